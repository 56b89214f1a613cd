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


class SleepyTracker(Tracker):
    """A real MLflow tracker whose metric writes take 0.5 s each, like a slow or locked store."""
    calls = 0

    def log_points(self, run_id, points):
        SleepyTracker.calls += 1
        time.sleep(0.5)
        super().log_points(run_id, points)


def _train_s(cfg, out, tracker=None) -> float:
    return run_job(cfg, out, tracker=tracker).metrics[M.TIME_TRAIN]


@pytest.mark.slow  # 10 short runs: about 40 s
def test_train_time_excludes_metric_logging_tiny_random_bert(tiny_overrides, tmp_path):
    """A logger that sleeps 0.5 s per call leaves time/train_s within 10 % of the same run with a normal one.
    With log_every=1 the old placement (a store write inside the timed loop every log_every steps) would add
    120 s to a ~1.5 s training time."""
    # one evaluation mid-run and one at the end: a 0.5 s pause leaves caches and clocks cold for a few steps,
    # a real cost of pausing (a few %), not store I/O inside the timer; few pauses keep it out of the comparison
    overrides = [*tiny_overrides, "method=lora", "train.max_steps=240", "train.log_every=1", "train.eval_every=120",
                 "train.threads=1"]
    cfg = compose(*overrides)
    sleepy = SleepyTracker(cfg.tracking.uri, cfg.tracking.experiment)
    normal, slow = [], []
    for i in range(5):  # interleaved; the best of each: other load on the machine only ever adds time
        normal.append(_train_s(cfg, tmp_path / f"normal{i}"))
        slow.append(_train_s(cfg, tmp_path / f"slow{i}", tracker=sleepy))
    # per run: one write per periodic evaluation (steps 120, 240) from fit, plus run.py's two writes outside the
    # timed segment (parameter counts before training, results after)
    assert SleepyTracker.calls == 5 * (2 + 2), SleepyTracker.calls
    print(f"time/train_s, best of 5: normal logger {min(normal):.3f} s, logger sleeping 0.5 s per call "
          f"{min(slow):.3f} s ({SleepyTracker.calls} calls, {0.5 * SleepyTracker.calls:.1f} s asleep)")
    assert min(slow) <= 1.1 * min(normal), (normal, slow)


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
