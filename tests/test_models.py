"""Backbones load from their offline sources as sequence classifiers."""
from __future__ import annotations

import pytest
import torch

from bench.core import models
from bench.orchestration.worker import run_job
from tests.conftest import compose


def test_minilm_loads_pretrained_from_its_package():
    cfg = compose("model=minilm")
    model, tok = models.load(cfg.model, cfg.quant, 6, torch.device("cpu"))
    assert type(model).__name__ == "BertForSequenceClassification"
    assert model.config.num_hidden_layers == 6 and model.config.hidden_size == 384
    # pretrained, not random: the word embedding of "paris" is closer to "france" than to "banana"
    emb = model.bert.embeddings.word_embeddings.weight
    ids = tok.convert_tokens_to_ids(["paris", "france", "banana"])
    cos = torch.nn.functional.cosine_similarity
    assert cos(emb[ids[0]], emb[ids[1]], dim=0) > cos(emb[ids[0]], emb[ids[2]], dim=0) + 0.1


@pytest.mark.slow
def test_smollm2_gguf_trains_as_a_classifier_with_lora(tmp_path):
    cfg = compose("model=smollm2", "method=lora", "train.max_steps=4", "train.batch_size=8", "train.eval_every=null",
                  "task.max_train_samples=64", "task.max_eval_samples=16", "task.max_test_samples=16", "train.isolate=false", "device=cpu",
                  "forgetting=false", "deploy.latency=false", "deploy.merged_test=false",   # loading and counts only
                  f"tracking.uri=sqlite:///{tmp_path}/mlflow.db")
    result = run_job(cfg, tmp_path / "job")
    assert result.status == "FINISHED"
    # LoRA r=8 on q_proj (576->576) and v_proj (576->192) in 30 layers, plus the 576x6 score head (no bias)
    assert result.metrics["params/trainable"] == 30 * 8 * ((576 + 576) + (576 + 192)) + 576 * 6
    assert result.metrics["params/total"] > 134e6
