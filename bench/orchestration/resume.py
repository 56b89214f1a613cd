"""Resuming a multirun: a stable key per run, finished runs found by it, runs orphaned by dead processes closed.

- `run_key(cfg)`: sha256 of the resolved config without what cannot change the result (tracking.*, rerun,
  train.isolate, train.threads, method.search), plus the content of local data files, plus the run's own tags
  (`tracking.tags`, when set: a `python -m bench.compare` campaign's runs are its own, not another command's). Stored as the MLflow tag `run_key`;
  `python -m bench` skips a job whose key already has a FINISHED run in the experiment.
- Process tags (`owner.*` for the process that opened the run, `worker.*` for the worker process that fills it)
  say who holds a RUNNING run, so a later invocation can tell a run orphaned by SIGKILL (or a power cut) from
  one that a live process, e.g. a parallel worker, is still filling. On another host the pids mean nothing: there
  the run's heartbeat tag (bench/orchestration/heartbeat.py) tells, after a grace period.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path

from omegaconf import OmegaConf

from bench.orchestration import heartbeat, procs
from bench.files import sha256_file

KEY_VERSION = 2   # 2: validation/test protocol (val/*, test/*): runs of version 1 are not reused
# never change what a run measures (method.search: the method's search space, read by bench.compare only)
IGNORED = ("tracking", "rerun", "train.isolate", "train.threads", "method.search")
DATA_FILE_KEYS = ("path", "test_path", "validation_path")  # task.* files whose content is in the key


def _file_digest(path: str) -> str | None:
    p = Path(path).expanduser()
    return sha256_file(p) if p.is_file() else None


def run_key(cfg) -> str:
    """Stable 16-hex-digit key of everything that changes a run's result (same config, same key)."""
    conf = OmegaConf.to_container(cfg, resolve=True)
    tags = (conf.get("tracking") or {}).get("tags") or {}
    for dotted in IGNORED:
        *parents, leaf = dotted.split(".")
        node = conf
        for p in parents:
            node = node.get(p, {})
        node.pop(leaf, None)
    task = conf.get("task", {})
    data = {k: _file_digest(task[k]) for k in DATA_FILE_KEYS if isinstance(task.get(k), str)}
    key = {"v": KEY_VERSION, "config": conf, "data_sha256": data, **({"tags": tags} if tags else {})}
    blob = json.dumps(key, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def process_tags(role: str = "owner") -> dict[str, str]:
    """host, pid and start time of this process (start time: a reused pid is not mistaken for a live run)."""
    return {f"{role}.host": socket.gethostname(), f"{role}.pid": str(os.getpid()),
            f"{role}.started": procs.start_time()}


def _held_here(tags: dict[str, str]) -> bool:
    """The run was opened by a process of this host: its pids can be checked."""
    return "owner.pid" in tags and tags.get("owner.host") == socket.gethostname()


def holder_alive(tags: dict[str, str], now: float | None = None) -> bool | None:
    """Whether a process that holds the run still lives. On the holder's host: its pids (at once); anywhere: a
    heartbeat at most heartbeat.ORPHAN_AFTER_S old. None: nobody can tell (no heartbeat, another host)."""
    if _held_here(tags):
        return any(procs.alive(tags.get(f"{role}.pid"), tags.get(f"{role}.started")) for role in ("owner", "worker"))
    age = heartbeat.age_s(tags, now)
    return None if age is None else age <= heartbeat.ORPHAN_AFTER_S


def orphaned(tags: dict[str, str], now: float | None = None) -> tuple[str, str] | None:
    """(the run's error tag, the line's wording) when the run's holders are gone; None when they live or nobody
    can tell (such a run is left alone)."""
    if holder_alive(tags, now) is not False:
        return None
    host = tags.get("owner.host", "?")
    if _held_here(tags):
        pid = tags["owner.pid"]
        return (f"orphaned: process {pid} on {host} ended without closing the run (SIGKILL, crash or power loss)",
                f"left RUNNING by process {pid}, which is gone")
    age = heartbeat.age_s(tags, now)
    return (f"orphaned: no heartbeat from {host} for {age:.0f} s (its processes were killed, crashed, pre-empted "
            "or lost power)", f"left RUNNING on {host}, silent for {age:.0f} s (no heartbeat)")


def close_orphans(tracker) -> list[str]:
    """Mark KILLED every RUNNING run of the experiment whose holders are gone (orphaned)."""
    closed = []
    running = tracker.client.search_runs([tracker.experiment_id], "attributes.status = 'RUNNING'",
                                         max_results=5000)
    for r in running:
        why = orphaned(r.data.tags)
        if why is None:
            continue
        tracker.end(r.info.run_id, "KILLED", why[0])
        print(f"closed {r.info.run_name}: {why[1]}; marked KILLED (run {r.info.run_id})", flush=True)
        closed.append(r.info.run_id)
    return closed


def find_finished(tracker, key: str):
    """The newest FINISHED run with this run_key in the experiment, or None. Sweep trials (runs nested under a
    study) do not count: reports keep them apart from the runs of `python -m bench`."""
    found = tracker.client.search_runs([tracker.experiment_id],
                                       f"tags.run_key = '{key}' and attributes.status = 'FINISHED'",
                                       order_by=["attributes.start_time DESC"], max_results=100)
    return next((r for r in found if not {"study", "mlflow.parentRunId"} & set(r.data.tags)), None)
