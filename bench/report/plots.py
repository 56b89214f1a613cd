"""The PNGs: a group's test accuracy against each cost with the Pareto frontier (the report), a campaign's learning
curves (test accuracy against training examples, bench/report/curves.py), a study's objective over its settings
(the one objective plot: the sweep's objective.png and the report's sweep plots), a multi-objective study's Pareto
front (`pareto_plot`: the sweep's pareto.png and the report's) and the tuned comparison's defaults against tuned
(`tuned_plot`, bench/report/compare.py).

matplotlib's object-oriented API only (`Figure`, no pyplot): no backend is selected and no global state changes;
savefig renders PNG with Agg. Byte-stable: fixed sizes, layout and DPI, points in a fixed order, and no
`Software` entry in the PNG metadata (matplotlib writes its version there; the rest of its PNG output is
deterministic).
"""
from __future__ import annotations

import math
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter, NullLocator

from bench.core import metrics as M
from bench.fmt import human_bytes
from bench.report.curves import Campaign
from bench.report.data import ACCURACY, Group
from bench.report.sweeps import FINISHED, Study

# x axis per cost: (label, scale, log); memory is the group's method-separating figure (data.Group.memory_metric)
AXES = {M.MEM_TRAIN_GROWTH: ("train growth (MiB)", 1 / 2**20, False),
        M.MEM_PEAK_TRAIN: ("peak train memory, allocated (MiB)", 1 / 2**20, False),
        M.CKPT_BYTES: ("checkpoint size (bytes, log scale)", 1.0, True),
        M.TIME_TRAIN: ("train time (s)", 1.0, False)}
FRONT, OTHER = "#c0392b", "#2c7fb8"


def _save(fig: Figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, metadata={"Software": None})


def group_plot(group: Group, path: Path) -> None:
    """Three panels: test accuracy (mean, 95 % CI bars over seeds) against the memory figure, checkpoint size and
    train time."""
    fig = Figure(figsize=(15, 4.8))
    axes = fig.subplots(1, 3)
    fig.subplots_adjust(left=0.045, right=0.99, bottom=0.11, top=0.87, wspace=0.2)  # fixed: layout engines are slow
    for ax, (metric, short) in zip(axes, group.costs):
        label, scale, log = AXES[metric]
        rows = [r for r in group.rows if r.means[metric] is not None]
        for on in (False, True):
            part = [r for r in rows if (short in r.pareto) == on]
            if part:
                ax.errorbar([r.means[metric] * scale for r in part], [100 * r.accuracy.mean for r in part],
                            yerr=[100 * (r.accuracy.half_width or 0) for r in part], fmt="o",
                            color=FRONT if on else OTHER, ecolor="#888888", elinewidth=1, capsize=3, markersize=6)
        for row in rows:
            ax.annotate(row.label, (row.means[metric] * scale, 100 * row.accuracy.mean), textcoords="offset points",
                        xytext=(6, 5), fontsize=8)
        front = sorted((r.means[metric] * scale, 100 * r.accuracy.mean) for r in rows if short in r.pareto)
        if front:
            xs, ys = zip(*front)
            # best accuracy reachable within each budget: a step that rises at every frontier point
            ax.step(xs, ys, where="post", color=FRONT, linewidth=1.2, alpha=0.8, label="Pareto frontier")
            ax.legend(loc="best", fontsize=8)
        if log:
            ax.set_xscale("log", base=2)  # ticks at KiB/MiB powers of two, at most ~7 of them
            ax.xaxis.set_major_locator(LogLocator(base=2, numticks=7))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: human_bytes(v, short=True)))
            ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels would be mathtext: slow and crowded
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"test accuracy vs {short}", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.margins(x=0.15)
        if rows:  # intervals of wildly disagreeing seeds can pass 0 or 100 %: keep the axis on possible values
            lo = min(100 * r.accuracy.low for r in rows)
            hi = max(100 * r.accuracy.high for r in rows)
            pad = max(1.0, 0.12 * (hi - lo))
            ax.set_ylim(max(lo - pad, -1.0), min(hi + pad, 101.0))
    fig.suptitle(f"{group.title}: {ACCURACY} (mean ± 95 % CI over seeds); red: on the frontier", fontsize=11)
    _save(fig, path)


def curve_plot(campaign: Campaign, path: Path) -> Path | None:
    """Test accuracy (mean ± 95 % seed interval) against training examples (log scale), one line per method, full
    fine-tuning in black. Points whose runs did not log train/examples are not drawn. None (nothing written)
    when no point can be drawn."""
    drawn = [(line, [(campaign.examples[k], line.points[k]) for k in campaign.keys
                     if k in line.points and campaign.examples.get(k)]) for line in campaign.lines]
    drawn = [(line, pts) for line, pts in drawn if pts]
    if not drawn:
        return None
    fig = Figure(figsize=(8, 5))
    ax = fig.subplots()
    fig.subplots_adjust(left=0.1, right=0.97, bottom=0.11, top=0.91)  # fixed: layout engines are slow
    for i, (line, pts) in enumerate(drawn):
        ref = line is campaign.reference
        ax.errorbar([x for x, _ in pts], [100 * p.accuracy.mean for _, p in pts],
                    yerr=[100 * (p.accuracy.half_width or 0) for _, p in pts], fmt="-o", capsize=3, markersize=5,
                    linewidth=2.2 if ref else 1.3, color="black" if ref else f"C{i % 10}", label=line.label)
    xs = sorted({x for _, pts in drawn for x, _ in pts})
    ax.set_xscale("log")
    ax.set_xticks(xs, [f"{x:,.0f}" for x in xs])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel(f"training examples ({M.TRAIN_EXAMPLES}, log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{campaign.title}: {ACCURACY} (mean ± 95 % CI over seeds)", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.margins(x=0.08)
    points = [p for _, pts in drawn for _, p in pts]   # wildly disagreeing seeds: keep the axis on possible values
    lo, hi = min(100 * p.accuracy.low for p in points), max(100 * p.accuracy.high for p in points)
    pad = max(1.0, 0.08 * (hi - lo))
    ax.set_ylim(max(lo - pad, -1.0), min(hi + pad, 101.0))
    ax.legend(loc="best", fontsize=8)
    _save(fig, path)
    return path


def _coord(v):
    """A setting as a plot coordinate: a number (int when whole: ranks, alphas), else its text."""
    if isinstance(v, bool):
        return str(v)
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    return int(f) if f.is_integer() else f


def _axis(values: list) -> list:
    coords = [_coord(v) for v in values]
    return [str(c) for c in coords] if any(isinstance(c, str) for c in coords) else coords   # one kind per axis


def _objective_points(study: Study, x: str, y: str | None):
    """(COMPLETE points -> value: the best value where trials share a point; one axis: (x, number) -> value,
    PRUNED trials' points, the best trial's point or None)."""
    drawn = [t for t in study.trials if t.state in FINISHED and t.value is not None and math.isfinite(t.value)
             and x in t.settings and (y is None or y in t.settings)]
    xs = _axis([t.settings[x] for t in drawn])
    ys = _axis([t.settings[y] for t in drawn]) if y else [t.value for t in drawn]
    better = max if study.direction == "maximize" else min
    complete, pruned, best = {}, [], None
    for t, px, py in zip(drawn, xs, ys):
        if t.state == "PRUNED":
            pruned.append((px, py))
            continue
        key = (px, py) if y else (px, t.number)
        complete[key] = better(complete.get(key, t.value), t.value)
        if study.best is not None and t.number == study.best.number:
            best = (px, py)
    return complete, pruned, best


def _log_axes(ax, points: list[tuple], n_axes: int) -> None:
    """Positive whole numbers (ranks, alphas, reduction factors: powers of two) on a log2 axis ticked at the values
    (up to 12 of them); positive values spanning more than 10x (learning rates) on a log10 axis."""
    for i in range(n_axes):
        values = [p[i] for p in points]
        if not all(isinstance(v, (int, float)) and v > 0 for v in values):
            continue
        set_scale, axis = (ax.set_xscale, ax.xaxis) if i == 0 else (ax.set_yscale, ax.yaxis)
        if all(isinstance(v, int) for v in values):
            set_scale("log", base=2)
            ticks = sorted(set(values))
            if len(ticks) <= 12:
                (ax.set_xticks if i == 0 else ax.set_yticks)(ticks, [str(v) for v in ticks])
                axis.set_minor_locator(NullLocator())
            else:
                axis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
                axis.set_minor_formatter(NullFormatter())
        elif max(values) / min(values) > 10:
            set_scale("log")


def objective_plot(study: Study, x: str | None, y: str | None, path: Path) -> Path | None:
    """The objective over a study's settings x (and y): with two axes (rank × alpha for LoRA) each COMPLETE point
    coloured and labelled by its value, PRUNED trials as grey crosses; with one, the objective against x. The best
    trial ringed. Drawn here, not with optuna.visualization: alpha is derived, not an Optuna parameter. Writes
    `path` and returns it; None, writing nothing, when no finished trial has a value and the settings."""
    complete, pruned, best = _objective_points(study, x, y) if x else ({}, [], None)
    if not complete and not pruned:
        return None
    fig = Figure(figsize=(7, 5))
    ax = fig.subplots()
    fig.subplots_adjust(left=0.12, right=0.97, bottom=0.11, top=0.92)  # fixed: layout engines are slow
    if y and complete:
        xs, ys = zip(*complete)
        sc = ax.scatter(xs, ys, c=list(complete.values()), cmap="viridis", s=160, edgecolors="black", zorder=3)
        fig.colorbar(sc, ax=ax, label=study.objective)
        for point, value in complete.items():
            ax.annotate(f"{value:.3f}", point, textcoords="offset points", xytext=(0, 11), ha="center", fontsize=7)
    elif complete:
        ax.scatter([k[0] for k in complete], list(complete.values()), s=60, zorder=3, label="complete")
    if best is not None:
        ax.scatter(*best, s=420 if y else 200, facecolors="none", edgecolors=FRONT, linewidths=2, zorder=4,
                   label="best")
    if pruned:
        ax.scatter(*zip(*pruned), marker="x", c="grey", s=60, zorder=2,
                   label="pruned" if y else "pruned (last value)")
    _log_axes(ax, [k if y else (k[0],) for k in complete] + pruned, 2 if y else 1)
    ax.margins(0.12)
    ax.set_xlabel(x)
    ax.set_ylabel(y or study.objective)
    ax.set_title(f"study {study.name}: {study.objective} " + (f"over {x} × {y}" if y else f"against {x}"),
                 fontsize=10)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize=8, markerscale=0.5)
    _save(fig, path)
    return path


def pareto_plot(study: Study, path: Path) -> Path | None:
    """A multi-objective study's COMPLETE trials on its first two objectives (the first on y), the Pareto front
    (on all objectives) in red, joined in x order and labelled with trial numbers, dominated trials in grey. Drawn
    here rather than with optuna.visualization.plot_pareto_front so that the sweep's PNG and the report's are the
    same bytes from the same trials (and need no plotly). None, writing nothing, without a COMPLETE trial."""
    (y_metric, y_dir), (x_metric, x_dir) = study.objectives[:2]
    points = [t for t in study.trials if t.state == "COMPLETE" and t.values and None not in t.values[:2]
              and all(math.isfinite(v) for v in t.values[:2])]
    if not points:
        return None
    front = {t.number for t in study.front}
    fig = Figure(figsize=(7, 5))
    ax = fig.subplots()
    fig.subplots_adjust(left=0.12, right=0.97, bottom=0.11, top=0.92)
    for on in (False, True):
        part = [t for t in points if (t.number in front) == on]
        if part:
            ax.scatter([t.values[1] for t in part], [t.values[0] for t in part], s=70 if on else 40, zorder=3,
                       color=FRONT if on else "#999999", label="Pareto front" if on else "dominated")
    line = sorted((t.values[1], t.values[0], t.number) for t in points if t.number in front)
    ax.plot([p[0] for p in line], [p[1] for p in line], color=FRONT, linewidth=1, alpha=0.6, zorder=2)
    for xv, yv, n in line:
        ax.annotate(f"t{n}", (xv, yv), textcoords="offset points", xytext=(5, 5), fontsize=8)
    xs = [t.values[1] for t in points]
    if min(xs) > 0 and max(xs) > 20 * min(xs):   # sizes over orders of magnitude (parameters, bytes)
        ax.set_xscale("log")
    ax.margins(0.12)
    ax.set_xlabel(f"{x_metric} ({x_dir})")
    ax.set_ylabel(f"{y_metric} ({y_dir})")
    ax.set_title(f"study {study.name}: Pareto front of {len(points)} complete trials", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    _save(fig, path)
    return path


def tuned_plot(campaign, path: Path) -> Path | None:
    """A tuned-comparison campaign (bench/report/compare.py): per method its test accuracy at the defaults (grey)
    and tuned (red), mean and 95 % seed interval, joined by an arrow. None, writing nothing, without a method that
    has both."""
    from bench.report.compare import both
    methods = sorted(both(campaign), key=lambda m: (-m.tuned.accuracy.mean, m.method))
    if not methods:
        return None
    height = 1.1 + 0.45 * len(methods)   # inches: 0.6 below the axes, 0.4 above, 0.45 per method
    fig = Figure(figsize=(7, height))
    ax = fig.subplots()
    fig.subplots_adjust(left=0.2, right=0.97, bottom=0.6 / height, top=1 - 0.4 / height)
    for i, m in enumerate(methods):
        for row, colour, label in ((m.default, "#999999", "defaults"), (m.tuned, FRONT, "tuned")):
            ax.errorbar([100 * row.accuracy.mean], [i], xerr=[100 * (row.accuracy.half_width or 0)], fmt="o",
                        color=colour, ecolor=colour, capsize=3, markersize=7, label=label if i == 0 else None)
        ax.annotate("", xy=(100 * m.tuned.accuracy.mean, i), xytext=(100 * m.default.accuracy.mean, i),
                    arrowprops={"arrowstyle": "->", "color": "#555555", "lw": 1})
    ax.set_yticks(range(len(methods)), [m.method for m in methods])
    ax.set_ylim(len(methods) - 0.5, -0.5)
    ax.set_xlabel("test accuracy (%), mean and 95 % seed interval")
    ax.set_title(f"campaign {campaign.name}: defaults → tuned", fontsize=10)
    ax.grid(True, axis="x", alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    _save(fig, path)
    return path
