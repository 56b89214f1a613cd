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
best.txt stays the command line of the best configuration."""
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

STATE_COLOURS = {"COMPLETE": "green", "PRUNED": "yellow", "FAIL": "red", "RUNNING": "cyan", "WAITING": "dim"}


def best_command(best: Trial | None, sweep, cli_overrides: list[str]) -> str | None:
    if best is None:
        return None
    values = [f"{k}={override_value(v)}" for k, v in best.settings.items()]
    merged: dict[str, str] = {}   # one override per key, the last one wins (as in Hydra), in first-seen order
    for o in sweep.overrides + list(cli_overrides) + values:
        merged[o.split("=", 1)[0]] = o
    return " ".join(["python -m bench", *map(shlex.quote, merged.values())])


def trials_table(study: Study, keys: list[str]) -> Table:
    table = Table(title=f"study {study.name}: selection on {study.objective} ({study.direction})",
                  caption=f"* best on {study.objective}: selection uses the objective only; {M.TEST_ACCURACY} is "
                          "each complete trial's one test evaluation, shown, never used for selection")
    for col in ("#", "state", study.objective, M.TEST_ACCURACY, *keys, "steps", "time", "note"):
        table.add_column(col, justify="left" if col in ("state", "note") else "right")
    for t in study.trials:
        value = "-" if t.value is None else f"{t.value:.4f}"
        if study.best is not None and t.number == study.best.number:
            value = f"[bold]{value} *[/bold]"
        colour = STATE_COLOURS.get(t.state, "white")
        table.add_row(str(t.number), f"[{colour}]{t.state}[/{colour}]", value, t.test_text(),
                      *(escape(short(t.settings[k])) if k in t.settings else "-" for k in keys),
                      "-" if t.steps is None else str(t.steps),
                      f"{t.seconds:.1f} s" if t.seconds else "-", escape(t.note[:90]))
    return table


def importances(study) -> dict[str, float] | str:
    """fANOVA importances of the searched parameters of an optuna.Study (optuna.importance); a reason when not
    computable."""
    import optuna

    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    if len(complete) < 2:
        return "needs at least 2 COMPLETE trials"
    try:
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
        return {k: float(v) for k, v in optuna.importance.get_param_importances(study, evaluator=evaluator).items()}
    except (ValueError, RuntimeError) as e:
        return f"not computable: {e}"


def write(study, sweep, cli_overrides: list[str], out_dir: Path) -> tuple[dict, Table]:
    """reports/<study>/ for an optuna.Study of `sweep`: the FILES."""
    from bench.report.plots import objective_plot

    out_dir.mkdir(parents=True, exist_ok=True)
    record = from_optuna(study, sweep)
    info = {**record.summary(), "best_command": best_command(record.best, sweep, cli_overrides),
            "importances": importances(study)}
    table = trials_table(record, sweep.searched_keys)
    (out_dir / "best.txt").write_text((info["best_command"] or "no COMPLETE trial") + "\n")
    (out_dir / "summary.json").write_text(json.dumps(info, indent=2, default=str) + "\n")
    (out_dir / "importances.json").write_text(json.dumps(info["importances"], indent=2) + "\n")
    text = Console(record=True, width=200, file=io.StringIO())
    text.print(table)
    (out_dir / "trials.txt").write_text(text.export_text())
    study.trials_dataframe().to_csv(out_dir / "trials.csv", index=False)
    if objective_plot(record, sweep.plot.get("x"), sweep.plot.get("y"), out_dir / "objective.png") is None:
        (out_dir / "objective.png").unlink(missing_ok=True)
    return info, table


def log_to_parent(tracker, parent_run_id: str, info: dict, out_dir: Path) -> None:
    """Best value and parameters on the parent run (metrics + tags: params are write-once in MLflow and a
    resumed study may find a new best), and the report files as its artifacts."""
    metrics = {"sweep/finished_trials": info["finished_trials"], "sweep/train_steps": info["train_steps"],
               "sweep/trial_seconds": info["trial_seconds"],
               **{f"sweep/{k.lower()}_trials": v for k, v in info["states"].items() if k != "WAITING"}}
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
    imp = info["importances"]
    if isinstance(imp, dict):
        console.print("parameter importances (fANOVA): " + ", ".join(f"{k} {v:.2f}" for k, v in imp.items()))
    else:
        console.print(escape(f"parameter importances: {imp}"))
    s = info["states"]
    console.print(f"{info['finished_trials']} finished ({s['COMPLETE']} complete, {s['PRUNED']} pruned), "
                  f"{s['FAIL']} failed; {info['train_steps']} training steps in all")
    if info["best_command"]:
        test = (info.get("best_test") or {}).get(M.TEST_ACCURACY)
        console.print(escape(f"best {info['objective']} {info['best_value']:.4f} (trial {info['best_trial']}); its "
                             f"{M.TEST_ACCURACY} " + ("-" if test is None else f"{test:.4f}")
                             + " (scored once, not used for selection)"))
        console.print("run it again with:")
        console.print(escape(info["best_command"]), soft_wrap=True)
    console.print(escape(f"report: {out_dir}/ ({', '.join(FILES)})"))
