"""The README's main command, shortened with overrides, end to end: real MiniLM, real TREC, real MLflow store."""
from __future__ import annotations

import json
import re
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from bench.core import metrics as M
from bench.orchestration.worker import run_job
from tests.conftest import ROOT, compose

METRICS = list(M.run_names("classification"))   # every metric a finished CPU classification run reports
TAGS = ["method", "model", "task", "quant", "seed", "status", "git_commit", "version.torch",
        "version.transformers", "version.peft", "version.bitsandbytes", "device_name", "torch_threads"]
SHORT = ["train.max_steps=12", "train.eval_every=6", "train.log_every=3", "task.max_train_samples=256",
         "task.max_eval_samples=64", "task.max_test_samples=64", "deploy.repeats=3"]


def runs(uri: str):
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("peft-bench")
    return client, client.search_runs([exp.experiment_id]) if exp else []


@pytest.mark.slow
def test_main_command_multirun_with_a_broken_job(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cmd = [sys.executable, "-m", "bench", "method=lora,adapter,broken,prefix", *SHORT,
           f"tracking.uri={uri}", f"hydra.searchpath=[file://{ROOT}/tests/conf]",
           f"hydra.sweep.dir={tmp_path}/multirun", "-m"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "COLUMNS": "200"})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out  # non-zero because one job failed, after all jobs ran
    client, found = runs(uri)
    by_method = {r.data.tags["method"]: r for r in found}
    assert sorted(by_method) == ["adapter", "broken", "lora", "prefix"], out
    broken = by_method.pop("broken")
    assert broken.info.status == "FAILED"
    assert re.search(r"loss is (nan|inf) at step \d+", broken.data.tags["error"]), broken.data.tags["error"]
    for method, r in by_method.items():
        assert r.info.status == "FINISHED", (method, r.data.tags.get("error"), out)
        assert r.info.run_name == f"{method}-trec-minilm-s0"
        missing = [m for m in METRICS if m not in r.data.metrics]
        assert not missing, (method, missing)
        assert not [t for t in TAGS if t not in r.data.tags], method
        assert r.data.params["method.name"] == method and r.data.params["train.max_steps"] == "12"
        assert 0 < r.data.metrics["params/trainable_pct"] < 100
        assert r.data.metrics["mem/peak_train_bytes"] > 50e6  # a whole process holding MiniLM
        artifacts = {a.path for a in client.list_artifacts(r.info.run_id)}
        assert {"config.yaml", "result.json", "predictions"} <= artifacts
        result = json.loads(Path(client.download_artifacts(r.info.run_id, "result.json", str(tmp_path))).read_text())
        assert result["metrics"]["test/accuracy"] == r.data.metrics["test/accuracy"]
        predictions = pd.read_parquet(client.download_artifacts(r.info.run_id, M.PREDICTIONS_ARTIFACT, str(tmp_path)))
        assert len(predictions) == 64 and list(predictions.columns) == ["index", "label", "prediction"]
        assert (predictions.label == predictions.prediction).mean() == r.data.metrics["test/accuracy"]
    # the summary table lists every job, the failed one with its reason
    for name in ("lora-trec-minilm-s0", "adapter-trec-minilm-s0", "prefix-trec-minilm-s0", "broken-trec-minilm-s0"):
        assert name in out
    assert "FAILED" in out


def test_in_process_run_logs_everything_and_failure_is_marked(tiny_overrides, tmp_path):
    cfg = compose("method=lora", *tiny_overrides)
    result = run_job(cfg, tmp_path / "job")
    assert result.status == "FINISHED"
    assert json.loads((tmp_path / "job" / "result.json").read_text())["status"] == "FINISHED"
    client, found = runs(cfg.tracking.uri)
    assert [r.info.status for r in found] == ["FINISHED"]
    assert not [m for m in METRICS if m not in found[0].data.metrics]
    history = client.get_metric_history(found[0].info.run_id, "train/loss")
    assert len(history) >= 6  # every log_every steps, not just the final value
    val = client.get_metric_history(found[0].info.run_id, "val/accuracy")
    assert sorted(m.step for m in val) == [30, 60]  # each periodic evaluation on validation
    assert [m.step for m in client.get_metric_history(found[0].info.run_id, "test/accuracy")] == [60]  # once

    bad = compose("method=lora", *tiny_overrides, "train.lr=1e12", "train.max_grad_norm=1e12")
    with pytest.raises(FloatingPointError, match=r"loss is (nan|inf) at step \d+"):
        run_job(bad, tmp_path / "bad")
    client, found = runs(cfg.tracking.uri)
    failed = [r for r in found if r.info.status == "FAILED"]
    assert len(failed) == 1 and "at step" in failed[0].data.tags["error"]


@pytest.mark.slow  # a whole command or several runs: kept out of the fast subset
def test_multirun_flag_between_overrides(tiny_overrides, tmp_path):
    """`python -m bench seed=0,1 -m <overrides>`: -m between overrides runs both jobs (issue 10; -m last: the slow
    tests above and in test_reliability.py; every order of flags and overrides: test_reliability.py)."""
    uri = next(o.split("=", 1)[1] for o in tiny_overrides if o.startswith("tracking.uri="))
    rest = [o for o in tiny_overrides if not o.startswith(("train.max_steps=", "train.eval_every="))]
    cmd = [sys.executable, "-m", "bench", "seed=0,1", "-m", *rest, "train.max_steps=4", "train.eval_every=null",
           f"hydra.sweep.dir={tmp_path}/sweep"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    _, found = runs(uri)
    assert sorted((r.data.tags["seed"], r.info.status) for r in found) == [("0", "FINISHED"), ("1", "FINISHED")]
    assert all(r.data.params["train.max_steps"] == "4" for r in found)   # an override after -m reached each job


def test_unknown_flag_is_one_line_and_exit_code_2(tmp_path):
    """An unknown flag anywhere: one line (not argparse's whole usage), exit code 2, and nothing runs."""
    proc = subprocess.run([sys.executable, "-m", "bench", "seed=0,1", "--frobnicate", "-m"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith("error: unrecognized arguments: --frobnicate;") and proc.stderr.count("\n") == 1, \
        proc.stderr
    assert not proc.stdout and not list(tmp_path.iterdir())   # nothing ran: no store, no job folders
