"""With the real pretrained MiniLM on real TREC-6, LoRA learns: accuracy far above the majority class."""
from __future__ import annotations

from collections import Counter

import pytest

from bench.orchestration.worker import run_job
from tests.conftest import compose


@pytest.mark.slow
def test_lora_on_real_minilm_trec_beats_majority_class_by_far(tmp_path):
    cfg = compose("method=lora", "train.max_steps=200", "train.eval_every=null", "train.isolate=false",
                  "forgetting=false", "deploy.latency=false", "deploy.merged_test=false",   # learning only
                  "device=cpu", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db")
    result = run_job(cfg, tmp_path / "job")
    from bench.core import tasks
    test_labels = tasks.load(cfg.task, 0).test["label"]
    majority = Counter(test_labels).most_common(1)[0][1] / len(test_labels)  # DESC: 138/500 = 0.276
    # measured: 0.870 (f1 0.72) after 200 steps, seed 0; the bound leaves room for other seeds and library versions
    assert result.metrics["test/accuracy"] > 0.65 > majority + 0.3, result.metrics
    assert result.metrics["test/f1_macro"] > 0.4
