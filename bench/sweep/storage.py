"""A study's shared storage: the Optuna storage (a journal file or a database), the lock under which processes
count trials and ask for the next one, and the recovery of trials whose worker died.

Several processes (the --workers of one command, or several commands) share one study. Each asks for a trial
under a file lock after counting what is finished and running, so the sweep stops at exactly the requested
number of finished trials; a RUNNING trial whose worker process is gone is failed and retried.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import tempfile
from collections import Counter
from pathlib import Path

import optuna
from optuna.trial import TrialState
from rich.markup import escape

from bench.errors import BenchError
from bench.files import lock
from bench.orchestration import procs
from bench.report.sweeps import FINISHED

MAX_RETRIES = 2        # a trial whose process keeps dying (e.g. the OOM killer) is not retried forever


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


def load_study(name: str, storage: str, sampler=None, pruner=None) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=open_storage(storage), sampler=sampler, pruner=pruner)


def open_or_create(name: str, storage: str, sweep, cli_overrides: list[str]) -> tuple[optuna.Study, bool]:
    """The study, created on first use; a resumed study must have been made from the same definition.
    Call under sweep_lock."""
    opened = open_storage(storage)
    definition = sweep.definition(cli_overrides)
    fingerprint = sweep.fingerprint(cli_overrides)
    try:
        study = optuna.load_study(study_name=name, storage=opened)
    except KeyError:
        study = optuna.create_study(study_name=name, storage=opened, directions=sweep.directions)
        study.set_user_attr("definition", definition)
        study.set_user_attr("fingerprint", fingerprint)
        study.set_user_attr("sweep_file", str(sweep.path))
        return study, True
    if study.user_attrs.get("fingerprint") != fingerprint:
        old = study.user_attrs.get("definition") or {}
        diff = [k for k in definition if old.get(k) != definition[k]] or ["definition"]
        raise BenchError(f"--study {name}: the study in {storage} was made from a different sweep "
                         f"({', '.join(diff)} differ: {old.get(diff[0])!r} then, {definition.get(diff[0])!r} now); "
                         f"rerun with the same file and overrides to resume it, or pass --study NEW_NAME")
    return study, False


def trial_counts(study: optuna.Study) -> Counter:
    """Trials per state name (COMPLETE, PRUNED, FAIL, RUNNING, WAITING)."""
    return Counter(t.state.name for t in study.get_trials(deepcopy=False))


def finished_count(counts: Counter) -> int:
    """What counts towards --trials: COMPLETE and PRUNED trials."""
    return sum(counts[s] for s in FINISHED)


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
