"""Quantization on CPU: QLoRA (bitsandbytes NF4 + LoRA) trains, evaluates and trains again; the new head stays
unquantized; bitsandbytes' import-time warning stays off the console.

bitsandbytes >= 0.49 takes an AVX512-BF16 inference path for Linear4bit on CPUs that have it (its weight is
repacked at the first no-grad evaluation; training afterwards crashed). bench.core.models.keep_off_cpu_packing keeps
trained models off it. The tests force what bitsandbytes detects on or off (`avx512bf16_forced_on` /
`avx512bf16_forced_off` in their ids), so both paths are covered on any CPU.
"""
from __future__ import annotations

import importlib.metadata
import inspect
import json
import logging
import os
import subprocess
import sys

import pytest
import torch
from packaging.version import Version

from bench.core import models, quant_backend
from bench.orchestration.worker import run_job
from tests.conftest import ROOT, compose

FORCED = {"avx512bf16_forced_on": True, "avx512bf16_forced_off": False}
PACKING_SINCE = Version("0.49")  # bitsandbytes version that added the AVX512-BF16 CPU path (and its switch)


def bnb_version() -> Version:
    return Version(importlib.metadata.version("bitsandbytes"))


def force_avx512bf16(monkeypatch, value: bool) -> list[bool]:
    """Make bitsandbytes see (or not see) AVX512-BF16, whatever this CPU has; returns a record of its checks."""
    import bitsandbytes.functional
    import bitsandbytes.nn.modules
    checks: list[bool] = []
    if bnb_version() < PACKING_SINCE:
        return checks  # no AVX512-BF16 path to force

    def has_avx512bf16() -> bool:
        checks.append(value)
        return value
    # Linear4bit.__init__ calls the name it imported from bitsandbytes.functional (raising=True: a rename fails here)
    monkeypatch.setattr(bitsandbytes.nn.modules, "has_avx512bf16", has_avx512bf16)
    monkeypatch.setattr(bitsandbytes.functional, "has_avx512bf16", has_avx512bf16)
    return checks


def is_packed(module) -> bool:
    return bool(getattr(getattr(module.weight, "quant_state", None), "packing_format_for_cpu", False))


def test_linear4bit_still_has_the_avx512bf16_switch_that_bench_models_turns_off():
    """bench.core.models sets a bitsandbytes internal: fail clearly when bitsandbytes renames or drops it."""
    bnb = pytest.importorskip("bitsandbytes")
    if bnb_version() < PACKING_SINCE:
        pytest.skip(f"bitsandbytes {bnb_version()} has no AVX512-BF16 CPU path (added in {PACKING_SINCE})")
    layer = bnb.nn.Linear4bit(64, 64)
    reads = "support_avx512bf16_for_cpu" in inspect.getsource(bnb.nn.Linear4bit.forward)
    assert hasattr(layer, "support_avx512bf16_for_cpu") and reads, (
        f"bitsandbytes {bnb_version()}: Linear4bit.support_avx512bf16_for_cpu is gone or no longer read by forward; "
        "bench.core.models.keep_off_cpu_packing relies on it to keep trained models off the AVX512-BF16 CPU "
        "inference path: find the new switch, or pin bitsandbytes below this version in pyproject.toml")


@pytest.mark.parametrize("forced", list(FORCED), ids=list(FORCED))
def test_linear4bit_eval_then_train_on_cpu(forced, monkeypatch):
    """A bare NF4 layer + a LoRA-like side path: no-grad eval, then a training step, then eval again."""
    bnb = pytest.importorskip("bitsandbytes")
    checks = force_avx512bf16(monkeypatch, FORCED[forced])
    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float32, quant_type="nf4").to("cpu")
    if bnb_version() >= PACKING_SINCE:
        assert checks and bool(layer.support_avx512bf16_for_cpu) is FORCED[forced]  # the forcing reached the layer
    models.keep_off_cpu_packing(layer)
    side = torch.nn.Linear(64, 64, bias=False)
    x = torch.randn(8, 64)

    layer.eval()
    with torch.no_grad():
        before = layer(x)
    assert not is_packed(layer)
    layer.train()
    xg = x.clone().requires_grad_(True)
    (layer(xg) + side(xg)).pow(2).mean().backward()  # crashed after a packing eval ("a view of a leaf Variable")
    assert side.weight.grad is not None and xg.grad is not None and layer.bias.grad is not None
    layer.eval()
    with torch.no_grad():
        assert torch.equal(layer(x), before)


def test_bitsandbytes_kernel_warning_is_dropped_and_noted_other_records_pass(monkeypatch, caplog):
    gate = quant_backend.quiet()
    monkeypatch.setattr(gate, "seen", False)  # restored afterwards: other tests see the real state
    with caplog.at_level(logging.WARNING):
        logging.getLogger("bitsandbytes.backends.cpu.ops").warning(
            "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure ...", "No module named")
        logging.getLogger("bitsandbytes.nn.modules").warning("some other bitsandbytes warning")
    assert [r.getMessage() for r in caplog.records] == ["some other bitsandbytes warning"]
    assert gate.seen
    assert quant_backend.cpu_note("nf4", "cpu") == ("note: quant=nf4: bitsandbytes' fast AVX512-BF16 CPU kernel "
                                                    "(kernels-community) is not available; using its portable CPU path")
    assert quant_backend.cpu_note("nf4", "cuda") is None and quant_backend.cpu_note("int8", "cpu") is None


def _python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


@pytest.mark.slow  # a fresh interpreter importing the harness: ~10 s
def test_importing_the_harness_keeps_the_bitsandbytes_kernel_warning_off_stderr():
    """The real import (through peft); meaningful on AVX512-BF16 CPUs, where bitsandbytes logs the warning."""
    pytest.importorskip("bitsandbytes")
    proc = _python("import json, importlib.util, bench.orchestration.worker, bitsandbytes.functional as F\n"
                   "from bench.core import quant_backend as q\n"
                   "print(json.dumps([bool(F.has_avx512bf16()), importlib.util.find_spec('kernels') is None,"
                   " q.cpu_note('nf4', 'cpu')]))")
    assert proc.returncode == 0, proc.stderr
    assert "kernels-community" not in proc.stderr, proc.stderr
    avx512bf16, no_kernels, note = json.loads(proc.stdout.splitlines()[-1])
    if bnb_version() >= PACKING_SINCE and avx512bf16 and no_kernels:
        assert note and note.startswith("note: quant=nf4: "), "the harness lost track of bitsandbytes' warning"


@pytest.mark.slow  # a fresh interpreter importing the harness: ~10 s
def test_hidden_bitsandbytes_is_not_imported_and_lora_still_applies():
    """BENCH_HIDE_BITSANDBYTES=1 (a process that runs only quant=none jobs): peft treats bitsandbytes as absent."""
    pytest.importorskip("bitsandbytes")
    proc = _python("import sys, bench.orchestration.worker, peft\n"
                   "from transformers import BertConfig, BertForSequenceClassification\n"
                   "m = BertForSequenceClassification(BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1,"
                   " num_attention_heads=2, intermediate_size=64))\n"
                   "m = peft.get_peft_model(m, peft.LoraConfig(task_type='SEQ_CLS', target_modules=['query']))\n"
                   "print(sys.modules.get('bitsandbytes'))",
                   **{quant_backend.HIDE_ENV: "1"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "None", proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("quant,layer,forced", [("nf4", "Linear4bit", "avx512bf16_forced_on"),
                                                ("nf4", "Linear4bit", "avx512bf16_forced_off"),
                                                ("int8", "Linear8bitLt", None)],
                         ids=["nf4-avx512bf16_forced_on", "nf4-avx512bf16_forced_off", "int8"])
def test_quantized_lora_trains_evaluates_and_trains_again_on_cpu_minilm(quant, layer, forced, tmp_path,
                                                                        monkeypatch):
    bnb = pytest.importorskip("bitsandbytes")
    checks = force_avx512bf16(monkeypatch, FORCED[forced]) if forced else []
    loaded, seen = [], {"steps": [], "acc": [], "packed": []}
    load = models.load
    monkeypatch.setattr(models, "load", lambda *a, **k: loaded.append(load(*a, **k)) or loaded[-1])

    def check(step, metrics):  # a periodic evaluation; training goes on after the one at step 20
        seen["steps"].append(step)
        seen["acc"].append(metrics.get("val/accuracy", metrics.get("eval/accuracy")))
        seen["packed"] += [is_packed(m) for m in loaded[0][0].modules() if isinstance(m, bnb.nn.Linear4bit)]

    cfg = compose("method=lora", f"quant={quant}", "train.max_steps=40", "train.eval_every=20",
                  "task.max_train_samples=640", "task.max_eval_samples=100", "task.max_test_samples=100",
                  "forgetting=false", "deploy.latency=false", "deploy.merged_test=false",   # not this test's subject
                  "train.isolate=false", "device=cpu",
                  f"tracking.uri=sqlite:///{tmp_path}/mlflow.db")
    result = run_job(cfg, tmp_path / "job", on_eval=check)
    assert result.status == "FINISHED"
    assert 20 in seen["steps"] and result.metrics["train/steps"] == 40
    assert all(a is not None for a in seen["acc"])
    assert result.metrics["train/loss"] < 1.79  # below ln(6): it learned something in 40 steps
    if forced and bnb_version() >= PACKING_SINCE:
        assert checks and seen["packed"] and not any(seen["packed"])  # forced value used; never repacked
    monkeypatch.setattr(models, "load", load)
    from peft import PeftModel  # reload the adapter onto a freshly quantized base
    base, _ = models.load(cfg.model, cfg.quant, 6, torch.device("cpu"))
    layers = {type(m).__name__ for m in base.modules()}
    assert layer in layers
    assert type(base.classifier).__name__ == "Linear"  # the head is kept out of quantization
    model = PeftModel.from_pretrained(base, tmp_path / "job" / "ckpt")
    assert any(type(m).__name__ == layer for m in model.modules())


@pytest.mark.slow
def test_quantized_job_runs_in_a_new_interpreter_with_bitsandbytes_minilm(tmp_path):
    """The warm template hides bitsandbytes, so `python -m bench quant=int8` starts the job's worker as a new
    interpreter (python -m bench.orchestration.worker), where bitsandbytes loads and the run finishes (in a fork of
    the template, where bitsandbytes counts as not installed, int8 weights could not load)."""
    pytest.importorskip("bitsandbytes")
    from mlflow.tracking import MlflowClient
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    proc = subprocess.run([sys.executable, "-m", "bench", "method=lora", "quant=int8", "train.max_steps=2",
                           "train.eval_every=null", "task.max_train_samples=32", "task.max_eval_samples=16",
                           "task.max_test_samples=16", "device=cpu", f"tracking.uri={uri}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    client = MlflowClient(tracking_uri=uri)
    run = client.search_runs([client.get_experiment_by_name("peft-bench").experiment_id])[0]
    assert run.info.status == "FINISHED" and run.data.tags["quant"] == "int8"
    assert run.data.tags["worker.pid"] != run.data.tags["owner.pid"]   # not the parent: its own process
    assert run.data.metrics["params/trainable"] > 0
