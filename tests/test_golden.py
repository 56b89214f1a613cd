"""Golden run: a tiny fixed-seed full fine-tuning run (random-init tiny BERT, toy data, 20 steps) must reproduce its stored
loss curve and final metrics, so that a refactor cannot change the numbers silently.

Update GOLDEN only on purpose (a change that is meant to change the numbers), and say why in the commit:
    BENCH_GOLDEN_PRINT=1 python -m pytest -q tests/test_golden.py -s
prints the values to paste.
"""
from __future__ import annotations

import os

import pytest
from mlflow.tracking import MlflowClient

from bench.core import metrics as M
from bench.orchestration.worker import run_job
from tests.conftest import compose

OVERRIDES = ["method=full", "train.max_steps=20", "train.eval_every=10", "train.log_every=1",
             "train.batch_size=16", "train.lr=1e-2", "train.threads=1", "seed=0"]
# train/loss at steps 1..20, then the final metrics. Stored 2026-11-23: validation/test protocol (issue 8).
GOLDEN_LOSS = [1.096797, 1.099181, 1.10223, 1.160182, 1.127615, 1.093702, 1.138644, 1.076362, 1.14199, 1.103519,
               1.119555, 1.10757, 1.089231, 1.092831, 1.099246, 1.095412, 1.089013, 1.079742, 1.091947, 1.087038]
GOLDEN_METRICS = {"val/accuracy": 0.315789, "val/loss": 1.082867, "val/best_accuracy": 0.368421, "val/best_step": 10,
                  "test/accuracy": 0.333333, "test/f1_macro": 0.166667, "test/loss": 1.081957,
                  "params/trainable": 999171, "train/tokens": 3170}
LOSS_TOL = 2e-4   # float32 kernels differ slightly between CPUs and thread counts; a real change moves more


def test_golden_tiny_full_finetune_run(tiny_overrides, tmp_path):
    cfg = compose(*tiny_overrides, *OVERRIDES)
    result = run_job(cfg, tmp_path / "job")
    history = MlflowClient(tracking_uri=cfg.tracking.uri).get_metric_history(result.run_id, M.TRAIN_LOSS)
    by_step = {m.step: m.value for m in history}   # the final summary repeats step 20's value
    losses = [by_step[step] for step in sorted(by_step)]
    final = {k: result.metrics[k] for k in (M.VAL_ACCURACY, M.VAL_LOSS, M.VAL_BEST_ACCURACY, M.VAL_BEST_STEP,
                                            M.TEST_ACCURACY, M.TEST_F1_MACRO, M.TEST_LOSS, M.PARAMS_TRAINABLE,
                                            M.TRAIN_TOKENS)}
    if os.environ.get("BENCH_GOLDEN_PRINT"):
        print(f"\nGOLDEN_LOSS = {[round(v, 6) for v in losses]}\nGOLDEN_METRICS = "
              f"{ {k: round(v, 6) for k, v in final.items()} }")
    assert len(losses) == 20
    assert losses == pytest.approx(GOLDEN_LOSS, abs=LOSS_TOL)
    for key, value in GOLDEN_METRICS.items():
        assert final[key] == pytest.approx(value, abs=LOSS_TOL), key
