"""Resuming a multirun: a stable key per run, finished runs found by it, runs orphaned by dead processes closed.

- `run_key(cfg)`: sha256 of the resolved config without what cannot change the result (tracking.*, rerun,
  train.isolate, train.threads, method.search), plus the content of local data files, plus the run's own tags
  (`tracking.tags`, when set: a `python -m bench.compare` campaign's runs are its own, not another command's). Stored as the MLflow tag `run_key`;
  `python -m bench` skips a job whose key already has a FINISHED run in the experiment.
- Process tags (`owner.*` for the process that opened the run, `worker.*` for the worker process that fills it)
  say who holds a RUNNING run, so a later invocation can tell a run orphaned by SIGKILL (or a power cut) from
  one that a live process, e.g. a parallel worker, is still filling.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path

from omegaconf import OmegaConf

from bench.orchestration import procs
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


def holder_alive(tags: dict[str, str]) -> bool | None:
    """True/False: whether a process that holds the run still lives; None: unknown (no tags, other host)."""
    if "owner.pid" not in tags or tags.get("owner.host") != socket.gethostname():
        return None
    return any(procs.alive(tags.get(f"{role}.pid"), tags.get(f"{role}.started")) for role in ("owner", "worker"))


def close_orphans(tracker) -> list[str]:
    """Mark KILLED every RUNNING run of the experiment whose processes (on this host) are all gone."""
    closed = []
    running = tracker.client.search_runs([tracker.experiment_id], "attributes.status = 'RUNNING'",
                                         max_results=5000)
    for r in running:
        if holder_alive(r.data.tags) is not False:
            continue
        pid = r.data.tags["owner.pid"]
        tracker.end(r.info.run_id, "KILLED", f"orphaned: process {pid} on {r.data.tags['owner.host']} ended "
                                             "without closing the run (SIGKILL, crash or power loss)")
        print(f"closed {r.info.run_name}: left RUNNING by process {pid}, which is gone; marked KILLED "
              f"(run {r.info.run_id})", flush=True)
        closed.append(r.info.run_id)
    return closed


def find_finished(tracker, key: str):
    """The newest FINISHED run with this run_key in the experiment, or None. Sweep trials (runs nested under a
    study) do not count: reports keep them apart from the runs of `python -m bench`."""
    found = tracker.client.search_runs([tracker.experiment_id],
                                       f"tags.run_key = '{key}' and attributes.status = 'FINISHED'",
                                       order_by=["attributes.start_time DESC"], max_results=100)
    return next((r for r in found if not {"study", "mlflow.parentRunId"} & set(r.data.tags)), None)
