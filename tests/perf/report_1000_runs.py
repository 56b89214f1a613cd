"""Benchmark: time `python -m bench.report` on 1,000 runs (goal: under 5 s on 2 CPU cores).

    python tests/perf/report_1000_runs.py [--runs 1000] [--keep DIR] [--predictions N]

The runs are synthetic but stored for real: a scratch SQLite MLflow store filled through MlflowClient with what
the harness logs per run (run name, the filter tags and provenance tags, ~50 params, the final metrics of
bench.core.metrics.RUN), spread over 2 tasks × 2 models × 15 methods × seeds, with 2 % FAILED runs and one 40-trial
sweep. By default no run has a predictions artifact (the goal's case), so this times the report's one file
check per table run and its "paired test unavailable" path; `--predictions N` gives every FINISHED table run a
predictions artifact of N test examples, which times reading them and the paired tests (not part of the goal).
Prints the time to fill the store (not part of the goal), the end-to-end command time (wall and CPU), and the
in-process build time without imports.
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
from pathlib import Path

import numpy as np
import pandas as pd

from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from tqdm import tqdm

from bench.core import metrics as M

ROOT = Path(__file__).resolve().parents[2]
METHODS = ["full", "head", "lora", "dora", "rslora", "loha", "lokr", "vera", "ia3", "adapter",
           "adapter_pfeiffer", "prefix", "ptuning_v2", "prompt", "ptuning"]
TAGS = {"git_commit": "0123456789abcdef0123456789abcdef01234567", "python": "3.11.7", "device": "cpu",
        "device_name": "AMD EPYC", "cpu": "AMD EPYC", "cpu_count": "2", "torch_threads": "2",
        "platform": "Linux-x86_64", "mem_source": "rss_phase_peak", "version.torch": "2.13.0+cpu",
        "version.transformers": "5.23.0", "version.peft": "0.21.2", "version.mlflow": "3.17.2"}


def params_for(method: str, task: str, model: str, seed: int, extra: dict | None = None) -> dict[str, str]:
    p = {"seed": str(seed), "method.name": method, "method.kind": "peft", "method.lr": "0.001",
         "model.name": model, "task.name": task, "quant.name": "none", "tracking.uri": "sqlite:///mlflow.db",
         "tracking.experiment": "peft-bench", "device": "auto", "train.lr": "0.001", "train.max_steps": "600",
         "train.batch_size": "16", "train.isolate": "True", "train.threads": "None"}
    p.update({f"train.knob{i}": str(i) for i in range(35)})  # the rest of a resolved config's ~50 entries
    p.update(extra or {})
    return p


def log_predictions(client, rid: str, accuracy: float, examples: int, seed: int) -> None:
    """A predictions artifact: the same `examples` questions for every run, each right with p = accuracy."""
    gen = np.random.default_rng(seed)
    label = np.arange(examples) % 6
    right = gen.random(examples) < accuracy
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / Path(M.PREDICTIONS_ARTIFACT).name
        pd.DataFrame({"index": np.arange(examples), "label": label,
                      "prediction": np.where(right, label, (label + 1) % 6)}).to_parquet(path, index=False)
        client.log_artifact(rid, str(path), artifact_path=str(Path(M.PREDICTIONS_ARTIFACT).parent))


def log_run(client, exp_id, rng, method, task, model, seed, status="FINISHED", tags=None, extra_params=None,
            examples=0):
    base = 0.6 + 0.3 * (METHODS.index(method) % 5) / 5 + (0.05 if task == "trec" else 0.0)
    name = f"{method}-{task}-{model}-s{seed}"
    all_tags = {"method": method, "model": model, "task": task, "quant": "none", "seed": str(seed),
                "status": status, **TAGS, **(tags or {})}
    run = client.create_run(exp_id, run_name=name, tags=all_tags)
    rid, ts = run.info.run_id, int(time.time() * 1000)
    params = [Param(k, v) for k, v in params_for(method, task, model, seed, extra_params).items()]
    metrics = {}
    if status == "FINISHED":
        i = METHODS.index(method)
        growth = 1e8 + 3e7 * i + rng.gauss(0, 1e6)
        metrics = {M.VAL_ACCURACY: base + 0.005, M.VAL_F1_MACRO: base - 0.04, M.VAL_LOSS: 0.5,
                   M.VAL_BEST_ACCURACY: base + 0.01, M.VAL_BEST_STEP: 500,
                   M.TEST_ACCURACY: min(1.0, base + rng.gauss(0, 0.01)), M.TEST_F1_MACRO: base - 0.05,
                   M.TEST_LOSS: 0.5, M.TRAIN_LOSS: 0.4, M.TRAIN_STEPS: 600, M.TRAIN_TOKENS: 1e5,
                   M.TRAIN_SELECTED_STEP: 500, M.MEM_PEAK_TRAIN: 9e8 + growth, M.MEM_PEAK_EVAL: 9e8,
                   M.MEM_TRAIN_GROWTH: growth, M.MEM_WEIGHTS: 9e7, M.MEM_GRAD: 1e6 * (1 + i),
                   M.MEM_OPTIMIZER: 2e6 * (1 + i), M.TIME_TRAIN: 60 + 3 * i + rng.gauss(0, 1), M.TIME_EVAL: 5,
                   M.TIME_TOTAL: 70, M.CKPT_BYTES: 3e5 * (1 + i), M.PARAMS_TRAINABLE: 1e5, M.PARAMS_TOTAL: 2.2e7,
                   M.PARAMS_TRAINABLE_PCT: 0.5, M.THROUGHPUT_TOKENS: 2000, M.THROUGHPUT_SAMPLES: 160,
                   M.TRAIN_LR: 0}
    client.log_batch(rid, metrics=[Metric(k, float(v), ts, 600) for k, v in metrics.items()], params=params[:100])
    if examples and status == "FINISHED" and not tags:
        log_predictions(client, rid, metrics[M.TEST_ACCURACY], examples, rng.randrange(2**31))
    if status != "FINISHED":
        client.set_tag(rid, "error", "RuntimeError: synthetic failure for the benchmark")
    client.set_terminated(rid, status=status)


def fill(uri: str, n_runs: int, examples: int = 0) -> None:
    client = MlflowClient(tracking_uri=uri)
    artifacts = Path(uri.removeprefix("sqlite:///")).parent / "artifacts"   # beside the store, not in the cwd
    exp_id = client.create_experiment("peft-bench", artifact_location=artifacts.as_uri())
    rng = random.Random(0)
    combos = [(t, m, meth) for t in ("trec", "finefoods") for m in ("minilm", "smollm2") for meth in METHODS]
    sweep_trials = 40
    table_runs = n_runs - sweep_trials - 1
    with tqdm(total=n_runs, desc="filling the store", unit="run") as bar:
        for i in range(table_runs):
            task, model, method = combos[i % len(combos)]
            seed = i // len(combos)
            log_run(client, exp_id, rng, method, task, model, seed, status="FAILED" if i % 50 == 7 else "FINISHED",
                    examples=examples)
            bar.update()
        parent = client.create_run(exp_id, run_name="sweep-lora_rank_alpha", tags={
            "study": "lora_rank_alpha", "objective": M.VAL_ACCURACY, "direction": "maximize"})
        client.set_terminated(parent.info.run_id, "FINISHED")
        bar.update()
        for t in range(sweep_trials):
            r, mult = [2, 4, 8, 16, 32, 64][t % 6], [0.5, 1, 2, 4][t % 4]
            log_run(client, exp_id, rng, "lora", "trec", "minilm", 0,
                    status="KILLED" if t % 7 == 3 else "FINISHED",
                    tags={"study": "lora_rank_alpha", "trial": str(t), "mlflow.parentRunId": parent.info.run_id},
                    extra_params={"method.r": str(r), "method.alpha": f"{r * mult:g}"})
            bar.update()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=1000)
    p.add_argument("--keep", help="folder for the store and report, kept; a store already there is reused "
                                  "(default: a temporary folder, removed)")
    p.add_argument("--predictions", type=int, default=0, metavar="N",
                   help="give every FINISHED table run a predictions artifact of N test examples (default: none)")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(a.keep or tmp)
        work.mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{work}/mlflow.db"
        if (work / "mlflow.db").exists():
            print(f"reusing the store in {work} (delete it to fill a new one)")
        else:
            t0 = time.perf_counter()
            fill(uri, a.runs, a.predictions)
            print(f"filled {a.runs} runs in {time.perf_counter() - t0:.1f} s (setup, not timed against the goal)")

        t0, cpu0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
        proc = subprocess.run([sys.executable, "-m", "bench.report", "--tracking-uri", uri, "--out",
                               str(work / "reports" / "bench.md")], cwd=ROOT, capture_output=True, text=True)
        command_s = time.perf_counter() - t0
        cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        command_cpu_s = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
        if proc.returncode != 0:
            raise SystemExit(f"bench.report failed:\n{proc.stdout}{proc.stderr}")

        # imports paid here, outside the in-process timing
        from bench.report import build_report, data, markdown, plots, runs, sweeps  # noqa: F401
        t0 = time.perf_counter()
        out, pngs = build_report(uri, ["peft-bench"], work / "reports" / "again.md")
        build_s = time.perf_counter() - t0
        same = out.read_text().replace("again/", "bench/") == (work / "reports" / "bench.md").read_text()
        load = os.getloadavg()[0]
        print(f"report on {a.runs} runs: `python -m bench.report` {command_s:.2f} s end to end "
              f"(goal < 5 s: {'met' if command_s < 5 else 'MISSED'}), {command_cpu_s:.2f} s of CPU; "
              f"build_report() after imports {build_s:.2f} s; {len(pngs)} plots; second report identical: {same}; "
              f"load average {load:.1f} on {os.cpu_count()} cores (other work on the machine stretches wall time)")


if __name__ == "__main__":
    main()
