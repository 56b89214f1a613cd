"""`python -m bench.report`: the learning curves (runs with task.train_per_class, kept out of the method tables)
and the Claims section, on real MLflow sqlite stores filled through MLflow's public API with constructed figures."""
from __future__ import annotations

from mlflow.entities import Metric

from bench.core import metrics as M
from bench.report import build_report
from bench.report.claims import CURVES, MULTITASK_COMMAND, TABLES
from bench.report.stats import latency_apart, latency_verdict
from tests.test_report import EXPERIMENT, MiB, _log, _row, _section, _store


def _claim(md: str, letter: str) -> str:
    start = md.index(f"### {letter}. ")
    end = md.find("\n### ", start + 1)
    end2 = md.find("\n## ", start + 1)
    return md[start:min(x for x in (end, end2, len(md)) if x >= 0)]


def _findings(section: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in section.splitlines()
            if line.startswith("| ") and not line.startswith("| where |")]


def _latency(base, unmerged, merged=None, iqr=0.5, n=128):
    """latency/* of one run: each variant's (median, IQR) the same at batch 1 and N (N ms scaled by 10)."""
    out = {M.LATENCY_BATCH_SIZE: float(n), M.LATENCY_THREADS: 2.0}
    for variant, ms in (("base", base), ("unmerged", unmerged), ("merged", merged)):
        if ms is None:
            continue
        for suffix, scale in (("b1", 1), ("bN", 10)):
            out[f"latency/{variant}_ms_{suffix}"] = ms * scale
            out[f"latency/{variant}_iqr_ms_{suffix}"] = iqr * scale
    return out


def test_latency_rule():
    assert not latency_apart(10.2, 0.5, 10.0, 0.3) and latency_apart(11.0, 0.5, 10.0, 0.3)
    assert latency_verdict([(11.0, 0.5, 10.0, 0.3)] * 3) == (1, 3)
    assert latency_verdict([(9.0, 0.5, 10.0, 0.3)] * 2) == (-1, 2)
    # one run of three within its IQRs: no difference claimed
    assert latency_verdict([(11.0, 0.5, 10.0, 0.3), (10.1, 0.5, 10.0, 0.3), (11.0, 0.5, 10.0, 0.3)]) == (0, 2)


def test_claims_not_measured_without_the_runs(tmp_path):
    """Runs without latency, merge, learning-curve or multi-task figures: those claims say "not measured here"
    with the command that measures them; the cost claims are measured."""
    uri, client, exp = _store(tmp_path)
    _log(client, exp, "lora", 0, 0.90, 500 * MiB, 1e5, 10.0)
    # logged with the keys added since (null train_per_class, deploy.*): the same settings, so the same row
    _log(client, exp, "lora", 1, 0.90, 500 * MiB, 1e5, 10.0, extra={"task.train_per_class": "None",
                                                                    "deploy.latency": "False", "deploy.repeats": "10"})
    _log(client, exp, "full", 0, 0.95, 900 * MiB, 9e7, 20.0)
    out = tmp_path / "r.md"
    build_report(uri, [EXPERIMENT], out)
    md = out.read_text()
    assert _row(md, "lora")[1] == "n=2 (0, 1)"
    claims = _section(md, "Claims")
    assert "[Claims](#claims)" in md and "## Learning curves" not in md
    for letter, command in (("a", "python -m bench method=lora seed=0,1,2 -m"),
                            ("b", "python -m bench method=adapter seed=0,1,2 -m"),
                            ("c", "python -m bench method=prefix seed=0,1,2 -m"),
                            ("d", "python -m bench method=lora seed=0,1,2 -m"),
                            ("e", "python -m bench method=lora,dora,ia3 seed=0,1,2 -m"),
                            ("f", CURVES), ("k", MULTITASK_COMMAND)):
        text = _claim(claims, letter)
        assert "**Verdict: not measured here** (" in text and f"Measure it: `{command}`." in text, text
        assert not _findings(text)
    assert "no `lora` run in the tables timed merged and base" in _claim(claims, "a")
    # the checkpoint and memory claims are measured (full's one seed: 5 % resolution), forgetting has no figure
    g = _findings(_claim(claims, "g"))
    assert g == [["trec · minilm · none", "lora", "`ckpt/bytes` 97.7 KiB vs full's 85.8 MiB (×0.0011; spread 0 B / "
                  "4.3 MiB, n=2 / 1)", "holds"]]
    assert _findings(_claim(claims, "h"))[0][3] == "holds"
    assert f"Measure it: `{TABLES}`" in _claim(claims, "i")
    j = _findings(_claim(claims, "j"))   # full's one seed, no predictions: no interval, no paired test
    assert j[0][3] == "not measured here" and f"Measure the rest: `{TABLES}`" in _claim(claims, "j")


def test_latency_and_merge_claims(tmp_path):
    """lora merged within the IQR of base (a holds), unmerged slower than merged (d holds); adapter slower than
    base beyond the IQR (b holds); prefix within the IQR (c within noise); merge deltas; a lora group whose merged
    copy is slower beyond the IQR in every run (a does not hold)."""
    uri, client, exp = _store(tmp_path)
    for seed in range(3):
        _log(client, exp, "lora", seed, 0.90 + seed / 100, 500 * MiB, 1e5, 10.0,
             metrics={**_latency(10.0, 12.0 + seed / 10, 10.2 - seed / 10),
                      M.TEST_ACCURACY_MERGED: 0.90, M.MERGE_ACCURACY_DELTA: [0.0, 0.002, 0.0][seed]})
        _log(client, exp, "adapter", seed, 0.91, 600 * MiB, 1e6, 12.0, metrics=_latency(10.0, 11.5, iqr=0.3))
        _log(client, exp, "prefix", seed, 0.80, 550 * MiB, 2e5, 11.0, metrics=_latency(10.0, 10.1))
        _log(client, exp, "lora", seed, 0.90, 500 * MiB, 1e5, 10.0, task="sst",
             metrics=_latency(10.0, 12.0, 11.0, iqr=0.3))
    out = tmp_path / "r.md"
    build_report(uri, [EXPERIMENT], out)
    claims = _section(out.read_text(), "Claims")

    a = _findings(_claim(claims, "a"))
    assert a == [
        ["sst · minilm · none", "lora", "batch 1 (3 runs, medians over runs, 2 threads): merged 11.0 ms (IQR 0.30) "
         "vs "
         "base 10.0 ms (IQR 0.30), +10.0 %; beyond the larger IQR in 3 of 3 runs", "does not hold"],
        ["sst · minilm · none", "lora", "batch 128 (3 runs, medians over runs, 2 threads): merged 110 ms (IQR 3.00) "
         "vs "
         "base 100 ms (IQR 3.00), +10.0 %; beyond the larger IQR in 3 of 3 runs", "does not hold"],
        ["trec · minilm · none", "lora", "batch 1 (3 runs, medians over runs, 2 threads): merged 10.1 ms (IQR 0.50) "
         "vs "
         "base 10.0 ms (IQR 0.50), +1.0 %; beyond the larger IQR in 0 of 3 runs", "holds"],
        ["trec · minilm · none", "lora", "batch 128 (3 runs, medians over runs, 2 threads): merged 101 ms (IQR 5.00) "
         "vs "
         "base 100 ms (IQR 5.00), +1.0 %; beyond the larger IQR in 0 of 3 runs", "holds"]]
    assert "**Verdicts: holds 2, does not hold 2** (one per comparison above)." in _claim(claims, "a")
    b = _findings(_claim(claims, "b"))
    assert [f[3] for f in b] == ["holds", "holds"] and "+15.0 %; beyond the larger IQR in 3 of 3 runs" in b[0][2]
    assert "**Verdict: holds** (2 of 2 comparisons)." in _claim(claims, "b")
    c = _findings(_claim(claims, "c"))
    assert [f[3] for f in c] == ["within noise"] * 2 and "in 0 of 3 runs" in c[0][2]
    d = [f for f in _findings(_claim(claims, "d")) if f[0].startswith("trec")]
    assert [f[3] for f in d] == ["holds", "holds"] and "unmerged 12.1 ms (IQR 0.50) vs merged 10.1 ms" in d[0][2]
    e = _findings(_claim(claims, "e"))
    assert e == [["trec · minilm · none", "lora", "`merge/accuracy_delta` +0.1 pt ± 0.3 pt (n=3); non-zero in 1 of "
                  "3 "
                  "runs, largest +0.2 pt", "holds"]]


def _curve_runs(client, exp, method, k, examples, accs, task="trec", tmp=None, correct=None):
    extra = {"task.train_per_class": str(k) if k else "None", "task.max_train_samples": "None",
             "train.max_steps": "600", "train.batch_size": "16"}
    for seed, acc in enumerate(accs):
        _log(client, exp, method, seed, acc, (900 if method == "full" else 500) * MiB,
             9e7 if method == "full" else 1e5, 10.0, task=task, extra=extra, metrics={M.TRAIN_EXAMPLES: examples},
             tmp=tmp, correct=None if correct is None else correct[seed])


def test_learning_curves_and_the_tables_they_leave_alone(tmp_path):
    """lora beats full at the smallest k, is within noise at the next and behind with every example: the sentence
    says so (seed intervals; the paired test where predictions exist), the curve PNG is written, claim f holds; the
    k runs leave the method tables as they were."""
    uri, client, exp = _store(tmp_path)
    arts = tmp_path / "to-log"
    _curve_runs(client, exp, "full", None, 4952, [0.960, 0.962])
    _curve_runs(client, exp, "lora", None, 4952, [0.900, 0.905])
    # sst, one seed with predictions, 200 questions: with every example both alike; at k=4 lora 9 vs 1 ahead
    both = [True] * 170 + [False] * 20
    _curve_runs(client, exp, "full", None, 800, [None], task="sst", tmp=arts, correct=[both + [True] * 10])
    _curve_runs(client, exp, "lora", None, 800, [None], task="sst", tmp=arts, correct=[both + [True] * 10])
    first = tmp_path / "first.md"
    build_report(uri, [EXPERIMENT], first)
    before = first.read_text()

    _curve_runs(client, exp, "full", 4, 24, [0.40, 0.41])
    _curve_runs(client, exp, "lora", 4, 24, [0.60, 0.61])
    _curve_runs(client, exp, "full", 16, 96, [0.70, 0.71])
    _curve_runs(client, exp, "lora", 16, 96, [0.80, 0.81])   # 80.5 ± 6.4 against 70.5 ± 6.4: overlapping
    _curve_runs(client, exp, "full", 4, 8, [None], task="sst", tmp=arts, correct=[both + [True] + [False] * 9])
    _curve_runs(client, exp, "lora", 4, 8, [None], task="sst", tmp=arts, correct=[both + [False] + [True] * 9])
    out = tmp_path / "r.md"
    build_report(uri, [EXPERIMENT], out)
    md = out.read_text()

    for title in ("trec · minilm · none", "sst · minilm · none"):   # the tables: as without the k runs
        assert _section(md, title).replace("](r/", "](first/") == _section(before, title)
    assert _row(_section(md, "trec · minilm · none"), "lora")[1] == "n=2 (0, 1)"
    assert "- Runs: 16 (16 FINISHED); 6 in the method tables, 10 in the learning curves (`task.train_per_class` " \
           "set), 0 sweep runs" in md

    curves = _section(md, "Learning curves")
    trec = curves[curves.index("### trec · minilm · none (600 steps, batch 16)"):]
    assert "| method | k=4: 24 examples | k=16: 96 examples | all: 4,952 examples |" in trec
    assert "| **full** | 40.5 ± 6.4 % (n=2) | 70.5 ± 6.4 % (n=2) | 96.1 ± 1.3 % (n=2) |" in trec
    assert "- lora is ahead of full at 24 examples, within noise at 96, behind at 4,952 (seed intervals at every " \
           "point)." in trec
    assert "- lora is ahead of full at 8 examples, within noise at 800 (paired test at every point)." in curves
    assert "](r/curve-trec-minilm-none-s600-b16.png)" in curves
    png = (tmp_path / "r" / "curve-trec-minilm-none-s600-b16.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert (tmp_path / "r" / "curve-sst-minilm-none-s600-b16.png").is_file()

    f = _findings(_claim(_section(md, "Claims"), "f"))
    assert [(x[0], x[1], x[3]) for x in f] == [("sst · minilm · none (600 steps, batch 16)", "lora", "holds"),
                                               ("trec · minilm · none (600 steps, batch 16)", "lora", "holds")]
    assert f[0][2].startswith("at 8 examples (k=4): 89.5 % (n=1) vs full's 85.5 % (n=1), ahead (paired test: "
                              "McNemar p = 0.0215")


def test_multitask_parent_runs_are_claims_not_rows(tmp_path):
    """A multi-task parent run (tag multitask=parent), even with a test/accuracy, is no table row; its children are
    ordinary runs; claim k reads the parent's figures and the children's switched accuracy."""
    uri, client, exp = _store(tmp_path)
    tags = {"method": "lora", "model": "minilm", "task": "trec", "quant": "none", "seed": "0", "device": "cpu",
            "multitask": "parent"}
    parent = client.create_run(exp, run_name="multitask-lora-minilm", tags=tags).info.run_id
    figures = {M.TEST_ACCURACY: 0.5, "multitask/tasks": 2, "multitask/switch_ms": 0.8, "multitask/switch_iqr_ms": 0.1,
               "multitask/load_s": 2.5, "multitask/adapters_bytes": 6e5, "multitask/base_bytes": 9e7,
               "multitask/full_models_bytes": 1.8e8, "multitask/rss_base_bytes": 300 * MiB,
               "multitask/rss_adapters_bytes": 2 * MiB, "multitask/max_abs_logit_diff": 0.0,
               "multitask/predictions_equal": 1.0}
    client.log_batch(parent, metrics=[Metric(k, float(v), 0, 1) for k, v in figures.items()])
    client.set_terminated(parent, "FINISHED")
    for task, acc in (("trec", 0.93), ("sst", 0.88)):
        rid = _log(client, exp, "lora", 0, acc, 500 * MiB, 1e5, 10.0, task=task,
                   metrics={"multitask/test_accuracy_switched": acc})
        client.set_tag(rid, "mlflow.parentRunId", parent)
    out = tmp_path / "r.md"
    build_report(uri, [EXPERIMENT], out)
    md = out.read_text()

    trec = _section(md, "trec · minilm · none")
    assert _row(trec, "lora")[1:3] == ["n=1 (0)", "93.0 %"] and "50.0 %" not in trec
    assert "1 finished runs in 1 rows" in trec
    assert "2 in the method tables, 1 multi-task parent runs" in md
    k = _findings(_claim(_section(md, "Claims"), "k"))
    where = "multitask-lora-minilm (minilm · none, 2 tasks)"
    assert k == [
        [where, "no cross-talk", "predictions equal: yes; largest absolute logit difference 0; children with "
         "switched accuracy ≠ "
         "own: 0 of 2", "holds"],
        [where, "cheap switch", "switch 0.80 ms (IQR 0.10) vs loading 2.5 s", "holds"],
        [where, "shared base", "base 85.8 MiB + adapters 585.9 KiB = 86.4 MiB vs full models 171.7 MiB (×0.5); "
         "resident memory: base 300 MiB, adapters +2 MiB", "holds"]]
    assert "**Verdict: holds** (3 of 3 comparisons)." in _claim(_section(md, "Claims"), "k")
