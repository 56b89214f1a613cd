"""Several tasks' adapters on one base (bench/core/multitask.py, python -m bench.multitask) on tiny random-init
models (conftest: tiny_bert_dir, tiny_llama_dir): switching gives each task exactly its single-adapter predictions,
the command records one parent and one FINISHED run per task, and bad input stops it in one line."""
from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from bench import private_apis
from bench.core import metrics as M
from bench.core import multitask, pipeline
from bench.orchestration import multitask as command
from tests.conftest import ROOT, compose
from tests.test_generation import gen_overrides, instruct_files  # noqa: F401  (a fixture)

CPU = torch.device("cpu")
FAST = ["train.lr=0.05", "forgetting=false", "deploy.latency=false", "deploy.merged_test=false", "deploy.repeats=3",
        "deploy.warmup=1", "device=cpu"]
PARENT = [n for n in M.MULTITASK if not n.endswith("_switched") and n != M.MULTITASK_MIXED_BATCH_MAX_ABS_DIFF]


class NoLog:
    def log_metrics(self, metrics, step=0):
        pass

    def log_points(self, points):
        pass


@pytest.fixture(scope="module")
def two_class_csv(toy_csv, tmp_path_factory):
    """The toy data without its third class: a task whose head has another size."""
    df = pd.read_csv(toy_csv)
    path = tmp_path_factory.mktemp("toy2") / "toy2.csv"
    df[df.label != "blue"].to_csv(path, index=False)
    return path


def train(tmp_path, name: str, *overrides: str):
    """A task's run in this process (pipeline.run, as the worker calls it): its adapter and its metrics."""
    cfg = compose(*overrides, f"task.name={name}", *FAST)
    out = tmp_path / name
    return multitask.Adapter(cfg, out / "ckpt"), pipeline.run(cfg, out, CPU, NoLog())


@pytest.mark.slow  # a whole command or several runs: kept out of the fast subset
def test_switching_gives_each_task_its_single_adapter_predictions_exactly(tiny_bert_dir, toy_csv, two_class_csv,
                                                                          tmp_path, monkeypatch):
    """Three LoRA adapters (3, 2 and 2 classes) on one tiny BERT: after set_adapter each task's test predictions are
    those of its adapter alone, to the logit, and score what its own run scored; the two 2-class tasks share a
    mixed batch."""
    bert = ["model=hf", f"model.name_or_path={tiny_bert_dir}", "method=lora", "task=local", "train.max_steps=6",
            "train.eval_every=6", "train.batch_size=16"]
    runs = {"colors3": train(tmp_path, "colors3", *bert, f"task.path={toy_csv}"),
            "colors2": train(tmp_path, "colors2", *bert, f"task.path={two_class_csv}"),
            "colors2b": train(tmp_path, "colors2b", *bert, f"task.path={two_class_csv}", "seed=1")}
    weights = [load_file(a.ckpt / "adapter_model.safetensors") for a, _ in runs.values()]
    lora_b = [k for k in weights[1] if "lora_B" in k]
    assert lora_b and all(not torch.equal(weights[1][k], weights[2][k]) for k in lora_b)   # the adapters differ
    assert all(weights[1][k].abs().sum() > 0 for k in lora_b)                              # and left their init

    out = multitask.measure([a for a, _ in runs.values()], CPU)
    m = out.metrics
    assert m[M.MULTITASK_TASKS] == 3 and m[M.MULTITASK_PREDICTIONS_EQUAL] == 1.0
    assert m[M.MULTITASK_MAX_ABS_LOGIT_DIFF] <= 1e-6
    for name, (adapter, outcome) in runs.items():
        switched = out.per_task[name][M.MULTITASK_TEST_ACCURACY_SWITCHED]
        assert switched == outcome.metrics[M.TEST_ACCURACY], name
        assert out.task_tags[name]["multitask.predictions_equal"] == "true", name
    assert out.tags["mixed_batch"].startswith("mixed: colors2, colors2b; left out") and "colors3 3 classes" in \
        out.tags["mixed_batch"]
    assert m[M.MULTITASK_MIXED_BATCH_MAX_ABS_DIFF] <= 1e-5
    assert m[M.MULTITASK_ADAPTERS_BYTES] == sum(o.metrics[M.CKPT_BYTES] for _, o in runs.values())
    assert m[M.MULTITASK_FULL_MODELS_BYTES] > 2.5 * m[M.MULTITASK_BASE_BYTES] > 0
    assert m[M.MULTITASK_SWITCH_MS] > 0 and m[M.MULTITASK_LOAD_S] > 0 and m[M.MULTITASK_RSS_BASE_BYTES] > 0
    assert set(m) == set(PARENT) | {M.MULTITASK_MIXED_BATCH_MAX_ABS_DIFF}

    # the check can fail: with the other 2-class adapter switched in, colors2 is no longer its adapter alone
    activate = multitask.activate
    monkeypatch.setattr(multitask, "activate", lambda model, parts, name: activate(
        model, parts, {"colors2": "colors2b"}.get(name, name)))
    wrong = multitask.measure([runs["colors2"][0], runs["colors2b"][0]], CPU)
    assert wrong.metrics[M.MULTITASK_MAX_ABS_LOGIT_DIFF] > 1e-4
    assert wrong.task_tags["colors2b"]["multitask.max_abs_logit_diff"] == "0"


@pytest.mark.slow  # a whole command or several runs: kept out of the fast subset
def test_generative_adapters_switch_exactly_and_mix_in_one_batch(tiny_llama_dir, instruct_files, tmp_path):  # noqa: F811
    """Two LoRA adapters on one tiny Llama LM: switched generations and teacher-forced logits equal each adapter
    alone; a batch mixing both adapters (adapter_names=) equals each row under its own adapter."""
    common = gen_overrides(tiny_llama_dir, instruct_files, tmp_path, "method=lora", "train.max_steps=3")
    runs = {name: train(tmp_path, name, *common, f"seed={seed}") for name, seed in (("gen_a", 0), ("gen_b", 1))}
    out = multitask.measure([a for a, _ in runs.values()], CPU)
    assert out.metrics[M.MULTITASK_PREDICTIONS_EQUAL] == 1.0 and out.metrics[M.MULTITASK_MAX_ABS_LOGIT_DIFF] <= 1e-6
    for name, (_, outcome) in runs.items():
        assert out.per_task[name] == {M.MULTITASK_TEST_ACCURACY_SWITCHED: outcome.metrics[M.TEST_ACCURACY]}
    assert out.tags["mixed_batch"] == "mixed: gen_a, gen_b" and out.metrics[M.MULTITASK_MIXED_BATCH_MAX_ABS_DIFF] <= 1e-5


def test_peft_keeps_one_head_per_adapter_in_modules_to_save():
    """fit_heads replaces an adapter's copy of the head in ModulesToSaveWrapper.modules_to_save (the name
    adapter_layer_names gives); the wrapper must then run that module for the adapter."""
    from peft.utils import ModulesToSaveWrapper
    api = private_apis.PEFT_MODULES_TO_SAVE
    version = importlib.metadata.version("peft")
    wrapper = ModulesToSaveWrapper(torch.nn.Linear(4, 2), "a")
    held = getattr(wrapper, "modules_to_save", None)
    assert wrapper.adapter_layer_names == ("modules_to_save",) and isinstance(held, torch.nn.ModuleDict) \
        and "a" in held, api.changed(version, ["the per-adapter ModuleDict modules_to_save"])
    wrapper.modules_to_save["a"] = torch.nn.Linear(4, 6)
    assert wrapper(torch.zeros(1, 4)).shape == (1, 6), api.changed(version, ["forward through modules_to_save[adapter]"])


@pytest.mark.slow   # a whole command (pyproject.toml: the slow marker)
def test_command_records_a_parent_and_one_finished_run_per_task(tiny_bert_dir, tmp_path, capsys):
    """python -m bench.multitask on trec (6 classes) and finefoods (2): a parent run with every multitask figure,
    two complete FINISHED task runs nested under it with their switched scores; the same command again is skipped."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    argv = ["task=trec,finefoods", "model=hf", f"model.name_or_path={tiny_bert_dir}", "train.max_steps=3",
            "train.eval_every=3", "task.max_train_samples=48", "task.max_eval_samples=16", "task.max_test_samples=24",
            "train.isolate=false", f"tracking.uri={uri}", "deploy.repeats=3", "deploy.warmup=1", "device=cpu",
            "--out-dir", str(tmp_path / "out")]   # a complete run each: forgetting, latencies, merged test
    assert command.main(argv) == 0, capsys.readouterr().err
    client = MlflowClient(tracking_uri=uri)
    found = client.search_runs([client.get_experiment_by_name("peft-bench").experiment_id])
    parents = [r for r in found if r.data.tags.get("multitask") == "parent"]
    assert len(parents) == 1 and len(found) == 3
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.info.run_name == "multitask-lora-hf-s0"
    assert set(PARENT) <= set(parent.data.metrics) and parent.data.metrics[M.MULTITASK_PREDICTIONS_EQUAL] == 1.0
    assert M.MULTITASK_MIXED_BATCH_MAX_ABS_DIFF not in parent.data.metrics
    assert parent.data.tags["mixed_batch"].startswith("not possible: no two heads have one size")
    children = {r.data.tags["task"]: r for r in found if r is not parent}
    assert sorted(children) == ["finefoods", "trec"]
    for task, r in children.items():
        assert r.info.status == "FINISHED" and r.data.tags["mlflow.parentRunId"] == parent.info.run_id, task
        assert set(M.run_names("classification", merged=True)) <= set(r.data.metrics), task
        assert r.data.metrics[M.MULTITASK_TEST_ACCURACY_SWITCHED] == r.data.metrics[M.TEST_ACCURACY], task
        assert (tmp_path / "out" / parent.info.run_id / task / "ckpt" / "adapter_config.json").is_file(), task
    capsys.readouterr()
    assert command.main(argv) == 0
    assert "skip multitask-lora-hf-s0: finished earlier" in capsys.readouterr().out
    assert len(client.search_runs([parent.info.experiment_id])) == 3


@pytest.mark.parametrize("overrides, key, says", [
    (["task=trec"], "task", "at least 2 tasks"),
    (["task=trec,trec"], "task", "trec named twice"),
    (["task=trec,rotten_tomatoes", "method=full"], "method", "method=full is kind full"),
    (["task=trec,rotten_tomatoes", "method=lora,ia3"], "method", "one value per multitask command"),
    (["task=trec,trec_instruct"], "task", "trec (classification), trec_instruct (generation)"),
    (["task=trec,rotten_tomatoes", "quant=nf4"], "quant", "quant=nf4 is not supported"),
    (["task=trec,nosuch"], "task", "unknown choice 'nosuch'"),
], ids=["one-task", "twice", "full", "two-methods", "two-kinds", "quantized", "unknown-task"])
def test_bad_input_is_one_line_exit_2_and_no_run(overrides, key, says, tmp_path, capsys):
    store = tmp_path / "mlflow.db"
    code = command.main([*overrides, "train.isolate=false", f"tracking.uri=sqlite:///{store}"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    line = err.strip()
    assert line.startswith("error: ") and f"{key}: " in line and "valid: " in line and says in line, line
    assert not store.exists()


def test_python_m_bench_multitask_and_bench_multitask_reach_the_command(monkeypatch, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench.multitask", "task=trec", "train.isolate=false"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2 and proc.stderr.startswith("error: task: multitask needs at least 2 tasks"), proc.stderr
    assert not list(tmp_path.iterdir())
    from bench import __main__ as entry
    seen = []
    monkeypatch.setattr(command, "main", lambda argv: seen.append(argv) or 0)
    with pytest.raises(SystemExit) as e:
        entry.main(["multitask", "task=trec,finefoods"])
    assert e.value.code == 0 and seen == [["task=trec,finefoods"]]
