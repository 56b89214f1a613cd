"""MLflow: one run per job, logged explicitly through MlflowClient (no autologging, no global active run),
so a parent process can open a run, a worker process fill it, and either one end it.

Several processes may share one SQLite store (parallel workers): the store's first creation is serialized
with a file lock (MLflow's own table creation races otherwise), and a call that still meets "database is
locked" is retried.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from bench.core import metrics as M
from bench.errors import BenchError
from bench.files import lock
from bench.fmt import error_line, redact_url

# with a tracking server MLflow prints "View run <name> at: <url>" whenever a run ends; the harness prints its own lines
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "datasets", "mlflow", "optuna", "hydra-core")
SECRET_WORDS = ("token", "secret", "password", "api_key", "apikey")  # never log values under such keys
# The MLflow UI's runs table shows no metric columns until the user picks them. Each experiment carries a shared
# view (the UI's own mechanism: experiment tag mlflow.sharedViewState.<key>, opened with ?viewStateShareKey=<key>)
# that shows the comparison columns, best accuracy first; experiment_url() links to it.
COMPARE_VIEW = "peft-bench-compare"
COMPARE_COLUMNS = {"metrics": [M.TEST_ACCURACY, M.TEST_F1_MACRO, M.VAL_BEST_ACCURACY, M.MEM_TRAIN_GROWTH,
                               M.MEM_PEAK_TRAIN, M.TIME_TRAIN, M.CKPT_BYTES, M.PARAMS_TRAINABLE_PCT,
                               M.THROUGHPUT_TOKENS],
                   "params": ["train.lr"], "tags": ["method", "seed", "quant"]}


def compare_view() -> str:
    columns = [f"{kind}.`{key}`" for kind, keys in COMPARE_COLUMNS.items() for key in keys]
    return json.dumps({"selectedColumns": columns, "orderByKey": f"metrics.`{M.TEST_ACCURACY}`", "orderByAsc": False})


def run_name(cfg) -> str:
    quant = "" if cfg.quant.name == "none" else f"-{cfg.quant.name}"
    return f"{cfg.method.name}-{cfg.task.name}-{cfg.model.name}{quant}-s{cfg.seed}"


def is_secret(key: str) -> bool:
    return any(w in str(key).lower() for w in SECRET_WORDS)


# config keys that are no setting of the run: the method's search space (bench.compare), the run's own tags (logged
# as tags); neither is a param, so neither splits the report's rows
NOT_PARAMS = ("method.search", "tracking.tags")


def flatten(d, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if key in NOT_PARAMS:
            continue
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        elif not is_secret(k):
            out[key] = redact_url(str(v))[:6000]  # MLflow's limit on a param value
    return out


def without_secrets(d):
    """A copy of a config container without the values of secret-looking keys (for the config.yaml artifact)."""
    if isinstance(d, dict):
        return {k: without_secrets(v) for k, v in d.items() if not is_secret(k)}
    if isinstance(d, list):
        return [without_secrets(v) for v in d]
    return redact_url(d)


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


def _store_lock(uri: str):
    """Inter-process lock around opening a SQLite store: MLflow creates and migrates a new store's tables
    without one, and parallel first opens leave it half-migrated ("table ... already exists")."""
    if not uri.startswith("sqlite:"):
        return contextlib.nullcontext()
    digest = hashlib.sha256(os.path.abspath(uri.removeprefix("sqlite:///")).encode()).hexdigest()[:16]
    return lock(Path(tempfile.gettempdir()) / f"peft-bench-store-{digest}.lock")


def _artifact_root(uri: str, experiment: str) -> str | None:
    """A new experiment in a SQLite store keeps its artifacts beside the store (<store dir>/mlruns/<name>), not
    in MLflow's default ./mlruns of whatever directory the command ran in; other stores: MLflow's default."""
    if not uri.startswith("sqlite:///"):
        return None
    folder = Path(uri.removeprefix("sqlite:///")).expanduser().absolute().parent / "mlruns"
    return (folder / hashlib.sha256(experiment.encode()).hexdigest()[:12]).as_uri()


class _Retrying:
    """MlflowClient whose calls are retried when SQLite answers "database is locked": MLflow waits on a busy
    store (busy_timeout) but SQLite refuses some lock upgrades at once, without waiting."""

    DELAYS_S = (0.2, 0.5, 1, 2, 4, 8, 15)

    def __init__(self, client: MlflowClient):
        self._client = client

    def __getattr__(self, name):
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        @functools.wraps(attr)
        def call(*args, **kwargs):
            for delay in (*self.DELAYS_S, None):
                try:
                    return attr(*args, **kwargs)
                except MlflowException as e:
                    if delay is None or "database is locked" not in str(e):
                        raise
                    time.sleep(delay)
        return call


class Tracker:
    def __init__(self, uri: str, experiment: str):
        self.uri = uri
        try:
            with _store_lock(uri):
                self.client = _Retrying(MlflowClient(tracking_uri=uri))
                exp = self.client.get_experiment_by_name(experiment)
                self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(
                    experiment, artifact_location=_artifact_root(uri, experiment))
                if f"mlflow.sharedViewState.{COMPARE_VIEW}" not in (exp.tags if exp else {}):
                    self.client.set_experiment_tag(self.experiment_id, f"mlflow.sharedViewState.{COMPARE_VIEW}",
                                                   compare_view())
        except MlflowException as e:
            raise BenchError(f"tracking.uri: cannot open the MLflow store {uri}: "
                             f"{error_line(e, with_type=False)}") from e

    def start(self, cfg, extra_tags: dict | None = None) -> str:
        """Open a RUNNING run named method-task-model-seed with the filter tags, the config's own tags
        (`tracking.tags`), its run_key and the process that holds it (see bench/orchestration/resume.py); return
        its id."""
        from bench.orchestration.heartbeat import now_tag
        from bench.orchestration.resume import process_tags, run_key
        own = {str(k): str(v) for k, v in (OmegaConf.select(cfg, "tracking.tags", default=None) or {}).items()}
        tags = {**own, "method": cfg.method.name, "model": cfg.model.name, "task": cfg.task.name,
                "quant": cfg.quant.name, "seed": str(cfg.seed), "status": "RUNNING", "run_key": run_key(cfg),
                **process_tags("owner"), **now_tag(), **(extra_tags or {})}
        run = self.client.create_run(self.experiment_id, run_name=run_name(cfg), tags=tags)
        return run.info.run_id

    def log_config(self, run_id: str, cfg) -> None:
        """params: the flattened resolved config; artifact: config.yaml (both without secret-looking keys)."""
        container = OmegaConf.to_container(cfg, resolve=True)
        params = [Param(k, v) for k, v in sorted(flatten(container).items())]
        for i in range(0, len(params), 100):  # log_batch accepts at most 100 params per call
            self.client.log_batch(run_id, params=params[i:i + 100])
        self.log_text(run_id, OmegaConf.to_yaml(OmegaConf.create(without_secrets(container))), "config.yaml")

    def bind(self, run_id: str) -> "RunLog":
        """The metric-logging side of one run, as bench/core/pipeline.py takes it (`log_metrics`, `log_points`)."""
        return RunLog(self, run_id)

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        self.log_points(run_id, [(step, metrics)])

    def log_points(self, run_id: str, points: list[tuple[int, dict[str, float]]]) -> None:
        """Several steps' metrics in as few store writes as possible (log_batch takes at most 1,000 metrics)."""
        ts = int(time.time() * 1000)
        batch = [Metric(k, float(v), ts, step) for step, metrics in points for k, v in metrics.items()]
        for i in range(0, len(batch), 1000):
            self.client.log_batch(run_id, metrics=batch[i:i + 1000])

    def log_file(self, run_id: str, path: Path, artifact: str) -> None:
        """Log a local file as the artifact `artifact` (a path such as predictions/test.parquet)."""
        folder = str(Path(artifact).parent)
        self.client.log_artifact(run_id, str(path), None if folder == "." else folder)

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
        # MLflow 3 opens experiments in its GenAI view; this query opens the runs table, with the comparison columns.
        return (f"{host}/#/experiments/{self.experiment_id}/runs?workflowType=machine_learning"
                f"&viewStateShareKey={COMPARE_VIEW}")


class RunLog:
    """One run's metric writes: what bench/core/pipeline.py logs through, without knowing about MLflow."""

    def __init__(self, tracker: Tracker, run_id: str):
        self.tracker, self.run_id = tracker, run_id

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        self.tracker.log_metrics(self.run_id, metrics, step)

    def log_points(self, points: list[tuple[int, dict[str, float]]]) -> None:
        self.tracker.log_points(self.run_id, points)
