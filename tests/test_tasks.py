"""Task loaders on the real package-shipped data (no hub access) and on local files."""
from __future__ import annotations

from collections import Counter

import pytest

from bench.core import tasks
from bench.errors import BenchError
from tests.conftest import compose


def test_trec_official_split_and_labels():
    data = tasks.load(compose("task=trec").task, seed=0)
    # validation: 500 (the cap of 10 % of 5,452) held out of the official training set; test untouched
    assert (len(data.train), len(data.validation), len(data.test)) == (4952, 500, 500)
    assert data.label_names == ["DESC", "ENTY", "ABBR", "HUM", "NUM", "LOC"]
    # the TREC-10 test set's coarse class counts
    counts = Counter(data.label_names[i] for i in data.test["label"])
    assert counts == {"DESC": 138, "ENTY": 94, "ABBR": 9, "HUM": 65, "NUM": 113, "LOC": 81}
    assert data.test[0]["text"].startswith("How far is it from Denver to Aspen")


def test_finefoods_official_split():
    data = tasks.load(compose("task=finefoods").task, seed=0)
    assert (len(data.train), len(data.validation), len(data.test)) == (3600, 400, 1000)
    assert Counter(data.test["label"]) == {0: 658, 1: 342}  # great / other


def test_rotten_tomatoes_seeded_split_is_fixed_across_run_seeds():
    cfg = compose("task=rotten_tomatoes").task
    a, b = tasks.load(cfg, seed=0), tasks.load(cfg, seed=1)
    assert len(a.train) + len(a.validation) + len(a.test) == 10605
    assert a.test["text"] == b.test["text"] and a.validation["text"] == b.validation["text"]
    assert set(a.train["label"]) == {0, 1}


def test_subsample_is_seeded_and_clamped(capsys):
    cfg = compose("task=trec", "task.max_train_samples=100", "task.max_eval_samples=100000",
                  "task.max_test_samples=50").task
    a, b = tasks.load(cfg, seed=0), tasks.load(cfg, seed=0)
    assert len(a.train) == 100 and a.train["text"] == b.train["text"]
    assert len(a.validation) == 500 and len(a.test) == 50
    assert "task.max_eval_samples=100000 is larger than the split (500)" in capsys.readouterr().out
    # validation and test subsamples do not depend on the run's seed: every run is selected and scored alike
    c = tasks.load(cfg, seed=1)
    assert c.train["text"] != a.train["text"]
    assert c.test["index"] == a.test["index"] and c.validation["index"] == a.validation["index"]


def test_validation_is_held_out_of_train_stratified_and_fixed():
    """The hold-out is disjoint from train and test, stratified by label, and the same for every run seed."""
    full = tasks.load(compose("task=trec").task, seed=0)
    again = tasks.load(compose("task=trec").task, seed=3)
    assert full.validation["text"] == again.validation["text"]
    official_train = tasks.load_trec(compose("task=trec").task)["train"]["text"]
    assert Counter(full.train["text"]) + Counter(full.validation["text"]) == Counter(official_train)  # a partition
    train_share = Counter(full.train["label"])
    val_share = Counter(full.validation["label"])
    for label, n in val_share.items():  # stratified: each class's share within one example of train's
        assert abs(n - 500 * train_share[label] / len(full.train)) <= 1.0, (label, n)
    assert full.test["index"] == list(range(500))  # the key of per-example test predictions


def test_validation_size_official_split_and_local_file(toy_csv, tmp_path):
    cfg = compose("task=local", f"task.path={toy_csv}", "task.validation_size=30").task
    data = tasks.load(cfg, seed=0)
    assert (len(data.train), len(data.validation), len(data.test)) == (162, 30, 48)
    share = compose("task=local", f"task.path={toy_csv}", "task.validation_size=0.5").task
    assert len(tasks.load(share, seed=0).validation) == 96   # half of the 192 training rows
    val = tmp_path / "val.csv"
    val.write_text("text,label\nthe red one,red\nthe blue one,blue\n")
    own = tasks.load(compose("task=local", f"task.path={toy_csv}", f"task.validation_path={val}").task, seed=0)
    assert own.validation["text"] == ["the red one", "the blue one"] and len(own.train) == 192


def test_local_csv_infers_label_names(toy_csv):
    data = tasks.load(compose("task=local", f"task.path={toy_csv}").task, seed=0)
    assert data.label_names == ["blue", "green", "red"]
    assert len(data.train) + len(data.validation) + len(data.test) == 240


def test_local_labels_outside_declared_classes(toy_csv):
    cfg = compose("task=local", f"task.path={toy_csv}", "task.label_names=[red,green]").task
    with pytest.raises(BenchError, match=r"task.label_names: .*'blue'.*outside the declared classes"):
        tasks.load(cfg, seed=0)


def test_local_missing_column_and_file(toy_csv, tmp_path):
    with pytest.raises(BenchError, match=r"task.text_column: column 'sentence' not in the train data"):
        tasks.load(compose("task=local", f"task.path={toy_csv}", "task.text_column=sentence").task, seed=0)
    with pytest.raises(BenchError, match=r"task.path: file not found"):
        tasks.load(compose("task=local", f"task.path={tmp_path}/nope.csv").task, seed=0)
