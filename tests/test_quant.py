"""QLoRA (bitsandbytes NF4 + LoRA) trains on CPU; the new head stays unquantized."""
from __future__ import annotations

import pytest
import torch

from bench.run import run
from tests.conftest import compose


@pytest.mark.slow
@pytest.mark.parametrize("quant,layer", [("nf4", "Linear4bit"), ("int8", "Linear8bitLt")])
def test_quantized_lora_trains_on_cpu_minilm(quant, layer, tmp_path):
    pytest.importorskip("bitsandbytes")
    seen = {}

    def check(step, metrics):  # look at the model the trainer is using
        seen.setdefault("acc", []).append(metrics["eval/accuracy"])

    cfg = compose("method=lora", f"quant={quant}", "train.max_steps=40", "train.eval_every=20",
                  "task.max_train_samples=640", "task.max_eval_samples=100", "train.isolate=false", "device=cpu",
                  f"tracking.uri=sqlite:///{tmp_path}/mlflow.db")
    result = run(cfg, tmp_path / "job", on_eval=check)
    assert result.status == "FINISHED"
    assert result.metrics["train/loss"] < 1.79  # below ln(6): it learned something in 40 steps
    from peft import PeftModel  # reload the adapter onto a freshly quantized base
    from bench import models
    base, _ = models.load(cfg.model, cfg.quant, 6, torch.device("cpu"))
    layers = {type(m).__name__ for m in base.modules()}
    assert layer in layers
    assert type(base.classifier).__name__ == "Linear"  # the head is kept out of quantization
    model = PeftModel.from_pretrained(base, tmp_path / "job" / "ckpt")
    assert any(type(m).__name__ == layer for m in model.modules())
