"""The study's workers: one trial = one normal run, run until the study has its finished trials.

Storage, the lock and stale-trial recovery: bench/sweep/storage.py.

Protocol (bench/core/metrics.py): a trial reports the objective (a val/* metric) to the pruner at each periodic
evaluation and is told its final value; the run's one test evaluation (test/*) is kept on the trial as the user
attribute `test_metrics` for the report, and never reaches Optuna's value, so it plays no part in sampling,
pruning or choosing the best trial.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import optuna
from optuna.trial import TrialState
from rich.console import Console
from rich.markup import escape

from bench import CONF_DIR
from bench.core import metrics as M
from bench.errors import BenchError
from bench.fmt import error_line, override_value, short
from bench.report.sweeps import from_optuna
from bench.sweep import spec as sweep_spec
from bench.sweep.storage import (fail_stale_trials, fail_trial, finished_count, load_study, sweep_lock, trial_counts,
                                 worker_id)

console = Console(highlight=False, width=None if Console().is_terminal else 160)


@dataclass
class Job:
    """Everything a worker process needs (picklable: workers are spawned)."""
    sweep_file: str
    cli_overrides: list[str]
    trials: int
    storage: str
    study: str
    parent_run_id: str
    out_root: str
    workers: int = 1
    worker_index: int = 0
    worker_overrides: list[str] = field(default_factory=list)   # e.g. train.threads when workers share cores
    max_failures: int = 5
    parent_pid: int | None = None   # workers of --workers N: stop taking trials when this process is gone


def compose(overrides: list[str]):
    """The run config, composed from conf/ exactly like `python -m bench` with these overrides."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    try:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            return hydra_compose("config", overrides=list(overrides))
    except HydraException as e:
        lines = [ln.strip() for ln in str(e).split("Config search path")[0].splitlines() if ln.strip()]
        raise BenchError(f"overrides {' '.join(overrides)}: {'; '.join(lines)}") from None


class Pruned(optuna.TrialPruned):
    """Raised from the trainer's on_eval: run() ends the MLflow run KILLED with these tags, Optuna marks the
    trial PRUNED."""
    mlflow_status = "KILLED"

    def __init__(self, step: int, metric: str, value: float):
        super().__init__(f"pruned at step {step} ({metric}={value:.4f})")
        self.step = step
        self.mlflow_tags = {"pruned": "true", "pruned_at_step": str(step)}


def _pruning_hook(trial: optuna.Trial, sweep, last: int):
    """The trainer's on_eval: reports the objective to the pruner and raises Pruned when told to; the trial's
    `train_steps` attribute keeps the last evaluated step (a lower bound, should the run fail later)."""
    def on_eval(step: int, metrics: dict) -> None:
        trial.set_user_attr("train_steps", step)
        if sweep.multi:   # Optuna prunes single-objective studies only (Trial.report refuses several objectives)
            return
        if sweep.metric in metrics:
            trial.report(metrics[sweep.metric], step)
            if step != last and trial.should_prune():   # a prune at the last evaluation would save nothing
                raise Pruned(step, sweep.metric, metrics[sweep.metric])
    return on_eval


def pruning_hook(cfg, storage: str, study: str, trial_id: int, sweep_file: str):
    """The pruning hook in the trial's own worker process (bench/orchestration/worker.py --on-eval): the trial,
    opened again from the shared storage, with the sweep file's pruner."""
    sweep = sweep_spec.load(sweep_file)
    opened = load_study(study, storage, pruner=sweep.make_pruner())
    return _pruning_hook(optuna.trial.Trial(opened, trial_id), sweep, cfg.train.max_steps)


def _start_run(cfg, trial: optuna.Trial, job: Job, tracker) -> str:
    """The trial's MLflow run, nested under the study's parent run."""
    from bench.tracking import run_name

    run_id = tracker.start(cfg, extra_tags={"mlflow.parentRunId": job.parent_run_id, "study": job.study,
                                            "trial": str(trial.number)})
    tracker.set_tags(run_id, {"mlflow.runName": f"{run_name(cfg)}-t{trial.number}"})
    trial.set_user_attr("mlflow_run_id", run_id)
    return run_id


def _failed(study: optuna.Study, trial: optuna.Trial, tracker, run_id: str | None,
            reason: str) -> tuple[TrialState, str]:
    stored = next(t for t in study.get_trials(deepcopy=False) if t.number == trial.number)   # the worker's writes
    if "train_steps" not in stored.user_attrs:   # else the last evaluated step (the pruning hook): a lower bound
        trial.set_user_attr("train_steps", 0)
    if run_id is not None:
        with contextlib.suppress(Exception):
            if tracker.client.get_run(run_id).info.status == "RUNNING":   # failed before run() took over
                tracker.end(run_id, "FAILED", reason)
    fail_trial(study, trial.number, trial._trial_id, reason)
    return TrialState.FAIL, reason


def _completed(study: optuna.Study, trial: optuna.Trial, sweep, tracker, run_id: str,
               metrics: dict) -> tuple[TrialState, str]:
    values = [float(metrics.get(m, math.nan)) for m in sweep.metrics]
    trial.set_user_attr("train_steps", int(metrics[M.TRAIN_STEPS]))
    # the run's one test evaluation, for the report only (set before tell: a finished trial is read-only)
    trial.set_user_attr("test_metrics", {k: float(metrics[k]) for k in M.TEST if k in metrics})
    bad = [(m, v) for m, v in zip(sweep.metrics, values) if not math.isfinite(v)]
    if bad:
        reason = f"objective {bad[0][0]} is {bad[0][1]}"
        tracker.set_tags(run_id, {"sweep_error": reason})
        fail_trial(study, trial.number, trial._trial_id, reason)
        return TrialState.FAIL, reason
    study.tell(trial, values if sweep.multi else values[0])
    if not sweep.multi:
        return TrialState.COMPLETE, f"{sweep.metric}={values[0]:.4f}"
    return TrialState.COMPLETE, ", ".join(f"{m}={short(v)}" for m, v in zip(sweep.metrics, values))


def run_trial(study: optuna.Study, trial: optuna.Trial, sweep, job: Job, tracker) -> tuple[TrialState, str]:
    """One trial = one normal run with the trial's values as overrides, validated here, once (a trial whose values
    are out of range is a FAILED child run with that one line), then run like every job: in a fresh worker
    process forked warm (bench/orchestration/job.py: run_in_worker), which reports to the pruner itself."""
    from bench.orchestration.job import run_in_worker
    from bench.orchestration.validate import validate

    overrides = [f"{k}={override_value(v)}" for k, v in sweep.run_overrides(trial.params).items()]
    trial.set_user_attr("overrides", overrides)
    run_id = None
    try:
        cfg = compose(sweep.overrides + job.cli_overrides + job.worker_overrides + overrides)
        run_id = _start_run(cfg, trial, job, tracker)
        validate(cfg)   # the trial's values (the base config was validated before the study): FAILED, with the line
        out_dir = Path(job.out_root) / job.study / f"trial-{trial.number:04d}"
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "result.json").unlink(missing_ok=True)
        hook = {"storage": job.storage, "study": job.study, "trial_id": trial._trial_id,
                "sweep_file": str(job.sweep_file)}
        result, signum = run_in_worker(cfg, out_dir, tracker, run_id, ("--on-eval", f"{__name__}:pruning_hook",
                                                                       "--on-eval-args", json.dumps(hook)))
    except Exception as e:
        return _failed(study, trial, tracker, run_id, error_line(e))
    if signum or result.status == "KILLED" and result.tags.get("pruned") != "true":
        # cut short by the user, not by its parameters: queue it again for the next invocation
        fail_trial(study, trial.number, trial._trial_id, "interrupted (KeyboardInterrupt); retried on resume")
        study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
        raise KeyboardInterrupt
    if result.status == "KILLED":   # pruned: the worker ended its run KILLED with the step it stopped at
        step = int(result.tags["pruned_at_step"])
        trial.set_user_attr("train_steps", step)
        trial.set_user_attr("pruned_at_step", step)
        study.tell(trial, state=TrialState.PRUNED)
        return TrialState.PRUNED, (result.error or "pruned").removeprefix("Pruned: ")
    if result.status != "FINISHED":
        return _failed(study, trial, tracker, run_id, result.error or result.status)
    return _completed(study, trial, sweep, tracker, run_id, result.metrics)


def progress_line(study: optuna.Study, sweep, job: Job, number: int, state: TrialState, note: str,
                  seconds: float) -> str:
    record = from_optuna(study, sweep)
    t, best = record.trials[number], record.best   # best on the objective (validation); its test figure is shown
    if sweep.multi:
        best_text = (f"Pareto front: trial{'s' if len(record.front) > 1 else ''} "
                     f"{', '.join(str(f.number) for f in record.front)}" if record.front else "no complete trial yet")
    else:
        best_text = (f"best {sweep.metric} {best.value:.4f} (trial {best.number}; its {M.TEST_ACCURACY} "
                     f"{best.test_text()})" if best is not None else "no complete trial yet")
    colour = {TrialState.COMPLETE: "green", TrialState.PRUNED: "yellow"}.get(state, "red")
    who = f"[w{job.worker_index}] " if job.workers > 1 else ""
    params = " ".join(f"{k}={short(v)}" for k, v in t.settings.items())
    return (f"{escape(who)}trial {number} [{colour}]{state.name}[/{colour}]  {escape(note)}  {escape(params)}  "
            f"{t.steps if t.steps is not None else '?'} steps {seconds:.1f} s  "
            f"[{record.finished_trials}/{job.trials} finished, {best_text}]")


def work(job: Job) -> int:
    """A worker: run trials of the study until the requested number is finished or reserved by live
    workers. Returns 0, or 1 when it stopped after max_failures failures in a row."""
    from bench.orchestration.worker import quiet_libraries
    from bench.tracking import Tracker

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    quiet_libraries()
    sweep = sweep_spec.load(job.sweep_file)
    base = compose(sweep.overrides + job.cli_overrides)
    sweep_spec.check_keys(sweep, base)
    tracker = Tracker(base.tracking.uri, base.tracking.experiment)
    study = load_study(job.study, job.storage)
    # seeded samplers: distinct draws per worker and per resumed invocation, reproducible for a given history
    seed_offset = 7919 * job.worker_index + len(study.get_trials(deepcopy=False))
    study = load_study(job.study, job.storage, sweep.make_sampler(seed_offset), sweep.make_pruner())
    me = worker_id()
    failures_in_a_row = 0
    while True:
        if job.parent_pid and os.getppid() != job.parent_pid:
            console.print(escape(f"[w{job.worker_index}] the sweep's main process is gone; this worker stops"))
            return 1
        with sweep_lock(job.storage):
            fail_stale_trials(study, tracker, sweep.space, log=console.print)
            counts = trial_counts(study)
            if finished_count(counts) + counts["RUNNING"] >= job.trials:
                return 0
            trial = study.ask(sweep.space)   # samples every parameter now, inside the lock
            trial.set_user_attr("worker", me)
        started = time.perf_counter()
        state, note = run_trial(study, trial, sweep, job, tracker)
        console.print(progress_line(study, sweep, job, trial.number, state, note, time.perf_counter() - started))
        sys.stdout.flush()
        failures_in_a_row = failures_in_a_row + 1 if state == TrialState.FAIL else 0
        if failures_in_a_row >= job.max_failures:
            console.print(f"[red]stopping this worker: {failures_in_a_row} trials in a row failed[/red] "
                          f"(last: {escape(note)}); fix the cause and run the same command again to resume")
            return 1


def worker_entry(job: Job) -> int:
    """multiprocessing target for --workers N; the exit code says how the worker ended."""
    from bench.orchestration import launch
    launch.warm_up()   # this worker's own template (its trials fork from it) imports while the worker starts
    try:
        code = work(job)
    except KeyboardInterrupt:
        code = 130
    except BenchError as e:
        console.print(f"[red]error:[/red] {escape(str(e))}")
        code = 2
    raise SystemExit(code)
