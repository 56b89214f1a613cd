"""`python -m bench.compare method=full,lora,adapter [overrides] --trials N --seeds S`: every method tuned on an
equal budget, its winner re-run over seeds next to its defaults (README: Tuned comparison).

1. Tuning: for each method one Optuna study over the method's own search space (the `search:` block of its YAML,
   bench/sweep/search.py), with the same number of finished trials, the same training budget per trial (the
   command's overrides), the same sampler, pruner and importance evaluator (named: SAMPLER, PRUNER, IMPORTANCE),
   selecting on validation. Each study is an ordinary `python -m bench.sweep` study of a sweep file this command
   writes to <reports>/<name>/sweeps/<method>.yaml (study `<name>-<method>`, outputs in <reports>/<name>-<method>/);
   its parent MLflow run is tagged compare=<name>, compare_role=study.
2. Re-runs: the best configuration of each method (several objectives: every trial of its Pareto front) is run
   again over S seeds with `python -m bench ... -m`, the normal run path, each run tested once on the test split;
   the method at its defaults over the same seeds. The trials train with the run's `seed` (default 0); the re-runs
   use the S seeds after it (1, 2, 3), so no re-run repeats the training a trial was selected on. Tags (MLflow, via
   `tracking.tags`, also part of the run key, so a campaign resumes its own runs only): compare=<name>,
   compare_role=tuned | default | front (front runs add compare_trial=<trial>).
3. The report: `python -m bench.report` over the experiment, written to <reports>/<name>.md, whose "Tuned
   comparison" section (bench/report/compare.py) reads the tags above.

Running the same command again resumes: finished trials are kept, and FINISHED re-runs are skipped by run key.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import yaml
from rich.markup import escape

from bench.errors import BenchError
from bench.fmt import override_value
from bench.sweep import search
from bench.sweep import spec as sweep_spec
from bench.sweep.cli import override_key
from bench.sweep.study import compose, console

TAG, ROLE, TRIAL_TAG = "compare", "compare_role", "compare_trial"   # bench/report/compare.py reads them
STUDY, TUNED, DEFAULT, FRONT = "study", "tuned", "default", "front"


def startup_trials(trials: int) -> int:
    """Random trials before TPE models the space, and trials before the pruner judges: the same for every method."""
    return max(1, min(5, trials // 3))


def sampler(trials: int) -> dict:
    # named in full: Optuna 5 made multivariate TPE with constant liar the default, Optuna 4 had neither
    return {"type": "TPESampler", "seed": 0, "n_startup_trials": startup_trials(trials), "multivariate": True,
            "constant_liar": True}


def pruner(trials: int, objectives: list) -> dict | None:
    """The median rule on the objective at every periodic evaluation; none with several objectives (Optuna's
    pruners do not support multi-objective studies)."""
    if len(objectives) > 1:
        return None
    return {"type": "MedianPruner", "n_startup_trials": startup_trials(trials), "n_warmup_steps": 0}


IMPORTANCE = dict(sweep_spec.DEFAULT_IMPORTANCE)   # fANOVA, seed 0: named (Optuna 5's default is PED-ANOVA)


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m bench.compare",
        description="Tune every method on the same budget (one Optuna study each, over its YAML's search: block), "
                    "re-run each winner over seeds next to its defaults, and write the report.")
    p.add_argument("overrides", nargs="*", help="method=a,b,c (required) and Hydra overrides for every run, "
                                                "e.g. task=trec train.max_steps=200")
    p.add_argument("--trials", type=int, required=True, help="finished (COMPLETE + PRUNED) trials per method")
    p.add_argument("--seeds", type=int, default=3, help="seeds of each re-run (default 3)")
    p.add_argument("--objective", action="append", metavar="METRIC[:maximize|minimize]",
                   help="what the studies select on (default val/accuracy); repeat for several objectives: a "
                        "Pareto front per method, no pruning, every front point re-run over the seeds")
    p.add_argument("--name", help="campaign name: studies <name>-<method>, tag compare=<name> (default: "
                                  "<task>-<model>)")
    p.add_argument("--workers", type=int, default=1, help="trials and re-runs at a time (default 1)")
    p.add_argument("--storage", help="Optuna storage (default: optuna.journal beside the MLflow sqlite store)")
    p.add_argument("--reports", default="reports", help="the report goes to REPORTS/<name>.md, each study's outputs "
                                                        "to REPORTS/<name>-<method>/ (default reports)")
    p.add_argument("--out-dir", default="outputs/compare", help="trial and run folders (default outputs/compare)")
    return p.parse_intermixed_args(argv)


def objectives(given: list[str] | None) -> list[dict]:
    found = []
    for text in given or [sweep_spec.DEFAULT_OBJECTIVE]:
        metric, _, direction = text.partition(":")
        sweep_spec.check_objective("--objective", metric)
        found.append({"metric": metric, "direction": direction or sweep_spec.DEFAULT_DIRECTION[metric]})
        if found[-1]["direction"] not in sweep_spec.DIRECTIONS:
            raise BenchError(f"--objective {text}: direction {direction!r}; valid: {', '.join(sweep_spec.DIRECTIONS)}")
    return found


def split_methods(overrides: list[str]) -> tuple[list[str], list[str]]:
    """The methods of `method=a,b,c` and the other overrides (one value each: every run shares them)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except HydraException as e:
        raise BenchError(f"overrides: {' '.join(str(e).split())}") from None
    methods, rest = [], []
    for text, o in zip(overrides, parsed):
        if o.get_key_element() == "method":
            methods += ([str(v) for v in o.sweep_string_iterator()] if o.is_sweep_override()
                        else [o.get_value_element_as_str()])
        elif o.is_sweep_override():
            raise BenchError(f"override {text}: compare runs every method with one value of {o.get_key_element()}; "
                             "only method= lists several (run one compare per value, with --name)")
        else:
            rest.append(text)
    if not methods:
        raise BenchError("method: name the methods to compare, e.g. method=full,lora,adapter,prefix,prompt,ia3")
    from bench import CONF_DIR
    known = sorted(p.stem for p in (CONF_DIR / "method").glob("*.yaml"))
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise BenchError(f"method: unknown choice {unknown[0]!r}; valid: {', '.join(known)}")
    twice = sorted({m for m in methods if methods.count(m) > 1})
    if twice:
        raise BenchError(f"method: {', '.join(twice)} listed twice")
    return methods, rest


def sweep_doc(name: str, method: str, space: search.Search, trials: int, objs: list[dict]) -> dict:
    """The sweep file of one method's study: everything but the method and its search space is the same for all."""
    doc = {"study": f"{name}-{method}", "overrides": [f"method={method}"], "trials": trials,
           "search_space": space.space, "derived": space.derived, "sampler": sampler(trials),
           "pruner": pruner(trials, objs), "importance": IMPORTANCE}
    doc.update({"objectives": objs} if len(objs) > 1 else {"objective": objs[0]})
    return doc


def check(a) -> tuple[list[str], list[str], dict[str, search.Search], object, list[dict]]:
    """Everything checked before any study or run exists: one line naming the key, file or flag."""
    from bench.orchestration.validate import validate

    for flag, value in (("--trials", a.trials), ("--seeds", a.seeds), ("--workers", a.workers)):
        if value < 1:
            raise BenchError(f"{flag}: must be >= 1, got {value}")
    objs = objectives(a.objective)
    methods, rest = split_methods(a.overrides)
    spaces, base = {}, None
    for m in methods:
        cfg = compose([f"method={m}", *rest])
        spaces[m] = search.check(m, cfg)
        for o in rest:
            if override_key(o) in spaces[m].keys:
                raise BenchError(f"override {o}: {override_key(o)} is tuned for method={m} (its search: block in "
                                 f"{search.method_file(m)}); remove it from the command line")
        validate(cfg)
        base = base or cfg
    if not isinstance(base.seed, int):
        raise BenchError(f"seed: must be one integer (the trials' seed), got {base.seed!r}")
    return methods, rest, spaces, base, objs


def best_points(study_name: str, storage: str, sweep_file: Path, rest: list[str]) -> list:
    """The trials to re-run: the best (one objective) or the Pareto front (several)."""
    from bench.report.sweeps import from_optuna
    from bench.sweep.storage import load_study

    sweep = sweep_spec.load(sweep_file)
    sweep_spec.check_keys(sweep, compose(sweep.overrides + rest))   # which searched names are config keys
    return from_optuna(load_study(study_name, storage), sweep).front


def bench_command(overrides: list[str], seeds: list[int], tags: dict[str, str], run_dir: Path,
                  workers: int) -> list[str]:
    """A `python -m bench` multirun over the seeds with these tags (the normal run path)."""
    parallel = ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={workers}"] if workers > 1 else []
    return [sys.executable, "-m", "bench", *overrides, f"seed={','.join(map(str, seeds))}",
            *(f"+tracking.tags.{k}={v}" for k, v in tags.items()), f"hydra.sweep.dir={run_dir}", *parallel, "-m"]


def shown(command: list[str]) -> str:
    import shlex
    return " ".join(["python", *map(shlex.quote, command[1:])])


def _run(command: list[str]) -> int:
    console.print(escape(f"$ {shown(command)}"), soft_wrap=True)
    sys.stdout.flush()
    return subprocess.run(command).returncode


def _tag_parent(tracker, study_name: str, name: str, method: str) -> None:
    found = tracker.client.search_runs([tracker.experiment_id], filter_string=f"tags.study = '{study_name}' AND "
                                                                               "tags.sweep_role = 'parent'")
    for run in found:
        tracker.set_tags(run.info.run_id, {TAG: name, ROLE: STUDY, "compare_method": method})


def main(argv=None) -> int:
    from bench.sweep import cli as sweep_cli
    from bench.sweep.storage import default_storage
    from bench.tracking import Tracker

    a = parse_args(argv)
    try:
        methods, rest, spaces, base, objs = check(a)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    name = a.name or f"{base.task.name}-{base.model.name}"
    report = Path(a.reports) / f"{name}.md"
    if report.is_file() and f"### Campaign `{name}`" not in report.read_text(errors="replace"):
        print(f"error: --name {name}: {report} is another report (no tuned comparison of campaign {name}), which "
              "this campaign's report would overwrite; valid: another --name or --reports", file=sys.stderr)
        return 2
    storage = a.storage or default_storage(base.tracking.uri)
    seeds = [base.seed + i for i in range(1, a.seeds + 1)]
    folder = Path(a.reports) / name
    (folder / "sweeps").mkdir(parents=True, exist_ok=True)
    out = Path(a.out_dir) / name
    tracker = Tracker(base.tracking.uri, base.tracking.experiment)
    console.print(escape(f"compare {name}: {', '.join(methods)}; {a.trials} trials each "
                         f"({', '.join(o['metric'] + ' ' + o['direction'] for o in objs)}), then seeds "
                         f"{', '.join(map(str, seeds))}; MLflow {base.tracking.uri} (experiment "
                         f"{base.tracking.experiment!r}), Optuna {storage}"))

    commands, failed = [], []
    try:
        for m in methods:   # 1. one study per method, the same trials and budget
            study_name = f"{name}-{m}"
            sweep_file = folder / "sweeps" / f"{m}.yaml"
            sweep_file.write_text(f"# written by python -m bench.compare (campaign {name}); the study {study_name}\n"
                                  + yaml.safe_dump(sweep_doc(name, m, spaces[m], a.trials, objs), sort_keys=False))
            console.rule(escape(f"tuning {m}: study {study_name}"))
            args = [str(sweep_file), *rest, "--trials", str(a.trials), "--workers", str(a.workers), "--storage",
                    storage, "--reports", a.reports, "--out-dir", str(out / "trials")]
            code = sweep_cli.main(args)
            if code == 130:
                raise KeyboardInterrupt
            if code:
                failed.append(f"study {study_name} (exit code {code})")
            _tag_parent(tracker, study_name, name, m)
            points = best_points(study_name, storage, sweep_file, rest)
            if not points:
                failed.append(f"{m}: no COMPLETE trial to re-run")
            for t in points:   # 2. the winner (or the front) over the seeds
                role = FRONT if len(objs) > 1 else TUNED
                tags = {TAG: name, ROLE: role, **({TRIAL_TAG: str(t.number)} if role == FRONT else {})}
                values = [f"{k}={override_value(v)}" for k, v in t.settings.items()]
                run_dir = out / (f"{role}-{m}" + (f"-t{t.number}" if role == FRONT else ""))
                commands.append(bench_command([f"method={m}", *rest, *values], seeds, tags, run_dir, a.workers))
        commands.append(bench_command([f"method={','.join(methods)}", *rest], seeds, {TAG: name, ROLE: DEFAULT},
                                      out / DEFAULT, a.workers))
        (folder / "commands.txt").write_text("\n".join(shown(c) for c in commands) + "\n")
        console.rule("re-runs over seeds: the winners, then the defaults")
        for command in commands:
            code = _run(command)
            if code in (130, 143):
                raise KeyboardInterrupt
            if code:
                failed.append(f"{shown(command)} (exit code {code})")
    except KeyboardInterrupt:
        console.print("stopped: run the same command again to resume (finished trials and runs are kept)")
        return 130
    return _report(a, base, name, failed)


def _report(a, base, name: str, failed: list[str]) -> int:
    """3. The report over the campaign's experiment."""
    from bench.report import build_report

    path, _ = build_report(str(base.tracking.uri), [str(base.tracking.experiment)], Path(a.reports) / f"{name}.md")
    console.print(escape(f"report: {path} (section \"Tuned comparison\"); commands: {Path(a.reports) / name}/"
                         "commands.txt"))
    for line in failed:
        console.print(escape(f"[failed] {line}"))
    return 1 if failed else 0
