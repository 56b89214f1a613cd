"""The report's *Plan against measurement* section: per group and method, what `python -m bench.plan` estimated
before the run (the plan/* metrics every run logs next to its measurements, bench/core/plan.py) against what the
run measured. Exact figures (trainable parameters, checkpoint bytes, weights, gradients, optimizer state) are shown
as equal or not; memory estimates as estimate, measured and their relative error: on CPU the memory training adds
(plan: gradients + optimizer + activations + overhead; measured: `mem/train_growth_bytes`), on CUDA the peak
(plan/train_bytes against `mem/peak_train_bytes`, allocated). Means over the row's seeds. Runs logged before the
plan existed have no plan/* metrics and are left out.
"""
from __future__ import annotations

import math

from bench.core import metrics as M
from bench.fmt import human_bytes

EXACT = ((M.PLAN_TRAINABLE, M.PARAMS_TRAINABLE), (M.PLAN_CKPT_BYTES, M.CKPT_BYTES),
         (M.PLAN_WEIGHTS_BYTES, M.MEM_WEIGHTS), (M.PLAN_GRAD_BYTES, M.MEM_GRAD),
         (M.PLAN_OPTIMIZER_BYTES, M.MEM_OPTIMIZER))
GROWTH = (M.PLAN_GRAD_BYTES, M.PLAN_OPTIMIZER_BYTES, M.PLAN_ACTIVATION_BYTES, M.PLAN_OVERHEAD_BYTES)


def _mean(runs, metric) -> float | None:
    values = [r.metrics[metric] for r in runs if metric in r.metrics]
    return math.fsum(values) / len(values) if len(values) == len(runs) else None


def _estimate(runs, cuda: bool) -> tuple[float | None, float | None]:
    """(estimate, measured): the CUDA peak, or the CPU growth."""
    if cuda:
        return _mean(runs, M.PLAN_TRAIN_BYTES), _mean(runs, M.MEM_PEAK_TRAIN)
    parts = [_mean(runs, m) for m in GROWTH]
    return (None if None in parts else math.fsum(parts)), _mean(runs, M.MEM_TRAIN_GROWTH)


def _exact(runs) -> str:
    differ = [plan.split("/", 1)[1] for plan, measured in EXACT
              if any(r.metrics.get(plan) != r.metrics.get(measured) for r in runs)]
    return "all equal" if not differ else "differ: " + ", ".join(differ)


def section(data) -> list[str]:
    """The section's lines; none when no table run logged plan/* metrics."""
    groups = [g for g in [*data.groups, *data.score_groups]
              if any(M.PLAN_TRAIN_BYTES in r.metrics for row in g.rows for r in row.runs)]
    if not groups:
        return []
    lines = ["## Plan against measurement", "",
             "What `python -m bench.plan` computes from the model's config alone (bench/core/plan.py) against what "
             "each run measured. *Exact*: trainable parameters, checkpoint bytes, weights, gradient and optimizer "
             "bytes equal the measured figures (AdaLoRA's checkpoint is planned before rank pruning, so it may "
             "differ). *Memory*: on CPU the estimated growth (gradients + optimizer + activations + overhead) "
             f"against `{M.MEM_TRAIN_GROWTH}`, on CUDA `{M.PLAN_TRAIN_BYTES}` against `{M.MEM_PEAK_TRAIN}` "
             "(allocated); error = estimate / measured − 1, means over the row's seeds.", ""]
    for g in groups:
        cuda = g.cuda
        lines += [f"**{g.title}** ({'CUDA: peak allocated' if cuda else 'CPU: train growth'})", "",
                  "| method | seeds | exact | memory estimate | measured | error |", "|---|---:|---|---:|---:|---:|"]
        for row in g.rows:
            runs = [r for r in row.runs if M.PLAN_TRAIN_BYTES in r.metrics]
            if not runs:
                continue
            est, measured = _estimate(runs, cuda)
            error = f"{100 * (est / measured - 1):+.0f} %" if est is not None and measured else "-"
            lines.append(f"| {row.label} | {len(runs)} | {_exact(runs)} | {human_bytes(est)} | "
                         f"{human_bytes(measured)} | {error} |")
        lines.append("")
    return lines
