"""`python -m bench.report`: a store filled by real short runs (tiny random-init BERT), and constructed cases for
the statistics (against libraries and hand-checked numbers), the Pareto frontier, the paired verdicts read from
real prediction artifacts, the noise wording of budget claims, and the bad-input errors."""
from __future__ import annotations

import hashlib
import math
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from scipy import stats

from bench.core import metrics as M
from bench.errors import BenchError
from bench.report import build_report, main
from bench.report import runs as report_runs
from bench.report.predictions import Reader, local_candidates
from bench.report.stats import (N_RESAMPLES, bootstrap_distribution, cost_spread, costs_apart, mcnemar_exact,
                                mcnemar_test, mean_ci, paired_bootstrap, pareto_front, wilson)
from bench.orchestration.worker import run_job
from bench.tracking import Tracker
from tests.conftest import ROOT, compose

EXPERIMENT = "peft-bench"


# Real runs on one torch thread: on a busy 2-core machine two spinning threads make a tiny run ~10x slower
# (conftest's _torch_threads restores the count afterwards)
ONE_THREAD = ["train.threads=1"]


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
def test_report_from_real_tiny_runs(tiny_overrides, tmp_path):
    """Tiny random-init BERT on the toy data: full, lora, ia3 × seeds 0, 1; one FAILED run (NaN loss); two sweep
    trials of a study. Checks the tables, deltas, failures, sweeps, determinism, and that the store is untouched."""
    tiny_overrides = tiny_overrides + ONE_THREAD
    uri = compose(*tiny_overrides).tracking.uri
    for method in ("full", "lora", "ia3"):
        for seed in (0, 1):
            assert run_job(compose(f"method={method}", f"seed={seed}", *tiny_overrides),
                       tmp_path / f"{method}-{seed}").status == "FINISHED"
    with pytest.raises(FloatingPointError):
        run_job(compose("method=lora", "seed=2", "train.lr=1e12", "train.max_grad_norm=1e12", *tiny_overrides),
            tmp_path / "nan")
    tracker = Tracker(uri, EXPERIMENT)
    parent = tracker.client.create_run(tracker.experiment_id, run_name="sweep-toy", tags={
        "study": "toy", "sweep_role": "parent", "objective": M.VAL_ACCURACY, "direction": "maximize"}).info.run_id
    for trial, (r, alpha) in enumerate([(2, 4), (4, 16)]):
        cfg = compose("method=lora", f"method.r={r}", f"method.alpha={alpha}", *tiny_overrides)
        rid = tracker.start(cfg, extra_tags={"study": "toy", "trial": str(trial), "mlflow.parentRunId": parent})
        run_job(cfg, tmp_path / f"trial-{trial}", run_id=rid, tracker=tracker)
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
    acc = {(r.data.tags["method"], r.data.tags["seed"]): r.data.metrics[M.TEST_ACCURACY] for r in runs
           if r.info.status == "FINISHED" and "study" not in r.data.tags}
    assert "## local · hf · none" in md
    full, lora, ia3 = _row(md, "full"), _row(md, "lora"), _row(md, "ia3")
    assert full[0] == "**full**" and full[4] == "reference"
    for cells, method in ((full, "full"), (lora, "lora"), (ia3, "ia3")):
        values = [acc[(method, "0")], acc[(method, "1")]]
        hw = stats.t.ppf(0.975, 1) * np.std(values, ddof=1) / math.sqrt(2)
        assert cells[1] == "n=2 (0, 1)", cells  # sweep trials and the failed run stay out of the tables
        assert cells[2] == f"{100 * np.mean(values):.1f} ± {100 * hw:.1f} %", cells
        assert cells[3].endswith(")") and "(n=" in cells[3], cells  # test-sampling interval: predictions were read
    delta = 100 * (np.mean([acc["lora", "0"], acc["lora", "1"]]) - np.mean([acc["full", "0"], acc["full", "1"]]))
    assert lora[4] == f"{delta:+.1f} pt"
    assert "(×" in lora[9]  # checkpoint ratio against full
    assert "### Which method to choose: local · hf · none" in md
    assert "Smallest checkpoint within 1 point of the best test accuracy" in md
    assert "paired bootstrap" in md  # two seeds per method, predictions logged by every run
    assert "- Test predictions (`predictions/test.parquet`, for the test-sampling intervals and the paired tests): " \
           "read for 6 of the 6 runs in the tables." in md

    # provenance: the failed run with its reason; sweeps: the study with its best trial
    failed = next(line for line in md.splitlines() if line.startswith("| lora-local-hf-s2 |"))
    assert "FAILED" in failed and "at step" in failed
    assert "## Sweeps" in md
    toy = next(line for line in md.splitlines() if line.startswith("| toy |"))
    assert f"maximize {M.VAL_ACCURACY}" in toy and "method.alpha=" in toy and "method.r=" in toy
    assert "the one test evaluation of the chosen configuration" in md
    assert "- Runs: 10 (1 FAILED, 9 FINISHED); 6 in the method tables, 3 sweep runs" in md

    # the plain-SQL reader returns exactly what MLflow's own search returns
    fast = report_runs.read_runs(uri, [EXPERIMENT])
    slow = report_runs._read_mlflow(uri, [EXPERIMENT])
    key = lambda r: r.run_id  # noqa: E731
    assert sorted(fast, key=key) == sorted(slow, key=key)


def test_served_artifacts_are_read_from_the_artifacts_root_when_given(tmp_path):
    uri = "mlflow-artifacts:/3/0123abcd/artifacts"
    assert local_candidates(uri, "http://127.0.0.1:5000") is None   # downloaded through the server
    assert local_candidates(uri, "http://127.0.0.1:5000", str(tmp_path)) == \
        [tmp_path / "3" / "0123abcd" / "artifacts" / M.PREDICTIONS_ARTIFACT]


def test_sql_reader_knows_the_installed_mlflow_schema_and_refuses_another_in_one_line(tmp_path):
    from mlflow.tracking import MlflowClient
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    client.set_terminated(client.create_run(client.create_experiment(EXPERIMENT)).info.run_id)   # MLflow makes it
    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        (revision,), = db.execute("SELECT version_num FROM alembic_version").fetchall()
    assert revision in report_runs.SCHEMAS, (f"the installed MLflow writes schema {revision}: check the SQL of "
                                             "bench/report/runs.py against it, then add it to SCHEMAS")
    assert len(report_runs.read_runs(uri, [EXPERIMENT])) == 1
    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        db.execute("UPDATE alembic_version SET version_num = 'f00dcafe1234'")
    with pytest.raises(BenchError) as e:
        report_runs.read_runs(uri, [EXPERIMENT])
    assert "MLflow schema revision f00dcafe1234 is not the one bench/report/runs.py reads" in str(e.value)
    assert "\n" not in str(e.value)


# --- constructed cases: statistics ------------------------------------------------------------------------------
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


def test_wilson_interval_against_the_libraries():
    # integer count: scipy's own Wilson interval (an implementation independent of statsmodels)
    ref = stats.binomtest(469, 500).proportion_ci(confidence_level=0.95, method="wilson")
    assert wilson(469 / 500, 500) == pytest.approx((ref.low, ref.high), abs=1e-12)
    # hand-checked: 8 of 10, z = 1.959964: centre (8 + z²/2) / (10 + z²) = 0.71636, half-width
    # z·sqrt(10·0.8·0.2 + z²/4) / (10 + z²) = 0.22728 -> 0.4902 to 0.9433
    low, high = wilson(0.8, 10)
    assert low == pytest.approx(0.4902, abs=1e-4) and high == pytest.approx(0.9433, abs=1e-4)
    # a pooled accuracy over seeds is a fractional count; statsmodels takes it as is
    from statsmodels.stats.proportion import proportion_confint
    assert wilson(0.9383, 500) == pytest.approx(proportion_confint(0.9383 * 500, 500, method="wilson"), abs=1e-12)


def test_mcnemar_against_a_hand_checked_value():
    # b = 1, c = 9 discordant: two-sided exact p = 2 · P(X ≤ 1 | X ~ Bin(10, 1/2)) = 2 · (1 + 10) / 1024
    assert mcnemar_exact(1, 9) == pytest.approx(2 * 11 / 1024, abs=1e-15) == pytest.approx(0.021484375)
    assert mcnemar_exact(9, 1) == mcnemar_exact(1, 9)
    assert mcnemar_exact(0, 0) == 1.0
    # from per-example answers: 20 examples, both right on 8, both wrong on 2, A only on 1, B only on 9
    a = np.array([1] * 8 + [0] * 2 + [1] + [0] * 9, dtype=bool)
    b = np.array([1] * 8 + [0] * 2 + [0] + [1] * 9, dtype=bool)
    test = mcnemar_test(a, b, "0")
    assert (test.a_only, test.b_only, test.examples) == (1, 9, 20)
    assert test.diff == pytest.approx((9 - 17) / 20) and test.p_value == pytest.approx(0.021484375)
    assert test.within_noise is False  # p < 0.05
    assert mcnemar_test(a, a, "0").within_noise is True


def _answers(rng, n, p):
    return rng.random(n) < p


def test_paired_bootstrap_agrees_with_scipy_for_one_seed():
    """With one seed the two-level bootstrap is scipy's paired bootstrap over examples: the 95 % percentile
    endpoints agree within Monte-Carlo error (the 2.5 % quantile of B resamples has a standard error of about
    0.06 · σ for B = 2,000, σ the bootstrap distribution's deviation; scipy runs 20,000 resamples)."""
    rng = np.random.default_rng(1)
    a, b = _answers(rng, 400, 0.85), _answers(rng, 400, 0.80)
    ours = paired_bootstrap(a[None, :], b[None, :], ("0",))
    sigma = bootstrap_distribution(a[None, :], b[None, :]).std()
    ref = stats.bootstrap((a.astype(float), b.astype(float)), lambda x, y, axis: x.mean(axis) - y.mean(axis),
                          paired=True, vectorized=True, n_resamples=20_000, method="percentile", confidence_level=0.95,
                          rng=np.random.default_rng(7)).confidence_interval
    assert ours.test == "bootstrap" and ours.examples == 400 and ours.seeds == ("0",)
    assert ours.diff == pytest.approx(a.mean() - b.mean())
    assert abs(ours.low - ref.low) < 0.25 * sigma and abs(ours.high - ref.high) < 0.25 * sigma, (ours, ref)
    # deterministic: the same answers give the same interval, bit for bit, also after other comparisons
    paired_bootstrap(np.ones((3, 50), bool), np.zeros((3, 50), bool), ("0", "1", "2"))
    again = paired_bootstrap(a[None, :], b[None, :], ("0",))
    assert (again.low, again.high) == (ours.low, ours.high)
    assert len(bootstrap_distribution(np.zeros((2, 5), bool), np.ones((2, 5), bool))) == N_RESAMPLES


def test_paired_bootstrap_over_seeds_and_examples():
    """Identical seeds: resampling seeds changes nothing, so the interval is the one-seed one (within Monte-Carlo
    error). Seeds that disagree widen it: the seed level is really resampled."""
    rng = np.random.default_rng(2)
    a, b = _answers(rng, 300, 0.85), _answers(rng, 300, 0.80)
    one = paired_bootstrap(a[None, :], b[None, :], ("0",))
    three = paired_bootstrap(np.stack([a, a, a]), np.stack([b, b, b]), ("0", "1", "2"))
    sigma = bootstrap_distribution(a[None, :], b[None, :]).std()
    assert abs(three.low - one.low) < 0.3 * sigma and abs(three.high - one.high) < 0.3 * sigma
    assert three.diff == pytest.approx(one.diff)
    # seed 1: A right on the first 60 questions, seed 2: A wrong on them; B unchanged
    first = np.arange(300) < 60
    wide = paired_bootstrap(np.stack([a, a | first, a & ~first]), np.stack([b, b, b]), ("0", "1", "2"))
    assert wide.high - wide.low > 1.5 * (three.high - three.low)
    assert wide.within_noise is (wide.low <= 0 <= wide.high)
    # the definition spelled out as a loop (its own generator): the same interval within Monte-Carlo error
    a3, b3 = np.stack([a, a | first, a & ~first]), np.stack([b, b, b])
    loop_rng, loop = np.random.default_rng(11), []
    for _ in range(N_RESAMPLES):
        s, e = loop_rng.integers(0, 3, 3), loop_rng.integers(0, 300, 300)
        loop.append(a3[s][:, e].mean() - b3[s][:, e].mean())
    sigma = bootstrap_distribution(a3, b3).std()
    low, high = np.percentile(loop, [2.5, 97.5])
    assert abs(wide.low - low) < 0.3 * sigma and abs(wide.high - high) < 0.3 * sigma, (wide, low, high)


def test_cost_noise_definition():
    assert cost_spread([1030.0, 1041.0, 1052.0]) == 22.0
    assert cost_spread([1000.0]) == pytest.approx(50.0)                   # one seed: the 5 % resolution
    assert not costs_apart([1030.0, 1041.0, 1052.0], [1042.0, 1053.0, 1064.0])  # 12 apart, spread 22
    assert costs_apart([1030.0, 1041.0, 1052.0], [1300.0, 1310.0, 1320.0])
    assert not costs_apart([1041.0], [1053.0])                             # 1.2 % < 5 % of one seed
    assert costs_apart([900.0], [1053.0])


def test_pareto_frontier_on_a_constructed_case():
    points = [(0.90, 100),   # A: on
              (0.85, 50),    # B: on (cheapest at its accuracy)
              (0.80, 60),    # C: dominated by B (less accurate, costlier)
              (0.90, 120),   # D: dominated by A (as accurate, costlier)
              (0.95, 300),   # E: on (most accurate)
              (0.85, 50),    # F: identical to B: both stay on
              (0.70, 40)]    # G: on (cheapest)
    assert pareto_front(points) == [True, True, False, False, True, True, True]


def test_where_predictions_are_looked_for(tmp_path):
    store = f"sqlite:///{tmp_path}/mlflow.db"
    art = "predictions/test.parquet"
    assert local_candidates((tmp_path / "a").as_uri(), store) == [tmp_path / "a" / art]
    assert local_candidates(str(tmp_path / "a"), store) == [tmp_path / "a" / art]
    assert local_candidates("./mlruns/1/x/artifacts", store) == [tmp_path / "mlruns/1/x/artifacts" / art,
                                                                  Path.cwd() / "mlruns/1/x/artifacts" / art]
    # served by `mlflow server` into its default --artifacts-destination ./mlartifacts
    assert local_candidates("mlflow-artifacts:/1/x/artifacts", store)[0] == tmp_path / "mlartifacts/1/x/artifacts" / art
    assert local_candidates("mlflow-artifacts:/1/x/artifacts", "http://127.0.0.1:5000") is None  # downloaded
    assert local_candidates("s3://bucket/1/x/artifacts", store) is None
    # a missing local file is one file test, not a download
    missing = report_runs.RunRecord("r", "n", "FINISHED", 0, None, "e", {}, {}, {},
                                    artifact_uri=(tmp_path / "none").as_uri())
    reader = Reader(store)
    assert reader(missing) is None and reader.remote_error is None


# --- constructed cases: the report -----------------------------------------------------------------------------
MiB = 2**20


def _predictions(correct) -> pd.DataFrame:
    """One row per test example: labels cycle over 3 classes; a wrong answer predicts the next class."""
    correct = np.asarray(correct, dtype=bool)
    label = np.arange(len(correct)) % 3
    return pd.DataFrame({"index": np.arange(len(correct)), "label": label,
                         "prediction": np.where(correct, label, (label + 1) % 3)})


def _log(client, exp, method, seed, acc, mem, ckpt, secs, task="trec", status="FINISHED", extra=None, correct=None,
         peak=None, old_protocol=False, tmp=None, device="cpu", metrics=None, frame=None):
    """One run as the harness logs it; `mem` is the train growth (CPU). With `correct`, its accuracy comes from
    those answers and they are logged as the predictions artifact; `frame`: a predictions artifact as given.
    `metrics`: more figures (a generative run's); acc None without `correct`: no test/accuracy (chrf_bleu)."""
    tags = {"method": method, "model": "minilm", "task": task, "quant": "none", "seed": str(seed), "device": device}
    rid = client.create_run(exp, run_name=f"{method}-{task}-minilm-s{seed}", tags=tags).info.run_id
    if correct is not None:
        acc = float(np.mean(correct))
    figures = {"eval/accuracy" if old_protocol else M.TEST_ACCURACY: acc, M.MEM_TRAIN_GROWTH: mem,
               M.MEM_PEAK_TRAIN: peak or mem + 1000 * MiB, M.CKPT_BYTES: ckpt, M.TIME_TRAIN: secs,
               M.PARAMS_TRAINABLE_PCT: 1.0, M.THROUGHPUT_TOKENS: 1000.0, **(metrics or {})}
    figures = {k: v for k, v in figures.items() if v is not None}
    params = {"seed": str(seed), "method.name": method, "train.lr": "0.001", **(extra or {})}
    ts = int(time.time() * 1000)
    client.log_batch(rid, metrics=[Metric(k, v, ts, 1) for k, v in figures.items()] if status == "FINISHED" else [],
                     params=[Param(k, v) for k, v in params.items()])
    if correct is not None or frame is not None:
        path = tmp / rid / "test.parquet"
        path.parent.mkdir(parents=True)
        (_predictions(correct) if frame is None else frame).to_parquet(path)
        client.log_artifact(rid, str(path), artifact_path=M.PREDICTIONS_ARTIFACT.rsplit("/", 1)[0])
    client.set_terminated(rid, status)
    return rid


def _store(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    # artifacts in tmp_path, as a file: URI (the default, ./mlruns, would be the working directory)
    return uri, client, client.create_experiment(EXPERIMENT, artifact_location=(tmp_path / "artifacts").as_uri())


def _section(md: str, title: str) -> str:
    start = md.index(f"## {title}\n")
    end = md.find("\n## ", start + 1)
    return md[start:end if end >= 0 else len(md)]


def test_constructed_report_tables_and_settings_without_predictions(tmp_path):
    """No predictions artifacts: tables, settings split into rows, Pareto frontiers, and no accuracy claim."""
    uri, client, exp = _store(tmp_path)
    for seed, acc in enumerate([0.80, 0.84, 0.85]):          # lora: 83.0 ± 6.6, cheap
        _log(client, exp, "lora", seed, acc, 500 * MiB, 1e5, 10.0)
    for seed, acc in enumerate([0.81, 0.85, 0.86]):          # adapter: 84.0 ± 6.6, costlier
        _log(client, exp, "adapter", seed, acc, 600 * MiB, 1e6, 12.0)
    for seed, acc in enumerate([0.95, 0.951, 0.952]):        # full: clearly best, most memory
        _log(client, exp, "full", seed, acc, 900 * MiB, 9e7, 20.0)
    _log(client, exp, "ia3", 0, 0.60, 400 * MiB, 5e4, 8.0)  # one seed
    _log(client, exp, "lora", 0, 0.1, 500 * MiB, 1e5, 10.0, extra={"method.r": "64"})  # another setting: own row
    _log(client, exp, "lora", 1, 0, 0, 0, 0, status="FAILED")
    _log(client, exp, "prefix", 0, 0.7, 450 * MiB, 1e5, 9.0, old_protocol=True)  # eval/accuracy only
    out = tmp_path / "r.md"
    build_report(uri, [EXPERIMENT], out)
    md = out.read_text()

    lora, adapter, full, ia3 = _row(md, "lora"), _row(md, "adapter"), _row(md, "full"), _row(md, "ia3")
    assert lora[2] == "83.0 ± 6.6 %" and lora[1] == "n=3 (0, 1, 2)"
    assert lora[3] == "-"                                       # no predictions: no test-sampling interval
    assert ia3[2] == "60.0 %" and ia3[1] == "n=1 (0)"           # n=1: no interval
    assert _row(md, "lora (r=64)")[1] == "n=1 (0)"              # different settings are not averaged together
    assert full[4] == "reference" and lora[4] == "-12.1 pt"     # 83.0 - 95.1
    assert lora[6] == "500 MiB (×0.56)" and adapter[6] == "600 MiB (×0.67)"   # train growth against full's
    assert lora[7] == "1,500 MiB (×0.79)"                                      # peak train (process)
    assert full[11] == "memory, checkpoint, train time" and ia3[11] == "memory, checkpoint, train time"
    assert adapter[11] == "memory, checkpoint, train time" and lora[11] == "memory, checkpoint, train time"
    assert _row(md, "lora (r=64)")[11] == "-"
    assert "| test accuracy (seeds, 95 % CI) | test sampling (Wilson 95 %) |" in md
    assert "| train growth | peak train (process) |" in md
    # without predictions no accuracy claim: "paired test unavailable", never "within noise" or "beyond noise"
    assert "| ≤ 600 MiB | adapter | 84.0 ± 6.6 %, n=3 | - | paired test unavailable: lora, ia3, lora (r=64) | " \
           "none |" in md
    assert "- **≤ 600 MiB**: use **adapter** (84.0 ± 6.6 %, n=3); paired test unavailable against lora (-1.0 pt: " \
           "no predictions for adapter (seeds 0, 1, 2), lora (seeds 0, 1, 2)), ia3" in md
    selection = _section(md, "trec · minilm · none")
    assert "within noise (" not in selection and "beyond noise" not in selection
    assert "**Fastest within 1 point of the best test accuracy** (full, 95.1 ± 0.2 %): **full**" in md
    failed = next(line for line in md.splitlines() if line.startswith("| lora-trec-minilm-s1 |"))
    assert "FAILED" in failed
    assert "- Old protocol, no `test/accuracy` (left out of the tables): prefix-trec-minilm-s0." in md
    assert "read for 0 of the 11 runs in the tables; missing for " in md


def test_paired_verdicts_from_prediction_artifacts(tmp_path):
    """Real parquet artifacts in a real store: McNemar with one seed, the two-level bootstrap with three, the
    Wilson interval on distinct examples, and "unavailable" for a run without predictions."""
    uri, client, exp = _store(tmp_path)
    arts = tmp_path / "to-log"
    # trec, one seed each, 200 questions: both right on 170, both wrong on 20, lora only on 1, adapter only on 9
    both, none = [1] * 170, [0] * 20
    _log(client, exp, "lora", 0, None, 500 * MiB, 1e5, 10.0, correct=both + none + [1] + [0] * 9, tmp=arts)
    _log(client, exp, "adapter", 0, None, 600 * MiB, 1e6, 12.0, correct=both + none + [0] + [1] * 9, tmp=arts)
    _log(client, exp, "ia3", 0, 0.5, 400 * MiB, 5e4, 8.0)    # no predictions artifact
    # sst, three seeds, 200 questions: lora misses one question adapter gets, per seed; gets one more on seed 0
    rng = np.random.default_rng(0)
    base = rng.random(200) < 0.9
    base[10:13], base[195] = True, False
    for seed in range(3):
        lora = base.copy()
        lora[10 + seed] = False
        if seed == 0:
            lora[195] = True
        _log(client, exp, "adapter", seed, None, 600 * MiB, 1e6, 12.0, task="sst", correct=base, tmp=arts)
        _log(client, exp, "lora", seed, None, 500 * MiB, 1e5, 10.0, task="sst", correct=lora, tmp=arts)
    out = tmp_path / "r.md"
    build_report(uri, [EXPERIMENT], out)
    md = out.read_text()
    build_report(uri, [EXPERIMENT], tmp_path / "again.md")
    assert (tmp_path / "again.md").read_text().replace("again/", "r/") == md   # byte-identical

    trec = _section(md, "trec · minilm · none")
    # adapter (89.5 %) against lora (85.5 %): 9 vs 1 discordant, exact p = 2 · 11/1024 = 0.0215: beyond noise
    assert "- **≤ 600 MiB**: use **adapter** (89.5 %, n=1); ahead of lora beyond noise (McNemar p = 0.0215, 9 vs 1 " \
           "discordant of 200 examples, seed 0); paired test unavailable against ia3 (-39.5 pt: no predictions for " \
           "ia3 (seed 0)), so no claim either way." in trec
    lo, hi = wilson(0.895, 200)
    assert _row(trec, "adapter")[3] == f"{100 * lo:.1f}–{100 * hi:.1f} % (n=200)"
    assert _row(trec, "ia3")[3] == "-"

    sst = _section(md, "sst · minilm · none")
    # pooled over three seeds the Wilson n stays 200: the same questions, not 600 independent ones
    lo, hi = wilson(base.mean(), 200)
    assert _row(sst, "adapter")[3] == f"{100 * lo:.1f}–{100 * hi:.1f} % (n=200)"
    loras = []
    for seed in range(3):
        lora = base.copy()
        lora[10 + seed] = False
        lora[195] = seed == 0
        loras.append(lora)
    expected = paired_bootstrap(np.stack([base] * 3), np.stack(loras), ("0", "1", "2"))
    assert expected.low < 0 < expected.high
    detail = (f"paired bootstrap {100 * expected.diff:+.1f} pt, 95 % CI {100 * expected.low:+.1f} pt to "
              f"{100 * expected.high:+.1f} pt, seeds 0, 1, 2 × 200 examples")
    # adapter's gain over lora is within noise: the cheaper lora is recommended at adapter's budget
    assert f"adapter's +0.3 pt at this budget is within noise ({detail}), so the extra memory buys nothing " \
           "measurable." in sst
    assert "- **≤ 600 MiB**: use **lora**" in sst
    assert "- Test predictions (`predictions/test.parquet`, for the test-sampling intervals and the paired tests): " \
           "read for 8 of the 9 runs in the tables; missing for ia3-trec-minilm-s0" in md


def test_no_budget_claim_within_measurement_noise(tmp_path):
    """reports/trec-minilm.md once said "adapter: the only method whose measured peak memory fits this budget" on
    a 1.2 % gap (1,041 against 1,053 MiB) that three seeds' spread (22 MiB) cannot resolve. Same for one seed
    (5 % resolution) and for train time; a gap beyond the spread still gets its claim."""
    uri, client, exp = _store(tmp_path)
    for seed in range(3):
        # trec: adapter 1,030-1,052 MiB; lora 1,042-1,064 MiB (+1.2 % on the mean); times within spread too
        _log(client, exp, "adapter", seed, [0.93, 0.94, 0.95][seed], [1030, 1041, 1052][seed] * MiB, 9e5,
             [150.0, 160.0, 200.0][seed])
        _log(client, exp, "lora", seed, [0.935, 0.935, 0.94][seed], [1042, 1053, 1064][seed] * MiB, 3e5,
             [170.0, 180.0, 190.0][seed])
        # sst: the same but lora's memory is beyond the spread (+26 %)
        _log(client, exp, "adapter", seed, [0.93, 0.94, 0.95][seed], [1030, 1041, 1052][seed] * MiB, 9e5,
             [150.0, 160.0, 170.0][seed], task="sst")
        _log(client, exp, "lora", seed, [0.935, 0.935, 0.94][seed], [1300, 1310, 1320][seed] * MiB, 3e5,
             [250.0, 260.0, 270.0][seed], task="sst")
    # one seed each: a 1.2 % gap is below the 5 % resolution
    _log(client, exp, "adapter", 0, 0.94, 1041 * MiB, 9e5, 160.0, task="one")
    _log(client, exp, "lora", 0, 0.93, 1053 * MiB, 3e5, 250.0, task="one")
    out = tmp_path / "r.md"
    build_report(uri, [EXPERIMENT], out)
    md = out.read_text()

    for title in ("trec · minilm · none", "one · minilm · none"):
        section = _section(md, title)
        assert "the only method" not in section, section
        assert "lora's train growth (1,053 MiB, spread " in section
        assert "exceeds this budget by less than the measurement noise: whether it fits is not resolved" in section
        budget_line = next(line for line in section.splitlines() if line.startswith("| ≤ 1,041 MiB | adapter |"))
        assert budget_line.endswith("| lora |")  # fit not resolved: lora
    assert "spread 22 MiB)" in _section(md, "trec · minilm · none")
    assert "spread 53 MiB (5 %, one seed))" in _section(md, "one · minilm · none")
    trec = _section(md, "trec · minilm · none")
    # train time 150-200 s against 170-190 s: no "fastest"
    assert "- **Fastest within 1 point of the best test accuracy** (adapter, 94.0 ± 2.5 %): no single one: " \
           "**adapter** (170.0 s, spread 50.0 s; 94.0 ± 2.5 %, n=3; the best itself) and lora (180.0 s, spread " \
           "20.0 s) are within measurement noise of each other." in trec
    sst = _section(md, "sst · minilm · none")
    assert "the only method whose measured train growth fits this budget: every other row needs more, beyond " \
           "measurement noise." in sst
    assert "**Fastest within 1 point of the best test accuracy** (adapter, 94.0 ± 2.5 %): **adapter**, 160.0 s" in sst
    assert "Next: lora (260.0 s), beyond measurement noise" in sst


def test_cuda_groups_separate_methods_by_peak_allocated(tmp_path):
    """On CUDA `mem/peak_train_bytes` is peak allocated: the one memory column, the budgets and the frontier."""
    uri, client, exp = _store(tmp_path)
    # train growth would rank them the other way round: the report must not read it on CUDA
    _log(client, exp, "lora", 0, 0.90, 900 * MiB, 1e5, 10.0, peak=2000 * MiB, device="cuda")
    _log(client, exp, "full", 0, 0.95, 100 * MiB, 9e7, 20.0, peak=6000 * MiB, device="cuda")
    out = tmp_path / "r.md"
    build_report(uri, [EXPERIMENT], out)
    md = out.read_text()
    assert "| peak train (allocated) | train time |" in md and "train growth |" not in md
    assert _row(md, "lora")[6] == "2,000 MiB (×0.33)"
    assert "| ≤ 2,000 MiB | lora |" in md and "| ≤ 6,000 MiB | full |" in md
    assert "memory figure that separates the methods: `mem/peak_train_bytes` (peak allocated)" in md


# --- constructed cases: generative runs ------------------------------------------------------------------------
LABEL_MATCH = {"task.kind": "generation", "task.scorer": "label_match", "task.template": "alpaca", "forgetting": "True"}
CHRF_BLEU = {"task.kind": "generation", "task.scorer": "chrf_bleu", "task.template": "alpaca", "forgetting": "True"}
WORDS = ["description", "entity", "human"]


def _generated(correct, invalid, outside=()) -> pd.DataFrame:
    """A label_match run's predictions as the harness writes them: index, reference, generation, score, label,
    prediction. Labels cycle over 3 answer words; `outside`: examples whose reference is none of the answers
    (label -1); a wrong answer is the next word, or, where `invalid`, a line that is no answer (prediction -1)."""
    correct, invalid = np.asarray(correct, dtype=bool), np.asarray(invalid, dtype=bool)
    n = len(correct)
    label = np.arange(n) % 3
    label[list(outside)] = -1
    prediction = np.where(correct, label, np.where(invalid, -1, (label + 1) % 3))
    reference = [WORDS[x] if x >= 0 else "unknown" for x in label]
    generation = [WORDS[x] if x >= 0 else "I think so" for x in prediction]
    return pd.DataFrame({"index": np.arange(n), "reference": reference, "generation": generation,
                         "score": correct.astype(float), "label": label, "prediction": prediction})


def test_label_match_runs_enter_the_accuracy_tables_with_invalid_answers_and_forgetting(tmp_path):
    """Generative label_match runs are accuracy runs: their own group (titled with the scorer), the seed and
    test-sampling intervals, the paired test read from their predictions (the scorer's per-example `score`, not
    label = prediction, which would count an invalid answer to a reference outside the answers as right), plus
    their invalid rate and forgetting; classification runs show forget/embedding_cosine where they logged it, and
    a run logged before the generative keys existed shares its row with a new one of the same settings."""
    uri, client, exp = _store(tmp_path)
    arts = tmp_path / "to-log"
    # 200 questions: both right on 0-169, both wrong on 170-189 (175-189 invalid; 175-179 with references outside
    # the answers), lora only right on 190, adapter only right on 191-199 (lora answers those invalidly)
    both = np.arange(200) < 170
    lora_ok, adapter_ok = both | (np.arange(200) == 190), both | (np.arange(200) >= 191)
    lora_bad = ((np.arange(200) >= 175) & (np.arange(200) < 190)) | (np.arange(200) >= 191)
    adapter_bad = (np.arange(200) >= 175) & (np.arange(200) < 190)
    outside = range(175, 180)
    lora_frame = _generated(lora_ok, lora_bad, outside)
    adapter_frame = _generated(adapter_ok, adapter_bad, outside)
    assert (lora_frame.label == lora_frame.prediction).mean() > lora_ok.mean()   # -1 = -1 would count as right
    for method, frame, delta in (("lora", lora_frame, 0.012), ("adapter", adapter_frame, 0.034)):
        _log(client, exp, method, 0, float(frame.score.mean()), 500 * MiB if method == "lora" else 600 * MiB,
             1e5, 10.0, task="trec_instruct", extra=LABEL_MATCH, frame=frame, tmp=arts,
             metrics={M.TEST_INVALID_RATE: float((frame.prediction == -1).mean()), M.FORGET_LOSS_BEFORE: 3.0,
                      M.FORGET_LOSS_AFTER: 3.0 + delta, M.FORGET_LOSS_DELTA: delta,
                      M.VAL_INVALID_RATE: 0.1, M.VAL_BEST_ACCURACY: 0.8})
    # classification: a run logged before the generative keys (no task.kind, no forgetting) and a new one
    _log(client, exp, "lora", 0, 0.90, 500 * MiB, 1e5, 10.0)
    _log(client, exp, "lora", 1, 0.92, 500 * MiB, 1e5, 10.0, extra={"task.kind": "classification",
                                                                    "task.template": "alpaca", "forgetting": "True"},
         metrics={M.FORGET_EMBEDDING_COSINE: 0.98765})
    out = tmp_path / "r.md"
    build_report(uri, [EXPERIMENT], out)
    md = out.read_text()

    gen = _section(md, "trec_instruct · minilm · none · label_match")
    assert "Task `trec_instruct`, generative, scored by label_match, model `minilm`" in gen
    assert "| throughput | invalid answers | forgetting: Δ LM loss | Pareto frontier |" in gen
    assert "embedding cosine" not in gen
    lora, adapter = _row(gen, "lora"), _row(gen, "adapter")
    assert lora[1] == "n=1 (0)" and lora[2] == "85.5 %" and adapter[2] == "89.5 %"
    lo, hi = wilson(0.855, 200)   # from the scorer's verdicts; label = prediction would give 88.0 %
    assert lora[3] == f"{100 * lo:.1f}–{100 * hi:.1f} % (n=200)"
    assert lora[-3:-1] == ["12.0 %", "+0.012"] and adapter[-3:-1] == ["7.5 %", "+0.034"]
    assert "- **≤ 600 MiB**: use **adapter** (89.5 %, n=1); ahead of lora beyond noise (McNemar p = 0.0215, 9 vs " \
           "1 discordant of 200 examples, seed 0)" in gen
    assert "](r/acc-trec_instruct-minilm-none-label_match.png)" in gen
    assert (tmp_path / "r" / "acc-trec_instruct-minilm-none-label_match.png").is_file()

    trec = _section(md, "trec · minilm · none")
    assert "| throughput | forgetting: embedding cosine | Pareto frontier |" in trec and "invalid answers" not in trec
    row = _row(trec, "lora")
    assert row[1] == "n=2 (0, 1)" and row[-2] == "0.9877"   # one row; the mean over the seed that has it
    assert "Groups titled `… · label_match` are generative tasks" in md and "*Forgetting*" in md
    assert "- Test predictions (`predictions/test.parquet`, for the test-sampling intervals and the paired tests): " \
           "read for 2 of the 4 runs in the tables" in md


def test_chrf_bleu_runs_get_their_own_table_in_a_mixed_report(tmp_path):
    """Translation runs (chrf_bleu: test/chrf, test/bleu, no test/accuracy) beside classification and label_match
    runs: their own section with chrF and BLEU over seeds, costs and forgetting, not "old protocol"; a run
    without the task.kind param is recognised by its metrics; a chrF study's best trial shows its test chrF."""
    uri, client, exp = _store(tmp_path)
    arts = tmp_path / "to-log"
    _log(client, exp, "lora", 0, 0.90, 500 * MiB, 1e5, 10.0)
    _log(client, exp, "full", 0, 0.95, 900 * MiB, 9e7, 20.0)
    _log(client, exp, "lora", 0, 0.70, 500 * MiB, 1e5, 10.0, task="trec_instruct", extra=LABEL_MATCH,
         metrics={M.TEST_INVALID_RATE: 0.05, M.FORGET_LOSS_DELTA: 0.02})
    frame = pd.DataFrame({"index": np.arange(3), "reference": ["hola", "sí", "no"],
                          "generation": ["hola", "si", "nada"], "score": [100.0, 40.0, 10.0]})
    for seed, (chrf, bleu, delta) in enumerate([(40.0, 15.0, 0.02), (42.0, 17.0, 0.04)]):
        _log(client, exp, "lora", seed, None, 500 * MiB, 1e5, 30.0, task="translate_en_es", extra=CHRF_BLEU,
             frame=frame, tmp=arts, metrics={M.TEST_CHRF: chrf, M.TEST_BLEU: bleu, M.FORGET_LOSS_DELTA: delta,
                                             M.VAL_CHRF: chrf, M.VAL_BEST_CHRF: chrf, M.TEST_LOSS: 1.5})
    _log(client, exp, "full", 0, None, 900 * MiB, 9e7, 60.0, task="translate_en_es", extra=CHRF_BLEU,
         metrics={M.TEST_CHRF: 50.0, M.TEST_BLEU: 25.0, M.FORGET_LOSS_DELTA: 0.30})
    _log(client, exp, "ia3", 0, None, 400 * MiB, 5e4, 20.0, task="translate_en_es",   # no task.kind param
         metrics={M.TEST_CHRF: 30.0, M.TEST_BLEU: 9.0})
    _log(client, exp, "lora", 2, None, 0, 0, 0, task="translate_en_es", extra=CHRF_BLEU, status="FAILED")
    tracker = Tracker(uri, EXPERIMENT)
    parent = tracker.client.create_run(exp, run_name="sweep-mt", tags={
        "study": "mt", "sweep_role": "parent", "objective": M.VAL_CHRF, "direction": "maximize"}).info.run_id
    for trial, (r, val, test) in enumerate([(4, 38.0, 37.5), (8, 41.0, 40.25)]):
        rid = client.create_run(exp, run_name=f"lora-mt-t{trial}", tags={
            "study": "mt", "trial": str(trial), "mlflow.parentRunId": parent, "task": "translate_en_es"}).info.run_id
        client.log_batch(rid, metrics=[Metric(M.VAL_CHRF, val, 0, 1), Metric(M.TEST_CHRF, test, 0, 1)],
                         params=[Param("method.r", str(r)), *(Param(k, v) for k, v in CHRF_BLEU.items())])
        client.set_terminated(rid, "FINISHED")
    client.set_terminated(parent, "FINISHED")
    out = tmp_path / "r.md"
    assert main(["--tracking-uri", uri, "--out", str(out)]) == 0
    md = out.read_text()

    mt = _section(md, "translate_en_es · minilm · none · chrf_bleu")
    assert "Task `translate_en_es`, generative, scored by chrf_bleu, model `minilm`, quantization `none`; 4 " \
           "finished runs in 3 rows" in mt
    assert "| method | seeds | test chrF (seeds, 95 % CI) | test BLEU (seeds, 95 % CI) | Δ test chrF vs full | " \
           "trainable % | train growth | peak train (process) | train time | checkpoint | throughput | " \
           "forgetting: Δ LM loss | Pareto frontier |" in mt
    full, lora, ia3 = _row(mt, "full"), _row(mt, "lora"), _row(mt, "ia3")
    assert full[:5] == ["**full**", "n=1 (0)", "50.0", "25.0", "reference"] and full[-2] == "+0.300"
    hw = stats.t.ppf(0.975, 1) * np.std([40.0, 42.0], ddof=1) / math.sqrt(2)
    assert lora[:5] == ["lora", "n=2 (0, 1)", f"41.0 ± {hw:.1f}", f"16.0 ± {hw:.1f}", "-9.0"], lora
    assert lora[6] == "500 MiB (×0.56)" and lora[-2] == "+0.030"
    assert ia3[:4] == ["ia3", "n=1 (0)", "30.0", "9.0"] and ia3[-2] == "-"
    for row in (full, lora, ia3):   # each trades chrF for cost: all on the frontiers (maximizing test chrF)
        assert row[-1] == "memory, checkpoint, train time", row
    assert "no paired test, and the report makes no method-selection claim here" in mt
    assert "Which method to choose: translate_en_es" not in md
    assert [line for line in md.splitlines() if line.startswith("## ")] == [
        "## trec · minilm · none", "## trec_instruct · minilm · none · label_match",
        "## translate_en_es · minilm · none · chrf_bleu", "## Claims", "## Sweeps", "## Provenance"]
    assert "[translate_en_es · minilm · none · chrf_bleu](#translate_en_es--minilm--none--chrf_bleu)" in md
    assert "| n=1 (0) | 70.0 % |" in _section(md, "trec_instruct · minilm · none · label_match")
    sweep = next(line for line in md.splitlines() if line.startswith("| mt |"))
    assert f"maximize {M.VAL_CHRF}" in sweep and "| 41 | chrF 40.2 (`test/chrf`) | 1 | `method.r=8` |" in sweep
    assert "- Runs: 11 (1 FAILED, 10 FINISHED); 3 in the method tables, 4 in the chrF / BLEU tables, 3 sweep " \
           "runs, 0 FINISHED runs superseded by a later run with the same settings and seed, 0 FINISHED runs of " \
           "the old protocol." in md
    assert "Old protocol" not in md
    assert "Computed by `python -m bench.report` from 7 finished runs" in md


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


def test_plots_leave_matplotlib_global_state_alone(tmp_path):
    """The PNGs are drawn with matplotlib's object-oriented API: importing bench.report.plots and drawing selects no
    backend and imports no pyplot (a fresh interpreter, so nothing else has imported them)."""
    code = f"""
import sys
from pathlib import Path
import matplotlib
before = matplotlib.rcParams._get("backend")
from bench.report import plots, sweeps
trials = [sweeps.Trial(n, "COMPLETE", v, {{"method.r": r}}) for n, (r, v) in enumerate([(2, 0.5), (8, 0.7)])]
study = sweeps.summarize("s", "val/accuracy", "maximize", trials, ["method.r"])
assert plots.objective_plot(study, "method.r", None, Path({str(tmp_path)!r}) / "o.png")
assert matplotlib.rcParams._get("backend") == before, matplotlib.rcParams._get("backend")
assert "matplotlib.pyplot" not in sys.modules
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "o.png").read_bytes().startswith(b"\x89PNG")
