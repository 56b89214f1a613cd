"""Benchmark (a script, not a test): how much wall time a job spends outside its own `time/total_s`.

    python tests/perf/overhead.py [--repo PATH] [--jobs 10] [--trials 10] [--single] [--out DIR]

Runs, in a fresh temporary folder with its own MLflow store, against the code in --repo (default: this checkout;
give a clone of another commit to compare, in the same session, on the same idle machine):
- a multirun of N one-step jobs: `python -m bench seed=0,...,N-1 -m` with train.max_steps=1 and 16 training /
  16 validation / 16 test questions (MiniLM + TREC-6, LoRA: the default job, shrunk);
- a sweep of N one-step trials: `python -m bench.sweep sweeps/lora_rank_alpha.yaml --trials N` with the same
  overrides (one sweep worker);
- with --single, one default-settings command: `python -m bench train.max_steps=1 ...` alone.

Wall time per job: the time from the previous job's end (the command's start for the first) to this job's end,
read from the MLflow runs' end times, so it includes everything the command does for that job (its share of the
pre-check, the store queries, the worker's start, logging). Overhead = wall time - the run's own time/total_s.
Prints min / median / max of each, and writes overhead.json to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHORT = ["train.max_steps=1", "train.eval_every=null", "task.max_train_samples=16", "task.max_eval_samples=16",
         "task.max_test_samples=16", "device=cpu"]


def command(repo: Path, args: list[str], cwd: Path) -> float:
    """Run `python <args>` with the code of `repo`; return its start time (epoch seconds)."""
    env = {**os.environ, "PYTHONPATH": str(repo)}
    started = time.time()
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args[:3])} ... failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n"
                         f"{proc.stderr[-2000:]}")
    return started


def per_job(uri: str, started: float, child_runs_only: bool) -> list[dict]:
    """Each finished run's wall time (from the previous run's end) and its own time/total_s, in end order."""
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("peft-bench")
    runs = [r for r in client.search_runs([exp.experiment_id], max_results=1000)
            if r.info.status == "FINISHED" and (not child_runs_only or "trial" in r.data.tags)]
    runs.sort(key=lambda r: r.info.end_time)
    out, previous = [], started
    for r in runs:
        end = r.info.end_time / 1000
        wall, total = end - previous, r.data.metrics["time/total_s"]
        out.append({"run": r.info.run_name, "wall_s": wall, "total_s": total, "overhead_s": wall - total})
        previous = end
    return out


def stats(rows: list[dict], key: str) -> str:
    values = [r[key] for r in rows]
    return f"{min(values):6.2f} {statistics.median(values):6.2f} {max(values):6.2f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[2])
    p.add_argument("--jobs", type=int, default=10)
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--single", action="store_true", help="also time one default-settings command")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    repo = a.repo.resolve()
    results = {"repo": str(repo), "loadavg_before": os.getloadavg()}
    with tempfile.TemporaryDirectory() as d:
        cwd = Path(d)
        uri = f"sqlite:///{cwd}/multirun.db"
        seeds = ",".join(map(str, range(a.jobs)))
        started = command(repo, ["-m", "bench", f"seed={seeds}", *SHORT, f"tracking.uri={uri}", "-m"], cwd)
        results["multirun"] = per_job(uri, started, child_runs_only=False)
        if a.trials:
            uri = f"sqlite:///{cwd}/sweep.db"
            sweep = repo / "sweeps" / "lora_rank_alpha.yaml"
            started = command(repo, ["-m", "bench.sweep", str(sweep), "--trials", str(a.trials), "--storage",
                                     f"sqlite:///{cwd}/optuna.db", *SHORT, f"tracking.uri={uri}"], cwd)
            results["sweep"] = per_job(uri, started, child_runs_only=True)
        if a.single:
            uri = f"sqlite:///{cwd}/single.db"
            started = command(repo, ["-m", "bench", *SHORT[:-1], f"tracking.uri={uri}"], cwd)
            results["single"] = per_job(uri, started, child_runs_only=False)
    results["loadavg_after"] = os.getloadavg()
    print(f"repo {repo}; load average before {results['loadavg_before']}, after {results['loadavg_after']}")
    print(f"{'':10} {'n':>3}  {'wall s (min med max)':>21}  {'time/total_s':>20}  {'overhead s':>20}")
    for name in ("multirun", "sweep", "single"):
        rows = results.get(name)
        if rows:
            print(f"{name:10} {len(rows):3}  {stats(rows, 'wall_s')}  {stats(rows, 'total_s')}  "
                  f"{stats(rows, 'overhead_s')}")
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "overhead.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
