"""What users look at: the MLflow UI's runs table for the harness's runs, rendered by a real headless Chromium
against a real `mlflow server` on the test's store (tiny random-init BERT runs). The screenshot is kept in
test-artifacts/ (or $BENCH_TEST_ARTIFACTS) for a person to look at."""
from __future__ import annotations

import html
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from bench.orchestration.worker import run_job
from bench.tracking import COMPARE_COLUMNS, Tracker
from tests.conftest import ROOT, compose

CHROMIUM = shutil.which("chromium")
ARTIFACTS = Path(os.environ.get("BENCH_TEST_ARTIFACTS", ROOT / "test-artifacts"))
# flags from /work/shared/notes/mlflow-ui.md: no sandbox (root in CI), and no background traffic on a closed network
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1920,1000", "--virtual-time-budget=10000"]

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install -y "
                                                          "chromium; .ci/run installs it): no browser to check the UI")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_up(url: str, server: subprocess.Popen, log: Path, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"mlflow server exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"mlflow server did not answer {url} in {timeout_s} s:\n{log.read_text()[-3000:]}")


def _visible_text(dom: str) -> str:
    dom = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S | re.I)
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", dom)).split())


def test_runs_table_shows_runs_and_metrics_in_headless_chromium(tiny_overrides, tmp_path):
    overrides = [*tiny_overrides, "train.threads=1"]  # one thread: a busy 2-core machine makes two spin
    for method in ("lora", "ia3"):
        assert run_job(compose(f"method={method}", *overrides), tmp_path / method).status == "FINISHED"
    uri = compose(*overrides).tracking.uri
    client = MlflowClient(tracking_uri=uri)
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("peft-bench").experiment_id])}
    assert sorted(runs) == ["ia3-local-hf-s0", "lora-local-hf-s0"]

    port = _free_port()
    log = tmp_path / "mlflow-server.log"
    with open(log, "w") as out:
        server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
                                   "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                                  stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True)
    try:
        host = f"http://127.0.0.1:{port}"
        _wait_until_up(f"{host}/health", server, log)
        url = Tracker(uri, "peft-bench").experiment_url(host)  # the link the harness hands to users
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shot = ARTIFACTS / "mlflow-runs-table.png"
        shot.unlink(missing_ok=True)
        with tempfile.TemporaryDirectory() as profile:
            proc = subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--screenshot={shot}",
                                   "--dump-dom", url], capture_output=True, text=True, timeout=180)
        print(f"MLflow UI screenshot: {shot}")
        text = _visible_text(proc.stdout)
        assert proc.returncode == 0 and text, proc.stderr[-2000:]
        assert shot.is_file() and shot.read_bytes().startswith(b"\x89PNG")

        assert "Runs" in text and "peft-bench" in text, text[:2000]
        for name in runs:
            assert name in text, f"run {name} not in the runs table: {text[:3000]}"
        # the comparison columns of the shared view are there, with the runs' values
        for metric in COMPARE_COLUMNS["metrics"]:
            assert metric in text, f"metric column {metric} missing: {text[:3000]}"
        for name, r in runs.items():
            assert r.data.tags["method"] in text
            assert f"{r.data.metrics['params/trainable_pct']:.3f}"[:4] in text, (name, text[:3000])
        assert "No data available" not in text  # the GenAI view's empty state: the link must open the runs table
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and its worker, which this test started
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
