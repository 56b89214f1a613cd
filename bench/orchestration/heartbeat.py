"""Run heartbeats: while a process holds an MLflow run RUNNING, a thread sets the run's tag `heartbeat` (seconds
since the epoch) every HEARTBEAT_S seconds, so that a run whose processes all died (SIGKILL, power loss, a
pre-empted cluster job) is recognised from any host once its heartbeat is older than ORPHAN_AFTER_S
(bench/orchestration/resume.py: close_orphans). On its own host a dead holder is recognised at once, by pid.
Hosts compare their own clocks with the writer's: keep them in sync (NTP) to well within ORPHAN_AFTER_S.
"""
from __future__ import annotations

import contextlib
import threading
import time

TAG = "heartbeat"
HEARTBEAT_S = 30.0
ORPHAN_AFTER_S = 300.0   # ten missed beats: a slow store or a paused process is not taken for a dead one


def now_tag() -> dict[str, str]:
    return {TAG: f"{time.time():.0f}"}


def age_s(tags: dict[str, str], now: float | None = None) -> float | None:
    """Seconds since the run's last heartbeat, None when it never had one (a run logged before heartbeats)."""
    try:
        return (now or time.time()) - float(tags[TAG])
    except (KeyError, ValueError):
        return None


@contextlib.contextmanager
def beating(tracker, run_id: str, interval_s: float = HEARTBEAT_S):
    """Beat on `run_id` while the block runs (a daemon thread: it never keeps the process alive)."""
    stop = threading.Event()

    def beat() -> None:
        while True:
            with contextlib.suppress(Exception):   # a store that is briefly unreachable: the next beat retries
                tracker.set_tags(run_id, now_tag())
            if stop.wait(interval_s):
                return

    thread = threading.Thread(target=beat, name=f"heartbeat-{run_id[:8]}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=10)
