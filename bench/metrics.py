"""Metric names: the public interface every run logs to MLflow (README: *What every run records in MLflow*).

One constant per name, so that grep leads from a name to where it is measured and where it is read. Each
metric's definition sits next to its measurement (bench/train.py, bench/measure.py, bench/methods, bench/run.py).

Protocol: selection (periodic evaluation, best step, pruning, sweep objectives) uses the validation split
(`val/*`); the test split is scored once, at the end of a run (`test/*`).
"""
from __future__ import annotations

# periodic evaluation on the validation split (with a step history)
VAL_ACCURACY = "val/accuracy"
VAL_F1_MACRO = "val/f1_macro"
VAL_LOSS = "val/loss"
VAL_BEST_ACCURACY = "val/best_accuracy"
VAL_BEST_STEP = "val/best_step"
VAL_PERIODIC = (VAL_ACCURACY, VAL_F1_MACRO, VAL_LOSS)   # reported at every periodic evaluation (pruning sees these)

# the one test evaluation of the final (selected) model
TEST_ACCURACY = "test/accuracy"
TEST_F1_MACRO = "test/f1_macro"
TEST_LOSS = "test/loss"
TEST = (TEST_ACCURACY, TEST_F1_MACRO, TEST_LOSS)

TRAIN_LOSS = "train/loss"
TRAIN_LR = "train/lr"
TRAIN_STEPS = "train/steps"
TRAIN_TOKENS = "train/tokens"
TRAIN_SELECTED_STEP = "train/selected_step"

MEM_PEAK_TRAIN = "mem/peak_train_bytes"
MEM_PEAK_EVAL = "mem/peak_eval_bytes"
MEM_PEAK_TRAIN_RESERVED = "mem/peak_train_reserved_bytes"
MEM_PEAK_EVAL_RESERVED = "mem/peak_eval_reserved_bytes"
MEM_TRAIN_GROWTH = "mem/train_growth_bytes"
MEM_WEIGHTS = "mem/weights_bytes"
MEM_GRAD = "mem/grad_bytes"
MEM_OPTIMIZER = "mem/optimizer_bytes"

TIME_TRAIN = "time/train_s"
TIME_EVAL = "time/eval_s"
TIME_TOTAL = "time/total_s"

CKPT_BYTES = "ckpt/bytes"

PARAMS_TRAINABLE = "params/trainable"
PARAMS_TOTAL = "params/total"
PARAMS_TRAINABLE_PCT = "params/trainable_pct"

THROUGHPUT_TOKENS = "throughput/train_tokens_per_s"
THROUGHPUT_SAMPLES = "throughput/train_samples_per_s"

# what a finished run reports (CUDA runs add the *_reserved_bytes figures)
RUN = (VAL_ACCURACY, VAL_F1_MACRO, VAL_LOSS, VAL_BEST_ACCURACY, VAL_BEST_STEP, *TEST, TRAIN_LOSS, TRAIN_STEPS,
       TRAIN_TOKENS, TRAIN_SELECTED_STEP, MEM_PEAK_TRAIN, MEM_PEAK_EVAL, MEM_TRAIN_GROWTH, MEM_WEIGHTS, MEM_GRAD,
       MEM_OPTIMIZER, TIME_TRAIN, TIME_EVAL, TIME_TOTAL, CKPT_BYTES, PARAMS_TRAINABLE, PARAMS_TOTAL,
       PARAMS_TRAINABLE_PCT, THROUGHPUT_TOKENS, THROUGHPUT_SAMPLES)

# costs a sweep may minimize (measured on the run itself, not on held-out data)
COSTS = (MEM_PEAK_TRAIN, MEM_PEAK_EVAL, MEM_TRAIN_GROWTH, MEM_WEIGHTS, MEM_GRAD, MEM_OPTIMIZER, TIME_TRAIN,
         TIME_EVAL, TIME_TOTAL, CKPT_BYTES, PARAMS_TRAINABLE, PARAMS_TRAINABLE_PCT)

# per-example predictions of the one test evaluation: a Parquet artifact of every finished run, columns
# `index` (the example's row in the task's whole test split), `label` and `prediction` (class ids)
PREDICTIONS_ARTIFACT = "predictions/test.parquet"
