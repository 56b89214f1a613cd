"""`hydra/launcher=ray`: each job of a multirun is a Ray task on a Ray cluster (settings: conf/hydra/launcher/ray.yaml).

peft-bench's own launcher on Ray's public API (`ray.init(address=...)`, `ray.remote`, `ray.wait`, `ray.cancel`):
hydra-ray-launcher 1.2.2 requires cloudpickle<3, which joblib 1.6 (the joblib launcher's, a core dependency) refuses,
so the two cannot share an environment. Hydra finds this class because it lives in the `hydra_plugins` namespace
package, which pyproject.toml installs with `bench`; Hydra imports every module here when it scans for plugins, so
this one imports neither Ray nor bench at module level.

A task runs its job as every launcher does (Hydra's `run_job` calls the harness's task function,
bench/orchestration/job.py: `execute`): the task's process opens the MLflow run, and the run trains in a fresh
worker process of its own, which ends its run KILLED with the reason when a signal stops it. The task works in the
driver's working directory (relative paths such as the default `sqlite:///mlflow.db` and `multirun/...` must name
the same files on every node: a shared file system, or an MLflow server with `tracking.uri=http://...`).
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, filter_overrides, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)


class RayLauncher(Launcher):
    def __init__(self, address: str | None = "auto", num_cpus: float = 1, num_gpus: float = 0,
                 memory: int | None = None, resources: Any = None, max_retries: int = 0, init: Any = None) -> None:
        self.address = address
        self.task_options = {"num_cpus": num_cpus, "num_gpus": num_gpus, "max_retries": max_retries,
                             **({"memory": memory} if memory else {}),
                             **({"resources": _plain(resources)} if resources else {})}
        self.init_kwargs = _plain(init) or {}
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.task_function: TaskFunction | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        assert self.config is not None and self.hydra_context is not None and self.task_function is not None
        ray = _import_ray()
        setup_globals()
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        self._connect(ray)
        remote = ray.remote(_run_job).options(**self.task_options)
        refs = []
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
            sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(sweep_config):
                sweep_config.hydra.job.id = f"{sweep_config.hydra.job.name}_{idx}"
                sweep_config.hydra.job.num = idx
            refs.append(remote.remote(self.hydra_context, sweep_config, self.task_function, Singleton.get_state(),
                                      os.getcwd()))
        return _gather(ray, refs, [list(o) for o in job_overrides])

    def _connect(self, ray) -> None:
        """Join the cluster at `address` (None: start a Ray on this machine for this command). Unreachable: one
        line and exit code 2, before any job (and so any MLflow run) starts."""
        if ray.is_initialized():
            return
        from bench.orchestration.validate import VALIDATED_ENV  # the jobs the command's pre-check validated
        kwargs = dict(self.init_kwargs)
        runtime_env = dict(kwargs.pop("runtime_env", None) or {})
        env_vars = {**({VALIDATED_ENV: os.environ[VALIDATED_ENV]} if VALIDATED_ENV in os.environ else {}),
                    **runtime_env.get("env_vars", {})}
        if env_vars:
            runtime_env["env_vars"] = env_vars
        kwargs.setdefault("log_to_driver", True)
        kwargs.setdefault("configure_logging", False)
        try:
            _probe(self.address)  # ray.init retries an unreachable head for minutes
            ray.init(address=self.address, runtime_env=runtime_env or None, **kwargs)
        except (ConnectionError, OSError, ValueError) as e:
            print(f"error: hydra.launcher.address={self.address}: no Ray cluster there ({str(e).splitlines()[0]}); "
                  "valid: the head's host:port (`ray start --head` prints it), `auto` on a cluster node, or null "
                  "to start Ray on this machine", file=sys.stderr)
            raise SystemExit(2) from None


def _probe(address: str | None, timeout_s: float = 5.0) -> None:
    """A host:port address must accept a TCP connection within timeout_s (auto, null and ray:// are Ray's to find)."""
    import socket
    if not address or "://" in address or ":" not in address:
        return
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
        pass


def _run_job(hydra_context: HydraContext, sweep_config: DictConfig, task_function: TaskFunction,
             singleton_state: dict, cwd: str):
    """In a Ray worker process: one job, exactly as Hydra's own launchers run it. A job stopped by a signal
    (KeyboardInterrupt: the harness's `Interrupted`) comes back as its signal number, so the driver stops too."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.utils import run_job
    if os.path.isdir(cwd):
        os.chdir(cwd)
    setup_globals()
    Singleton.set_state(singleton_state)
    HydraConfig.instance().set_config(sweep_config)
    try:
        return run_job(hydra_context=hydra_context, task_function=task_function, config=sweep_config,
                       job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
    except KeyboardInterrupt as e:
        return int(getattr(e, "signum", 2))


def _gather(ray, refs: list, overrides: list[list[str]]) -> list[JobReturn]:
    """The jobs' returns, in order, once every task has ended. A task Ray could not finish (its process or node
    died) is a FAILED job, which Hydra reports after the others. Ctrl-C or SIGTERM on the driver cancels every
    task (Ray delivers SIGINT to a running one: its worker ends its run KILLED), waits until they have closed their
    runs, and stops the command; so does a job that a signal stopped on its node, once the others are done."""
    from hydra.core.utils import JobStatus

    from bench.orchestration.faults import GRACE_S, Interrupted
    pending = list(refs)
    try:
        while pending:  # short waits: the driver's signal handlers run between them
            _, pending = ray.wait(pending, num_returns=len(pending), timeout=1.0)
    except KeyboardInterrupt:
        for ref in refs:
            ray.cancel(ref)
        ray.wait(refs, num_returns=len(refs), timeout=GRACE_S)
        raise
    returns = []
    for ref, job in zip(refs, overrides):
        try:
            returns.append(ray.get(ref))
        except ray.exceptions.RayError as e:
            returns.append(JobReturn(overrides=job, status=JobStatus.FAILED, _return_value=e))
    stopped = [r for r in returns if isinstance(r, int)]
    if stopped:
        raise Interrupted(stopped[0])
    return returns


def _import_ray():
    try:
        import ray
    except ImportError:
        print("error: hydra/launcher=ray: the package ray is not installed; valid: pip install -e '.[cluster]'",
              file=sys.stderr)
        raise SystemExit(2) from None
    return ray


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
