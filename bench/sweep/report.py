"""What a sweep leaves behind, in reports/<study>/ and on the study's parent MLflow run: the best configuration
as a `python -m bench` line, the trials table (text and csv), parameter importances and the objective plot.

Selection and the test figure (bench/core/metrics.py: the protocol). The best trial is the best COMPLETE trial on the
objective (a val/* metric or a cost: optuna's best_trial). Beside it every output shows that trial's test
figures: the one test evaluation of the chosen configuration, reported, never used for selection:
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

import optuna
from optuna.trial import TrialState
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from bench.core import metrics as M
from bench.sweep.study import FINISHED, fmt_test, fmt_value, short, trial_test_metrics

BEST_TEST_PREFIX = "best_trial/"   # parent run: best_trial/test/accuracy, ... (the best trial's test figures)

STATE_COLOURS = {"COMPLETE": "green", "PRUNED": "yellow", "FAIL": "red", "RUNNING": "cyan", "WAITING": "dim"}


def trial_steps(t) -> int:
    """Training steps a trial executed: all of them (COMPLETE), up to the prune (PRUNED), up to its last
    evaluation (FAIL; a lower bound)."""
    return int(t.user_attrs.get("train_steps", 0))


def best_trial(study: optuna.Study):
    try:
        return study.best_trial
    except ValueError:   # no COMPLETE trial
        return None


def best_command(study: optuna.Study, sweep, cli_overrides: list[str]) -> str | None:
    best = best_trial(study)
    if best is None:
        return None
    values = [f"{k}={fmt_value(v)}" for k, v in sweep.run_overrides(best.params).items()]
    merged: dict[str, str] = {}   # one override per key, the last one wins (as in Hydra), in first-seen order
    for o in sweep.overrides + list(cli_overrides) + values:
        merged[o.split("=", 1)[0]] = o
    return " ".join(["python -m bench", *map(shlex.quote, merged.values())])


def trials_table(study: optuna.Study, sweep) -> Table:
    keys = sweep.searched_keys
    table = Table(title=f"study {study.study_name}: selection on {sweep.metric} ({sweep.direction})",
                  caption=f"* best on {sweep.metric}: selection uses the objective only; {M.TEST_ACCURACY} is each "
                          "complete trial's one test evaluation, shown, never used for selection")
    for col in ("#", "state", sweep.metric, M.TEST_ACCURACY, *keys, "steps", "time", "note"):
        table.add_column(col, justify="left" if col in ("state", "note") else "right")
    best = best_trial(study)
    for t in study.get_trials(deepcopy=False):
        values = sweep.run_overrides(t.params) if set(t.params) == set(sweep.space) else {}
        value = "-" if t.value is None else f"{t.value:.4f}"
        if best is not None and t.number == best.number:
            value = f"[bold]{value} *[/bold]"
        note = ""
        if t.state == TrialState.PRUNED:
            note = f"pruned at step {t.user_attrs.get('pruned_at_step', '?')}"
        elif t.state == TrialState.FAIL:
            note = t.user_attrs.get("fail_reason", "")
        if "retry_of" in t.user_attrs:
            note = f"retry of {t.user_attrs['retry_of']}" + (f"; {note}" if note else "")
        colour = STATE_COLOURS.get(t.state.name, "white")
        table.add_row(str(t.number), f"[{colour}]{t.state.name}[/{colour}]", value, fmt_test(t),
                      *(escape(short(values[k])) if k in values else "-" for k in keys),
                      str(t.user_attrs["train_steps"]) if "train_steps" in t.user_attrs else "-",
                      f"{t.duration.total_seconds():.1f} s" if t.duration else "-", escape(note[:90]))
    return table


def importances(study: optuna.Study) -> dict[str, float] | str:
    """fANOVA importances of the searched parameters (optuna.importance); a reason when not computable."""
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    if len(complete) < 2:
        return "needs at least 2 COMPLETE trials"
    try:
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
        return {k: float(v) for k, v in optuna.importance.get_param_importances(study, evaluator=evaluator).items()}
    except (ValueError, RuntimeError) as e:
        return f"not computable: {e}"


def plot_objective(study: optuna.Study, sweep, path: Path) -> Path | None:
    """The objective over the plot axes (rank x alpha for LoRA): COMPLETE trials coloured by value (best per
    point), PRUNED ones as grey crosses. Drawn here because alpha is derived, not an Optuna parameter, so
    optuna.visualization's contour plots cannot show it."""
    import matplotlib
    import matplotlib.ticker
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_key, y_key = sweep.plot.get("x"), sweep.plot.get("y")
    points, pruned = {}, []
    for t in study.get_trials(deepcopy=False, states=FINISHED):
        v = sweep.run_overrides(t.params)
        xy = (v[x_key], v[y_key] if y_key else t.value)
        if t.state == TrialState.PRUNED:
            pruned.append(xy)
            continue
        better = max if sweep.direction == "maximize" else min
        key = (v[x_key], v[y_key]) if y_key else (v[x_key], t.number)
        points[key] = better(points.get(key, t.value), t.value)
    if not points and not pruned:
        return None
    fig, ax = plt.subplots(figsize=(7, 5), dpi=120)
    if y_key:
        if points:
            xs, ys = zip(*points)
            sc = ax.scatter(xs, ys, c=list(points.values()), cmap="viridis", s=160, edgecolors="black", zorder=3)
            fig.colorbar(sc, ax=ax, label=sweep.metric)
            for (x, y), value in points.items():
                ax.annotate(f"{value:.3f}", (x, y), textcoords="offset points", xytext=(0, 11), ha="center",
                            fontsize=7)
            best_xy = (max if sweep.direction == "maximize" else min)(points, key=points.get)
            ax.scatter(*best_xy, s=420, facecolors="none", edgecolors="red", linewidths=2, zorder=4, label="best")
        if pruned:
            ax.scatter(*zip(*pruned), marker="x", c="grey", s=60, zorder=2, label="pruned")
        ax.set_ylabel(y_key)
    else:
        if points:
            ax.scatter([k[0] for k in points], list(points.values()), s=60, zorder=3, label="complete")
        if pruned:
            ax.scatter(*zip(*pruned), marker="x", c="grey", s=60, zorder=2, label="pruned (last value)")
        ax.set_ylabel(sweep.metric)
    everything = list(points) + pruned
    for i, axis in enumerate((ax.xaxis, ax.yaxis) if y_key else (ax.xaxis,)):
        values = [p[i] for p in everything]
        if not all(isinstance(v, (int, float)) and v > 0 for v in values):
            continue
        if all(isinstance(v, int) for v in values):   # ranks, alphas, reduction factors: powers of two
            (ax.set_xscale if i == 0 else ax.set_yscale)("log", base=2)
            ticks = sorted(set(values))
            (ax.set_xticks if i == 0 else ax.set_yticks)(ticks, [str(v) for v in ticks], minor=False)
            axis.set_minor_locator(matplotlib.ticker.NullLocator())
        elif max(values) / min(values) > 10:   # e.g. learning rates
            (ax.set_xscale if i == 0 else ax.set_yscale)("log")
    ax.margins(0.12)
    ax.set_xlabel(x_key)
    ax.set_title(f"{study.study_name}: {sweep.metric}" + (f" over {x_key} x {y_key}" if y_key else ""))
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize=8, markerscale=0.5)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def summary(study: optuna.Study, sweep, cli_overrides: list[str]) -> dict:
    trials = study.get_trials(deepcopy=False)
    best = best_trial(study)
    counts = {s.name: sum(t.state == s for t in trials) for s in TrialState}
    return {
        "study": study.study_name, "objective": sweep.metric, "direction": sweep.direction,
        "finished_trials": counts["COMPLETE"] + counts["PRUNED"], "states": counts,
        "train_steps": sum(trial_steps(t) for t in trials if t.state.is_finished()),
        "trial_seconds": sum(t.duration.total_seconds() for t in trials if t.state in FINISHED and t.duration),
        "best_value": None if best is None else best.value,
        "best_trial": None if best is None else best.number,
        "best_params": None if best is None else best.params,
        "best_overrides": None if best is None else {k: v for k, v in sweep.run_overrides(best.params).items()},
        "best_run_id": None if best is None else best.user_attrs.get("mlflow_run_id"),
        # the best trial's one test evaluation: reported beside the selection, not used for it
        "best_test": None if best is None else trial_test_metrics(best),
        "best_command": best_command(study, sweep, cli_overrides),
    }


def write(study: optuna.Study, sweep, cli_overrides: list[str], out_dir: Path) -> tuple[dict, Table]:
    """reports/<study>/: best.txt, summary.json, trials.txt, trials.csv, importances.json, objective.png."""
    out_dir.mkdir(parents=True, exist_ok=True)
    info = summary(study, sweep, cli_overrides)
    info["importances"] = importances(study)
    table = trials_table(study, sweep)
    (out_dir / "best.txt").write_text((info["best_command"] or "no COMPLETE trial") + "\n")
    (out_dir / "summary.json").write_text(json.dumps(info, indent=2, default=str) + "\n")
    (out_dir / "importances.json").write_text(json.dumps(info["importances"], indent=2) + "\n")
    text = Console(record=True, width=200, file=io.StringIO())
    text.print(table)
    (out_dir / "trials.txt").write_text(text.export_text())
    study.trials_dataframe().to_csv(out_dir / "trials.csv", index=False)
    png = plot_objective(study, sweep, out_dir / "objective.png")
    if png is None:
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
                **{f"best.{k}": fmt_value(v) for k, v in info["best_overrides"].items()},
                **{f"best_param.{k}": fmt_value(v) for k, v in info["best_params"].items()}}
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
    console.print(escape(f"report: {out_dir}/ (best.txt, summary.json, trials.txt, trials.csv, importances.json, "
                  "objective.png)"))
