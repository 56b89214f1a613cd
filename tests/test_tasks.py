"""Task loaders on the real package-shipped data (no hub access) and on local files."""
from __future__ import annotations

from collections import Counter

import pytest

from bench import tasks
from bench.errors import BenchError
from tests.conftest import compose


def test_trec_official_split_and_labels():
    data = tasks.load(compose("task=trec").task, seed=0)
    assert (len(data.train), len(data.test)) == (5452, 500)
    assert data.label_names == ["DESC", "ENTY", "ABBR", "HUM", "NUM", "LOC"]
    # the TREC-10 test set's coarse class counts
    counts = Counter(data.label_names[i] for i in data.test["label"])
    assert counts == {"DESC": 138, "ENTY": 94, "ABBR": 9, "HUM": 65, "NUM": 113, "LOC": 81}
    assert data.test[0]["text"].startswith("How far is it from Denver to Aspen")


def test_finefoods_official_split():
    data = tasks.load(compose("task=finefoods").task, seed=0)
    assert (len(data.train), len(data.test)) == (4000, 1000)
    assert Counter(data.test["label"]) == {0: 658, 1: 342}  # great / other


def test_rotten_tomatoes_seeded_split_is_fixed_across_run_seeds():
    cfg = compose("task=rotten_tomatoes").task
    a, b = tasks.load(cfg, seed=0), tasks.load(cfg, seed=1)
    assert len(a.train) + len(a.test) == 10605
    assert a.test["text"] == b.test["text"]
    assert set(a.train["label"]) == {0, 1}


def test_subsample_is_seeded_and_clamped(capsys):
    cfg = compose("task=trec", "task.max_train_samples=100", "task.max_eval_samples=100000").task
    a, b = tasks.load(cfg, seed=0), tasks.load(cfg, seed=0)
    assert len(a.train) == 100 and a.train["text"] == b.train["text"]
    assert len(a.test) == 500
    assert "task.max_eval_samples=100000 is larger than the split (500)" in capsys.readouterr().out


def test_local_csv_infers_label_names(toy_csv):
    data = tasks.load(compose("task=local", f"task.path={toy_csv}").task, seed=0)
    assert data.label_names == ["blue", "green", "red"]
    assert len(data.train) + len(data.test) == 240


def test_local_labels_outside_declared_classes(toy_csv):
    cfg = compose("task=local", f"task.path={toy_csv}", "task.label_names=[red,green]").task
    with pytest.raises(BenchError, match=r"task.label_names: .*'blue'.*outside the declared classes"):
        tasks.load(cfg, seed=0)


def test_local_missing_column_and_file(toy_csv, tmp_path):
    with pytest.raises(BenchError, match=r"task.text_column: column 'sentence' not in the train data"):
        tasks.load(compose("task=local", f"task.path={toy_csv}", "task.text_column=sentence").task, seed=0)
    with pytest.raises(BenchError, match=r"task.path: file not found"):
        tasks.load(compose("task=local", f"task.path={tmp_path}/nope.csv").task, seed=0)
