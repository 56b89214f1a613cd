"""Signals, dead workers and out-of-memory: how a fault becomes a run status instead of a mess.

- SIGINT / SIGTERM / SIGUSR2 raise `Interrupted` (a KeyboardInterrupt, so bench.orchestration.worker.run_job ends the
  run KILLED with the signal as its reason); the parent forwards them to its worker process and stops the multirun
  once the worker has closed its run. SIGTERM and SIGUSR2 are also how a cluster scheduler stops a job (SLURM:
  SIGTERM on pre-emption or scancel, SIGUSR2 before the time limit with --signal, which hydra-submitit-launcher
  asks for); SIGUSR2 is then handed on to the handler the job's process had before (submitit's: requeue the job).
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

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)
HANDED_ON = (signal.SIGUSR2,)  # after the worker has closed its run, given to the handler installed before (hand_on)
REASONS = {signal.SIGUSR2: " (the scheduler's warning before the job's time limit, e.g. SLURM --signal)"}
GRACE_S = 60.0  # how long a worker may take to close its run after a forwarded signal before it is killed


class Interrupted(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGUSR2: the run ends KILLED and the multirun stops."""

    def __init__(self, signum: int):
        super().__init__(f"interrupted by {signal.Signals(signum).name}{REASONS.get(signum, '')}")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def interrupted_exit(returncode: int) -> int | None:
    """The signal a worker's exit code says it was stopped by (one of SIGNALS), else None."""
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
    """First SIGINT/SIGTERM/SIGUSR2 raises Interrupted; later ones are ignored so the run can be closed in peace.

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
    """While `proc` (a worker) runs: SIGNALS go to it; yields a dict that records the first signal caught
    ("signum") and the handler this process had for it before ("previous", for hand_on)."""
    caught: dict = {}
    if not _main_thread():
        yield caught
        return
    previous: dict = {}

    def handler(signum, frame):
        if "signum" not in caught:
            caught.update(signum=signum, previous=previous.get(signum))
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signum)

    for s in SIGNALS:
        previous[s] = signal.signal(s, handler)
    try:
        yield caught
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def hand_on(caught: dict) -> None:
    """Once the worker has closed its run: give a HANDED_ON signal (SIGUSR2) to the handler another library had
    installed in this process before forwarding_signals. Under hydra-submitit-launcher that is submitit's, which
    requeues the job (a SLURM time limit). The harness's own handler (raise_on_signals) is not called: the caller
    stops as for SIGTERM."""
    signum, previous = caught.get("signum"), caught.get("previous")
    if signum in HANDED_ON and callable(previous) and getattr(previous, "__module__", None) != __name__:
        previous(signum, None)


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
