"""The metric registry (bench/core/metrics.yaml, loaded by bench/core/metrics.py) against what documents it (the
README) and what logs it (a real run)."""
from __future__ import annotations

import dataclasses
import re

import pytest
import yaml
from mlflow.tracking import MlflowClient

from bench.core import metrics as M
from bench.orchestration.worker import run_job
from bench.sweep import spec
from tests.conftest import ROOT, compose

README = ROOT / "README.md"
# what a CPU run of a classification task logs to MLflow (final values and step histories); the multitask figures
# reach a run only from python -m bench.multitask, afterwards
CPU_METRICS = tuple(n for n in M.names(cuda_only=False) if "classification" in M.REGISTRY[n].runs
                    and n not in M.MULTITASK)


def section(title: str) -> str:
    """The README's `## title` section, up to the next `## ` heading."""
    text = README.read_text()
    assert f"\n## {title}\n" in text, f"README.md has no section '## {title}'"
    return text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def first_table(text: str) -> list[str]:
    """The body rows (header and separator dropped) of the first Markdown table in text."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append(line)
    return rows[2:]


def code_spans(text: str) -> list[str]:
    return re.findall(r"`([^`]+)`", text)


def readme_metric_rows() -> dict[str, list[str]]:
    """First-column metric names of the table *What every run records in MLflow*, each with its row."""
    rows = first_table(section("What every run records in MLflow"))
    assert rows, "the metric table is empty"
    names: dict[str, list[str]] = {}
    for row in rows:
        cell = row.split("|")[1]
        found = code_spans(cell)
        assert found, f"a row names no metric in its first column: {row[:80]}"
        for name in found:
            names.setdefault(name, []).append(row[:60])
    return names


def test_readme_metric_table_and_registry_name_the_same_metrics():
    documented = readme_metric_rows()
    assert not {n: r for n, r in documented.items() if len(r) > 1}, "a metric in two rows of the README table"
    undocumented = [n for n in M.REGISTRY if n not in documented]
    unregistered = [n for n in documented if n not in M.REGISTRY]
    assert not undocumented, f"in bench/core/metrics.yaml but not in the README's metric table: {undocumented}"
    assert not unregistered, f"in the README's metric table but not in bench/core/metrics.yaml: {unregistered}"


def test_readme_sweep_objectives_are_the_registry_objectives():
    """The README's `objective` row of the sweep-file table lists exactly what spec.OBJECTIVES allows."""
    row = next((line for line in section("Sweeps").splitlines() if line.startswith("| `objective` |")), None)
    assert row is not None, "README: no `objective` row in the sweep-file table"
    listed = [n for n in code_spans(row) if n in M.REGISTRY]
    assert set(listed) == set(spec.OBJECTIVES), (set(listed) ^ set(spec.OBJECTIVES))


def test_registry_declarations():
    for name, m in M.REGISTRY.items():
        assert m.name == name and m.unit in M.UNITS and m.phase in M.PHASES and m.direction in M.DIRECTIONS
        assert m.definition and "\n" not in m.definition and len(m.definition) <= 200, name
    # every name is a module constant and every metric-name constant is a registry entry
    constants = {v for k, v in vars(M).items() if k.isupper() and isinstance(v, str) and "/" in v
                 and k not in ("PREDICTIONS_ARTIFACT", "VAL_PREFIX", "TEST_PREFIX", "OLD_VAL_PREFIX")}
    assert constants == set(M.REGISTRY)
    # a bad declaration is refused when bench/core/metrics.py loads it, not when a report reads it
    good = M.REGISTRY[M.VAL_ACCURACY]
    for bad in ({"unit": "MB"}, {"phase": "eval"}, {"direction": "up"}, {"definition": "two\nlines"},
                {"definition": ""}, {"name": "test/accuracy2"}):   # a validation metric outside val/*
        with pytest.raises(ValueError, match="bad declaration"):
            dataclasses.replace(good, **bad)


def test_the_loader_reads_a_copy_of_metrics_yaml_as_the_registry(tmp_path):
    copy = tmp_path / "metrics.yaml"
    copy.write_text(M.DECLARATIONS.read_text())
    declared = M.load(copy)
    assert list(declared.values()) == list(M.REGISTRY.values())   # the same metrics, in the same order
    assert all(getattr(M, const) == m.name for const, m in declared.items())


@pytest.mark.parametrize("old, new, message", [
    ("TRAIN_STEPS:\n  name: train/steps\n  unit: count\n", "TRAIN_STEPS:\n  name: train/steps\n  unit: MB\n",
     "entry TRAIN_STEPS: bad declaration of 'train/steps': unit 'MB' is not one of"),
    ("  cuda_only: true\n", "  cuda: true\n", "entry MEM_PEAK_TRAIN_RESERVED: unknown field 'cuda'"),
    ("name: test/f1_macro\n", "name: test/accuracy\n",
     "entry TEST_F1_MACRO: name 'test/accuracy' already declared by TEST_ACCURACY"),
    ("\nTEST_LOSS:\n", "\nTEST_ACCURACY:\n", "key 'TEST_ACCURACY' twice"),
    ("name: val/loss\n", "name: eval/loss\n",
     "entry VAL_LOSS: bad declaration of 'eval/loss': name 'eval/loss' does not start with 'val/'"),
], ids=["unit", "unknown-field", "duplicate-name", "duplicate-key", "validation-outside-val"])
def test_a_bad_entry_in_metrics_yaml_is_refused_naming_the_file_and_the_entry(tmp_path, old, new, message):
    """The loader bench/core/metrics.py runs at import, on a copy of metrics.yaml with one entry broken."""
    text = M.DECLARATIONS.read_text()
    assert text.count(old) >= 1, f"metrics.yaml no longer holds {old!r}: update this test"
    bad = tmp_path / "metrics.yaml"
    bad.write_text(text.replace(old, new, 1))
    with pytest.raises(ValueError, match=re.escape(str(bad)) + ".*" + re.escape(message)):
        M.load(bad)


def test_groups_derive_from_the_registry():
    classification = M.run_names("classification")
    assert M.VAL_PERIODIC == M.names(phase="validation", history=True)
    assert tuple(n for n in M.VAL_PERIODIC if n in classification) == M.SCORES["val"] == (
        M.VAL_ACCURACY, M.VAL_F1_MACRO, M.VAL_LOSS)
    assert M.TEST == M.names(phase="test")
    assert tuple(n for n in M.TEST if n in classification) == M.SCORES["test"] == (
        M.TEST_ACCURACY, M.TEST_F1_MACRO, M.TEST_LOSS)
    assert set(M.HISTORY) == {*M.VAL_PERIODIC, M.TRAIN_LOSS, M.TRAIN_LR}
    assert M.TRAIN_LR not in M.RUN and not {M.MEM_PEAK_TRAIN_RESERVED, M.MEM_PEAK_EVAL_RESERVED} & set(M.RUN)
    assert set(M.RUN) == {n for n, m in M.REGISTRY.items() if m.final and not m.cuda_only and m.phase != "multitask"}
    assert M.MULTITASK == M.names(phase="multitask") and M.MULTITASK_SWITCH_MS in M.MULTITASK
    assert not set(M.MULTITASK) & {*M.RUN, *M.COSTS, *spec.OBJECTIVES}
    # each kind of run reports its own figures; together they are RUN; every kind reports the costs
    assert set(M.RUN) == {n for kind in M.RUN_KINDS for n in M.run_names(kind, merged=True)}
    assert set(M.run_names("classification", merged=True)) - set(classification) == set(M.names(merged_only=True)) & {
        M.TEST_ACCURACY_MERGED, M.MERGE_ACCURACY_DELTA, *(n for n in M.DEPLOYMENT if n.startswith("latency/merged") and "per_token" not in n)}
    assert not any(n.startswith("latency/") for n in M.run_names("classification", deploy=False))
    label_match, chrf_bleu = set(M.run_names("label_match")), set(M.run_names("chrf_bleu"))
    assert {M.FORGET_EMBEDDING_COSINE, M.TEST_F1_MACRO, M.VAL_BEST_ACCURACY} <= set(classification)
    assert not {M.TEST_INVALID_RATE, M.TEST_CHRF, M.FORGET_LOSS_DELTA} & set(classification)
    assert {M.TEST_ACCURACY, M.TEST_INVALID_RATE, M.VAL_BEST_ACCURACY, M.FORGET_LOSS_DELTA} <= label_match
    assert not {M.TEST_F1_MACRO, M.TEST_CHRF, M.FORGET_EMBEDDING_COSINE} & label_match
    assert {M.TEST_CHRF, M.TEST_BLEU, M.VAL_BEST_CHRF, M.VAL_BEST_STEP, M.TEST_LOSS, M.FORGET_LOSS_DELTA} <= chrf_bleu
    assert not {M.TEST_ACCURACY, M.VAL_BEST_ACCURACY, M.TEST_INVALID_RATE} & chrf_bleu
    assert M.run_kind("classification", None) == "classification" and M.run_kind("generation", "chrf_bleu") == \
        "chrf_bleu"
    for kind in M.RUN_KINDS:
        assert set(M.COSTS) <= set(M.run_names(kind)), kind
    for name in M.COSTS:
        m = M.REGISTRY[name]
        assert m.phase == "run" and m.direction == "min" and not m.cuda_only, name


def test_the_metrics_views_pick_are_registry_metrics_every_run_reports():
    """The report's columns and plot axes and the MLflow comparison view choose their metrics by hand; each must be
    one that every finished run of the kinds it shows reports: the costs every kind, the accuracy tables'
    headline classification and label_match runs, the score tables' chrf_bleu runs, the comparison view (sorted
    by test/accuracy) classification runs; the optional columns are registry metrics some kind reports."""
    from bench.report import data, plots
    from bench.tracking import COMPARE_COLUMNS
    every = set.intersection(*(set(M.run_names(kind)) for kind in M.RUN_KINDS))
    assert {*data.MEANS, *plots.AXES} <= every, {*data.MEANS, *plots.AXES} - every
    for kind in ("classification", "label_match"):
        assert data.ACCURACY in M.run_names(kind)
    assert set(data.SCORES) <= set(M.run_names("chrf_bleu"))
    assert set(COMPARE_COLUMNS["metrics"]) <= set(M.run_names("classification"))
    assert set(data.OPTIONAL) <= set(M.RUN)


def test_sweep_objectives_and_their_default_direction_come_from_the_registry(tmp_path):
    validation = [n for n, m in M.REGISTRY.items() if m.phase == "validation" and m.direction]
    assert spec.OBJECTIVES == (*validation, *M.COSTS)
    assert M.VAL_BEST_ACCURACY in spec.OBJECTIVES and M.VAL_BEST_STEP not in spec.OBJECTIVES
    assert not set(spec.OBJECTIVES) & {n for n, m in M.REGISTRY.items() if m.phase in ("test", "train")}
    path = tmp_path / "s.yaml"
    for metric, direction in ((M.VAL_ACCURACY, "maximize"), (M.VAL_F1_MACRO, "maximize"),
                              (M.VAL_LOSS, "minimize"), (M.TIME_TRAIN, "minimize"), (M.CKPT_BYTES, "minimize")):
        path.write_text(yaml.safe_dump({"trials": 1, "objective": {"metric": metric},
                                        "search_space": {"method.r": {"type": "categorical", "choices": [2]}}}))
        assert spec.load(path).direction == direction == spec.DEFAULT_DIRECTION[metric], metric
    path.write_text(yaml.safe_dump({"trials": 1, "objective": {"metric": M.VAL_LOSS, "direction": "maximize"},
                                    "search_space": {"method.r": {"type": "categorical", "choices": [2]}}}))
    assert spec.load(path).direction == "maximize"   # a direction the file names wins


def test_a_tiny_run_logs_exactly_the_registry(tiny_overrides, tmp_path):
    """result.metrics of a LoRA classification run holds every metric of run_names("classification", merged=True)
    (LoRA merges) and nothing else;
    the MLflow run holds every registry metric a CPU classification run can log (those plus the step-history-only
    train/lr), and the `history` ones have several steps."""
    cfg = compose("method=lora", *tiny_overrides)
    result = run_job(cfg, tmp_path / "job")
    assert result.status == "FINISHED"
    expected = set(M.run_names("classification", merged=True))
    assert set(result.metrics) == expected, {"not logged": expected - set(result.metrics),
                                             "not in run_names('classification')": set(result.metrics) - expected}
    client = MlflowClient(tracking_uri=cfg.tracking.uri)
    logged = client.get_run(result.run_id).data.metrics
    assert set(logged) == set(CPU_METRICS), {"not logged": set(CPU_METRICS) - set(logged),
                                             "not in the registry": set(logged) - set(CPU_METRICS)}
    for name in M.HISTORY:
        if name in CPU_METRICS:
            assert len(client.get_metric_history(result.run_id, name)) > 1, name
