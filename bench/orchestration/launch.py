"""How a job's worker process starts: warm, yet fresh.

A template process (Python's multiprocessing forkserver) imports torch, transformers, peft, datasets and mlflow
once; each job is then a fresh child forked from it, so it starts with those imports done (about a second instead
of a new interpreter's 10-20 s) while its memory figures and crashes stay its own: the template never loads a
model, trains or opens a store, so every child starts from the same state, and a child that dies takes nothing
else with it.

- The template hides bitsandbytes (BENCH_HIDE_BITSANDBYTES=1): a quantized job starts a new interpreter instead
  (`python -m bench.orchestration.worker`), where bitsandbytes is imported as usual.
- `warm_up()` starts the template early (python -m bench calls it before its pre-check), so its imports overlap
  with the parent's own; the first job waits until the template is ready.
- A child dies with the process that started it: PR_SET_PDEATHSIG in the child follows the template, which exits
  when its parent does, and the child also checks the starting process itself (bench/orchestration/faults.py).
"""
from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

from bench.core.quant_backend import HIDE_ENV

PRELOAD = ["bench.orchestration.launch", "bench.orchestration.worker", "bench.core.pipeline", "bench.tracking", "peft",
           "datasets", "sklearn.metrics", "transformers.models.auto.modeling_auto",
           "mlflow.store.tracking.sqlalchemy_store"]   # the store MlflowClient opens lazily (~1 s)
_CONTEXT = multiprocessing.get_context("forkserver")
TEMPLATE_ENV = "BENCH_TEMPLATE"   # set in the template process's environment only


def _template_exits_at_once() -> None:
    """In the template only: when its parent is gone it exits without tearing down torch & co. (seconds), which
    would keep the command's stdout and stderr open that long. Its children end with os._exit anyway."""
    import atexit
    if os.environ.get(TEMPLATE_ENV) == "1":
        atexit.register(os._exit, 0)


_template_exits_at_once()


def warm_up() -> None:
    """Start the template process now (in the background: this returns before its imports are done)."""
    from multiprocessing import forkserver
    _CONTEXT.set_forkserver_preload(PRELOAD)
    before = {k: os.environ.get(k) for k in (HIDE_ENV, TEMPLATE_ENV)}
    os.environ[HIDE_ENV] = "1"   # the template (and so every warm child) never imports bitsandbytes
    os.environ[TEMPLATE_ENV] = "1"
    try:
        forkserver.ensure_running()
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class Forked:
    """A forked worker with the subprocess.Popen methods bench/orchestration/faults.py uses."""

    def __init__(self, process):
        self.process, self.pid = process, process.pid

    def send_signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def kill(self) -> None:
        self.process.kill()

    def wait(self, timeout: float | None = None) -> int:
        self.process.join(timeout)
        if self.process.exitcode is None:
            raise subprocess.TimeoutExpired("forked worker", timeout)
        return self.process.exitcode


def start_worker(cfg, config_path: Path, run_id: str, out_dir: Path, env: dict[str, str], more_args=()):
    """Start the job's worker: a warm fork for quant=none, else a new interpreter. Returns a Popen-like handle."""
    args = ["--config", str(config_path), "--run-id", run_id, "--out-dir", str(out_dir), *more_args]
    if cfg.quant.name != "none":
        return subprocess.Popen([sys.executable, "-m", "bench.orchestration.worker", *args], env=env)
    warm_up()  # no-op when it runs already
    process = _CONTEXT.Process(target=_forked_main, args=(args, env), name="bench-worker")
    process.start()
    return Forked(process)


def start_child(target, *args) -> Forked:
    """target(*args) in a fresh child forked from the template, as a job's worker is (bench/orchestration/multitask.py:
    the measurement of several adapters on one base); target must be a module-level function."""
    warm_up()  # no-op when it runs already
    process = _CONTEXT.Process(target=target, args=args, name="bench-child")
    process.start()
    return Forked(process)


def _forked_main(argv: list[str], env: dict[str, str]) -> None:
    """In the forked child: the worker (already imported by the template); the parent never imports it."""
    from bench.orchestration.worker import forked_main
    forked_main(argv, env)


def is_worker(proc) -> bool:
    """A psutil.Process that is a job's worker: a new interpreter running the worker, or a child of the template."""
    import psutil
    try:
        if "bench.orchestration.worker" in " ".join(proc.cmdline()):
            return True
        parent = proc.parent()
        return parent is not None and "multiprocessing.forkserver" in " ".join(parent.cmdline())
    except psutil.Error:
        return False
