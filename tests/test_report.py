"""`python -m bench.report`: a store filled by real short runs (tiny random-init BERT), and constructed cases for
the statistics, the Pareto frontier, the noise wording and the bad-input errors."""
from __future__ import annotations

import hashlib
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from scipy import stats

from bench.report import build_report, main
from bench.report import data as report_data
from bench.report.stats import mean_ci, pareto_front, within_noise
from bench.run import run
from bench.track import Tracker
from tests.conftest import ROOT, compose

EXPERIMENT = "peft-bench"


@pytest.fixture
def one_thread():
    """Real runs on one torch thread: on a busy 2-core machine two spinning threads make a tiny run ~10x slower."""
    before = torch.get_num_threads()
    yield ["train.threads=1"]
    torch.set_num_threads(before)  # run() sets it process-wide


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _row(md: str, label: str) -> list[str]:
    """The cells of the table row whose first cell is `label` (bold or not)."""
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0].strip("*") == label:
            return cells
    raise AssertionError(f"no table row for {label!r} in:\n{md}")


# --- real runs ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_report_from_real_tiny_runs(tiny_overrides, one_thread, tmp_path):
    """Tiny random-init BERT on the toy data: full, lora, ia3 × seeds 0, 1; one FAILED run (NaN loss); two sweep
    trials of a study. Checks the tables, deltas, failures, sweeps, determinism, and that the store is untouched."""
    tiny_overrides = tiny_overrides + one_thread
    uri = compose(*tiny_overrides).tracking.uri
    for method in ("full", "lora", "ia3"):
        for seed in (0, 1):
            assert run(compose(f"method={method}", f"seed={seed}", *tiny_overrides),
                       tmp_path / f"{method}-{seed}").status == "FINISHED"
    with pytest.raises(FloatingPointError):
        run(compose("method=lora", "seed=2", "train.lr=1e12", "train.max_grad_norm=1e12", *tiny_overrides),
            tmp_path / "nan")
    tracker = Tracker(uri, EXPERIMENT)
    parent = tracker.client.create_run(tracker.experiment_id, run_name="sweep-toy", tags={
        "study": "toy", "sweep_role": "parent", "objective": "eval/accuracy", "direction": "maximize"}).info.run_id
    for trial, (r, alpha) in enumerate([(2, 4), (4, 16)]):
        cfg = compose("method=lora", f"method.r={r}", f"method.alpha={alpha}", *tiny_overrides)
        rid = tracker.start(cfg, extra_tags={"study": "toy", "trial": str(trial), "mlflow.parentRunId": parent})
        run(cfg, tmp_path / f"trial-{trial}", run_id=rid, tracker=tracker)
    tracker.end(parent, "FINISHED")

    store = Path(uri.removeprefix("sqlite:///"))
    before = _sha(store)
    out_a, out_b = tmp_path / "a" / "toy.md", tmp_path / "b" / "toy.md"
    assert main(["--tracking-uri", uri, "--experiment", EXPERIMENT, "--out", str(out_a)]) == 0
    proc = subprocess.run([sys.executable, "-m", "bench.report", "--tracking-uri", uri, "--out", str(out_b)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)  # default experiment: peft-bench
    assert proc.returncode == 0 and f"wrote {out_b}" in proc.stdout, proc.stderr
    assert _sha(store) == before, "the report must not write to the store"

    # deterministic: same runs, same bytes (Markdown and every PNG), also from another process
    md = out_a.read_text()
    assert out_b.read_text() == md
    pngs = sorted(p.name for p in (tmp_path / "a" / "toy").glob("*.png"))
    assert pngs == ["acc-local-hf-none.png", "sweep-toy.png"]
    for name in pngs:
        png = (tmp_path / "a" / "toy" / name).read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 10_000
        assert png == (tmp_path / "b" / "toy" / name).read_bytes(), name
        assert b"tEXtSoftware" not in png  # no "Matplotlib version ..." entry: a new matplotlib keeps the bytes
        assert f"](toy/{name})" in md

    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
    acc = {(r.data.tags["method"], r.data.tags["seed"]): r.data.metrics["eval/accuracy"] for r in runs
           if r.info.status == "FINISHED" and "study" not in r.data.tags}
    assert "## local · hf · none" in md
    full, lora, ia3 = _row(md, "full"), _row(md, "lora"), _row(md, "ia3")
    assert full[0] == "**full**" and full[3] == "reference"
    for cells, method in ((full, "full"), (lora, "lora"), (ia3, "ia3")):
        values = [acc[(method, "0")], acc[(method, "1")]]
        hw = stats.t.ppf(0.975, 1) * np.std(values, ddof=1) / math.sqrt(2)
        assert cells[1] == "n=2 (0, 1)", cells  # sweep trials and the failed run stay out of the tables
        assert cells[2] == f"{100 * np.mean(values):.1f} ± {100 * hw:.1f} %", cells
    delta = 100 * (np.mean([acc["lora", "0"], acc["lora", "1"]]) - np.mean([acc["full", "0"], acc["full", "1"]]))
    assert lora[3] == f"{delta:+.1f} pt"
    assert "(×" in lora[7]  # checkpoint ratio against full
    assert "### Which method to choose: local · hf · none" in md
    assert "Smallest checkpoint within 1 point of the best accuracy" in md

    # provenance: the failed run with its reason; sweeps: the study with its best trial
    failed = next(line for line in md.splitlines() if line.startswith("| lora-local-hf-s2 |"))
    assert "FAILED" in failed and "at step" in failed
    assert "## Sweeps" in md
    toy = next(line for line in md.splitlines() if line.startswith("| toy |"))
    assert "maximize eval/accuracy" in toy and "method.alpha=" in toy and "method.r=" in toy
    assert "- Runs: 10 (1 FAILED, 9 FINISHED); 6 in the method tables, 3 sweep runs" in md

    # the plain-SQL reader returns exactly what MLflow's own search returns
    fast = report_data._read_sqlite(store, uri, [EXPERIMENT])
    slow = report_data._read_mlflow(uri, [EXPERIMENT])
    key = lambda r: r.run_id  # noqa: E731
    assert sorted(fast, key=key) == sorted(slow, key=key)


# --- constructed cases ------------------------------------------------------------------------------------------
def test_confidence_interval_against_a_hand_computed_case():
    # values 0.80, 0.84, 0.85: mean 0.83; s = sqrt((0.03² + 0.01² + 0.02²) / 2) = sqrt(0.0007) = 0.0264575;
    # t(0.975, 2 df) = 4.303 (t table); half-width = 4.303 × 0.0264575 / √3 = 0.06573
    est = mean_ci([0.80, 0.84, 0.85])
    assert est.n == 3 and est.mean == pytest.approx(0.83)
    assert est.half_width == pytest.approx(0.06573, abs=2e-5)
    # two seeds 0.90, 0.80: s = 0.0707107; t(0.975, 1 df) = 12.706; half-width = 12.706 × 0.0707107 / √2 = 0.6353
    assert mean_ci([0.90, 0.80]).half_width == pytest.approx(0.6353, abs=2e-4)
    one = mean_ci([0.7])
    assert one.n == 1 and one.half_width is None and one.mean == 0.7
    assert within_noise(mean_ci([0.80, 0.84, 0.85]), mean_ci([0.88, 0.89, 0.90])) is True   # 76.4-89.6 vs 86.5-91.5
    assert within_noise(mean_ci([0.80, 0.81, 0.80]), mean_ci([0.90, 0.91, 0.90])) is False
    assert within_noise(one, mean_ci([0.80, 0.84, 0.85])) is None


def test_pareto_frontier_on_a_constructed_case():
    points = [(0.90, 100),   # A: on
              (0.85, 50),    # B: on (cheapest at its accuracy)
              (0.80, 60),    # C: dominated by B (less accurate, costlier)
              (0.90, 120),   # D: dominated by A (as accurate, costlier)
              (0.95, 300),   # E: on (most accurate)
              (0.85, 50),    # F: identical to B: both stay on
              (0.70, 40)]    # G: on (cheapest)
    assert pareto_front(points) == [True, True, False, False, True, True, True]


def _log(client, exp, method, seed, acc, mem, ckpt, secs, task="trec", status="FINISHED", extra=None):
    tags = {"method": method, "model": "minilm", "task": task, "quant": "none", "seed": str(seed)}
    rid = client.create_run(exp, run_name=f"{method}-{task}-minilm-s{seed}", tags=tags).info.run_id
    metrics = {"eval/accuracy": acc, "mem/peak_train_bytes": mem, "ckpt/bytes": ckpt, "time/train_s": secs,
               "params/trainable_pct": 1.0, "throughput/train_tokens_per_s": 1000.0}
    params = {"seed": str(seed), "method.name": method, "train.lr": "0.001", **(extra or {})}
    ts = int(time.time() * 1000)
    client.log_batch(rid, metrics=[Metric(k, v, ts, 1) for k, v in metrics.items()] if status == "FINISHED" else [],
                     params=[Param(k, v) for k, v in params.items()])
    client.set_terminated(rid, status)
    return rid


def test_constructed_report_says_what_is_noise_and_splits_settings(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment(EXPERIMENT)
    MiB = 2**20
    for seed, acc in enumerate([0.80, 0.84, 0.85]):          # lora: 83.0 ± 6.6, cheap
        _log(client, exp, "lora", seed, acc, 500 * MiB, 1e5, 10.0)
    for seed, acc in enumerate([0.81, 0.85, 0.86]):          # adapter: 84.0 ± 6.6, within noise of lora, costlier
        _log(client, exp, "adapter", seed, acc, 600 * MiB, 1e6, 12.0)
    for seed, acc in enumerate([0.95, 0.951, 0.952]):        # full: clearly best, most memory
        _log(client, exp, "full", seed, acc, 900 * MiB, 9e7, 20.0)
    _log(client, exp, "ia3", 0, 0.60, 400 * MiB, 5e4, 8.0)  # one seed: noise unknown
    _log(client, exp, "lora", 0, 0.1, 500 * MiB, 1e5, 10.0, extra={"method.r": "64"})  # another setting: own row
    _log(client, exp, "lora", 1, 0, 0, 0, 0, status="FAILED")
    out = tmp_path / "r.md"
    build_report(uri, [EXPERIMENT], out)
    md = out.read_text()

    lora, adapter, full, ia3 = _row(md, "lora"), _row(md, "adapter"), _row(md, "full"), _row(md, "ia3")
    assert lora[2] == "83.0 ± 6.6 %" and lora[1] == "n=3 (0, 1, 2)"
    assert ia3[2] == "60.0 %" and ia3[1] == "n=1 (0)"           # n=1: no interval
    assert _row(md, "lora (r=64)")[1] == "n=1 (0)"              # different settings are not averaged together
    assert full[3] == "reference" and lora[3] == "-12.1 pt"     # 83.0 - 95.1
    assert lora[5] == "500 MiB (×0.56)" and adapter[5] == "600 MiB (×0.67)"
    # Pareto: adapter is beaten by full in accuracy but cheaper; lora is cheaper than adapter but less accurate
    assert full[9] == "memory, checkpoint, train time" and ia3[9] == "memory, checkpoint, train time"
    assert adapter[9] == "memory, checkpoint, train time" and lora[9] == "memory, checkpoint, train time"
    assert _row(md, "lora (r=64)")[9] == "-"
    # budget table: every memory-frontier figure is a budget
    assert "| ≤ 400 MiB | ia3 | 60.0 %, n=1 | none |" in md
    assert "| ≤ 600 MiB | adapter | 84.0 ± 6.6 %, n=3 | lora; unknown (n=1): ia3, lora (r=64) |" in md
    # the recommendation at 600 MiB falls back to lora: adapter's gain is inside the seeds' noise
    assert "- **≤ 600 MiB**: use **lora** (83.0 ± 6.6 %, n=3, 500 MiB): adapter's +1.0 pt at this budget is within " \
           "seed noise" in md
    assert ("- **≤ 900 MiB**: use **full** (95.1 ± 0.2 %, n=3); ahead of adapter, lora beyond seed noise (95 % "
            "intervals apart); seed noise unknown (n=1) against ia3 (-35.1 pt), lora (r=64) (-85.1 pt)") in md
    assert "**Fastest within 1 point of the best accuracy** (full, 95.1 ± 0.2 %): **full**" in md
    failed = next(line for line in md.splitlines() if line.startswith("| lora-trec-minilm-s1 |"))
    assert "FAILED" in failed


def test_empty_or_unknown_experiment_is_one_line_and_nonzero(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    MlflowClient(tracking_uri=uri).create_experiment("empty")
    out = tmp_path / "reports" / "x.md"
    capsys.readouterr()  # MLflow's own lines from creating the store

    proc = subprocess.run([sys.executable, "-m", "bench.report", "--tracking-uri", uri, "--experiment", "nope",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "--experiment" in proc.stderr and "'nope'" in proc.stderr and "valid: Default, empty" in proc.stderr

    assert main(["--tracking-uri", uri, "--experiment", "empty", "--out", str(out)]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'empty'" in err and "has no runs" in err

    missing = tmp_path / "nowhere" / "mlflow.db"
    assert main(["--tracking-uri", f"sqlite:///{missing}", "--out", str(out)]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--tracking-uri" in err and str(missing) in err
    assert not missing.exists() and not out.exists()  # nothing created by a failed report
