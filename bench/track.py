"""MLflow: one run per job, logged explicitly through MlflowClient (no autologging, no global active run),
so a parent process can open a run, a worker process fill it, and either one end it."""
from __future__ import annotations

import functools
import importlib.metadata
import json
import os
import platform
import subprocess
import tempfile
from pathlib import Path

import mlflow
import torch
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "datasets", "mlflow", "optuna", "hydra-core")
SECRET_WORDS = ("token", "secret", "password", "api_key", "apikey")  # never log values under such keys


def run_name(cfg) -> str:
    quant = "" if cfg.quant.name == "none" else f"-{cfg.quant.name}"
    return f"{cfg.method.name}-{cfg.task.name}-{cfg.model.name}{quant}-s{cfg.seed}"


def flatten(d, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        elif not any(w in k.lower() for w in SECRET_WORDS):
            out[key] = str(v)[:6000]  # MLflow's limit on a param value
    return out


@functools.cache
def _git_commit() -> str:
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return (sha + ("-dirty" if dirty else "")) if sha else "unknown"


def _version(pkg: str) -> str:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance(device: torch.device) -> dict[str, str]:
    tags = {"git_commit": _git_commit(), "python": platform.python_version(), "platform": platform.platform(),
            "device": str(device.type), "torch_threads": str(torch.get_num_threads()),
            "cpu": _cpu_name(), "cpu_count": str(os.cpu_count())}
    tags["device_name"] = torch.cuda.get_device_name(device) if device.type == "cuda" else tags["cpu"]
    tags.update({f"version.{p}": _version(p) for p in PACKAGES})
    return tags


class Tracker:
    def __init__(self, uri: str, experiment: str):
        self.uri = uri
        mlflow.set_tracking_uri(uri)
        self.client = MlflowClient(tracking_uri=uri)
        exp = self.client.get_experiment_by_name(experiment)
        self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(experiment)

    def start(self, cfg, extra_tags: dict | None = None) -> str:
        """Open a RUNNING run named method-task-model-seed with the filter tags; return its id."""
        tags = {"method": cfg.method.name, "model": cfg.model.name, "task": cfg.task.name,
                "quant": cfg.quant.name, "seed": str(cfg.seed), "status": "RUNNING", **(extra_tags or {})}
        run = self.client.create_run(self.experiment_id, run_name=run_name(cfg), tags=tags)
        return run.info.run_id

    def log_config(self, run_id: str, cfg) -> None:
        """params: the flattened resolved config; artifact: config.yaml."""
        container = OmegaConf.to_container(cfg, resolve=True)
        params = [Param(k, v) for k, v in sorted(flatten(container).items())]
        for i in range(0, len(params), 100):  # log_batch accepts at most 100 params per call
            self.client.log_batch(run_id, params=params[i:i + 100])
        self.log_text(run_id, OmegaConf.to_yaml(OmegaConf.create(container)), "config.yaml")

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        import time
        ts = int(time.time() * 1000)
        self.client.log_batch(run_id, metrics=[Metric(k, float(v), ts, step) for k, v in metrics.items()])

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        self.client.log_batch(run_id, tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()])

    def log_text(self, run_id: str, text: str, name: str) -> None:
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / name).write_text(text)
            self.client.log_artifact(run_id, str(Path(d) / name))

    def log_json(self, run_id: str, obj: dict, name: str) -> None:
        self.log_text(run_id, json.dumps(obj, indent=2, sort_keys=True), name)

    def end(self, run_id: str, status: str, error: str | None = None) -> None:
        """status: FINISHED, FAILED or KILLED; a failure's reason goes to the `error` tag."""
        tags = {"status": status}
        if error:
            tags["error"] = error
        self.set_tags(run_id, tags)
        self.client.set_terminated(run_id, status=status)

    def experiment_url(self, host: str = "http://127.0.0.1:5000") -> str:
        # MLflow 3 opens experiments in its GenAI view; this query opens the runs table.
        return f"{host}/#/experiments/{self.experiment_id}/runs?workflowType=machine_learning"
