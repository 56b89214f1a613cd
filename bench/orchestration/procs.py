"""Whether a process named in a run tag or a trial attribute still lives: its pid, checked against its start time so
that a later process that reused the pid is not taken for it."""
from __future__ import annotations

import psutil

# Start times match within this many seconds. They are stored rounded to 0.01 s, and psutil adds the boot time
# (/proc/stat), which moves when the system clock is set (e.g. by NTP), so two reads of the same process's start
# can differ. A pid is reused only after its previous process ended, and a process that holds a run or a trial
# lives far longer than 1 s, so a later process with the same pid does not start within the tolerance.
START_TOLERANCE_S = 1.0


def start_time() -> str:
    """This process's start time as stored with its pid (seconds since the epoch, two decimals)."""
    return f"{psutil.Process().create_time():.2f}"


def alive(pid: str | int | None, started: str | None = None) -> bool:
    """Whether process `pid` runs (a zombie does not) and, when `started` is given, is the one started then."""
    if not pid:
        return False
    try:
        p = psutil.Process(int(pid))
        if p.status() == psutil.STATUS_ZOMBIE:
            return False
        return started is None or abs(p.create_time() - float(started)) < START_TOLERANCE_S
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):  # AccessDenied: another user's, so not ours
        return False
