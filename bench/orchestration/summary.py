"""The table printed at the end of `python -m bench` (single run or multirun), read from the jobs' result.json.

It is a Hydra callback so it also works when a launcher runs the jobs in other processes (e.g. the joblib
launcher's workers): it reads the result files, not in-memory returns. Runs skipped because they had finished
earlier show their earlier metrics, marked "skipped". The process exits non-zero when any run failed.
"""
from __future__ import annotations

from pathlib import Path

from hydra.experimental.callback import Callback
from rich.console import Console
from rich.table import Table

from bench.core import metrics as M
from bench.fmt import human_bytes
from bench.orchestration.result import Result


def table(results: list[Result]) -> Table:
    """One row per run; translation (chrf_bleu) runs have no accuracy, so where one is listed the table adds their
    own figures, test chrF and best validation chrF (the selection score)."""
    t = Table(title="peft-bench summary")
    chrf = any(M.TEST_CHRF in r.metrics for r in results)
    for col in ("run", "status", "test acc", "best val acc", *(("test chrF", "best val chrF") if chrf else ()),
                "train growth", "peak train mem", "train time", "checkpoint", "trainable %"):
        t.add_column(col, justify="left" if col in ("run", "status") else "right",
                     overflow="fold" if col == "run" else "ellipsis")   # a narrow table wraps run names, never cuts
    for r in results:
        m = r.metrics
        fmt = lambda key, f: f(m[key]) if key in m else "-"  # noqa: E731
        status = f"{r.status} (skipped)" if r.skipped else r.status
        scores = (fmt(M.TEST_CHRF, lambda v: f"{v:.1f}"), fmt(M.VAL_BEST_CHRF, lambda v: f"{v:.1f}")) if chrf else ()
        t.add_row(r.name, status, fmt(M.TEST_ACCURACY, lambda v: f"{v:.4f}"),
                  fmt(M.VAL_BEST_ACCURACY, lambda v: f"{v:.4f}"), *scores,
                  human_bytes(m.get(M.MEM_TRAIN_GROWTH)), human_bytes(m.get(M.MEM_PEAK_TRAIN)),
                  fmt(M.TIME_TRAIN, lambda v: f"{v:.1f} s"), human_bytes(m.get(M.CKPT_BYTES)),
                  fmt(M.PARAMS_TRAINABLE_PCT, lambda v: f"{v:.3f}"))
    return t


def report(results: list[Result], config) -> None:
    console = Console(width=None if Console().is_terminal else 160)  # logs and CI: do not wrap at 80
    console.print(table(results))
    for r in results:
        if r.status != "FINISHED":
            console.print(f"[red]{r.name}: {r.status}[/red] {r.error or ''}", highlight=False)
    skipped = sum(r.skipped for r in results)
    failed = sum(r.status != "FINISHED" for r in results)
    console.print(f"{len(results)} runs: {len(results) - skipped - failed} finished now, {skipped} skipped "
                  f"(finished earlier; --rerun runs them again), {failed} not finished", highlight=False)
    uri = config.tracking.uri
    console.print(f"MLflow store: {uri}  (UI: mlflow ui --backend-store-uri {uri}, then open the experiment "
                  f"{config.tracking.experiment!r} with ?workflowType=machine_learning for the runs table)",
                  highlight=False)
    if any(r.status != "FINISHED" for r in results):
        raise SystemExit(1)


def _job_order(path: Path) -> tuple[int, str]:
    head = path.parent.name.split("-", 1)[0]
    return (int(head) if head.isdigit() else 1 << 30, path.parent.name)


class MultirunSummary(Callback):
    def on_run_end(self, config, **kwargs) -> None:
        result = Result.read(Path(config.hydra.runtime.output_dir))
        if result is not None:
            report([result], config)

    def on_multirun_end(self, config, **kwargs) -> None:
        paths = sorted(Path(config.hydra.sweep.dir).glob("*/result.json"), key=_job_order)
        report([Result.read(p.parent) for p in paths], config)
