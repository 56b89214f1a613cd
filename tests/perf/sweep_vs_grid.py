"""Benchmark (a script, not a test): the LoRA grid against the Optuna sweep with pruning, on TREC-6 + MiniLM.

    python tests/perf/sweep_vs_grid.py [--steps 150] [--trials 10] [--grid-workers 2] [--out DIR]

Both run the shipped sweep files through `python -m bench.sweep` in fresh processes, with the same short budget
per trial and 1 torch thread per trial (on the shared, oversubscribed CPU a 2-thread trial took 784 s, against
~100 s for each of two 1-thread workers).
The grid's trials do not depend on each other, so it runs --grid-workers workers; the sweep runs one worker, so
that every trial sees all earlier ones. Running the script again with the same --out resumes both studies.
- grid:  sweeps/lora_rank_alpha_grid.yaml, all 24 rank x alpha pairs (r in 2..64, alpha = r x {0.5, 1, 2, 4}),
         lr 1e-3 (lora's default), no pruning;
- sweep: sweeps/lora_rank_alpha.yaml as shipped (TPE + MedianPruner with Optuna's defaults; r, alpha
         multiplier and log-uniform lr), --trials 10: before any pruning that is 10/24 = 42 % of the grid's runs.
Budget per trial (both): train.max_steps=STEPS, train.eval_every=STEPS/3 (the pruner's checkpoints),
task.max_train_samples=2000 (seeded subsample; STEPS=150 x batch 16 = 1.2 epochs), the full 500-question test
split for accuracy.

Prints the grid's best accuracy, the sweep's best, and the training steps each executed (pruned trials count the
steps they ran). Goal: the sweep within 0.5 points of the grid's best with at most 40 % of the grid's steps.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


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
    summary["wall_s"] = wall
    print(f"[{time.strftime('%H:%M:%S')}] {name}: done in {wall / 60:.1f} min", flush=True)
    return summary


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=150, help="training steps per trial (default 150)")
    p.add_argument("--trials", type=int, default=10, help="finished trials of the Optuna sweep (default 10)")
    p.add_argument("--grid-workers", type=int, default=2, help="worker processes for the grid (default 2)")
    p.add_argument("--out", default=str(ROOT / "outputs" / "perf" / time.strftime("sweep_vs_grid-%Y%m%d-%H%M%S")))
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    budget = [f"train.max_steps={a.steps}", f"train.eval_every={max(1, a.steps // 3)}",
              "task.max_train_samples=2000", "train.threads=1", f"tracking.uri=sqlite:///{out}/mlflow.db"]

    grid = run_sweep("grid", "sweeps/lora_rank_alpha_grid.yaml", ["--workers", str(a.grid_workers), *budget], out)
    sweep = run_sweep("sweep", "sweeps/lora_rank_alpha.yaml", ["--trials", str(a.trials), *budget], out)

    diff = 100 * (sweep["best_value"] - grid["best_value"])
    share = 100 * sweep["train_steps"] / grid["train_steps"]
    rows = [("", "trials (complete/pruned/failed)", "best eval/accuracy", "best settings", "training steps",
             "time in finished trials", "wall (this invocation)")]
    for name, s in (("grid", grid), ("sweep", sweep)):
        st = s["states"]
        rows.append((name, f"{st['COMPLETE']}/{st['PRUNED']}/{st['FAIL']}", f"{s['best_value']:.4f}",
                     " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                              for k, v in s["best_overrides"].items()),
                     str(s["train_steps"]), f"{s['trial_seconds'] / 60:.1f} min", f"{s['wall_s'] / 60:.1f} min"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print()
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    print(f"\nsweep best - grid best: {diff:+.1f} points (goal >= -0.5: {'met' if diff >= -0.5 else 'MISSED'}); "
          f"sweep steps: {share:.1f} % of the grid's (goal <= 40 %: {'met' if share <= 40 else 'MISSED'})")
    result = {"steps_per_trial": a.steps, "sweep_trials": a.trials, "grid_workers": a.grid_workers,
              "grid": grid, "sweep": sweep,
              "sweep_minus_grid_points": diff, "steps_share_pct": share}
    (out / "result.json").write_text(json.dumps(result, indent=2, default=str))
    print(f"figures: {out / 'result.json'}; MLflow store: sqlite:///{out}/mlflow.db")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
