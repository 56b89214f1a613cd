"""A study's shared storage: the Optuna storage, the lock under which a worker reserves the next trial, and the
recovery of trials whose worker died.

- A file path (the default, one machine): Optuna's JournalStorage. A RUNNING trial's worker is named on it
  (host:pid:start time) and judged by its pid, which only means something on this host.
- A database URL (postgresql://user@host:port/db, several hosts; the password comes from PGPASSWORD): Optuna's
  RDBStorage with its heartbeat. A trial whose worker stops beating for the grace period (SIGKILL, power loss, a
  pre-empted cluster job) is failed by whichever worker looks next (optuna.storages.fail_stale_trials) and
  retried with the same parameters (Optuna's RetryFailedTrialCallback); `on_stale` also closes its MLflow run
  KILLED.

The lock (a file lock on one machine; a PostgreSQL advisory lock, which every host sees, for a database): a worker
counts finished and reserved trials, asks for the next trial and reserves it while holding it, so the study stops
at exactly the requested number of finished trials. The server releases an advisory lock when its holder's
connection drops, as the kernel releases a file lock when its holder dies.
"""
from __future__ import annotations

import hashlib
import inspect
import os
import socket
import tempfile
import warnings
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

import optuna
from filelock import FileLock
from optuna.trial import TrialState

from bench.errors import BenchError
from bench.fmt import redact_url
from bench.orchestration import procs
from bench.report.sweeps import FINISHED
from bench.stack.postgres import driver, sqlalchemy_url

MAX_RETRIES = 2        # a trial whose process keeps dying (e.g. the OOM killer) is not retried forever
HEARTBEAT_S, GRACE_S = 10, 60   # Optuna's heartbeat_interval and grace_period for database storages (defaults)
# Optuna >= 4.9 names the retry callback RetryHeartbeatStaleTrialCallback (RetryFailedTrialCallback: its old name,
# kept until 6.0) and the storage argument heartbeat_stale_trial_callback (failed_trial_callback before)
Retry = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or optuna.storages.RetryFailedTrialCallback
_STALE_ARG = ("heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback" in
              inspect.signature(optuna.storages.RDBStorage).parameters else "failed_trial_callback")


def is_database(storage: str) -> bool:
    return "://" in storage


def default_storage(tracking_uri: str) -> str:
    """The journal file beside the MLflow store (sqlite:///dir/mlflow.db -> dir/optuna.journal); else cwd."""
    if tracking_uri.startswith("sqlite:///"):
        return str(Path(tracking_uri[len("sqlite:///"):]).parent / "optuna.journal")
    return "optuna.journal"


def open_storage(storage: str, heartbeat: tuple[int, int] | None = None, on_stale=None):
    """A file path: JournalStorage on that file. A URL: RDBStorage; with heartbeat=(interval, grace) its trials beat
    while they run, and on_stale(study, trial) is called for each trial failed for a stale heartbeat."""
    if is_database(storage):
        kwargs = {}
        if heartbeat:
            kwargs = {"heartbeat_interval": heartbeat[0], "grace_period": heartbeat[1], _STALE_ARG: on_stale}
        try:
            with warnings.catch_warnings():   # the heartbeat arguments are marked experimental
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(sqlalchemy_url(storage), **kwargs)
        except Exception as e:   # unreachable server, wrong password, missing driver: one line
            raise BenchError(f"--storage {redact_url(storage)}: cannot open it: "
                             f"{str(e).strip().splitlines()[0]}") from None
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    Path(storage).parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(storage))


class SweepLock:
    """One process at a time (on any host, for a database) counts trials, asks for the next one and reserves it,
    or creates the study and its parent run. acquire/release, or `with`."""

    def __init__(self, storage: str, study: str):
        self.storage, self.key, self.held = storage, study, False
        self._conn = None
        if urlsplit(storage).scheme.startswith("postgresql"):
            return
        if is_database(storage):   # another database on one machine: a file lock per storage
            digest = hashlib.sha1(storage.encode()).hexdigest()[:12]
            path = Path(tempfile.gettempdir()) / f"peft-bench-sweep-{digest}.lock"
        else:
            path = Path(f"{storage}.sweep-lock")   # not <storage>.lock: that name is the journal's own lock
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = FileLock(path)

    def _advisory_key(self) -> int:
        return int.from_bytes(hashlib.sha1(f"peft-bench-sweep:{self.key}".encode()).digest()[:8], "big", signed=True)

    def acquire(self) -> None:
        if self.held:
            return
        if urlsplit(self.storage).scheme.startswith("postgresql"):
            psycopg = driver()
            try:
                if self._conn is None or self._conn.closed:
                    url = self.storage.replace("postgresql+psycopg://", "postgresql://", 1)
                    self._conn = psycopg.connect(url, autocommit=True, keepalives=1, keepalives_idle=30,
                                                 connect_timeout=30)
                self._conn.execute("SELECT pg_advisory_lock(%s)", (self._advisory_key(),))
            except psycopg.Error as e:
                raise BenchError(f"--storage {redact_url(self.storage)}: cannot lock the study: "
                                 f"{str(e).strip().splitlines()[0]}") from None
        else:
            self._file.acquire()
        self.held = True

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        if self._conn is not None:
            self._conn.execute("SELECT pg_advisory_unlock(%s)", (self._advisory_key(),))
        else:
            self._file.release()

    def close(self) -> None:
        self.release()
        if self._conn is not None:
            self._conn.close()

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


def worker_id() -> str:
    """host:pid:start time; the start time tells a live worker from a later process that reused its pid."""
    return f"{socket.gethostname()}:{os.getpid()}:{procs.start_time()}"


def worker_alive(owner: str | None) -> bool:
    if not owner:
        return False
    host, pid, started = owner.rsplit(":", 2)
    if host != socket.gethostname():
        return True    # another machine's worker: a journal file cannot judge it (use a database storage)
    return procs.alive(pid, started)


def reserve(trial: optuna.Trial) -> None:
    """Name this worker on its trial (under the lock): the trial now holds one of the study's places."""
    trial.set_user_attr("worker", worker_id())
    trial.set_user_attr("worker_trial", trial.number)   # a retried trial inherits its predecessor's attributes


def reserved(t) -> bool:
    return t.user_attrs.get("worker_trial") == t.number


def load_study(name: str, storage: str, sampler=None, pruner=None, opened=None) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=opened or open_storage(storage), sampler=sampler, pruner=pruner)


def open_or_create(name: str, storage: str, sweep, cli_overrides: list[str]) -> tuple[optuna.Study, bool]:
    """The study, created on first use; a resumed study must have been made from the same definition.
    Call under the sweep lock."""
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
        raise BenchError(f"--study {name}: the study in {redact_url(storage)} was made from a different sweep "
                         f"({', '.join(diff)} differ: {old.get(diff[0])!r} then, {definition.get(diff[0])!r} now); "
                         f"rerun with the same file and overrides to resume it, or pass --study NEW_NAME")
    return study, False


def trial_counts(study: optuna.Study) -> Counter:
    """Trials per state name (COMPLETE, PRUNED, FAIL, RUNNING, WAITING), and RESERVED: running trials a worker
    holds."""
    trials = study.get_trials(deepcopy=False)
    counts = Counter(t.state.name for t in trials)
    counts["RESERVED"] = sum(t.state == TrialState.RUNNING and reserved(t) for t in trials)
    return counts


def finished_count(counts: Counter) -> int:
    """What counts towards --trials: COMPLETE and PRUNED trials."""
    return sum(counts[s] for s in FINISHED)


def fail_stale_trials(study: optuna.Study, storage: str, on_stale) -> None:
    """Fail the RUNNING trials whose worker is gone; on_stale(study, trial) closes each one's run and retries it.
    Call under the sweep lock: a trial asked under it is reserved before it is released, so a RUNNING trial
    without its reservation lost its worker in between. Reserved trials: a database's by Optuna's heartbeat, a
    journal's by their worker's pid."""
    if is_database(storage):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)   # calls on_stale through the storage's callback
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if reserved(t) and (is_database(storage) or worker_alive(t.user_attrs.get("worker"))):
            continue
        study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
        on_stale(study, next(s for s in study.get_trials(deepcopy=False) if s.number == t.number))
