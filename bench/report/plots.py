"""The report's PNGs: test accuracy against each cost with the Pareto frontier, and a sweep's rank × alpha map.

Byte-stable: the Agg backend, fixed sizes and DPI, points in the report's own order, and no `Software` entry in
the PNG metadata (matplotlib writes its version there; the rest of its PNG output is deterministic).
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: E402

from bench.core import metrics as M  # noqa: E402
from bench.fmt import human_bytes  # noqa: E402
from bench.report.data import ACCURACY, Group  # noqa: E402

# x axis per cost: (label, scale, log); memory is the group's method-separating figure (data.Group.memory_metric)
AXES = {M.MEM_TRAIN_GROWTH: ("train growth (MiB)", 1 / 2**20, False),
        M.MEM_PEAK_TRAIN: ("peak train memory, allocated (MiB)", 1 / 2**20, False),
        M.CKPT_BYTES: ("checkpoint size (bytes, log scale)", 1.0, True),
        M.TIME_TRAIN: ("train time (s)", 1.0, False)}
FRONT, OTHER = "#c0392b", "#2c7fb8"


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)


def group_plot(group: Group, path: Path) -> None:
    """Three panels: test accuracy (mean, 95 % CI bars over seeds) against the memory figure, checkpoint size and
    train time."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8))
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


def sweep_plot(study: str, points: list[tuple[float, float, float]], best: tuple[float, float] | None,
               x_name: str, y_name: str, objective: str, maximize: bool, path: Path) -> None:
    """One dot per finished trial at (x, y), coloured by the objective; the best trial ringed."""
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    fig.subplots_adjust(left=0.12, right=0.97, bottom=0.11, top=0.92)
    # trials at the same (x, y) overlap: draw the better ones last, so each spot shows its best value
    xs, ys, zs = zip(*sorted(points, key=lambda p: (p[2] if maximize else -p[2], p[0], p[1])))
    sc = ax.scatter(xs, ys, c=zs, cmap="viridis", s=70, edgecolors="#333333", linewidths=0.5)
    if best is not None:
        ax.scatter([best[0]], [best[1]], s=260, facecolors="none", edgecolors=FRONT, linewidths=2, label="best")
        ax.legend(loc="best", fontsize=8)
    for set_scale, axis, values in ((ax.set_xscale, ax.xaxis, xs), (ax.set_yscale, ax.yaxis, ys)):
        if min(values) > 0 and max(values) / min(values) >= 8:  # ranks, alphas: powers of two on a log2 axis
            set_scale("log", base=2 if all(float(v).is_integer() for v in values) else 10)
            axis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
            axis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(x_name)
    ax.set_ylabel(y_name)
    ax.grid(True, alpha=0.3)
    fig.colorbar(sc, ax=ax, label=objective)
    ax.set_title(f"study {study}: {objective} per trial", fontsize=10)
    _save(fig, path)
