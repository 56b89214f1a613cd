"""A job, in the process that owns the command: resume, skip, then one fresh worker process per run.

`execute(cfg, out_dir)` is what Hydra calls for every job of `python -m bench` (sweeps call `run_in_worker` per
trial). Each job:
- closes runs of its experiment that dead processes left RUNNING (bench/orchestration/resume.py),
- is skipped when a FINISHED run with the same run key exists (`--rerun` / `rerun=true` runs it anyway),
- runs in a fresh worker process (`train.isolate=true`, the default), so that peak-memory figures and crashes
  stay with their own run. SIGINT/SIGTERM/SIGUSR2 are forwarded to the worker, which ends its run KILLED; the
  multirun then stops (exit 130 / 143 / 140). A worker that dies (e.g. killed for lack of memory) fails its run only.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from omegaconf import OmegaConf

from bench.core.quant_backend import HIDE_ENV
from bench.errors import BenchError
from bench.fmt import error_line
from bench.orchestration import faults, heartbeat, launch, resume
from bench.orchestration.validate import VALIDATED_ENV, validate, was_validated
from bench.orchestration.result import Result
from bench.tracking import Tracker, run_name


def _cores_per_job() -> int | None:
    """The CPU cores one job may use under a launcher that runs jobs side by side: joblib's share of this machine
    (cores / n_jobs); what a cluster launcher reserves for each job (Ray: num_cpus; submitit: cpus_per_task, when
    set); else None."""
    from hydra.core.hydra_config import HydraConfig
    if not HydraConfig.initialized():
        return None
    launcher = HydraConfig.get().launcher
    target = str(launcher.get("_target_", ""))
    if "joblib" in target:
        n, cores = launcher.get("n_jobs") or -1, _cores()
        workers = max(1, n if n > 0 else cores + 1 + n)  # joblib: -1 = all cores, -2 = all but one, ...
        return max(1, cores // workers)
    if "bench_ray_launcher" in target:
        reserved = launcher.get("num_cpus")
    elif "submitit" in target:
        reserved = launcher.get("cpus_per_task")
    else:
        return None
    return max(1, int(reserved)) if reserved else None


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _limit_threads(cfg) -> None:
    """Jobs side by side share the cores: each gets its share as torch threads, unless train.threads is set."""
    cores = _cores_per_job()
    if cores and cfg.train.threads is None:
        cfg.train.threads = cores


def _skip_if_finished(cfg, tracker, out_dir: Path):
    done = resume.find_finished(tracker, resume.run_key(cfg))
    if done is None:
        return None
    print(f"skip {run_name(cfg)}: finished earlier (run {done.info.run_id})", flush=True)
    result = Result(name=run_name(cfg), status="FINISHED", run_id=done.info.run_id, metrics=dict(done.data.metrics),
                    tags={k: v for k, v in done.data.tags.items() if not k.startswith("mlflow.")}, skipped=True)
    result.write(out_dir)
    return result


def execute(cfg, out_dir: Path):
    """Run one composed job; never raises for a failed run (its result.json and MLflow status say FAILED).
    Raises faults.Interrupted when SIGINT/SIGTERM/SIGUSR2 stopped it (the run is KILLED; the multirun should stop)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "result.json").unlink(missing_ok=True)  # a job folder used again must not report an old result
    validated = was_validated(cfg)  # the command's pre-check validated its jobs (as composed: before _limit_threads)
    _limit_threads(cfg)
    try:
        if not validated:  # anything the pre-check did not validate is checked here
            validate(cfg)  # bad input: one line, no MLflow run left behind
        OmegaConf.resolve(cfg)
        tracker = Tracker(cfg.tracking.uri, cfg.tracking.experiment)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        result = Result(name=run_name(cfg), status="FAILED", error=str(e))
        result.write(out_dir)
        return result
    resume.close_orphans(tracker)
    if not cfg.get("rerun", False):
        skipped = _skip_if_finished(cfg, tracker, out_dir)
        if skipped is not None:
            return skipped

    if not cfg.train.isolate:
        from bench.orchestration.worker import run_job  # the worker's stack, imported only for in-process runs
        faults.raise_on_signals()  # SIGTERM ends this in-process run KILLED, like Ctrl-C
        try:
            return run_job(cfg, out_dir, tracker=tracker)   # run_job beats on the run it opens
        except Exception as e:
            result = Result.read(out_dir)
            print(f"error: {result.error if result else error_line(e)}", file=sys.stderr)
            return result

    run_id = tracker.start(cfg)
    result, signum = run_in_worker(cfg, out_dir, tracker, run_id)
    if signum:
        raise faults.Interrupted(signum)  # the user stopped it: stop the multirun too
    return result


def run_in_worker(cfg, out_dir: Path, tracker, run_id: str, worker_args: tuple[str, ...] = ()):
    """Run the open MLflow run `run_id` in a fresh worker process (bench/orchestration/launch.py) and wait for it,
    forwarding SIGINT/SIGTERM/SIGUSR2. Returns its Result (a worker that died leaves its run FAILED, or KILLED when a
    signal stopped it) and the signal that stopped it, if any. worker_args: more arguments for the worker's main."""
    config_path = out_dir / "config.yaml"
    config_path.write_text(OmegaConf.to_yaml(cfg))
    env = {k: v for k, v in os.environ.items() if k != VALIDATED_ENV}  # the worker trusts its config as handed
    env["BENCH_PARENT_PID"] = str(os.getpid())
    if cfg.train.threads:
        env["OMP_NUM_THREADS"] = str(cfg.train.threads)  # also caps the BLAS/OpenMP pools of the worker
    env.pop(HIDE_ENV, None)
    if cfg.quant.name == "none":
        env[HIDE_ENV] = "1"  # bench/core/quant_backend.py: this worker never imports bitsandbytes
    proc = launch.start_worker(cfg, config_path, run_id, out_dir, env, worker_args)
    with faults.forwarding_signals(proc) as caught, heartbeat.beating(tracker, run_id):   # alive for every host
        returncode = faults.wait_worker(proc, caught)
    signum = caught.get("signum") or faults.interrupted_exit(returncode)
    result = Result.read(out_dir)
    if result is None or result.status == "RUNNING":  # the worker died without writing its result
        status, reason = ("KILLED" if signum else "FAILED"), faults.describe_exit(returncode)
        tracker.end(run_id, status, reason)
        result = Result(name=run_name(cfg), status=status, run_id=run_id, error=reason)
        result.write(out_dir)
    faults.hand_on(caught)  # SIGUSR2: to the handler this process had (under submitit: requeue the job)
    return result, signum
