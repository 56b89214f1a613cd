"""The report's provenance: the store and experiments, what was read and left out, dates, hardware, platform,
code and packages, and the runs that did not finish (with their `error` tag)."""
from __future__ import annotations

import time
from collections import Counter

from bench.core import metrics as M
from bench.report.data import ACCURACY, Data
from bench.report.wording import cell

LISTED = 20       # provenance names at most this many runs per line


def date(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(ms / 1000)) if ms else "-"


def listed(names: list[str]) -> str:
    more = len(names) - LISTED
    return ", ".join(names[:LISTED]) + (f" and {more} more" if more > 0 else "")


def _counted(values: list[str]) -> str:
    counts = Counter(values)
    if len(counts) == 1:
        return next(iter(counts))
    return ", ".join(f"{v} ({n} run{'s' if n > 1 else ''})" for v, n in sorted(counts.items()))


def _predictions_line(data: Data) -> str:
    rows = [row for g in data.groups for row in g.rows]
    total = sum(len(row.runs) for row in rows)
    missing = [r.name for row in rows for r in row.runs if r.seed not in row.answers]
    line = (f"- Test predictions (`{M.PREDICTIONS_ARTIFACT}`, for the test-sampling intervals and the paired "
            f"tests): read for {total - len(missing)} of the {total} runs in the tables")
    if missing:
        line += f"; missing for {listed(missing)} (their comparisons say \"paired test unavailable\")"
    if data.remote_error:
        line += f"; downloads stopped after {data.remote_error}"
    return line + "."


def provenance(data: Data) -> list[str]:
    runs = data.runs
    status = Counter(r.status for r in runs)
    in_tables = sum(r.accuracy.n for g in data.groups for r in g.rows)
    in_scores = sum(r.headline.n for g in data.score_groups for r in g.rows)
    scores = f", {in_scores} in the chrF / BLEU tables" if in_scores else ""
    scores += (f", {len(data.curve_runs)} in the learning curves (`task.train_per_class` set)"
               if data.curve_runs else "")
    scores += f", {len(data.multitask)} multi-task parent runs" if data.multitask else ""
    ends = [r.end_time for r in runs if r.end_time]
    lines = ["## Provenance", "",
             f"- Store: `{data.uri}`; experiment{'s' if len(data.experiments) > 1 else ''} "
             f"{', '.join(f'`{e}`' for e in data.experiments)}.",
             f"- Runs: {len(runs)} ({', '.join(f'{n} {s}' for s, n in sorted(status.items()))}); "
             f"{in_tables} in the method tables{scores}, {len(data.sweep_runs)} sweep runs, "
             f"{len(data.superseded)} FINISHED runs superseded by a later run with the same settings and seed, "
             f"{len(data.old_protocol)} FINISHED runs of the old protocol.",
             f"- Dates (UTC): first run started {date(runs[0].start_time)}, last run ended "
             f"{date(max(ends) if ends else None)}."]
    if data.old_protocol:
        lines.append(f"- Old protocol, no `{ACCURACY}` (left out of the tables): "
                     f"{listed([r.name for r in data.old_protocol])}.")
    if data.groups:
        lines.append(_predictions_line(data))
    with_hw = [r for r in runs if "device_name" in r.tags]
    if with_hw:
        lines.append("- Hardware: " + _counted([
            f"{r.tags['device_name']} (device {r.tags.get('device', '?')}, {r.tags.get('cpu_count', '?')} CPU cores, "
            f"torch threads: {r.tags.get('torch_threads', '?')})" for r in with_hw]) + ".")
        sources = [r.tags["mem_source"] for r in with_hw if "mem_source" in r.tags]
        if sources:
            lines.append(f"- Peak memory measured as: {_counted(sources)} (README: `{M.MEM_PEAK_TRAIN}`, "
                         f"`{M.MEM_TRAIN_GROWTH}`).")
        lines.append("- Platform: " + _counted([f"{r.tags.get('platform', '?')}, Python {r.tags.get('python', '?')}"
                                                for r in with_hw]) + ".")
        lines.append("- Code: git commit " + _counted([r.tags.get("git_commit", "?") for r in with_hw]) + ".")
        packages = sorted({k for r in with_hw for k in r.tags if k.startswith("version.")})
        lines.append("- Packages: " + "; ".join(
            f"{k.removeprefix('version.')} {_counted([r.tags.get(k, '?') for r in with_hw])}" for k in packages) + ".")
    lines.append("")
    # pruned sweep trials end KILLED by design: the sweeps section counts them; everything else unfinished is listed
    unfinished = [r for r in runs if r.status != "FINISHED" and not ("study" in r.tags and r.status == "KILLED")]
    lines += ["### Runs that did not finish", ""]
    if not unfinished:
        lines += ["None" + (" (KILLED sweep trials, pruned or interrupted, are counted under Sweeps)"
                            if data.sweep_runs else "") + ".", ""]
    else:
        lines += ["Never in the tables. KILLED sweep trials (pruned or interrupted) are counted under Sweeps only.",
                  "", "| run | status | started (UTC) | reason (`error` tag) |", "|---|---|---|---|"]
        for r in sorted(unfinished, key=lambda r: (r.start_time, r.name, r.run_id)):
            reason = (r.tags.get("error") or r.tags.get("sweep_error")
                      or ("still running, or its process died without ending it" if r.status == "RUNNING" else "-"))
            lines.append("| " + " | ".join(cell(c) for c in (r.name, r.status, date(r.start_time), reason)) + " |")
        lines.append("")
    return lines
