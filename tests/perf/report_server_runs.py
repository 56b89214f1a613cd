"""Benchmark: `python -m bench.report` against an MLflow server on PostgreSQL (goal: under 10 s at 10,000 runs on
2 cores).

    python -m bench.stack up --dir /tmp/bench-stack          # or any MLflow server on PostgreSQL
    export PGPASSWORD=$(cat /tmp/bench-stack/pgpassword)
    python tests/perf/report_server_runs.py --tracking-uri http://127.0.0.1:5000 \
        --store-uri postgresql://bench@127.0.0.1:5432/mlflow --artifacts-root /tmp/bench-stack/artifacts \
        --runs 1000 10000

For each --runs N: fills the experiment `perf-N` with N synthetic runs through MLflow's public API (MlflowClient:
create_run, one log_batch of params and metrics, set_terminated; the runs of tests/perf/report_1000_runs.py:
~50 params, ~20 tags, the final metrics; 2 % FAILED) from --procs processes, unless it already holds N runs;
then times `python -m bench.report --tracking-uri URL --experiment perf-N` (runs through MLflow's REST API, paged;
each table run's predictions looked up through the server) and the same with `--store-uri` and `--artifacts-root`
(runs read from the server's PostgreSQL with plain SQL, predictions looked up in its artifact folder), and prints
both with the load average. Like tests/perf/report_1000_runs.py's goal case, the runs have no predictions file.
"""
from __future__ import annotations

import argparse
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
from mlflow.tracking import MlflowClient  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import report_1000_runs as synthetic  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
COMBOS = [(t, m, meth) for t in ("trec", "finefoods") for m in ("minilm", "smollm2") for meth in synthetic.METHODS]


def _fill_part(args) -> int:
    uri, exp_id, start, stop = args
    client, rng = MlflowClient(uri), random.Random(start)
    for i in range(start, stop):
        task, model, method = COMBOS[i % len(COMBOS)]
        synthetic.log_run(client, exp_id, rng, method, task, model, i // len(COMBOS),
                          status="FAILED" if i % 50 == 7 else "FINISHED")
    return stop - start


def fill(uri: str, experiment: str, runs: int, procs: int) -> float | None:
    """Fill `experiment` up to `runs` runs; the seconds it took, None when it was full already."""
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
    have = len(client.search_runs([exp_id], max_results=1)) and _count(client, exp_id)
    if have >= runs:
        return None
    t0 = time.perf_counter()
    bounds = [have + (runs - have) * i // procs for i in range(procs + 1)]
    with Pool(procs) as pool:
        pool.map(_fill_part, [(uri, exp_id, a, b) for a, b in zip(bounds, bounds[1:])])
    return time.perf_counter() - t0


def _count(client, exp_id: str) -> int:
    n, token = 0, None
    while True:
        page = client.search_runs([exp_id], max_results=1000, page_token=token)
        n, token = n + len(page), page.token
        if not token:
            return n


def time_report(uri: str, store: str | None, artifacts: str | None, experiment: str, out: Path) -> tuple[float, float]:
    t0, cpu0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run([sys.executable, "-m", "bench.report", "--tracking-uri", uri, "--experiment", experiment,
                           "--out", str(out)] + (["--store-uri", store] if store else [])
                          + (["--artifacts-root", artifacts] if store and artifacts else []),
                          cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"bench.report failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return wall, (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tracking-uri", required=True, help="the MLflow server, http://host:port")
    p.add_argument("--store-uri", help="its backend store, postgresql://user@host:port/db (password: PGPASSWORD)")
    p.add_argument("--artifacts-root", help="its artifact folder on this host (the stack's DIR/artifacts)")
    p.add_argument("--runs", type=int, nargs="+", default=[1000, 10000])
    p.add_argument("--procs", type=int, default=4, help="processes that fill the store (default 4)")
    p.add_argument("--skip-http", action="store_true", help="time only --store-uri")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for n in a.runs:
            experiment = f"perf-{n}"
            took = fill(a.tracking_uri, experiment, n, a.procs)
            print(f"{experiment}: " + (f"filled {n} runs in {took:.0f} s through the REST API ({a.procs} processes)"
                                       if took is not None else f"already holds {n} runs"), flush=True)
            for store in ([] if a.skip_http else [None]) + ([a.store_uri] if a.store_uri else []):
                wall, cpu = time_report(a.tracking_uri, store, a.artifacts_root, experiment,
                                        Path(tmp) / f"{experiment}.md")
                how = (f"--store-uri {store}" + (f" --artifacts-root {a.artifacts_root}" if a.artifacts_root else "")
                       if store else "the REST API")
                goal = f"goal < 10 s: {'met' if wall < 10 else 'missed'}; " if n >= 10000 else ""
                print(f"report on {n} runs, read through {how}: {wall:.2f} s end to end, {cpu:.2f} s of CPU; "
                      f"{goal}load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)


if __name__ == "__main__":
    main()
