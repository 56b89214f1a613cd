"""The README's main command, shortened with overrides, end to end: real MiniLM, real TREC, real MLflow store."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from bench import metrics as M
from bench.run import run
from tests.conftest import ROOT, compose

METRICS = list(M.RUN)   # every metric a finished CPU run reports (bench/metrics.py)
TAGS = ["method", "model", "task", "quant", "seed", "status", "git_commit", "version.torch",
        "version.transformers", "version.peft", "version.bitsandbytes", "device_name", "torch_threads"]
SHORT = ["train.max_steps=12", "train.eval_every=6", "train.log_every=3", "task.max_train_samples=256",
         "task.max_eval_samples=64", "task.max_test_samples=64"]


def runs(uri: str):
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("peft-bench")
    return client, client.search_runs([exp.experiment_id]) if exp else []


@pytest.mark.slow
def test_main_command_multirun_with_a_broken_job(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cmd = [sys.executable, "-m", "bench", "method=lora,adapter,broken,prefix", *SHORT,
           f"tracking.uri={uri}", f"hydra.searchpath=[file://{ROOT}/tests/conf]",
           f"hydra.sweep.dir={tmp_path}/multirun", "-m"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "COLUMNS": "200"})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out  # non-zero because one job failed, after all jobs ran
    client, found = runs(uri)
    by_method = {r.data.tags["method"]: r for r in found}
    assert sorted(by_method) == ["adapter", "broken", "lora", "prefix"], out
    broken = by_method.pop("broken")
    assert broken.info.status == "FAILED"
    assert "dropout" in broken.data.tags["error"].lower()
    for method, r in by_method.items():
        assert r.info.status == "FINISHED", (method, r.data.tags.get("error"), out)
        assert r.info.run_name == f"{method}-trec-minilm-s0"
        missing = [m for m in METRICS if m not in r.data.metrics]
        assert not missing, (method, missing)
        assert not [t for t in TAGS if t not in r.data.tags], method
        assert r.data.params["method.name"] == method and r.data.params["train.max_steps"] == "12"
        assert 0 < r.data.metrics["params/trainable_pct"] < 100
        assert r.data.metrics["mem/peak_train_bytes"] > 50e6  # a whole process holding MiniLM
        artifacts = {a.path for a in client.list_artifacts(r.info.run_id)}
        assert {"config.yaml", "result.json", "predictions"} <= artifacts
        result = json.loads(Path(client.download_artifacts(r.info.run_id, "result.json", str(tmp_path))).read_text())
        assert result["metrics"]["test/accuracy"] == r.data.metrics["test/accuracy"]
        predictions = pd.read_parquet(client.download_artifacts(r.info.run_id, M.PREDICTIONS_ARTIFACT, str(tmp_path)))
        assert len(predictions) == 64 and list(predictions.columns) == ["index", "label", "prediction"]
        assert (predictions.label == predictions.prediction).mean() == r.data.metrics["test/accuracy"]
    # the summary table lists every job, the failed one with its reason
    for name in ("lora-trec-minilm-s0", "adapter-trec-minilm-s0", "prefix-trec-minilm-s0", "broken-trec-minilm-s0"):
        assert name in out
    assert "FAILED" in out


def test_in_process_run_logs_everything_and_failure_is_marked(tiny_overrides, tmp_path):
    cfg = compose("method=lora", *tiny_overrides)
    result = run(cfg, tmp_path / "job")
    assert result.status == "FINISHED"
    assert json.loads((tmp_path / "job" / "result.json").read_text())["status"] == "FINISHED"
    client, found = runs(cfg.tracking.uri)
    assert [r.info.status for r in found] == ["FINISHED"]
    assert not [m for m in METRICS if m not in found[0].data.metrics]
    history = client.get_metric_history(found[0].info.run_id, "train/loss")
    assert len(history) >= 6  # every log_every steps, not just the final value
    val = client.get_metric_history(found[0].info.run_id, "val/accuracy")
    assert sorted(m.step for m in val) == [30, 60]  # each periodic evaluation on validation
    assert [m.step for m in client.get_metric_history(found[0].info.run_id, "test/accuracy")] == [60]  # once

    bad = compose("method=lora", *tiny_overrides, "train.lr=1e12", "train.max_grad_norm=1e12")
    with pytest.raises(FloatingPointError, match=r"loss is (nan|inf) at step \d+"):
        run(bad, tmp_path / "bad")
    client, found = runs(cfg.tracking.uri)
    failed = [r for r in found if r.info.status == "FAILED"]
    assert len(failed) == 1 and "at step" in failed[0].data.tags["error"]
