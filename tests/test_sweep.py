"""Sweeps (bench/sweep) on the tiny random-init BERT (plumbing, not learning): trials finish and are recorded in a
real Optuna journal and a real MLflow store; a SIGKILLed sweep resumes to exactly N finished trials; a raising
trial is FAILED and the study goes on; the pruner stops a clearly worse trial; two workers share one study.
Protocol: a sweep selects on validation (val/*) or a cost, never on test/* (refused, as is the renamed eval/*);
the best trial is the best on the objective, and its one test evaluation is reported beside it."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState
from rich.console import Console

from bench.core import metrics as M
from bench.errors import BenchError
from bench.report import sweep_outputs
from bench.sweep import spec
from bench.sweep.cli import main
from bench.sweep.storage import open_storage
from bench.sweep.study import Job, compose, progress_line
from tests.conftest import ROOT

LORA = ROOT / "sweeps" / "lora_rank_alpha.yaml"
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
SHORT = ["train.max_steps=30", "train.eval_every=15"]   # where learning does not matter


@pytest.fixture
def sweep_args(tiny_overrides, tmp_path) -> list[str]:
    """Tiny-model overrides for every trial plus report/output folders in tmp_path (storage: the default,
    beside the MLflow store in tmp_path)."""
    return [*tiny_overrides, "--reports", str(tmp_path / "reports"), "--out-dir", str(tmp_path / "outputs")]


def load(tmp_path: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=open_storage(str(tmp_path / "optuna.journal")))


def mlflow_runs(tmp_path: Path, study: str):
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("peft-bench")
    found = client.search_runs([exp.experiment_id], filter_string=f"tags.study = '{study}'")
    parents = [r for r in found if r.data.tags.get("sweep_role") == "parent"]
    trials = [r for r in found if r.data.tags.get("sweep_role") != "parent"]
    return client, parents, trials


def write_sweep(tmp_path: Path, name: str, **doc) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"overrides": ["method=lora"], "objective": {"metric": M.VAL_ACCURACY},
                                    "trials": 1, **doc}))
    return path


@pytest.mark.parametrize("space, derived, message", [
    ({"method.rank": {"type": "categorical", "choices": [4, 8]}}, None,
     "search_space.method.rank: not a key of the run's config and not used in derived; valid: a key such as "
     "method.r"),
    ({"method.r": {"type": "categorical", "choices": [4, 8]}}, {"method.alfa": "method.r * 2"},
     "derived.method.alfa: not a key of the run's config"),
    ({"method.r": {"type": "categorical", "choices": [4, 8]}, "method.alpha": {"type": "categorical",
                                                                             "choices": [8]}},
     {"method.alpha": "method.r * 2"}, "derived.method.alpha: is also in search_space; keep it in one place"),
])
def test_a_sweep_file_naming_no_config_key_is_one_line(tmp_path, space, derived, message):
    """The sweep file's check of its names against the composed config (the same function as a method YAML's
    search block, bench/sweep/spec.py check_names, spelt with the file's own block names)."""
    path = write_sweep(tmp_path, "bad", search_space=space, **({"derived": derived} if derived else {}))
    sweep = spec.load(path)
    with pytest.raises(BenchError) as e:
        spec.check_keys(sweep, compose(sweep.overrides))
    assert str(e.value).startswith(f"{path}: {message}"), str(e.value)


def grid_seed_putting_first(space: dict, first: dict) -> int:
    """A GridSampler seed whose first trial takes `first` (GridSampler visits its grid in a seeded order)."""
    dists = {k: optuna.distributions.CategoricalDistribution(v) for k, v in space.items()}
    for seed in range(50):
        study = optuna.create_study(sampler=optuna.samplers.GridSampler(space, seed=seed))
        if all(study.ask(dists).params[k] == v for k, v in first.items()):
            return seed
    raise AssertionError("no seed found")


def test_shipped_sweep_files_load_and_match_the_config():
    files = sorted((ROOT / "sweeps").glob("*.yaml"))
    assert {f.name for f in files} >= {"lora_rank_alpha.yaml", "lora_rank_alpha_grid.yaml",
                                       "adapter_reduction.yaml", "prompt_tokens.yaml"}
    for f in files:
        sweep = spec.load(f)
        spec.check_keys(sweep, compose(sweep.overrides))
        sweep.make_sampler(), sweep.make_pruner()
    grid = spec.load(ROOT / "sweeps" / "lora_rank_alpha_grid.yaml")
    spec.check_keys(grid, compose(grid.overrides))
    assert grid.trials == 24
    pairs = {(v["method.r"], v["method.alpha"]) for v in
             (grid.run_overrides({"method.r": r, "alpha_per_rank": m}) for r in [2, 4, 8, 16, 32, 64]
              for m in [0.5, 1, 2, 4])}
    assert len(pairs) == 24 and (8, 16) in pairs and (2, 1) in pairs and (64, 256) in pairs


@pytest.mark.slow  # a whole command or several runs: kept out of the fast subset
def test_sweep_runs_n_trials_nested_under_one_parent_run(sweep_args, tmp_path):
    assert main([str(LORA), "--trials", "3", *sweep_args, *SHORT]) == 0

    study = load(tmp_path, "lora_rank_alpha")   # default storage: beside the MLflow store
    assert Counter(t.state for t in study.trials) == {TrialState.COMPLETE: 3}
    client, parents, trials = mlflow_runs(tmp_path, "lora_rank_alpha")
    assert len(parents) == 1 and len(trials) == 3
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    by_trial = {int(r.data.tags["trial"]): r for r in trials}
    for t in study.trials:
        run = by_trial[t.number]
        assert run.info.status == "FINISHED" and run.info.run_id == t.user_attrs["mlflow_run_id"]
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.metrics[M.VAL_ACCURACY] == pytest.approx(t.value)
        assert t.user_attrs["test_metrics"] == pytest.approx({k: run.data.metrics[k] for k in M.TEST
                                                              if k in M.run_names("classification")})
        r, mult = t.params["method.r"], t.params["alpha_per_rank"]   # alpha is r x multiplier
        assert run.data.params["method.r"] == str(r)
        assert float(run.data.params["method.alpha"]) == r * mult
        assert float(run.data.params["train.lr"]) == pytest.approx(t.params["train.lr"])
        assert run.data.params["model.name_or_path"] != "null"   # the command line's overrides reached it
    # each trial ran in its own fresh worker process (a warm fork), not in the sweep's process
    workers = {r.data.tags["worker.pid"] for r in trials}
    assert len(workers) == 3 and str(os.getpid()) not in workers

    best = study.best_trial
    assert best.value == max(t.value for t in study.trials)   # selected on the objective (validation)
    assert parent.data.metrics[f"best/{M.VAL_ACCURACY}"] == pytest.approx(best.value)
    best_run = by_trial[best.number]   # its one test evaluation, reported beside the selection
    assert parent.data.metrics[f"best_trial/{M.TEST_ACCURACY}"] == pytest.approx(best_run.data.metrics[M.TEST_ACCURACY])
    summary = json.loads((tmp_path / "reports" / "lora_rank_alpha" / "summary.json").read_text())
    assert summary["objective"] == M.VAL_ACCURACY and summary["best_trial"] == best.number
    assert summary["best_test"] == pytest.approx({k: best_run.data.metrics[k] for k in M.TEST
                                                  if k in M.run_names("classification")})
    assert parent.data.tags["best_trial"] == str(best.number)
    assert parent.data.tags["best.method.r"] == str(best.params["method.r"])
    report = tmp_path / "reports" / "lora_rank_alpha"
    line = (report / "best.txt").read_text().strip()
    assert line.startswith("python -m bench ") and f"method.r={best.params['method.r']}" in line
    assert f"train.lr={best.params['train.lr']!r}" in line
    assert {"best.txt", "summary.json", "trials.txt", "trials.csv", "importances.json", "objective.png"} <= \
        {p.name for p in report.iterdir()}
    assert (report / "objective.png").read_bytes()[:4] == b"\x89PNG"
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"best.txt", "objective.png",
                                                                         "trials.txt", "sweep.yaml"}

    # the same command again: nothing to do, the same parent run, no new trials
    assert main([str(LORA), "--trials", "3", *sweep_args, *SHORT]) == 0
    assert len(load(tmp_path, "lora_rank_alpha").trials) == 3
    _, parents, trials = mlflow_runs(tmp_path, "lora_rank_alpha")
    assert len(parents) == 1 and len(trials) == 3


@pytest.mark.slow  # a whole command or several runs: kept out of the fast subset
def test_killed_sweep_resumes_to_exactly_n_finished_trials(sweep_args, tmp_path):
    cmd = [sys.executable, "-m", "bench.sweep", str(LORA), "--trials", "4", *sweep_args]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "TQDM_DISABLE": "1"})
    journal, victim = tmp_path / "optuna.journal", None
    deadline = time.time() + 600
    while victim is None and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
        if not journal.exists():
            continue
        trials = load(tmp_path, "lora_rank_alpha").trials
        running = [t for t in trials if t.state == TrialState.RUNNING and "mlflow_run_id" in t.user_attrs]
        if any(t.state == TrialState.COMPLETE for t in trials) and running:
            victim = running[0]
    assert victim is not None, "the sweep ended before it could be killed mid-trial"
    os.kill(proc.pid, signal.SIGKILL)   # no cleanup of any kind: the trial stays RUNNING
    proc.wait()
    before = load(tmp_path, "lora_rank_alpha").trials
    done_before = {t.number: t.params for t in before if t.state == TrialState.COMPLETE}
    assert load(tmp_path, "lora_rank_alpha").trials[victim.number].state == TrialState.RUNNING

    assert main([str(LORA), "--trials", "4", *sweep_args]) == 0

    trials = load(tmp_path, "lora_rank_alpha").trials
    states = Counter(t.state for t in trials)
    assert states[TrialState.COMPLETE] + states[TrialState.PRUNED] == 4
    assert states[TrialState.RUNNING] == states[TrialState.WAITING] == 0
    killed = trials[victim.number]
    assert killed.state == TrialState.FAIL
    for n, params in done_before.items():   # kept as they were, not run again
        assert trials[n].state == TrialState.COMPLETE and trials[n].params == params
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == victim.number]   # RetryFailedTrialCallback
    assert len(retries) == 1 and retries[0].params == killed.params and retries[0].state in FINISHED
    from bench.report.sweeps import from_optuna
    notes = {t.number: t.note for t in from_optuna(load(tmp_path, "lora_rank_alpha"), spec.load(LORA)).trials}
    assert "worker stopped during the trial" in notes[victim.number]
    assert notes[retries[0].number].startswith(f"retry of {victim.number}")

    _, parents, runs = mlflow_runs(tmp_path, "lora_rank_alpha")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    by_id = {r.info.run_id: r for r in runs}
    killed_run = by_id[killed.user_attrs["mlflow_run_id"]]
    # closed by its own worker process (told of its parent's death) or, had that died too, KILLED by on_stale
    assert killed_run.info.status in ("FAILED", "KILLED"), killed_run.data.tags
    finished_runs = [r for r in runs if r.info.status == "FINISHED" or r.data.tags.get("pruned") == "true"]
    assert sorted(int(r.data.tags["trial"]) for r in finished_runs) == \
        sorted(t.number for t in trials if t.state in FINISHED)   # one MLflow run per finished trial
    assert len(runs) == len(trials)


def test_trial_that_raises_is_failed_with_its_reason_and_the_study_goes_on(sweep_args, tmp_path):
    space = {"method.dropout": [1.5, 0.0]}   # lora_dropout=1.5: torch refuses it when the method is built
    seed = grid_seed_putting_first(space, {"method.dropout": 1.5})
    path = write_sweep(tmp_path, "raises", trials=1, sampler={"type": "GridSampler", "seed": seed},
                       search_space={"method.dropout": {"type": "categorical", "choices": space["method.dropout"]}})
    assert main([str(path), *sweep_args, *SHORT]) == 0

    trials = load(tmp_path, "raises").trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert trials[0].params["method.dropout"] == 1.5 and "dropout" in trials[0].user_attrs["fail_reason"]
    _, parents, runs = mlflow_runs(tmp_path, "raises")
    failed = next(r for r in runs if r.data.tags["trial"] == "0")
    assert failed.info.status == "FAILED" and "dropout" in failed.data.tags["error"]
    assert parents[0].data.metrics["sweep/fail_trials"] == 1
    summary = json.loads((tmp_path / "reports" / "raises" / "summary.json").read_text())
    assert summary["best_trial"] == 1 and summary["states"]["FAIL"] == 1


def test_pruner_stops_a_clearly_worse_trial(sweep_args, tmp_path):
    # lr 1e-6 leaves the tiny model at chance; lr 0.02 with alpha 64 learns the toy data within 40 steps
    space = {"train.lr": [0.02, 1e-6]}
    seed = grid_seed_putting_first(space, {"train.lr": 0.02})
    path = write_sweep(tmp_path, "prunes", trials=2, overrides=["method=lora", "method.alpha=64"],
                       sampler={"type": "GridSampler", "seed": seed},
                       pruner={"type": "MedianPruner", "n_startup_trials": 1, "n_warmup_steps": 0},
                       search_space={"train.lr": {"type": "categorical", "choices": space["train.lr"]}})
    assert main([str(path), *sweep_args, "train.eval_every=20"]) == 0

    good, bad = load(tmp_path, "prunes").trials
    assert good.state == TrialState.COMPLETE and good.params["train.lr"] == 0.02
    assert bad.state == TrialState.PRUNED and bad.user_attrs["pruned_at_step"] < 60
    assert bad.user_attrs["train_steps"] == bad.user_attrs["pruned_at_step"]   # steps it actually ran
    assert bad.value < good.intermediate_values[bad.user_attrs["pruned_at_step"]]
    _, _, runs = mlflow_runs(tmp_path, "prunes")
    pruned_run = next(r for r in runs if r.info.run_id == bad.user_attrs["mlflow_run_id"])
    assert pruned_run.info.status == "KILLED"
    assert pruned_run.data.tags["pruned_at_step"] == str(bad.user_attrs["pruned_at_step"])


@pytest.mark.slow  # a whole command or several runs: kept out of the fast subset
def test_two_workers_share_one_study(sweep_args, tmp_path):
    assert main([str(LORA), "--trials", "4", "--workers", "2", *sweep_args, *SHORT]) == 0

    trials = load(tmp_path, "lora_rank_alpha").trials
    assert Counter(t.state for t in trials) == {TrialState.COMPLETE: 4}
    workers = {t.user_attrs["worker"] for t in trials}
    assert len(workers) == 2, "both workers ran trials"
    _, parents, runs = mlflow_runs(tmp_path, "lora_rank_alpha")
    assert len(parents) == 1 and len(runs) == 4
    assert sorted(int(r.data.tags["trial"]) for r in runs) == [0, 1, 2, 3]
    assert {r.data.tags["torch_threads"] for r in runs} == {str(max(1, len(os.sched_getaffinity(0)) // 2))}


@pytest.mark.parametrize("doc, args, message", [
    ({"search_space": {"method.r": {"type": "normal"}}}, [], "search_space.method.r: needs type"),
    ({"search_space": {"method.rr": {"type": "categorical", "choices": [2]}}}, [], "method.rr: not a key"),
    ({"search_space": {"method.r": {"type": "categorical", "choices": [2]}}, "pruner": {"type": "Median"}}, [],
     "pruner.type"),
    ({"search_space": {"method.r": {"type": "categorical", "choices": [2]}}}, ["method.r=4"],
     "method.r is set by the sweep"),
    ({"search_space": {"method.r": {"type": "categorical", "choices": [2]}}, "colour": 1}, [], "unknown key"),
    ({"search_space": {"method.r": {"type": "categorical", "choices": [2]}},
      "sampler": {"type": "TPESampler", "n_start": 3}}, [], "sampler: TPESampler(n_start=3, multivariate=True, constant_liar=True) rejected"),
])
def test_bad_sweep_input_is_one_line_and_exit_2(doc, args, message, sweep_args, tmp_path, capsys):
    path = write_sweep(tmp_path, "bad", **doc)
    assert main([str(path), *sweep_args, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "optuna.journal").exists() or not load_names(tmp_path)


def load_names(tmp_path):
    return [s.study_name for s in optuna.get_all_study_summaries(open_storage(str(tmp_path / "optuna.journal")))]


def test_resuming_with_different_overrides_is_refused(sweep_args, tmp_path, capsys):
    path = write_sweep(tmp_path, "same", trials=1,
                       search_space={"method.r": {"type": "categorical", "choices": [2]}})
    assert main([str(path), *sweep_args, *SHORT]) == 0
    assert main([str(path), *sweep_args, *SHORT, "train.max_steps=20"]) == 2
    err = capsys.readouterr().err
    assert "--study same" in err and "overrides" in err and "train.max_steps=20" in err
    assert len(load(tmp_path, "same").trials) == 1


@pytest.mark.parametrize("metric, message", [
    (M.TEST_ACCURACY, "objective.metric: test/accuracy is a test metric; sweeps select on validation"),
    (M.TEST_F1_MACRO, "test/f1_macro is a test metric"),
    ("eval/accuracy", "objective.metric: eval/accuracy was renamed: periodic evaluation now runs on the "
                      "validation split (val/accuracy)"),
])
def test_objective_on_test_data_or_the_old_eval_name_is_refused(metric, message, sweep_args, tmp_path, capsys):
    path = write_sweep(tmp_path, "peeks", objective={"metric": metric},
                       search_space={"method.r": {"type": "categorical", "choices": [2]}})
    assert main([str(path), *sweep_args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and "valid: val/accuracy, val/f1_macro" in err, err
    assert not (tmp_path / "optuna.journal").exists(), "no study"
    assert not (tmp_path / "mlflow.db").exists(), "no MLflow run"
    assert not (tmp_path / "reports").exists()


def test_objective_rules(tmp_path):
    def load_doc(tmp: Path, **doc) -> spec.Sweep:
        path = tmp / "s.yaml"
        path.write_text(yaml.safe_dump({"trials": 1, "search_space": {"method.r": {"type": "categorical",
                                                                                   "choices": [2]}}, **doc}))
        return spec.load(path)

    tmp = tmp_path
    assert load_doc(tmp).metric == M.VAL_ACCURACY == spec.DEFAULT_OBJECTIVE
    for metric in (*M.VAL_PERIODIC, M.VAL_BEST_ACCURACY, *M.COSTS):
        assert load_doc(tmp, objective={"metric": metric, "direction": "minimize"}).metric == metric
    assert not set(spec.OBJECTIVES) & set(M.TEST)
    with pytest.raises(BenchError, match="not a sweep objective"):
        load_doc(tmp, objective={"metric": M.TRAIN_LOSS})
    for metric in M.VAL_PERIODIC:   # the pruner sees what every periodic evaluation reports
        load_doc(tmp, objective={"metric": metric}, pruner={"type": "MedianPruner"})
    for metric in (M.VAL_BEST_ACCURACY, M.TIME_TRAIN):
        with pytest.raises(BenchError, match="pruner: needs an objective.metric the periodic evaluation reports"):
            load_doc(tmp, objective={"metric": metric}, pruner={"type": "MedianPruner"})


class FakeTracker:
    def __init__(self):
        self.metrics, self.tags, self.client = {}, {}, self

    def log_metrics(self, run_id, metrics, step=None):
        self.metrics.update(metrics)

    def set_tags(self, run_id, tags):
        self.tags.update(tags)

    def log_artifacts(self, run_id, path):
        pass


def test_best_trial_is_the_best_on_validation_not_on_test(tmp_path):
    """Trials whose test ordering disagrees with their validation ordering: the best trial, everything the report
    says about it and the parent run's figures follow validation; its test figure is shown beside it."""
    path = write_sweep(tmp_path, "protocol", search_space={"method.r": {"type": "categorical", "choices": [2, 4, 8]}})
    sweep = spec.load(path)
    spec.check_keys(sweep, compose(sweep.overrides))
    study = optuna.create_study(study_name="protocol", direction="maximize")
    dist = {"method.r": optuna.distributions.CategoricalDistribution([2, 4, 8])}
    for r, val, test in ((2, 0.80, 0.95), (4, 0.90, 0.80), (8, 0.85, 0.90)):   # best val: r=4; best test: r=2
        study.add_trial(optuna.trial.create_trial(
            params={"method.r": r}, distributions=dist, value=val,
            user_attrs={"train_steps": 30, "test_metrics": {M.TEST_ACCURACY: test, M.TEST_F1_MACRO: test - 0.1,
                                                            M.TEST_LOSS: 1 - test}}))
    study.add_trial(optuna.trial.create_trial(   # pruned at a high validation figure: never the best
        params={"method.r": 8}, distributions=dist, state=TrialState.PRUNED, intermediate_values={15: 0.99},
        user_attrs={"train_steps": 15, "pruned_at_step": 15}))

    out = tmp_path / "reports" / "protocol"
    info, table = sweep_outputs.write(study, sweep, [], out)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best_trial"] == 1 and summary["best_value"] == 0.90 and summary["objective"] == M.VAL_ACCURACY
    assert summary["best_test"] == {M.TEST_ACCURACY: 0.80, M.TEST_F1_MACRO: pytest.approx(0.70),
                                    M.TEST_LOSS: pytest.approx(0.20)}
    assert "method.r=4" in (out / "best.txt").read_text()
    trials_txt = (out / "trials.txt").read_text()
    assert M.TEST_ACCURACY in trials_txt and "0.9000 *" in trials_txt
    assert "selection uses the objective only" in trials_txt

    tracker = FakeTracker()
    sweep_outputs.log_to_parent(tracker, "parent", info, out)
    assert tracker.metrics[f"best/{M.VAL_ACCURACY}"] == 0.90
    assert tracker.metrics[f"best_trial/{M.TEST_ACCURACY}"] == 0.80
    assert not any(k.startswith("best/test") for k in tracker.metrics)
    assert tracker.tags["best_trial"] == 1

    console = Console(record=True, width=300, file=io.StringIO())
    sweep_outputs.print_report(console, info, table, out)
    assert ("best val/accuracy 0.9000 (trial 1); its test/accuracy 0.8000 (scored once, not used for selection)"
            in console.export_text())
    job = Job(sweep_file=str(path), cli_overrides=[], trials=4, storage="", study="protocol", parent_run_id="",
              out_root="")
    line = Console(record=True, width=300, file=io.StringIO())
    line.print(progress_line(study, sweep, job, 3, TrialState.PRUNED, "pruned", 1.0))
    assert "best val/accuracy 0.9000 (trial 1; its test/accuracy 0.8000)" in line.export_text()


def test_one_study_summary_for_the_sweep_and_the_report(tmp_path):
    """The sweep's outputs (from Optuna) and the report's Sweeps section (from the MLflow runs) read a study into the
    same summary (bench/report/sweeps.py): the same trial states, the same best trial (the lowest number on a tie,
    as Optuna's best_trial), the same objective plot."""
    from bench.report import plots, sweeps
    from bench.report.runs import RunRecord

    assert sweeps.STATES == tuple(s.name for s in TrialState)   # summary.json's "states" keep Optuna's order
    sweep = spec.load(write_sweep(tmp_path, "tie", search_space={
        "method.r": {"type": "categorical", "choices": [2, 4, 8]}}))
    study = optuna.create_study(study_name="tie", direction="maximize")
    dist = {"method.r": optuna.distributions.CategoricalDistribution([2, 4, 8])}
    runs = []
    for number, (r, val, state) in enumerate(((2, 0.7, TrialState.COMPLETE), (8, 0.9, TrialState.PRUNED),
                                              (4, 0.8, TrialState.COMPLETE), (8, 0.8, TrialState.COMPLETE))):
        study.add_trial(optuna.trial.create_trial(params={"method.r": r}, distributions=dist, value=val, state=state,
                                                  intermediate_values={15: val}))
        runs.append(RunRecord(f"run{number}", f"t{number}", "FINISHED" if state == TrialState.COMPLETE else "KILLED",
                              number, None, "e", {"study": "tie", "trial": str(number),
                                                  **({"pruned": "true"} if state == TrialState.PRUNED else {})},
                              {"method.r": str(r), "method.name": "lora"}, {M.VAL_ACCURACY: val}))
    from_optuna = sweeps.from_optuna(study, sweep)
    [from_mlflow] = sweeps.from_runs(runs)
    assert study.best_trial.number == from_optuna.best.number == from_mlflow.best.number == 2
    assert from_optuna.counts == from_mlflow.counts == {"RUNNING": 0, "COMPLETE": 3, "PRUNED": 1, "FAIL": 0,
                                                        "WAITING": 0}
    assert sweeps.plot_axes(from_mlflow) == ("method.r", None) and from_mlflow.searched == sweep.searched_keys
    pngs = [plots.objective_plot(s, "method.r", None, tmp_path / f"{name}.png")
            for name, s in (("optuna", from_optuna), ("mlflow", from_mlflow))]
    assert pngs[0].read_bytes() == pngs[1].read_bytes()   # the same trials draw the same plot, whichever the source


def test_tpe_settings_optuna_5_changed_are_named(tmp_path):
    """Optuna 5 made TPE multivariate with constant liar by default; a sweep names both, so a study samples the same
    under Optuna 4 and 5: shipped files say them, and a file that leaves them (or the sampler) out gets them."""
    for path in sorted((ROOT / "sweeps").glob("*.yaml")):
        sampler = yaml.safe_load(path.read_text())["sampler"]
        if sampler["type"] == "TPESampler":
            assert sampler["multivariate"] is True and sampler["constant_liar"] is True, path
    doc = {"trials": 1, "search_space": {"method.r": {"type": "categorical", "choices": [2]}}}
    for extra in ({}, {"sampler": {"type": "TPESampler", "seed": 3}},
                  {"sampler": {"type": "TPESampler", "constant_liar": False}}):
        path = tmp_path / "s.yaml"
        path.write_text(yaml.safe_dump({**doc, **extra}))
        sampler = spec.load(path).make_sampler()
        assert isinstance(sampler, optuna.samplers.TPESampler)
        assert sampler._multivariate is True   # Optuna has no public getter for these
        assert sampler._constant_liar is (extra.get("sampler", {}).get("constant_liar", True))


def test_the_trial_id_the_pruning_hook_passes_opens_the_same_trial(tmp_path):
    """bench/sweep/study.py hands Optuna's private trial id to the run's worker process, which opens the same running
    trial with optuna.trial.Trial(study, id) to report to the pruner (bench/private_apis.py, docstring)."""
    from bench.private_apis import TESTED
    storage = open_storage(str(tmp_path / "ids.journal"))
    study = optuna.create_study(study_name="ids", storage=storage)
    trial = study.ask()
    assert isinstance(getattr(trial, "_trial_id", None), int), (
        f"optuna {optuna.__version__}: Trial has no _trial_id, which bench/sweep/study.py passes to the pruning "
        f"hook; install the tested range: pip install '{TESTED['optuna']}'")
    again = optuna.trial.Trial(optuna.load_study(study_name="ids", storage=open_storage(str(tmp_path / "ids.journal"))),
                               trial._trial_id)
    again.report(0.5, 1)
    assert again.number == trial.number and study.trials[0].intermediate_values == {1: 0.5}
