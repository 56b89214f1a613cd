"""Tuned comparison (python -m bench.compare, bench/sweep/compare.py) and what it rests on: every method's `search:`
block (bench/sweep/search.py), run tags (`tracking.tags`), multi-objective sweeps (Pareto front, no pruner), the
report's "Tuned comparison" section (bench/report/compare.py). Plumbing on a tiny random-init BERT through a real
Optuna journal and a real MLflow sqlite store; the report section on constructed runs with predictions."""
from __future__ import annotations

import json
import math
import time

import numpy as np
import optuna
import pytest
import yaml
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf, open_dict

from bench.core import metrics as M
from bench.core.methods import peft_spec
from bench.errors import BenchError
from bench.orchestration.resume import run_key
from bench.orchestration.validate import validate
from bench.report import build_report
from bench.report.sweeps import from_runs
from bench.report.runs import read_runs
from bench.sweep import compare, search, spec
from bench.sweep.cli import main as sweep_main
from bench.sweep.storage import open_storage
from bench.tracking import flatten
from tests.conftest import METHODS, ROOT, compose
from tests.test_report import EXPERIMENT, MiB, _log, _section, _store

SHORT = ["train.max_steps=30", "train.eval_every=15", "forgetting=false", "deploy.latency=false",
         "deploy.merged_test=false"]


# --- the search: blocks ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_every_method_yaml_has_a_valid_search_block_around_its_default(method):
    cfg = compose(f"method={method}")
    found = search.check(method, cfg)
    lr = optuna.distributions.FloatDistribution(**{k: v for k, v in found.space["train.lr"].items() if k != "type"})
    assert lr.log and lr.low <= cfg.method.lr <= lr.high, "the default learning rate lies in the searched range"
    assert "train.lr" in found.keys and all(OmegaConf.select(cfg, k) is not None for k in found.keys)
    # no run reads it: not handed to peft, not a param, not in the run key
    if cfg.method.kind == "peft":
        assert "search" not in peft_spec(cfg.method)
    assert not any(k.startswith("method.search") for k in flatten(OmegaConf.to_container(cfg, resolve=True)))
    without = cfg.copy()
    with open_dict(without):
        del without.method["search"]
    assert run_key(without) == run_key(cfg)


@pytest.mark.parametrize("method", ["lora", "adapter", "prefix", "prompt", "adalora"])
def test_the_extremes_of_a_search_space_validate(method, tiny_overrides):
    """The smallest and largest choices of every knob build on the model (peft on the meta device)."""
    found = search.check(method, compose(f"method={method}"))
    sweep = spec.Sweep(path=ROOT, study="x", overrides=[], metric=M.VAL_ACCURACY, direction="maximize", trials=1,
                       space={n: spec._distribution(n, s) for n, s in found.space.items()}, raw_space=found.space,
                       derived={k: spec._factors(k, e, found.space) for k, e in found.derived.items()})
    sweep.helpers = set(found.space) - set(found.keys)
    for pick in (0, -1):
        params = {n: (s["choices"][pick] if s["type"] == "categorical" else s["low" if pick == 0 else "high"])
                  for n, s in found.space.items()}
        values = [f"{k}={v}" for k, v in sweep.run_overrides(params).items()]
        validate(compose(f"method={method}", *tiny_overrides, *values))


def _with_search(block, method="lora"):
    cfg = compose(f"method={method}")
    with open_dict(cfg):
        cfg.method.search = block
    return cfg


@pytest.mark.parametrize("block, message", [
    (None, "conf/method/lora.yaml: search: missing;"),
    ({"space": {"method.r": {"type": "categorical", "choices": [4]}}},
     "conf/method/lora.yaml: search.space.train.lr: missing; the learning rate is always tuned"),
    ({"space": {"train.lr": {"type": "float", "low": 1e-4, "high": 1e-2}}},
     "conf/method/lora.yaml: search.space.train.lr: must be log-uniform"),
    ({"space": {"train.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}, "grid": 1},
     "conf/method/lora.yaml: search: unknown key(s) grid; valid: space, derived"),
    ({"space": {"train.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
                "method.rank": {"type": "categorical", "choices": [4]}}},
     "conf/method/lora.yaml: search.space.method.rank: not a key of the run's config"),
    ({"space": {"train.lr": {"type": "float", "low": 1e-2, "high": 1e-4, "log": True}}},
     "conf/method/lora.yaml: search.space.train.lr: "),
    ({"space": {"train.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}},
      "derived": {"method.alpha": "k * 2"}},
     "conf/method/lora.yaml: search.derived.method.alpha: 'k' is neither a searched name nor a number"),
    ({"space": {"train.lr": {"type": "uniform", "low": 1e-4, "high": 1e-2}}},
     "conf/method/lora.yaml: search.space.train.lr: needs type: one of categorical, int, float"),
])
def test_a_bad_search_block_is_one_line_naming_the_method_file_and_key(block, message):
    cfg = _with_search(block)
    if block is None:
        with open_dict(cfg):
            del cfg.method["search"]
    with pytest.raises(BenchError) as e:
        search.check("lora", cfg)
    assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)


# --- run tags -------------------------------------------------------------------------------------------------
def test_tracking_tags_become_run_tags_and_part_of_the_run_key(tiny_overrides, tmp_path):
    from bench.tracking import Tracker
    base = compose(*tiny_overrides)
    tagged = compose(*tiny_overrides, "+tracking.tags.compare=c1", "+tracking.tags.compare_role=tuned")
    other = compose(*tiny_overrides, "+tracking.tags.compare=c2", "+tracking.tags.compare_role=tuned")
    assert len({run_key(base), run_key(tagged), run_key(other)}) == 3   # a campaign resumes its own runs only
    assert run_key(compose(*tiny_overrides, "tracking.tags={}")) == run_key(base)
    tracker = Tracker(tagged.tracking.uri, tagged.tracking.experiment)
    run = tracker.client.get_run(tracker.start(tagged))
    assert run.data.tags["compare"] == "c1" and run.data.tags["compare_role"] == "tuned"
    assert not any(k.startswith("tracking.tags") for k in flatten(OmegaConf.to_container(tagged)))
    with pytest.raises(BenchError, match=r"^tracking\.tags\.method: the harness sets this tag itself"):
        validate(compose(*tiny_overrides, "+tracking.tags.method=x"))


# --- multi-objective sweep files ------------------------------------------------------------------------------
def _sweep_file(tmp_path, **doc):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"overrides": ["method=lora"], "trials": 1,
                                    "search_space": {"method.r": {"type": "categorical", "choices": [2, 8]}},
                                    **doc}))
    return path


TWO = [{"metric": M.VAL_ACCURACY}, {"metric": M.PARAMS_TRAINABLE}]


@pytest.mark.parametrize("doc, message", [
    ({"objectives": TWO, "pruner": {"type": "MedianPruner"}},
     "pruner: Optuna's pruners do not support multi-objective studies (2 objectives); set pruner: null"),
    ({"objectives": TWO, "objective": {"metric": M.VAL_ACCURACY}}, "objective and objectives: set one of them"),
    ({"objectives": TWO[:1]}, "objectives: must list two or more"),
    ({"objectives": [TWO[0], TWO[0]]}, "objectives: val/accuracy listed twice"),
    ({"objectives": [TWO[0], {"metric": M.TEST_ACCURACY}]}, "objectives[1].metric: test/accuracy is a test metric"),
    ({"objectives": TWO, "sampler": {"type": "CmaEsSampler"}}, "sampler.type: CmaEsSampler takes one objective"),
    ({"importance": {"type": "Nope"}}, "importance.type: {'type': 'Nope'}; valid: FanovaImportanceEvaluator"),
])
def test_bad_multi_objective_and_importance_settings_are_one_line(tmp_path, doc, message):
    with pytest.raises(BenchError) as e:
        spec.load(_sweep_file(tmp_path, **doc))
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_shipped_sweep_files_name_their_sampler_and_importance_evaluator():
    """Optuna 5 changed TPE's defaults, the default multi-objective sampler and the default importance evaluator:
    every shipped file names them, so a study does not move between Optuna 4 and 5."""
    for f in sorted((ROOT / "sweeps").glob("*.yaml")):
        doc = yaml.safe_load(f.read_text())
        assert "type" in doc["sampler"] and doc["importance"]["type"] == "FanovaImportanceEvaluator", f.name
        if doc["sampler"]["type"] == "TPESampler":
            assert {"multivariate", "constant_liar", "seed"} <= set(doc["sampler"]), f.name
    multi = spec.load(ROOT / "sweeps" / "lora_accuracy_vs_params.yaml")
    assert multi.multi and multi.pruner is None and multi.directions == ["maximize", "minimize"]
    spec.check_keys(multi, compose(*multi.overrides))


@pytest.mark.slow
def test_a_multi_objective_sweep_keeps_a_pareto_front(tiny_overrides, tmp_path):
    path = _sweep_file(tmp_path, objectives=TWO, trials=3, study="mo",
                       search_space={"method.r": {"type": "categorical", "choices": [2, 8]},
                                     "train.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}},
                       sampler={"type": "RandomSampler", "seed": 1}, pruner=None)
    assert sweep_main([str(path), *tiny_overrides, *SHORT, "--reports", str(tmp_path / "reports"),
                       "--out-dir", str(tmp_path / "out")]) == 0
    study = optuna.load_study(study_name="mo", storage=open_storage(str(tmp_path / "optuna.journal")))
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(complete) == 3 and all(len(t.values) == 2 for t in complete)
    assert {t.number for t in study.best_trials} and all(not t.intermediate_values for t in complete)  # no pruning
    out = tmp_path / "reports" / "mo"
    summary = json.loads((out / "summary.json").read_text())
    assert {p["trial"] for p in summary["pareto_front"]} == {t.number for t in study.best_trials}
    assert summary["best_trial"] is None and summary["importance_evaluator"] == "FanovaImportanceEvaluator(seed=0)"
    best = (out / "best.txt").read_text().splitlines()
    assert len(best) == 2 * len(study.best_trials) and best[0].startswith("# trial ")
    assert best[1].startswith("python -m bench method=lora") and (out / "pareto.png").is_file()
    # the report reads the same front from MLflow
    runs = read_runs(f"sqlite:///{tmp_path}/mlflow.db", ["peft-bench"])
    parent = next(r for r in runs if r.tags.get("sweep_role") == "parent")
    assert parent.tags["objectives"] == "val/accuracy:maximize,params/trainable:minimize"
    assert parent.tags["front_trials"] == ",".join(str(p["trial"]) for p in summary["pareto_front"])
    studies = from_runs([r for r in runs if "study" in r.tags])
    assert studies[0].multi and {t.number for t in studies[0].front} == {t.number for t in study.best_trials}
    md = build_report(f"sqlite:///{tmp_path}/mlflow.db", ["peft-bench"], tmp_path / "r.md")[0].read_text()
    assert "maximize val/accuracy, minimize params/trainable" in _section(md, "Sweeps")
    assert "Pareto front of" in _section(md, "Sweeps")


# --- the command's checks -------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, message", [
    (["task=trec"], "error: method: name the methods to compare"),
    (["method=lora,ia3", "seed=0,1"], "error: override seed=0,1: compare runs every method with one value of seed"),
    (["method=lora,ia3", "train.lr=0.01"], "error: override train.lr=0.01: train.lr is tuned for method=lora (its "
                                          "search: block in conf/method/lora.yaml)"),
    (["method=lora,lora"], "error: method: lora listed twice"),
    (["method=lora", "--objective", "test/accuracy"], "error: --objective: test/accuracy is a test metric"),
    (["method=lora", "--objective", "val/accuracy:up"], "error: --objective val/accuracy:up: direction 'up'"),
    (["method=lora,nope"], "error: method: unknown choice 'nope'; valid: adalora, adapter,"),
    (["method=lora", "--seeds", "0"], "error: --seeds: must be >= 1, got 0"),
])
def test_bad_compare_input_is_one_line_exit_2_and_no_run(args, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = compare.main([*args, "--trials", "2", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith(message) and "\n" not in err, err
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "optuna.journal").exists()


def test_compare_refuses_a_name_whose_report_is_another_report(tmp_path, capsys, monkeypatch):
    """reports/<name>.md written by `python -m bench.report` (no tuned comparison of this campaign) is not
    overwritten: one line, exit 2, nothing started."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "trec-minilm.md").write_text("# peft-bench report\n\n## Method selection\n")
    code = compare.main(["method=lora", "--trials", "2", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err, err
    assert err.startswith("error: --name trec-minilm: reports/trec-minilm.md is another report"), err
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "reports" / "trec-minilm").exists()
    assert (tmp_path / "reports" / "trec-minilm.md").read_text().startswith("# peft-bench report")


def test_compare_sweep_files_give_every_method_the_same_budget_and_named_settings():
    docs = {m: compare.sweep_doc("c", m, search.check(m, compose(f"method={m}")), 12,
                                 [{"metric": M.VAL_ACCURACY, "direction": "maximize"}]) for m in ("lora", "ia3")}
    same = [{k: v for k, v in d.items() if k not in ("study", "overrides", "search_space", "derived")}
            for d in docs.values()]
    assert same[0] == same[1]
    assert same[0]["sampler"] == {"type": "TPESampler", "seed": 0, "n_startup_trials": 4, "multivariate": True,
                                  "constant_liar": True}
    assert same[0]["pruner"]["type"] == "MedianPruner" and same[0]["importance"]["type"] == "FanovaImportanceEvaluator"
    two = compare.sweep_doc("c", "lora", search.check("lora", compose("method=lora")), 12,
                            [{"metric": M.VAL_ACCURACY, "direction": "maximize"},
                             {"metric": M.PARAMS_TRAINABLE, "direction": "minimize"}])
    assert two["pruner"] is None and "objectives" in two and "objective" not in two


# --- the report section ---------------------------------------------------------------------------------------
def _parent(client, exp, name, method, trials, steps, seconds, best):
    tags = {"study": f"{name}-{method}", "sweep_role": "parent", "compare": name, "compare_role": "study",
            "compare_method": method, "objective": M.VAL_ACCURACY, "direction": "maximize",
            **{f"best.{k}": v for k, v in best.items()}}
    rid = client.create_run(exp, run_name=f"sweep-{name}-{method}", tags=tags).info.run_id
    ts = int(time.time() * 1000)
    client.log_batch(rid, metrics=[Metric(k, v, ts, 1) for k, v in {
        "sweep/finished_trials": trials, "sweep/complete_trials": trials - 1, "sweep/pruned_trials": 1,
        "sweep/fail_trials": 0, "sweep/train_steps": steps, "sweep/trial_seconds": seconds}.items()])
    client.set_terminated(rid, "FINISHED")


def _campaign(tmp_path, tuned_gap: float):
    """Defaults: ia3 78 %, lora 70 %; tuned: ia3 80 %, lora 80 % + tuned_gap; 3 seeds, 500 test questions each."""
    uri, client, exp = _store(tmp_path)
    rng = np.random.default_rng(0)

    plan = {("lora", "default"): (0.70, {"train.lr": "0.001", "method.r": "8", "method.alpha": "16"}),
            ("ia3", "default"): (0.78, {"train.lr": "0.005"}),
            ("lora", "tuned"): (0.80 + tuned_gap, {"train.lr": "0.0032", "method.r": "16", "method.alpha": "16"}),
            ("ia3", "tuned"): (0.80, {"train.lr": "0.012"})}
    for (method, role), (p, params) in plan.items():
        for seed in (1, 2, 3):
            rid = _log(client, exp, method, seed, None, 300 * MiB, 3e5, 20.0, correct=rng.random(500) < p,
                       tmp=tmp_path, extra=params)
            client.set_tag(rid, "compare", "c")
            client.set_tag(rid, "compare_role", role)
    _parent(client, exp, "c", "lora", 8, 1200, 240.0, {"train.lr": "0.0032", "method.r": "16", "method.alpha": "16"})
    _parent(client, exp, "c", "ia3", 8, 1400, 200.0, {"train.lr": "0.012"})
    return uri


def test_tuned_comparison_section_reports_configs_intervals_costs_and_a_changed_ranking(tmp_path):
    uri = _campaign(tmp_path, tuned_gap=0.08)   # lora tuned 88 % against ia3 tuned 80 %: apart
    md = build_report(uri, [EXPERIMENT], tmp_path / "r.md")[0].read_text()
    section = _section(md, "Tuned comparison")
    lora = next(line for line in section.splitlines() if line.startswith("| lora |"))
    cells = [c.strip() for c in lora.strip("|").split("|")]
    assert cells[1] == "method.alpha 16 (= default), method.r 8 → 16, train.lr 0.001 → 0.0032"
    assert cells[2].endswith("(n=3)") and " ± " in cells[2] and cells[3].endswith("(n=3)")
    assert cells[4].endswith("(n=500)")              # Wilson, distinct test questions
    assert "beyond noise" in cells[5]                # tuned − defaults, paired bootstrap
    assert cells[10] == "8 (7 complete, 1 pruned, 0 failed)" and cells[11] == "1,200" and cells[12] == "240.0 s"
    assert "At the defaults: ia3 > lora. Tuned: lora > ia3." in section
    assert "beyond noise (the tuned paired test puts them apart): lora over ia3" in section
    assert "The ranking changed with tuning." in section
    assert "| lora | ia3 |" in section and "Tuning, all methods: 16 finished trials, 2,600 training steps" in section
    assert (tmp_path / "r" / "tuned-c.png").is_file()


def test_a_swap_within_noise_is_no_change_of_ranking(tmp_path):
    uri = _campaign(tmp_path, tuned_gap=0.004)   # lora tuned 80.4 % against ia3 tuned 80 %: within noise
    section = _section(build_report(uri, [EXPERIMENT], tmp_path / "r.md")[0].read_text(), "Tuned comparison")
    if "Tuned: lora > ia3" in section:
        assert "within noise (the tuned paired test cannot tell them apart" in section
        assert "the ranking did not change beyond noise" in section
    else:   # the draw put ia3 ahead again: no swap at all
        assert "The ranking did not change with tuning." in section


# --- end to end -----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_compare_end_to_end_on_a_tiny_model(tiny_overrides, tmp_path, monkeypatch):
    """2 methods x 2 trials x 2 seeds on the tiny random-init BERT: the studies, the re-runs through python -m
    bench (tagged), the report section; the same command again resumes without a new run."""
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    overrides = [o for o in tiny_overrides if not o.startswith("train.")] + SHORT + ["train.batch_size=16"]
    args = ["method=lora,ia3", *overrides, "--trials", "2", "--seeds", "2", "--name", "e2e"]
    assert compare.main(args) == 0
    storage = open_storage(str(tmp_path / "optuna.journal"))
    best = {}
    for m in ("lora", "ia3"):
        study = optuna.load_study(study_name=f"e2e-{m}", storage=storage)
        assert sum(t.state.name in ("COMPLETE", "PRUNED") for t in study.trials) == 2
        best[m] = study.best_trial
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("peft-bench").experiment_id
    runs = client.search_runs([exp], filter_string="tags.compare = 'e2e'")
    by = {}
    for r in runs:
        by.setdefault((r.data.tags["compare_role"], r.data.tags.get("method") or r.data.tags.get("compare_method")),
                      []).append(r)
    assert {k: len(v) for k, v in by.items()} == {("study", "lora"): 1, ("study", "ia3"): 1, ("tuned", "lora"): 2,
                                                  ("tuned", "ia3"): 2, ("default", "lora"): 2, ("default", "ia3"): 2}
    for m in ("lora", "ia3"):
        tuned = by[("tuned", m)]
        assert sorted(r.data.tags["seed"] for r in tuned) == ["1", "2"]   # seeds after the trials' seed 0
        assert all(r.info.status == "FINISHED" and "study" not in r.data.tags for r in tuned)
        assert all(math.isclose(float(r.data.params["train.lr"]), best[m].params["train.lr"]) for r in tuned)
        assert {float(r.data.params["train.lr"]) for r in by[("default", m)]} == {compose(f"method={m}").method.lr}
    md = (tmp_path / "reports" / "e2e.md").read_text()
    section = _section(md, "Tuned comparison")
    assert "### Campaign `e2e`" in section and "| lora |" in section and "| ia3 |" in section
    assert "2 (" in section and "**Ranking by mean test accuracy.**" in section
    assert len((tmp_path / "reports" / "e2e" / "commands.txt").read_text().splitlines()) == 3
    # the same command again: the studies have their trials, every re-run is skipped
    before = len(client.search_runs([exp]))
    assert compare.main(args) == 0
    assert len(client.search_runs([exp])) == before
