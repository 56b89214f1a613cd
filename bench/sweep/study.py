"""The study's workers: one trial = one normal run, run until the study has its finished trials.

A worker is Optuna's own loop, `study.optimize`, with `MaxTrialsCallback` and a `Gate`: before each ask the gate
waits, under the sweep lock, for a free place (finished + reserved < trials; trials of dead workers failed and
queued again first) and keeps the lock until the asked trial is reserved, so no process ever runs a trial
beyond the requested number. Storage, the lock and stale-trial recovery: bench/sweep/storage.py.

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
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import optuna
from optuna.study import MaxTrialsCallback
from optuna.trial import TrialState
from rich.console import Console
from rich.markup import escape

from bench import CONF_DIR
from bench.core import metrics as M
from bench.errors import BenchError
from bench.fmt import error_line, override_value, short
from bench.report.sweeps import from_optuna
from bench.sweep import spec as sweep_spec
from bench.sweep.storage import (GRACE_S, HEARTBEAT_S, MAX_RETRIES, Retry, SweepLock, fail_stale_trials,
                                 finished_count, is_database, load_study, open_storage, reserve, reserved,
                                 trial_counts, worker_id)

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
    heartbeat_s: int = HEARTBEAT_S  # database storages: Optuna's heartbeat_interval and grace_period
    grace_s: int = GRACE_S


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


class TrialFailed(Exception):
    """A trial that ran and failed (bad values, a crashed run, a non-finite objective): Optuna marks it FAIL, the
    sweep goes on. Its reason is the trial's user attribute fail_reason."""


def _failed(trial: optuna.Trial, tracker, run_id: str | None, reason: str):
    if "train_steps" not in trial.user_attrs:   # else the last evaluated step (the pruning hook): a lower bound
        trial.set_user_attr("train_steps", 0)
    if run_id is not None:
        with contextlib.suppress(Exception):
            if tracker.client.get_run(run_id).info.status == "RUNNING":   # failed before run() took over
                tracker.end(run_id, "FAILED", reason)
    trial.set_user_attr("fail_reason", reason)
    raise TrialFailed(reason)


def _completed(trial: optuna.Trial, sweep, tracker, run_id: str, metrics: dict) -> float | list[float]:
    """The objective's value (several objectives: their values, in the sweep file's order)."""
    values = [float(metrics.get(m, math.nan)) for m in sweep.metrics]
    trial.set_user_attr("train_steps", int(metrics[M.TRAIN_STEPS]))
    # the run's one test evaluation, for the report only
    trial.set_user_attr("test_metrics", {k: float(metrics[k]) for k in M.TEST if k in metrics})
    bad = [(m, v) for m, v in zip(sweep.metrics, values) if not math.isfinite(v)]
    if bad:
        reason = f"objective {bad[0][0]} is {bad[0][1]}"
        tracker.set_tags(run_id, {"sweep_error": reason})
        trial.set_user_attr("fail_reason", reason)
        raise TrialFailed(reason)
    return values if sweep.multi else values[0]


def run_trial(study: optuna.Study, trial: optuna.Trial, sweep, job: Job, tracker) -> float:
    """One trial = one normal run with the trial's values as overrides, validated here, once (a trial whose values
    are out of range is a FAILED child run with that one line), then run like every job: in a fresh worker
    process forked warm (bench/orchestration/job.py: run_in_worker), which reports to the pruner itself.
    Returns the objective; raises optuna.TrialPruned, TrialFailed, or KeyboardInterrupt when the user stopped it
    (its parameters are queued again for the next invocation)."""
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
        # the trial's id: the one way to open the same trial in the run's worker process (bench/private_apis.py)
        hook = {"storage": job.storage, "study": job.study, "trial_id": trial._trial_id,
                "sweep_file": str(job.sweep_file)}
        result, signum = run_in_worker(cfg, out_dir, tracker, run_id, ("--on-eval", f"{__name__}:pruning_hook",
                                                                       "--on-eval-args", json.dumps(hook)))
    except Exception as e:
        _failed(trial, tracker, run_id, error_line(e))
    if signum or result.status == "KILLED" and result.tags.get("pruned") != "true":
        # cut short by the user, not by its parameters: queue it again for the next invocation
        trial.set_user_attr("fail_reason", "interrupted (KeyboardInterrupt); retried on resume")
        study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
        raise KeyboardInterrupt
    if result.status == "KILLED":   # pruned: the worker ended its run KILLED with the step it stopped at
        step = int(result.tags["pruned_at_step"])
        trial.set_user_attr("train_steps", step)
        trial.set_user_attr("pruned_at_step", step)
        raise optuna.TrialPruned((result.error or "pruned").removeprefix("Pruned: "))
    if result.status != "FINISHED":
        _failed(trial, tracker, run_id, result.error or result.status)
    return _completed(trial, sweep, tracker, run_id, result.metrics)


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


def suggest(trial: optuna.Trial, name: str, d: optuna.distributions.BaseDistribution):
    """Draw one parameter of the search space with Optuna's public suggest_* (a retried trial gets its own)."""
    if isinstance(d, optuna.distributions.CategoricalDistribution):
        return trial.suggest_categorical(name, d.choices)
    if isinstance(d, optuna.distributions.IntDistribution):
        return trial.suggest_int(name, d.low, d.high, step=d.step, log=d.log)
    return trial.suggest_float(name, d.low, d.high, step=d.step, log=d.log)


class StaleTrials:
    """on_stale: a trial whose worker died was failed (Optuna's heartbeat, or its pid on this host): close its
    MLflow run KILLED and queue it again with the same parameters (RetryFailedTrialCallback, MAX_RETRIES)."""

    def __init__(self, tracker, space: dict, log):
        self.tracker, self.space, self.log = tracker, space, log
        self.retry = _retry_callback()

    def __call__(self, study: optuna.Study, trial) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            retries = len(Retry.retry_history(trial))
        again = set(trial.params) == set(self.space) and retries < MAX_RETRIES   # killed before sampling: drawn anew
        reason = (f"worker {trial.user_attrs.get('worker', '(unnamed)')} stopped during the trial (killed, crashed, "
                  f"pre-empted or lost); " + ("retried with the same parameters" if again else "not retried"))
        if again:
            self.retry(study, trial)
        run_id = trial.user_attrs.get("mlflow_run_id") if reserved(trial) else None
        if run_id:
            with contextlib.suppress(Exception):
                if self.tracker.client.get_run(run_id).info.status == "RUNNING":
                    self.tracker.end(run_id, "KILLED", reason)
        self.log(escape(f"trial {trial.number} FAILED  {reason}"))


def _retry_callback():
    with warnings.catch_warnings():   # experimental in Optuna 4, a deprecated alias in 4.9+ (storage.py: Retry)
        warnings.simplefilter("ignore")
        return Retry(max_retry=MAX_RETRIES)


class Gate:
    """A worker's place in the study. open(): wait, under the sweep lock, until the study has a free place (finished
    + reserved < trials; trials whose worker died are failed and queued again first) and keep the lock, so that
    Optuna's next ask and the trial's reservation happen under it; False once the study has its finished trials."""

    POLL_S = 2.0

    def __init__(self, study: optuna.Study, job: Job, lock: SweepLock, on_stale):
        self.study, self.job, self.lock, self.on_stale = study, job, lock, on_stale

    def open(self) -> bool:
        while True:
            self.lock.acquire()
            fail_stale_trials(self.study, self.job.storage, self.on_stale)
            counts = trial_counts(self.study)
            done = finished_count(counts)
            if done >= self.job.trials:
                self.lock.release()
                return False
            if done + counts["RESERVED"] < self.job.trials:
                return True
            self.lock.release()   # the last places are held by running trials: wait for them to end or die
            if self.job.parent_pid and os.getppid() != self.job.parent_pid:
                return False      # a worker of --workers N whose sweep's main process is gone
            time.sleep(self.POLL_S)


def work(job: Job) -> int:
    """A worker: Optuna's optimize loop on the shared study until it has the requested finished trials. Returns 0,
    or 1 when it stopped after max_failures failures in a row or because its sweep's main process is gone."""
    from bench.orchestration.worker import quiet_libraries
    from bench.tracking import Tracker

    optuna.logging.set_verbosity(optuna.logging.ERROR)   # the sweep prints its own line per trial
    quiet_libraries()
    sweep = sweep_spec.load(job.sweep_file)
    base = compose(sweep.overrides + job.cli_overrides)
    sweep_spec.check_keys(sweep, base)
    tracker = Tracker(base.tracking.uri, base.tracking.experiment)
    on_stale = StaleTrials(tracker, sweep.space, console.print)
    storage = open_storage(job.storage, (job.heartbeat_s, job.grace_s), on_stale)
    history = len(load_study(job.study, job.storage, opened=storage).get_trials(deepcopy=False))
    # seeded samplers: distinct draws per worker and per resumed invocation, reproducible for a given history on
    # one machine; workers of other commands (other hosts) on a database add their own identity
    seed_offset = 7919 * job.worker_index + history + (zlib.crc32(worker_id().encode()) % 2**20
                                                       if is_database(job.storage) else 0)
    study = load_study(job.study, job.storage, sweep.make_sampler(seed_offset), sweep.make_pruner(), opened=storage)
    lock = SweepLock(job.storage, job.study)
    gate = Gate(study, job, lock, on_stale)
    outcome = {"code": 0, "failures": 0}

    def objective(trial: optuna.Trial) -> float:
        try:   # under the lock the gate holds: this trial takes the place the gate found
            reserve(trial)
            trial.set_user_attr("train_steps", 0)   # not a dead predecessor's (a retry inherits its attributes)
            for name, dist in sweep.space.items():
                suggest(trial, name, dist)
        finally:
            lock.release()
        return run_trial(study, trial, sweep, job, tracker)

    def after_trial(study: optuna.Study, trial) -> None:
        seconds = trial.duration.total_seconds() if trial.duration else 0.0
        note = trial.user_attrs.get("fail_reason", "") if trial.state == TrialState.FAIL else \
            ", ".join(f"{m}={short(v)}" for m, v in zip(sweep.metrics, trial.values)) if trial.state == TrialState.COMPLETE else \
            f"pruned at step {trial.user_attrs.get('pruned_at_step', '?')}"
        console.print(progress_line(study, sweep, job, trial.number, trial.state, note, seconds))
        sys.stdout.flush()
        outcome["failures"] = outcome["failures"] + 1 if trial.state == TrialState.FAIL else 0
        if outcome["failures"] >= job.max_failures:
            console.print(f"[red]stopping this worker: {outcome['failures']} trials in a row failed[/red] "
                          f"(last: {escape(note)}); fix the cause and run the same command again to resume")
            outcome["code"] = 1
        elif job.parent_pid and os.getppid() != job.parent_pid:
            console.print(escape(f"[w{job.worker_index}] the sweep's main process is gone; this worker stops"))
            outcome["code"] = 1
        if outcome["code"] or not gate.open():
            study.stop()

    try:
        if gate.open():
            finished = MaxTrialsCallback(job.trials, states=(TrialState.COMPLETE, TrialState.PRUNED))
            study.optimize(objective, callbacks=[finished, after_trial], catch=(TrialFailed,))
    finally:
        lock.close()   # held when the study stopped between the gate and the next ask (e.g. a finished grid)
    return outcome["code"]


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
