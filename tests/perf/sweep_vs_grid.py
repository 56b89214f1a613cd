"""Benchmark (a script, not a test): the LoRA grid against the Optuna sweep with pruning, on TREC-6 + MiniLM,
under the protocol of bench/core/metrics.py: each selects its best trial on validation, and the two selected
configurations are compared on their one test evaluation.

    python tests/perf/sweep_vs_grid.py [--seeds 0,1,2] [--steps 150] [--trials 10] [--grid-workers 2] [--out DIR]

For each seed S (the run config's `seed=S`: model head init, data order, the training subsample) both shipped
sweep files run through `python -m bench.sweep` in fresh processes, each as its own study (grid-sS, sweep-sS),
with the same short budget per trial and 1 torch thread per trial (on the shared, oversubscribed CPU a 2-thread
trial took 784 s, against ~100 s for each of two 1-thread workers). The grid's trials do not depend on each
other, so it runs --grid-workers workers; the sweep runs one worker, so that every trial sees all earlier ones.
Running the script again with the same --out resumes every study.
- grid:  sweeps/lora_rank_alpha_grid.yaml, all 24 rank x alpha pairs (r in 2..64, alpha = r x {0.5, 1, 2, 4}),
         lr 1e-3 (lora's default), no pruning;
- sweep: sweeps/lora_rank_alpha.yaml as shipped (TPE + MedianPruner with Optuna's defaults; r, alpha
         multiplier and log-uniform lr), --trials 10: before any pruning that is 10/24 = 42 % of the grid's runs.
         The sampler's seed is the file's (0) for every S: the seeds vary the runs, not TPE's startup draws.
Budget per trial (both): train.max_steps=STEPS, train.eval_every=STEPS/3 (the periodic evaluations on the
validation split: the pruner's checkpoints), task.max_train_samples=2000 (a subsample, seeded by S, of the
training questions left after the task holds out its validation split: TREC-6 keeps 500 of its 5,452 training
questions for validation, the same for every seed); STEPS=150 x batch 16 = 1.2 epochs. Each COMPLETE trial's
run scores the 500-question test split once, at its end.

Selection uses val/accuracy only (each study's best trial, as its summary.json says); the figure compared is the
selected trial's test/accuracy (summary.json `best_test`), and the training steps each study executed (pruned
trials count the steps they ran). Prints a table per seed and the mean over seeds. Goal: the sweep's selected
test accuracy within 0.5 test points of the grid's (mean over seeds) with at most 40 % of its training steps.

--grid-limit N runs only N grid trials (passes --trials N to the grid): for smoke tests of this script only; the
comparison is meaningless then.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.core import metrics as M  # noqa: E402

SELECTED_ON = M.VAL_ACCURACY   # the shipped files' objective (checked against each summary.json)
COMPARED = M.TEST_ACCURACY


def run_sweep(name: str, sweep_file: str, args: list[str], out: Path) -> dict:
    log = out / f"{name}.log"
    cmd = [sys.executable, "-m", "bench.sweep", sweep_file, "--study", name, "--storage", str(out / "optuna.journal"),
           "--reports", str(out / "reports"), "--out-dir", str(out / "outputs"), *args]
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join(cmd[2:])}  (log: {log})", flush=True)
    started = time.perf_counter()
    with open(log, "a") as f:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                              env={**os.environ, "TQDM_DISABLE": "1", "COLUMNS": "200"})
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"{name} failed (exit {proc.returncode}); see {log}")
    summary = json.loads((out / "reports" / name / "summary.json").read_text())
    if summary["objective"] != SELECTED_ON:
        sys.exit(f"{name}: selected on {summary['objective']}, expected {SELECTED_ON}")
    summary["wall_s"] = wall
    summary["selected_test"] = (summary.get("best_test") or {}).get(COMPARED, math.nan)
    print(f"[{time.strftime('%H:%M:%S')}] {name}: done in {wall / 60:.1f} min", flush=True)
    return summary


def fmt(v: float, spec: str = ".4f") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def settings(s: dict) -> str:
    return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in (s["best_overrides"] or {}).items())


def print_table(rows: list[tuple]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def main() -> int:
    p = argparse.ArgumentParser(description="The LoRA grid against the Optuna sweep, selected on validation, "
                                            "compared on test (see the module docstring).")
    p.add_argument("--seeds", default="0,1,2", help="run seeds, comma-separated (default 0,1,2)")
    p.add_argument("--steps", type=int, default=150, help="training steps per trial (default 150)")
    p.add_argument("--trials", type=int, default=10, help="finished trials of the Optuna sweep (default 10)")
    p.add_argument("--grid-workers", type=int, default=2, help="worker processes for the grid (default 2)")
    p.add_argument("--grid-limit", type=int, help="run only N grid trials (--trials N): smoke tests of this "
                                                  "script only, the comparison is meaningless then")
    p.add_argument("--out", default=str(ROOT / "outputs" / "perf" / time.strftime("sweep_vs_grid-%Y%m%d-%H%M%S")))
    a = p.parse_args()
    try:
        seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    except ValueError:
        p.error(f"--seeds: comma-separated integers, got {a.seeds!r}")
    if not seeds:
        p.error("--seeds: at least one seed")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    budget = [f"train.max_steps={a.steps}", f"train.eval_every={max(1, a.steps // 3)}",
              "task.max_train_samples=2000", "train.threads=1", f"tracking.uri=sqlite:///{out}/mlflow.db"]
    grid_trials = ["--trials", str(a.grid_limit)] if a.grid_limit else []
    if a.grid_limit:
        print(f"--grid-limit {a.grid_limit}: a smoke test; the grid is not the full grid and the comparison "
              "means nothing", flush=True)

    per_seed = {}
    for seed in seeds:
        grid = run_sweep(f"grid-s{seed}", "sweeps/lora_rank_alpha_grid.yaml",
                         ["--workers", str(a.grid_workers), *grid_trials, *budget, f"seed={seed}"], out)
        sweep = run_sweep(f"sweep-s{seed}", "sweeps/lora_rank_alpha.yaml",
                          ["--trials", str(a.trials), *budget, f"seed={seed}"], out)
        per_seed[seed] = {"grid": grid, "sweep": sweep,
                          "test_diff_points": 100 * (sweep["selected_test"] - grid["selected_test"]),
                          "steps_share_pct": 100 * sweep["train_steps"] / grid["train_steps"]
                          if grid["train_steps"] else math.nan}

    print(f"\nEach study selects its best trial on {SELECTED_ON}; {COMPARED} is that trial's one test evaluation "
          "(scored once per run, not used for selection).\n")
    rows = [("seed", "", "trials (complete/pruned/failed)", f"selected on {SELECTED_ON}", f"its {COMPARED}",
             "selected settings", "training steps", "time in finished trials", "wall (this invocation)")]
    for seed, r in per_seed.items():
        for name in ("grid", "sweep"):
            s, st = r[name], r[name]["states"]
            rows.append((str(seed), name, f"{st['COMPLETE']}/{st['PRUNED']}/{st['FAIL']}", fmt(s["best_value"]),
                         fmt(s["selected_test"]), settings(s), str(s["train_steps"]),
                         f"{s['trial_seconds'] / 60:.1f} min", f"{s['wall_s'] / 60:.1f} min"))
        rows.append((str(seed), "sweep - grid", "", "", f"{fmt(r['test_diff_points'], '+.1f')} points", "",
                     f"{fmt(r['steps_share_pct'], '.1f')} %", "", ""))
    print_table(rows)

    def mean(values):
        values = [v for v in values if not math.isnan(v)]
        return statistics.fmean(values) if values else math.nan

    diff = mean([r["test_diff_points"] for r in per_seed.values()])
    grid_steps = sum(r["grid"]["train_steps"] for r in per_seed.values())
    share = 100 * sum(r["sweep"]["train_steps"] for r in per_seed.values()) / grid_steps if grid_steps else math.nan
    means = {name: {"selected_val": mean([r[name]["best_value"] or math.nan for r in per_seed.values()]),
                    "selected_test": mean([r[name]["selected_test"] for r in per_seed.values()])}
             for name in ("grid", "sweep")}
    print(f"\nmean over {len(seeds)} seed(s): grid selected {SELECTED_ON} {fmt(means['grid']['selected_val'])}, "
          f"its {COMPARED} {fmt(means['grid']['selected_test'])}; sweep selected {SELECTED_ON} "
          f"{fmt(means['sweep']['selected_val'])}, its {COMPARED} {fmt(means['sweep']['selected_test'])}")
    met_diff, met_share = diff >= -0.5, share <= 40
    print(f"sweep - grid, {COMPARED} of the selected configurations: {fmt(diff, '+.2f')} points (goal >= -0.5: "
          f"{'met' if met_diff else 'MISSED'}); sweep steps: {fmt(share, '.1f')} % of the grid's (goal <= 40 %: "
          f"{'met' if met_share else 'MISSED'})" + ("  [--grid-limit: smoke test, not a result]"
                                                   if a.grid_limit else ""))
    result = {"protocol": f"selection on {SELECTED_ON}; compared: the selected trial's {COMPARED}",
              "seeds": seeds, "steps_per_trial": a.steps, "sweep_trials": a.trials, "grid_workers": a.grid_workers,
              "grid_limit": a.grid_limit, "per_seed": {str(k): v for k, v in per_seed.items()}, "mean": means,
              "mean_test_diff_points": diff, "steps_share_pct": share,
              "goals_met": {"test_within_0.5_points": met_diff, "steps_at_most_40_pct": met_share}}
    (out / "result.json").write_text(json.dumps(result, indent=2, default=str))
    print(f"figures: {out / 'result.json'}; MLflow store: sqlite:///{out}/mlflow.db")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
