"""The command: `python -m bench.sweep sweeps/lora_rank_alpha.yaml [--trials N] [--workers N] [overrides ...]`

Runs (or resumes) the Optuna study the sweep file defines; every trial is a normal run composed from conf/ with
the file's overrides, the command line's overrides and the trial's values. README: Sweeps.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
from pathlib import Path

import optuna
from rich.markup import escape

from bench.errors import BenchError
from bench.fmt import redact_url
from bench.orchestration import heartbeat
from bench.orchestration.resume import process_tags
from bench.report import sweep_outputs
from bench.report.sweeps import objectives_tag
from bench.sweep import spec
from bench.sweep.storage import (GRACE_S, HEARTBEAT_S, SweepLock, default_storage, finished_count, open_or_create,
                                 trial_counts)
from bench.sweep.study import Job, compose, console, work, worker_entry


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench.sweep",
                                description="Optuna sweep over run settings; resumable, failure resistant, pruned.")
    p.add_argument("sweep", help="sweep file, e.g. sweeps/lora_rank_alpha.yaml")
    p.add_argument("overrides", nargs="*", help="Hydra overrides applied to every trial, e.g. train.max_steps=300")
    p.add_argument("--trials", type=int, help="finished (COMPLETE + PRUNED) trials to reach, earlier invocations "
                                              "included (default: the file's trials)")
    p.add_argument("--workers", type=int, default=1, help="worker processes on this study (default 1)")
    p.add_argument("--study", help="study name (default: the file's study, else its file name)")
    p.add_argument("--storage", help="Optuna storage: a journal file path (one machine) or a database URL such as "
                                     "postgresql://bench@host:5432/optuna, shared by hosts (password: PGPASSWORD; "
                                     "default: optuna.journal beside the MLflow sqlite store)")
    p.add_argument("--heartbeat-interval", type=int, default=HEARTBEAT_S, metavar="S",
                   help=f"database storages: a running trial's heartbeat period (Optuna's heartbeat_interval; "
                        f"default {HEARTBEAT_S})")
    p.add_argument("--grace-period", type=int, default=GRACE_S, metavar="S",
                   help=f"database storages: a trial without a heartbeat for this long lost its worker; it is failed "
                        f"and retried with the same parameters (Optuna's grace_period; default {GRACE_S})")
    p.add_argument("--reports", default="reports", help="report folder; the report goes to REPORTS/<study>/")
    p.add_argument("--out-dir", default="outputs/sweeps", help="trial folders (checkpoints, result.json) go "
                                                              "to OUT_DIR/<study>/trial-NNNN")
    p.add_argument("--max-failures", type=int, default=5, help="a worker stops after this many failed trials "
                                                               "in a row (default 5)")
    return p.parse_intermixed_args(argv)


def override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def threads_per_worker(workers: int, overrides: list[str]) -> list[str]:
    """workers x threads <= cores, unless the sweep file or the command line sets train.threads."""
    if workers == 1 or any(override_key(o) == "train.threads" for o in overrides):
        return []
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if workers > cores:
        console.print(f"[yellow]note:[/yellow] {workers} workers on {cores} cores: one torch thread each, "
                      "the workers still share cores")
    return [f"train.threads={max(1, cores // workers)}"]


def parent_run(tracker, sweep, job: Job, definition: dict) -> str:
    """The study's parent MLflow run: found by its tags when resuming, else created. Call under the sweep lock."""
    found = tracker.client.search_runs(
        [tracker.experiment_id], filter_string=f"tags.study = '{job.study}' AND tags.sweep_role = 'parent' AND "
                                               f"tags.optuna_storage = '{redact_url(job.storage)}'", max_results=1)
    holder = process_tags("owner")   # this process holds the parent run now (bench/orchestration/resume.py: orphans)
    if found:
        run_id = found[0].info.run_id
        tracker.client.update_run(run_id, status="RUNNING")
        tracker.set_tags(run_id, {"status": "RUNNING", **holder})
        return run_id
    run = tracker.client.create_run(tracker.experiment_id, run_name=f"sweep-{job.study}", tags={
        "study": job.study, "sweep_role": "parent", "optuna_storage": redact_url(job.storage),
        "sweep_file": str(sweep.path), "objective": sweep.metric, "direction": sweep.direction, "status": "RUNNING",
        **holder,
        **({"objectives": objectives_tag(sweep.objectives)} if sweep.multi else {})})
    run_id = run.info.run_id
    tracker.log_json(run_id, definition, "sweep_definition.json")
    tracker.log_text(run_id, Path(sweep.path).read_text(), "sweep.yaml")
    return run_id


def run_workers(job: Job) -> int:
    """--workers N: N spawned processes on the same study (fresh interpreters: no torch state shared)."""
    ctx = multiprocessing.get_context("spawn")
    before = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"   # N interleaved progress bars are noise; each trial still prints a line
    try:
        procs = [ctx.Process(target=worker_entry, args=(Job(**{**job.__dict__, "worker_index": i,
                                                               "parent_pid": os.getpid()}),),
                             name=f"sweep-worker-{i}") for i in range(job.workers)]
        for p in procs:
            p.start()
    finally:
        if before is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = before
    try:
        for p in procs:
            p.join()
    except KeyboardInterrupt:
        for p in procs:   # they got the same SIGINT; give them time to mark their trials for retry
            p.join(timeout=30)
        raise
    codes = [p.exitcode for p in procs]
    if any(codes):
        console.print(f"worker exit codes: {codes}")
    return 0 if not any(codes) else (2 if 2 in codes else 1)


def _checked_sweep(a):
    """The sweep file and the base config, checked against each other and the command line."""
    from bench.orchestration.validate import validate

    if a.trials is not None and a.trials < 1:
        raise BenchError(f"--trials: must be >= 1, got {a.trials}")
    if a.workers < 1:
        raise BenchError(f"--workers: must be >= 1, got {a.workers}")
    if a.max_failures < 1:
        raise BenchError(f"--max-failures: must be >= 1, got {a.max_failures}")
    if a.heartbeat_interval < 1 or a.grace_period <= a.heartbeat_interval:
        raise BenchError(f"--heartbeat-interval {a.heartbeat_interval}, --grace-period {a.grace_period}: need "
                         "1 <= heartbeat interval < grace period (seconds)")
    sweep = spec.load(a.sweep)
    base = compose(sweep.overrides + a.overrides)
    spec.check_keys(sweep, base)
    sweep.make_sampler(), sweep.make_pruner(), sweep.make_importance()   # checked before a study exists
    validate(base)
    for o in sweep.overrides + a.overrides:
        if override_key(o) in sweep.searched_keys:
            raise BenchError(f"override {o}: {override_key(o)} is set by the sweep's trials; remove it from "
                             f"the command line and the file's overrides, or from its search_space/derived")
    if (a.trials or sweep.trials) is None:
        raise BenchError(f"{a.sweep}: trials: not set; set trials: N in the file or pass --trials N")
    return sweep, base


def _open(a, sweep, base):
    """The job, the tracker, the study (created on first use) and its parent MLflow run."""
    from bench.tracking import Tracker

    storage = a.storage or default_storage(base.tracking.uri)
    if "://" not in storage:
        storage = str(Path(storage).resolve())
    job = Job(sweep_file=str(a.sweep), cli_overrides=list(a.overrides), trials=a.trials or sweep.trials,
              storage=storage, study=a.study or sweep.study, parent_run_id="", out_root=a.out_dir,
              workers=a.workers, worker_overrides=threads_per_worker(a.workers, sweep.overrides + a.overrides),
              max_failures=a.max_failures, heartbeat_s=a.heartbeat_interval, grace_s=a.grace_period)
    tracker = Tracker(base.tracking.uri, base.tracking.experiment)
    lock = SweepLock(storage, job.study)
    try:
        with lock:
            study, created = open_or_create(job.study, storage, sweep, job.cli_overrides)
            job.parent_run_id = parent_run(tracker, sweep, job, sweep.definition(job.cli_overrides))
    finally:
        lock.close()
    return job, tracker, study, created


def _finish(a, study, sweep, job: Job, tracker, status: str, code: int) -> int:
    """The study's outputs (reports/<study>/, the parent run's record); the parent run ends unless trials still
    run in other processes."""
    counts = trial_counts(study)
    done = finished_count(counts)
    elsewhere = code == 0 and done < job.trials   # our workers stopped because others hold the last trials
    if code and status == "FINISHED":
        status = "FAILED"
    out_dir = Path(a.reports) / job.study
    info, table = sweep_outputs.write(study, sweep, job.cli_overrides, out_dir)
    sweep_outputs.print_report(console, info, table, out_dir)
    sweep_outputs.log_to_parent(tracker, job.parent_run_id, info, out_dir)
    if elsewhere:
        console.print(f"{done}/{job.trials} finished; {counts['RUNNING']} trial(s) still running in "
                      "other processes: the command that finishes last completes the study's record")
        return 0
    tracker.end(job.parent_run_id, status, None if status == "FINISHED" else
                f"{done}/{job.trials} trials finished when the sweep stopped")
    if done < job.trials:
        console.print(f"[red]{done}/{job.trials} trials finished[/red]; run the same command again to resume")
    return code


def main(argv=None) -> int:
    a = parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)   # the sweep prints its own line per trial
    if a.workers == 1:   # this process runs the trials: its template imports while the sweep is checked
        from bench.orchestration import launch
        launch.warm_up()
    try:
        sweep, base = _checked_sweep(a)
        job, tracker, study, created = _open(a, sweep, base)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    counts = trial_counts(study)
    done = finished_count(counts)
    console.print(escape(f"study {job.study} ({'new' if created else f'resumed: {done} finished'}) in "
                         f"{redact_url(job.storage)}; "
                         f"target {job.trials} finished trials, {job.workers} worker(s); MLflow parent run "
                         f"{job.parent_run_id} in {base.tracking.uri} (experiment {base.tracking.experiment!r})"))
    status, code = "FINISHED", 0
    try:
        with heartbeat.beating(tracker, job.parent_run_id):   # other hosts see the study's parent run alive
            code = work(job) if job.workers == 1 else run_workers(job)
    except KeyboardInterrupt:
        status, code = "KILLED", 130
    except BenchError as e:
        console.print(f"[red]error:[/red] {escape(str(e))}")
        status, code = "FAILED", 2
    return _finish(a, study, sweep, job, tracker, status, code)
