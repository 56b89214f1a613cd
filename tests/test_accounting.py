"""Exact accounting: time/train_s holds no store I/O, the memory components are what their names say, and the
train-growth figure separates full fine-tuning from LoRA on CPU (where the process total cannot)."""
from __future__ import annotations

import time

import pytest
import torch

from bench.core import metrics as M
from bench.core.measure import grad_bytes, optimizer_bytes, weights_bytes
from bench.orchestration.worker import run_job
from bench.tracking import Tracker
from tests.conftest import compose


class Clock:
    """time.perf_counter() plus a jump of JUMP seconds per slow store write: where the harness writes to the store
    decides which of its clocks see the jumps, without sleeping and whatever the machine's load."""
    JUMP = 1000.0

    def __init__(self):
        self.real, self.offset = time.perf_counter, 0.0

    def __call__(self) -> float:
        return self.real() + self.offset


class SlowStoreTracker(Tracker):
    """A real MLflow tracker whose every metric write takes Clock.JUMP seconds on the fake clock."""

    def __init__(self, uri, experiment, clock):
        super().__init__(uri, experiment)
        self.clock, self.calls = clock, 0

    def log_points(self, run_id, points):
        self.calls += 1
        self.clock.offset += Clock.JUMP
        super().log_points(run_id, points)


def test_train_time_excludes_metric_logging_tiny_random_bert(tiny_overrides, tmp_path, monkeypatch):
    """Store writes that take 1,000 s each (on a fake clock) leave time/train_s at the training's own seconds and
    land in time/total_s. With log_every=1, the old placement (a store write inside the timed loop every log_every
    steps) would add 1,000 s to time/train_s per write."""
    clock = Clock()
    monkeypatch.setattr(time, "perf_counter", clock)   # every clock of the harness reads time.perf_counter()
    cfg = compose(*tiny_overrides, "method=lora", "train.max_steps=40", "train.log_every=1", "train.eval_every=20")
    tracker = SlowStoreTracker(cfg.tracking.uri, cfg.tracking.experiment, clock)
    metrics = run_job(cfg, tmp_path / "run", tracker=tracker).metrics
    # one write per periodic evaluation (steps 20, 40) from fit, plus run.py's two writes outside the timed
    # segment (parameter counts before training, results after)
    assert tracker.calls == 2 + 2, tracker.calls
    print(f"time/train_s {metrics[M.TIME_TRAIN]:.3f} s, time/total_s {metrics[M.TIME_TOTAL]:.3f} s; "
          f"{tracker.calls} slow store writes, {clock.offset:.0f} s on the fake clock")
    assert metrics[M.TIME_TRAIN] < Clock.JUMP                  # no write inside the training clock
    assert metrics[M.TIME_TOTAL] >= 2 * Clock.JUMP             # fit's two writes did pass through the clocks


def test_memory_components_are_exact_on_a_known_module():
    torch.manual_seed(0)
    emb = torch.nn.Embedding(10, 4)
    model = torch.nn.Sequential(emb, torch.nn.Linear(4, 10, bias=True), torch.nn.BatchNorm1d(10))
    model[1].weight = emb.weight  # tied: one storage, counted once
    model[2].requires_grad_(False)
    # stored: 40 (tied weight) + 10 (bias) + 20 (BN weight, bias) floats; BN buffers: 2 x 10 floats + 1 int64
    assert weights_bytes(model) == 4 * (40 + 10 + 20) + 4 * 20 + 8
    assert grad_bytes(model) == 4 * (40 + 10)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    model(torch.tensor([1, 2, 3])).sum().backward()
    opt.step()
    # AdamW: exp_avg and exp_avg_sq per trainable element, and one float32 step counter per parameter tensor
    assert optimizer_bytes(opt) == 2 * 4 * (40 + 10) + 4 * 2


@pytest.mark.slow
def test_full_minus_lora_memory_on_minilm(tmp_path):
    """On MiniLM: full minus lora (optimizer + grad bytes) is 3 x 4 bytes per extra trainable parameter (AdamW's
    two moments and the gradient, float32) plus AdamW's 4-byte step counter per extra parameter tensor; and
    training growth of full exceeds lora's by at least 80 % of that, though the process totals are close."""
    short = ["train.max_steps=3", "train.eval_every=null", "task.max_train_samples=96", "task.max_eval_samples=32",
             "task.max_test_samples=32", "train.isolate=false", "train.threads=1", "device=cpu",
             f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"]
    got = {}
    for method in ("lora", "full"):
        cfg = compose(f"method={method}", *short)
        got[method] = run_job(cfg, tmp_path / method).metrics
    full, lora = got["full"], got["lora"]
    extra_params = full[M.PARAMS_TRAINABLE] - lora[M.PARAMS_TRAINABLE]
    # trainable tensors: MiniLM has 6 layers x 16 + 5 embedding + 2 pooler + 2 head = 105 (full); LoRA: 6 x 2 x 2
    # (A and B on query and value) + the head's 2 = 26 (peft's frozen copy of the head is not trainable)
    extra_tensors = 105 - 26
    moments_and_grads = (full[M.MEM_OPTIMIZER] + full[M.MEM_GRAD]) - (lora[M.MEM_OPTIMIZER] + lora[M.MEM_GRAD])
    assert moments_and_grads == 3 * 4 * extra_params + 4 * extra_tensors
    growth_gap = full[M.MEM_TRAIN_GROWTH] - lora[M.MEM_TRAIN_GROWTH]
    assert growth_gap >= 0.8 * 3 * 4 * extra_params, (full[M.MEM_TRAIN_GROWTH], lora[M.MEM_TRAIN_GROWTH])
    assert full[M.MEM_WEIGHTS] < lora[M.MEM_WEIGHTS]  # LoRA adds A, B and peft's copy of the head
    print(f"full - lora: optimizer+grad {moments_and_grads / 2**20:.1f} MiB, growth {growth_gap / 2**20:.1f} MiB, "
          f"peak {(full[M.MEM_PEAK_TRAIN] - lora[M.MEM_PEAK_TRAIN]) / 2**20:.1f} MiB")
