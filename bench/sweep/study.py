"""The study and its workers: shared storage, stale-trial recovery, and one trial = one normal run.

Several processes (the --workers of one command, or several commands) share one study. Each asks for a trial
under a file lock after counting what is finished and running, so the sweep stops at exactly the requested
number of finished trials; a RUNNING trial whose worker process is gone is failed and retried.

Protocol (bench/core/metrics.py): a trial reports the objective (a val/* metric) to the pruner at each periodic
evaluation and is told its final value; the run's one test evaluation (test/*) is kept on the trial as the user
attribute `test_metrics` for the report, and never reaches Optuna's value, so it plays no part in sampling,
pruning or choosing the best trial.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import os
import socket
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import optuna
from optuna.trial import TrialState
from rich.console import Console
from rich.markup import escape

from bench import CONF_DIR
from bench.core import metrics as M
from bench.orchestration import procs
from bench.errors import BenchError
from bench.files import lock
from bench.fmt import error_line
from bench.sweep import spec as sweep_spec

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
MAX_RETRIES = 2        # a trial whose process keeps dying (e.g. the OOM killer) is not retried forever

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


def default_storage(tracking_uri: str) -> str:
    """The journal file beside the MLflow store (sqlite:///dir/mlflow.db -> dir/optuna.journal); else cwd."""
    if tracking_uri.startswith("sqlite:///"):
        return str(Path(tracking_uri[len("sqlite:///"):]).parent / "optuna.journal")
    return "optuna.journal"


def open_storage(storage: str):
    """A file path: Optuna's JournalStorage on a file (several processes append under its lock; the
    documented choice for sharing a study on one machine). A URL (sqlite://, postgresql://...): RDBStorage."""
    if "://" in storage:
        return optuna.storages.RDBStorage(storage)
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    Path(storage).parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(storage))


def sweep_lock(storage: str):
    """One process at a time counts trials and asks for the next one (and creates the study / parent run).
    flock: the kernel releases it when its holder dies, even by SIGKILL."""
    if "://" in storage:
        path = Path(tempfile.gettempdir()) / f"peft-bench-sweep-{hashlib.sha1(storage.encode()).hexdigest()[:12]}.lock"
    else:
        path = Path(f"{storage}.sweep-lock")   # not <storage>.lock: that name is the journal's own lock
    return lock(path)


def worker_id() -> str:
    """host:pid:start time; the start time tells a live worker from a later process that reused its pid."""
    return f"{socket.gethostname()}:{os.getpid()}:{procs.start_time()}"


def worker_alive(owner: str | None) -> bool:
    if not owner:
        return False   # asking and naming the owner happen under one lock: no owner means its worker died there
    host, pid, started = owner.rsplit(":", 2)
    if host != socket.gethostname():
        return True    # another machine's worker: not ours to judge
    return procs.alive(pid, started)


def load_study(job: Job, sweep, sampler=None, pruner=None) -> optuna.Study:
    return optuna.load_study(study_name=job.study, storage=open_storage(job.storage),
                             sampler=sampler, pruner=pruner)


def open_or_create(job: Job, sweep) -> tuple[optuna.Study, bool]:
    """The study, created on first use; a resumed study must have been made from the same definition.
    Call under sweep_lock."""
    storage = open_storage(job.storage)
    definition = sweep.definition(job.cli_overrides)
    fingerprint = sweep.fingerprint(job.cli_overrides)
    try:
        study = optuna.load_study(study_name=job.study, storage=storage)
    except KeyError:
        study = optuna.create_study(study_name=job.study, storage=storage, direction=sweep.direction)
        study.set_user_attr("definition", definition)
        study.set_user_attr("fingerprint", fingerprint)
        study.set_user_attr("sweep_file", str(sweep.path))
        return study, True
    if study.user_attrs.get("fingerprint") != fingerprint:
        old = study.user_attrs.get("definition") or {}
        diff = [k for k in definition if old.get(k) != definition[k]] or ["definition"]
        raise BenchError(f"--study {job.study}: the study in {job.storage} was made from a different sweep "
                         f"({', '.join(diff)} differ: {old.get(diff[0])!r} then, {definition.get(diff[0])!r} now); "
                         f"rerun with the same file and overrides to resume it, or pass --study NEW_NAME")
    return study, False


def trial_counts(study: optuna.Study) -> Counter:
    return Counter(t.state for t in study.get_trials(deepcopy=False))


def fail_stale_trials(study: optuna.Study, tracker, space: dict, log=print) -> list[int]:
    """Fail RUNNING trials whose worker is gone and queue each again with the same parameters.
    Call under sweep_lock (a live worker names itself on its trial inside the same lock)."""
    stale = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = t.user_attrs.get("worker")
        if worker_alive(owner):
            continue
        retries = int(t.user_attrs.get("retries", 0))
        retry = set(t.params) == set(space) and retries < MAX_RETRIES   # killed before sampling: draw anew
        reason = (f"worker {owner or '(unnamed)'} stopped during the trial (killed or crashed); "
                  + ("retried with the same parameters" if retry else "not retried"))
        fail_trial(study, t.number, t._trial_id, reason)
        if retry:
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number, "retries": retries + 1})
        run_id = t.user_attrs.get("mlflow_run_id")
        if run_id:
            with contextlib.suppress(Exception):
                if tracker.client.get_run(run_id).info.status == "RUNNING":
                    tracker.end(run_id, "FAILED", reason)
        log(escape(f"trial {t.number} FAILED  {reason}"))
        stale.append(t.number)
    return stale


def fail_trial(study: optuna.Study, number: int, trial_id: int, reason: str) -> None:
    # the reason goes on before the state (a finished trial is read-only); the storage call because Study has
    # no public setter for a trial another process started
    study._storage.set_trial_user_attr(trial_id, "fail_reason", reason)
    study.tell(number, state=TrialState.FAIL, skip_if_finished=True)


class Pruned(optuna.TrialPruned):
    """Raised from the trainer's on_eval: run() ends the MLflow run KILLED with these tags, Optuna marks the
    trial PRUNED."""
    mlflow_status = "KILLED"

    def __init__(self, step: int, metric: str, value: float):
        super().__init__(f"pruned at step {step} ({metric}={value:.4f})")
        self.step = step
        self.mlflow_tags = {"pruned": "true", "pruned_at_step": str(step)}


def fmt_value(v) -> str:
    """Exact, for overrides (repr keeps every digit of a float)."""
    return repr(v) if isinstance(v, float) else str(v)


def trial_test_metrics(t) -> dict[str, float]:
    """A COMPLETE trial's test/* figures: its run's one test evaluation (empty when there is none)."""
    return dict(t.user_attrs.get("test_metrics") or {})


def fmt_test(t, metric: str = M.TEST_ACCURACY) -> str:
    v = trial_test_metrics(t).get(metric)
    return "-" if v is None else f"{v:.4f}"


def short(v) -> str:
    """For people: 4 significant digits."""
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def run_trial(study: optuna.Study, trial: optuna.Trial, sweep, job: Job, tracker) -> tuple[TrialState, str]:
    """One trial = one normal run (bench.orchestration.worker.run_job) with the trial's values as overrides,
    validated here, once (a trial whose values are out of range is a FAILED child run with that one line)."""
    from bench.orchestration.validate import validate
    from bench.orchestration.worker import run_job
    from bench.tracking import run_name

    values = sweep.run_overrides(trial.params)
    overrides = [f"{k}={fmt_value(v)}" for k, v in values.items()]
    trial.set_user_attr("overrides", overrides)
    last_step = 0
    run_id = None
    try:
        cfg = compose(sweep.overrides + job.cli_overrides + job.worker_overrides + overrides)
        run_id = tracker.start(cfg, extra_tags={"mlflow.parentRunId": job.parent_run_id, "study": job.study,
                                                "trial": str(trial.number)})
        tracker.set_tags(run_id, {"mlflow.runName": f"{run_name(cfg)}-t{trial.number}"})
        trial.set_user_attr("mlflow_run_id", run_id)
        validate(cfg)   # the trial's values (the base config was validated before the study): FAILED, with the line

        last = cfg.train.max_steps   # a prune at the last evaluation would save nothing

        def on_eval(step: int, metrics: dict) -> None:
            nonlocal last_step
            last_step = step
            if sweep.metric in metrics:
                trial.report(metrics[sweep.metric], step)
                if step != last and trial.should_prune():
                    raise Pruned(step, sweep.metric, metrics[sweep.metric])

        out_dir = Path(job.out_root) / job.study / f"trial-{trial.number:04d}"
        result = run_job(cfg, out_dir, run_id=run_id, tracker=tracker, on_eval=on_eval)
    except Pruned as p:
        trial.set_user_attr("train_steps", p.step)
        trial.set_user_attr("pruned_at_step", p.step)
        study.tell(trial, state=TrialState.PRUNED)
        return TrialState.PRUNED, str(p)
    except KeyboardInterrupt:
        # cut short by the user, not by its parameters: queue it again for the next invocation
        fail_trial(study, trial.number, trial._trial_id, "interrupted (KeyboardInterrupt); retried on resume")
        study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
        raise
    except Exception as e:
        reason = error_line(e)
        trial.set_user_attr("train_steps", last_step)   # the last evaluated step: a lower bound
        if run_id is not None:
            with contextlib.suppress(Exception):
                if tracker.client.get_run(run_id).info.status == "RUNNING":   # failed before run() took over
                    tracker.end(run_id, "FAILED", reason)
        fail_trial(study, trial.number, trial._trial_id, reason)
        return TrialState.FAIL, reason
    value = result.metrics.get(sweep.metric, math.nan)
    trial.set_user_attr("train_steps", int(result.metrics[M.TRAIN_STEPS]))
    # the run's one test evaluation, for the report only (set before tell: a finished trial is read-only)
    trial.set_user_attr("test_metrics", {k: float(result.metrics[k]) for k in M.TEST if k in result.metrics})
    if not math.isfinite(value):
        reason = f"objective {sweep.metric} is {value}"
        tracker.set_tags(run_id, {"sweep_error": reason})
        fail_trial(study, trial.number, trial._trial_id, reason)
        return TrialState.FAIL, reason
    study.tell(trial, value)
    return TrialState.COMPLETE, f"{sweep.metric}={value:.4f}"


def progress_line(study: optuna.Study, sweep, job: Job, number: int, state: TrialState, note: str,
                  seconds: float) -> str:
    t = study.get_trials(deepcopy=False)[number]
    counts = trial_counts(study)
    done = counts[TrialState.COMPLETE] + counts[TrialState.PRUNED]
    try:
        best_trial = study.best_trial   # on the objective (validation); its test figure is shown, not used
        best = (f"best {sweep.metric} {best_trial.value:.4f} (trial {best_trial.number}; its "
                f"{M.TEST_ACCURACY} {fmt_test(best_trial)})")
    except ValueError:
        best = "no complete trial yet"
    colour = {TrialState.COMPLETE: "green", TrialState.PRUNED: "yellow"}.get(state, "red")
    who = f"[w{job.worker_index}] " if job.workers > 1 else ""
    params = " ".join(f"{k}={short(v)}" for k, v in sweep.run_overrides(t.params).items())
    steps = t.user_attrs.get("train_steps")
    return (f"{escape(who)}trial {number} [{colour}]{state.name}[/{colour}]  {escape(note)}  {escape(params)}  "
            f"{steps if steps is not None else '?'} steps {seconds:.1f} s  [{done}/{job.trials} finished, {best}]")


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
    study = load_study(job, sweep)
    # seeded samplers: distinct draws per worker and per resumed invocation, reproducible for a given history
    seed_offset = 7919 * job.worker_index + len(study.get_trials(deepcopy=False))
    study = load_study(job, sweep, sweep.make_sampler(seed_offset), sweep.make_pruner())
    me = worker_id()
    failures_in_a_row = 0
    while True:
        if job.parent_pid and os.getppid() != job.parent_pid:
            console.print(escape(f"[w{job.worker_index}] the sweep's main process is gone; this worker stops"))
            return 1
        with sweep_lock(job.storage):
            fail_stale_trials(study, tracker, sweep.space, log=console.print)
            counts = trial_counts(study)
            if sum(counts[s] for s in FINISHED) + counts[TrialState.RUNNING] >= job.trials:
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
    try:
        code = work(job)
    except KeyboardInterrupt:
        code = 130
    except BenchError as e:
        console.print(f"[red]error:[/red] {escape(str(e))}")
        code = 2
    raise SystemExit(code)
