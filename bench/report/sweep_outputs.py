"""What a sweep leaves behind, in reports/<study>/ and on the study's parent MLflow run: the best configuration
as a `python -m bench` line, the trials table (text and csv), parameter importances and the objective plot.
The study is read once (bench/report/sweeps.py: `from_optuna`); its summary and best trial, and the objective
plot (bench/report/plots.py), are the ones the Markdown report uses too.

Selection and the test figure (bench/core/metrics.py: the protocol). The best trial is the best COMPLETE trial on the
objective (a val/* metric or a cost). Beside it every output shows that trial's test figures: the one test
evaluation of the chosen configuration, reported, never used for selection:
- the progress line: `best val/accuracy 0.9120 (trial 7; its test/accuracy 0.9040)`;
- the trials table: a `test/accuracy` column (each COMPLETE trial's own test evaluation); the `*` marks the best
  on the objective, and the caption says that selection uses the objective only;
- summary.json: `best_value` (the objective), `best_test` (the best trial's test/* metrics, from its Optuna user
  attribute `test_metrics`; {} when its run reported none);
- the parent MLflow run: `best/<objective>` (e.g. `best/val/accuracy`) and `best_trial/<test metric>` (e.g.
  `best_trial/test/accuracy`: named after the trial, not `best/test/...`, since it is not a best over trials);
- the printed line: `best val/accuracy 0.9120 (trial 7); its test/accuracy 0.9040 (scored once, not used for
  selection)`.
best.txt stays the command line of the best configuration.

Several objectives (multi-objective): no best trial, the Pareto front instead. best.txt holds one command per
front trial (a `#` line before each names its trial and values), summary.json `pareto_front`, the trials table
marks front trials with `*`, importances.json has one mapping per objective, pareto.png draws the front
(bench/report/plots.py: pareto_plot), and the parent run gets `sweep/front_size` and the tag `front_trials`.
Optuna's pruners do not prune multi-objective studies: the sweep file refuses a pruner there."""
from __future__ import annotations

import io
import json
import math
import shlex
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from bench.core import metrics as M
from bench.fmt import override_value, short
from bench.report.sweeps import Study, Trial, from_optuna

BEST_TEST_PREFIX = "best_trial/"   # parent run: best_trial/test/accuracy, ... (the best trial's test figures)
FILES = ("best.txt", "summary.json", "trials.txt", "trials.csv", "importances.json", "objective.png")
MULTI_FILES = (*FILES, "pareto.png")   # several objectives

STATE_COLOURS = {"COMPLETE": "green", "PRUNED": "yellow", "FAIL": "red", "RUNNING": "cyan", "WAITING": "dim"}


def best_command(best: Trial | None, sweep, cli_overrides: list[str]) -> str | None:
    """The `python -m bench` line of a trial's configuration (the best, or a front trial)."""
    if best is None:
        return None
    values = [f"{k}={override_value(v)}" for k, v in best.settings.items()]
    merged: dict[str, str] = {}   # one override per key, the last one wins (as in Hydra), in first-seen order
    for o in sweep.overrides + list(cli_overrides) + values:
        merged[o.split("=", 1)[0]] = o
    return " ".join(["python -m bench", *map(shlex.quote, merged.values())])


def _value_cells(study: Study, t: Trial) -> list[str]:
    if not study.multi:
        value = "-" if t.value is None else f"{t.value:.4f}"
        return [f"[bold]{value} *[/bold]" if study.best is not None and t.number == study.best.number else value]
    on_front = t.number in {f.number for f in study.front}
    cells = ["-" if v is None else short(float(v)) for v in (t.values or (None,) * len(study.objectives))]
    return [f"[bold]{c} *[/bold]" if on_front else c for c in cells]


def trials_table(study: Study, keys: list[str]) -> Table:
    if study.multi:
        names = [m for m, _ in study.objectives]
        title = f"study {study.name}: Pareto front on " + ", ".join(f"{m} ({d})" for m, d in study.objectives)
        caption = (f"* on the Pareto front of the complete trials; {M.TEST_ACCURACY} is each complete trial's one "
                   "test evaluation, shown, never used for selection")
    else:
        names = [study.objective]
        title = f"study {study.name}: selection on {study.objective} ({study.direction})"
        caption = (f"* best on {study.objective}: selection uses the objective only; {M.TEST_ACCURACY} is each "
                   "complete trial's one test evaluation, shown, never used for selection")
    table = Table(title=title, caption=caption)
    for col in ("#", "state", *names, M.TEST_ACCURACY, *keys, "steps", "time", "note"):
        table.add_column(col, justify="left" if col in ("state", "note") else "right")
    for t in study.trials:
        colour = STATE_COLOURS.get(t.state, "white")
        table.add_row(str(t.number), f"[{colour}]{t.state}[/{colour}]", *_value_cells(study, t), t.test_text(),
                      *(escape(short(t.settings[k])) if k in t.settings else "-" for k in keys),
                      "-" if t.steps is None else str(t.steps),
                      f"{t.seconds:.1f} s" if t.seconds else "-", escape(t.note[:90]))
    return table


def importances(study, sweep) -> dict | str:
    """Parameter importances of an optuna.Study (optuna.importance) with the sweep file's evaluator (named, never
    Optuna's default, which 5.0 changed from fANOVA to PED-ANOVA): {param: importance}, with several objectives
    {objective: {param: importance}}; a reason when not computable."""
    import optuna

    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    if len(complete) < 2:
        return "needs at least 2 COMPLETE trials"

    def one(target=None) -> dict[str, float]:
        found = optuna.importance.get_param_importances(study, evaluator=sweep.make_importance(), target=target)
        return {k: float(v) for k, v in found.items()}
    try:
        if not sweep.multi:
            return one()
        return {m: one(lambda t, i=i: t.values[i]) for i, m in enumerate(sweep.metrics)}
    except (ValueError, RuntimeError, ZeroDivisionError) as e:
        return f"not computable: {e}"


def importance_name(sweep) -> str:
    kwargs = {k: v for k, v in sweep.importance.items() if k != "type"}
    return f"{sweep.importance['type']}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})"


def _front_lines(record: Study, sweep, cli_overrides: list[str]) -> str:
    lines = []
    for t in record.front:
        values = ", ".join(f"{m}={short(float(v))}" for m, v in zip(sweep.metrics, t.values))
        lines += [f"# trial {t.number}: {values}", best_command(t, sweep, cli_overrides)]
    return "\n".join(lines) if lines else "no COMPLETE trial"


def write(study, sweep, cli_overrides: list[str], out_dir: Path) -> tuple[dict, Table]:
    """reports/<study>/ for an optuna.Study of `sweep`: the FILES."""
    from bench.report.plots import objective_plot, pareto_plot

    out_dir.mkdir(parents=True, exist_ok=True)
    record = from_optuna(study, sweep)
    info = {**record.summary(), "best_command": best_command(record.best, sweep, cli_overrides),
            "importances": importances(study, sweep), "importance_evaluator": importance_name(sweep)}
    if sweep.multi:
        for point in info["pareto_front"]:
            point["command"] = best_command(next(t for t in record.front if t.number == point["trial"]), sweep,
                                            cli_overrides)
    table = trials_table(record, sweep.searched_keys)
    best_text = _front_lines(record, sweep, cli_overrides) if sweep.multi else info["best_command"]
    (out_dir / "best.txt").write_text((best_text or "no COMPLETE trial") + "\n")
    (out_dir / "summary.json").write_text(json.dumps(info, indent=2, default=str) + "\n")
    (out_dir / "importances.json").write_text(json.dumps(info["importances"], indent=2) + "\n")
    text = Console(record=True, width=200, file=io.StringIO())
    text.print(table)
    (out_dir / "trials.txt").write_text(text.export_text())
    study.trials_dataframe().to_csv(out_dir / "trials.csv", index=False)
    if objective_plot(record, sweep.plot.get("x"), sweep.plot.get("y"), out_dir / "objective.png") is None:
        (out_dir / "objective.png").unlink(missing_ok=True)
    if not sweep.multi or pareto_plot(record, out_dir / "pareto.png") is None:
        (out_dir / "pareto.png").unlink(missing_ok=True)
    return info, table


def log_to_parent(tracker, parent_run_id: str, info: dict, out_dir: Path) -> None:
    """Best value and parameters on the parent run (metrics + tags: params are write-once in MLflow and a
    resumed study may find a new best), and the report files as its artifacts."""
    metrics = {"sweep/finished_trials": info["finished_trials"], "sweep/train_steps": info["train_steps"],
               "sweep/trial_seconds": info["trial_seconds"],
               **{f"sweep/{k.lower()}_trials": v for k, v in info["states"].items() if k != "WAITING"}}
    if "pareto_front" in info:
        metrics["sweep/front_size"] = len(info["pareto_front"])
        tracker.set_tags(parent_run_id, {"front_trials": ",".join(str(p["trial"]) for p in info["pareto_front"])})
    if info["best_value"] is not None and math.isfinite(info["best_value"]):
        metrics[f"best/{info['objective']}"] = info["best_value"]
    metrics.update({f"{BEST_TEST_PREFIX}{k}": v for k, v in (info.get("best_test") or {}).items()
                    if isinstance(v, (int, float)) and math.isfinite(v)})
    tracker.log_metrics(parent_run_id, metrics, step=info["finished_trials"])
    if info["best_trial"] is not None:
        tags = {"best_trial": info["best_trial"], "best_run_id": info["best_run_id"] or "",
                "best_command": info["best_command"],
                **{f"best.{k}": override_value(v) for k, v in info["best_overrides"].items()},
                **{f"best_param.{k}": override_value(v) for k, v in info["best_params"].items()}}
        tracker.set_tags(parent_run_id, tags)
    tracker.client.log_artifacts(parent_run_id, str(out_dir))


def print_report(console: Console, info: dict, table: Table, out_dir: Path) -> None:
    console.print(table)
    imp, evaluator = info["importances"], info["importance_evaluator"]
    if isinstance(imp, dict) and "pareto_front" in info:
        for metric, found in imp.items():
            console.print(escape(f"parameter importances for {metric} ({evaluator}): "
                                 + ", ".join(f"{k} {v:.2f}" for k, v in found.items())))
    elif isinstance(imp, dict):
        console.print(escape(f"parameter importances ({evaluator}): " + ", ".join(f"{k} {v:.2f}"
                                                                                 for k, v in imp.items())))
    else:
        console.print(escape(f"parameter importances: {imp}"))
    s = info["states"]
    console.print(f"{info['finished_trials']} finished ({s['COMPLETE']} complete, {s['PRUNED']} pruned), "
                  f"{s['FAIL']} failed; {info['train_steps']} training steps in all")
    for point in info.get("pareto_front", []):
        values = ", ".join(f"{m} {short(float(v))}" for m, v in point["values"].items())
        test = point["test"].get(M.TEST_ACCURACY)
        console.print(escape(f"Pareto front: trial {point['trial']}: {values}; its {M.TEST_ACCURACY} "
                             + ("-" if test is None else f"{test:.4f}") + " (scored once, not used for selection)"))
        console.print(escape(f"  {point['command']}"), soft_wrap=True)
    if "pareto_front" in info:
        console.print("the front's points are single runs: re-run them over seeds before ranking them (python -m "
                      "bench.compare --objective ... does)")
    if info["best_command"]:
        test = (info.get("best_test") or {}).get(M.TEST_ACCURACY)
        console.print(escape(f"best {info['objective']} {info['best_value']:.4f} (trial {info['best_trial']}); its "
                             f"{M.TEST_ACCURACY} " + ("-" if test is None else f"{test:.4f}")
                             + " (scored once, not used for selection)"))
        console.print("run it again with:")
        console.print(escape(info["best_command"]), soft_wrap=True)
    console.print(escape(f"report: {out_dir}/ ({', '.join(MULTI_FILES if 'pareto_front' in info else FILES)})"))
