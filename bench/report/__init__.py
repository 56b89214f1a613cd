"""`python -m bench.report`: which PEFT method to use, answered from the runs in MLflow.

    MLflow runs -> runs.py (RunRecord: plain SQL for sqlite, MLflow's client otherwise)
    -> data.py (groups task × model × quant, one row per method, Pareto frontiers)
       + predictions.py (each table run's predictions/test.parquet; paired tests of two rows)
       + stats.py (the definitions: seed and test-sampling intervals, paired tests, cost and latency noise)
    -> compare.py (the tuned comparison: the runs of python -m bench.compare campaigns, by their tags)
    -> curves.py (learning curves: the task.train_per_class runs, kept out of the tables, against full's)
    -> claims.py (the Claims section: each claim against the runs; evidence.py: findings and shared evidence)
    -> sweeps.py (per study: its trials and summary, the best trial)
    -> plots.py (PNGs) -> markdown.py (the report: wording.py, selection.py, provenance.py, curves, claims)

The end of `python -m bench.sweep` writes reports/<study>/ with sweep_outputs.py, from the same study summary
(sweeps.py) and the same objective plot (plots.py).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from bench.errors import BenchError

DEFAULT_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "peft-bench"


def build_report(uri: str, experiments: list[str], out: Path, store_uri: str | None = None,
                 artifacts_root: str | None = None) -> tuple[Path, list[Path]]:
    """Read the runs, write `out` (Markdown) and its PNGs into the folder `out` without `.md`; return the paths.
    store_uri / artifacts_root: a server's backend store and artifact folder, read directly (`--store-uri`,
    `--artifacts-root`)."""
    from bench.report import compare, curves
    from bench.report import data as data_mod
    from bench.report import markdown, plots, sweeps

    data = data_mod.load(uri, experiments, store_uri, artifacts_root)
    campaigns = curves.campaigns(data)
    studies = sweeps.from_runs(data.sweep_runs)
    tuned = compare.campaigns(data)
    out = Path(out)
    assets = out.with_suffix("")  # reports/NAME.md -> reports/NAME/ holds its plots
    written: list[Path] = []
    group_plots, sweep_plots, curve_plots, tuned_plots = {}, {}, {}, {}
    for group in data.groups:
        path = assets / f"acc-{group.slug}.png"
        plots.group_plot(group, path)
        group_plots[group.slug] = f"{assets.name}/{path.name}"
        written.append(path)
    for campaign in campaigns:
        path = assets / f"curve-{campaign.slug}.png"
        if plots.curve_plot(campaign, path) is not None:
            curve_plots[campaign.slug] = f"{assets.name}/{path.name}"
            written.append(path)
    for campaign in tuned:
        path = assets / f"tuned-{data_mod.safe_name(campaign.name)}.png"
        if plots.tuned_plot(campaign, path) is not None:
            tuned_plots[campaign.name] = f"{assets.name}/{path.name}"
            written.append(path)
    for study in studies:
        axes = sweeps.plot_axes(study)
        path = assets / f"sweep-{data_mod.safe_name(study.name)}.png"
        if study.multi:   # several objectives: the Pareto front
            if plots.pareto_plot(study, path) is None:
                continue
        elif axes is None or not study.complete or plots.objective_plot(study, *axes, path) is None:
            continue
        sweep_plots[study.name] = f"{assets.name}/{path.name}"
        written.append(path)
    # only this report's own plots of groups, campaigns or studies now gone
    for pattern in ("acc-*.png", "curve-*.png", "sweep-*.png", "tuned-*.png"):
        for stale in sorted(assets.glob(pattern)) if assets.is_dir() else []:
            if stale not in written:
                stale.unlink()
    markdown.write(markdown.render(data, studies, group_plots, sweep_plots, campaigns, curve_plots, tuned,
                                   tuned_plots), out)
    return out, written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.report",
                                description="Write a method-selection report (Markdown + PNG plots) from MLflow runs.")
    p.add_argument("--experiment", action="append", metavar="NAME",
                   help=f"MLflow experiment to read; repeat for several (default: {DEFAULT_EXPERIMENT})")
    p.add_argument("--tracking-uri", default=DEFAULT_URI, metavar="URI",
                   help=f"MLflow tracking URI (default: {DEFAULT_URI}, the store `python -m bench` writes)")
    p.add_argument("--store-uri", metavar="postgresql://USER@HOST:PORT/DB",
                   help="with an http(s) --tracking-uri: read the runs straight from that server's backend store "
                        "with plain SQL (password: PGPASSWORD), ~10x faster than its REST API on thousands of runs; "
                        "artifacts still come through the server unless --artifacts-root is given")
    p.add_argument("--artifacts-root", metavar="DIR",
                   help="the server's artifact folder (its --artifacts-destination, e.g. the stack's DIR/artifacts) "
                        "on this host: predictions are read from it instead of downloaded one request per run")
    p.add_argument("--out", metavar="reports/NAME.md",
                   help="Markdown file to write; its plots go to the folder of the same name without .md "
                        "(default: reports/<experiment>.md)")
    a = p.parse_args(argv)
    experiments = a.experiment or [DEFAULT_EXPERIMENT]
    out = Path(a.out) if a.out else Path("reports") / f"{'+'.join(experiments)}.md"
    if out.suffix != ".md":
        print(f"error: --out: {out} must end in .md", file=sys.stderr)
        return 2
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")  # an unreachable server: fail in seconds
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # predictions downloads: no bars
    try:
        path, pngs = build_report(a.tracking_uri, experiments, out, a.store_uri, a.artifacts_root)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    plots = f" and {len(pngs)} plot{'s' if len(pngs) != 1 else ''} in {path.with_suffix('')}/" if pngs else ""
    print(f"wrote {path}{plots}")
    return 0
