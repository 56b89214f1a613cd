"""Signals, dead workers and out-of-memory: how a fault becomes a run status instead of a mess.

- SIGINT / SIGTERM raise `Interrupted` (a KeyboardInterrupt, so bench.orchestration.worker.run_job ends the run KILLED); the
  parent forwards them to its worker process and stops the multirun once the worker has closed its run.
- A worker process that dies without writing its result (SIGKILL, often the OS out-of-memory killer) fails
  its run, not the multirun.
- A worker dies with its parent (Linux PR_SET_PDEATHSIG), so SIGKILL on the parent leaves no orphan training.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time

import psutil

SIGNALS = (signal.SIGINT, signal.SIGTERM)
GRACE_S = 60.0  # how long a worker may take to close its run after a forwarded signal before it is killed


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM: the run ends KILLED and the multirun stops."""

    def __init__(self, signum: int):
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def interrupted_exit(returncode: int) -> int | None:
    """The signal a worker's exit code says it was stopped by (SIGINT/SIGTERM), else None."""
    for s in SIGNALS:
        if returncode in (128 + s, -s):
            return s
    return None


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        name = signal.Signals(-returncode).name
        hint = " (often the OS out-of-memory killer; see `dmesg`)" if returncode == -signal.SIGKILL else ""
        return f"worker process was killed by {name}{hint} before finishing"
    return f"worker process exited with code {returncode} before finishing"


def is_out_of_memory(e: BaseException) -> bool:
    import torch
    return isinstance(e, (MemoryError, torch.OutOfMemoryError))


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def raise_on_signals(stop_workers: bool = False) -> None:
    """First SIGINT/SIGTERM raises Interrupted; later ones are ignored so the run can be closed in peace.

    stop_workers (the Hydra process): first let the `bench.orchestration.worker` workers below close their runs (KILLED)."""
    if not _main_thread():
        return

    def handler(signum, frame):
        for s in SIGNALS:
            signal.signal(s, signal.SIG_IGN)
        if stop_workers:
            stop_descendant_workers(signum)
        raise Interrupted(signum)

    for s in SIGNALS:
        signal.signal(s, handler)


def stop_descendant_workers(signum: int, grace_s: float = GRACE_S) -> None:
    """Forward a signal to every `bench.orchestration.worker` worker below this process (e.g. under joblib's worker processes)
    and wait until they have closed their runs; joblib would otherwise SIGKILL them mid-run."""
    from bench.orchestration.launch import is_worker
    try:
        workers = [p for p in psutil.Process().children(recursive=True) if is_worker(p)]
    except psutil.Error:
        return
    for p in workers:
        with contextlib.suppress(psutil.Error):
            p.send_signal(signum)
    _, alive = psutil.wait_procs(workers, timeout=grace_s)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()


@contextlib.contextmanager
def forwarding_signals(proc):
    """While `proc` (a worker) runs: SIGINT/SIGTERM go to it; yields a dict that records the signal caught."""
    caught: dict[str, int] = {}
    if not _main_thread():
        yield caught
        return

    def handler(signum, frame):
        caught.setdefault("signum", signum)
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signum)

    previous = {s: signal.signal(s, handler) for s in SIGNALS}
    try:
        yield caught
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def wait_worker(proc, caught: dict) -> int:
    """Wait for the worker; once a signal was forwarded, give it GRACE_S to close its run, then SIGKILL it."""
    deadline = None
    while True:
        try:
            return proc.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            if "signum" in caught:
                deadline = deadline or time.monotonic() + GRACE_S
                if time.monotonic() > deadline:
                    proc.kill()


def die_with_parent() -> None:
    """Linux: SIGTERM this process when its parent dies (so a SIGKILLed multirun leaves no worker training).
    A warm fork's parent is the template process, which exits when the process that started the job does."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    expected = os.environ.get("BENCH_PARENT_PID")  # the process that started this job
    # it died before prctl took effect (a warm fork's parent is the template, so ask whether it still exists)
    if expected and os.getppid() != int(expected) and not psutil.pid_exists(int(expected)):
        os.kill(os.getpid(), signal.SIGTERM)
