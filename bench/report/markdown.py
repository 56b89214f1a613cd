"""The report's Markdown: per task × model × quant a table, plots and the method-selection answer; then sweeps
and provenance. Everything here is a function of the runs alone (stable order, no generation time)."""
from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

from bench.report.data import ACCURACY, Data, Group, Row
from bench.report.stats import within_noise
from bench.report.sweeps import Study

ONE_POINT = 0.01  # "within 1 point": accuracy is a fraction; one percentage point


# --- formatting ---------------------------------------------------------------------------------------------
def _pct(v: float) -> str:
    return f"{100 * v:.1f}"


def _acc(row: Row, with_n: bool = False) -> str:
    est = row.accuracy
    text = _pct(est.mean) + (f" ± {_pct(est.half_width)}" if est.half_width is not None else "") + " %"
    return f"{text}, n={est.n}" if with_n else text


def _mib(v: float | None) -> str:
    return "-" if v is None else f"{v / 2**20:,.0f} MiB"


def _bytes(v: float | None) -> str:
    if v is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if v < 1024 or unit == "GiB":
            return f"{v:.0f} {unit}" if unit == "B" else f"{v:.1f} {unit}"
        v /= 1024
    return str(v)


def _secs(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f} s"


def _ratio(v: float | None, ref: float | None) -> str:
    return "" if v is None or not ref else f" (×{v / ref:.2g})"


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _date(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(ms / 1000)) if ms else "-"


def _names(rows: list[Row]) -> str:
    return ", ".join(f"{r.label} ({_acc(r)})" for r in rows)


def _noise_phrase(a: Row, b: Row) -> str:
    verdict = within_noise(a.accuracy, b.accuracy)
    if verdict is None:
        return "seed noise unknown (n=1)"
    return "within seed noise" if verdict else "beyond seed noise"


# --- sections -----------------------------------------------------------------------------------------------
def _table(group: Group) -> list[str]:
    ref = group.reference
    head = ["method", "seeds", "accuracy (95 % CI)"] + (["Δ accuracy vs full"] if ref is not None else []) + [
        "trainable %", "peak train memory", "train time", "checkpoint", "throughput", "Pareto frontier"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 2) + ["---"]) + "|"]
    for row in group.rows:
        m, is_ref = row.means, row is ref
        rm = ref.means if ref is not None and not is_ref else {}
        delta = [] if ref is None else [
            "reference" if is_ref else f"{100 * (row.accuracy.mean - ref.accuracy.mean):+.1f} pt"]
        tp, tput = m["params/trainable_pct"], m["throughput/train_tokens_per_s"]
        cells = [f"**{row.label}**" if is_ref else row.label,
                 f"n={row.accuracy.n} ({', '.join(row.seeds)})",
                 _acc(row), *delta,
                 "-" if tp is None else f"{tp:.3g}",
                 _mib(m["mem/peak_train_bytes"]) + _ratio(m["mem/peak_train_bytes"], rm.get("mem/peak_train_bytes")),
                 _secs(m["time/train_s"]) + _ratio(m["time/train_s"], rm.get("time/train_s")),
                 _bytes(m["ckpt/bytes"]) + _ratio(m["ckpt/bytes"], rm.get("ckpt/bytes")),
                 "-" if tput is None else f"{tput:,.0f} tok/s",
                 ", ".join(row.pareto) or "-"]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return lines


def _memory_tiers(group: Group) -> list[tuple[float, Row]]:
    """Each memory figure on the memory frontier is a budget; its answer is the best row that fits in it."""
    rows = [r for r in group.rows if r.means["mem/peak_train_bytes"] is not None]
    budgets = sorted({r.means["mem/peak_train_bytes"] for r in rows if "memory" in r.pareto})
    tiers = []
    for b in budgets:
        fits = [r for r in rows if r.means["mem/peak_train_bytes"] <= b]
        tiers.append((b, min(fits, key=lambda r: (-r.accuracy.mean, r.means["mem/peak_train_bytes"], r.label))))
    return tiers


def _time_clause(pick: Row, runner: Row) -> str:
    """Train time varies from run to run too (other load on the machine): say whether the lead is real."""
    a, b = pick.train_time, runner.train_time
    if a is None or b is None:
        return ""
    shown = f"{b.mean:.1f}" + (f" ± {b.half_width:.1f}" if b.half_width is not None else "") + " s"
    verdict = within_noise(a, b)
    if verdict is None:
        return f"Next: {runner.label} ({shown}); one run each, so run-to-run variation of the time is unknown."
    if verdict:
        return (f"Next: {runner.label} ({shown}); the 95 % intervals of train time overlap, so the speed "
                "difference is within run-to-run variation.")
    return f"Next: {runner.label} ({shown}), slower beyond run-to-run variation (95 % intervals apart)."


def _rivals_clause(pick: Row, fits: list[Row]) -> str:
    others = [r for r in fits if r is not pick]
    if not others:
        return "the only method whose measured peak memory fits this budget."
    verdicts = [(r, within_noise(r.accuracy, pick.accuracy)) for r in others]
    tied = [r for r, v in verdicts if v is True]
    apart = [r.label for r, v in verdicts if v is False]
    unknown = [f"{r.label} ({100 * (r.accuracy.mean - pick.accuracy.mean):+.1f} pt)" for r, v in verdicts if v is None]
    parts = []
    if tied:
        parts.append(f"within seed noise of it (95 % intervals overlap): {_names(tied)}; choose among them by "
                     "checkpoint size or speed")
    if apart:
        parts.append(f"ahead of {', '.join(apart)} beyond seed noise (95 % intervals apart)")
    if unknown:
        parts.append(f"seed noise unknown (n=1) against {', '.join(unknown)}, so a gap of a point or two there "
                     "may not be real")
    return "; ".join(parts) + "."


def _selection(group: Group) -> list[str]:
    rows = group.rows
    best = min(rows, key=lambda r: (-r.accuracy.mean, r.label))
    lines = [f"### Which method to choose: {group.title}", ""]
    tiers = _memory_tiers(group)
    if tiers:
        lines += ["Best accuracy within each peak-train-memory budget the data supports (the budgets are the "
                  "memory figures on the memory frontier):", "",
                  "| budget: peak train memory | best method | accuracy (95 % CI) | within seed noise of it |",
                  "|---:|---|---:|---|"]
        for budget, pick in tiers:
            fits = [r for r in rows if r.means["mem/peak_train_bytes"] is not None
                    and r.means["mem/peak_train_bytes"] <= budget and r is not pick]
            tied = [r.label for r in fits if within_noise(r.accuracy, pick.accuracy) is True]
            unknown = [r.label for r in fits if within_noise(r.accuracy, pick.accuracy) is None]
            noise = "; ".join(([", ".join(tied)] if tied else [])
                              + ([f"unknown (n=1): {', '.join(unknown)}"] if unknown else [])) or "none"
            lines.append("| " + " | ".join(_cell(c) for c in (f"≤ {_mib(budget)}", pick.label,
                                                             _acc(pick, with_n=True), noise)) + " |")
        lines.append("")
        mems = [r.means["mem/peak_train_bytes"] for r in rows if r.means["mem/peak_train_bytes"] is not None]
        if len(mems) > 1 and max(mems) < 1.05 * min(mems):
            lines += [f"All rows' peak train memory lies within {100 * (max(mems) / min(mems) - 1):.1f} % "
                      f"({_mib(min(mems))} to {_mib(max(mems))}): here the memory budget hardly separates the "
                      "methods, so weigh accuracy, checkpoint size and time instead.", ""]

    for metric, what, fmt in (("ckpt/bytes", "Smallest checkpoint", _bytes), ("time/train_s", "Fastest", _secs)):
        near = [r for r in rows if r.accuracy.mean >= best.accuracy.mean - ONE_POINT - 1e-12
                and r.means[metric] is not None]
        if not near:
            continue
        pick = min(near, key=lambda r: (r.means[metric], -r.accuracy.mean, r.label))
        if pick is best:
            verdict = "the best itself"
        else:
            verdict = (f"{100 * (pick.accuracy.mean - best.accuracy.mean):+.1f} pt against the best, "
                       f"{_noise_phrase(pick, best)}")
        line = (f"- **{what} within 1 point of the best accuracy** ({best.label}, {_acc(best)}): "
                f"**{pick.label}**, {fmt(pick.means[metric])} ({_acc(pick, with_n=True)}; {verdict}).")
        runners = sorted((r for r in near if r is not pick), key=lambda r: (r.means[metric], r.label))
        if metric == "time/train_s" and runners:
            line += " " + _time_clause(pick, runners[0])
        lines.append(line)
    lines.append("")

    if tiers:
        lines += ["Recommendation per memory budget:", ""]
        for i, (budget, pick) in enumerate(tiers):
            fits = [r for r in rows if r.means["mem/peak_train_bytes"] is not None
                    and r.means["mem/peak_train_bytes"] <= budget]
            cheaper = [p for _, p in tiers[:i] if within_noise(p.accuracy, pick.accuracy) is True]
            if cheaper:
                c = cheaper[0]
                lines.append(f"- **≤ {_mib(budget)}**: use **{c.label}** ({_acc(c, with_n=True)}, "
                             f"{_mib(c.means['mem/peak_train_bytes'])}): {pick.label}'s "
                             f"{100 * (pick.accuracy.mean - c.accuracy.mean):+.1f} pt at this budget is within "
                             "seed noise, so the extra memory buys nothing measurable.")
            else:
                lines.append(f"- **≤ {_mib(budget)}**: use **{pick.label}** ({_acc(pick, with_n=True)}); "
                             f"{_rivals_clause(pick, fits)}")
        lines.append("")
    if all(r.accuracy.n < 2 for r in rows):
        lines += ["Every row here has a single seed (n=1), so seed noise is unknown and none of these "
                  "differences is established; run more seeds (`seed=0,1,2 -m`) before choosing on a gap of a "
                  "point or two.", ""]
    return lines


def _group_section(group: Group, plot: str | None) -> list[str]:
    lines = [f"## {group.title}", "", f"Task `{group.task}`, model `{group.model}`, quantization `{group.quant}`; "
             f"{sum(r.accuracy.n for r in group.rows)} finished runs in {len(group.rows)} rows.", ""]
    if group.reference is None:
        lines += ["No full fine-tuning run (`method=full`) here, so there is no reference row and no deltas.", ""]
    lines += _table(group) + [""]
    if plot:
        lines += [f"![{group.title}: accuracy against peak memory, checkpoint size and train time]({plot})", ""]
    return lines + _selection(group)


def _sweeps_section(studies: list[Study], plots: dict[str, str]) -> list[str]:
    lines = ["## Sweeps", "", "Sweep trials (runs tagged `study`) are kept out of the method tables above: their "
             "settings are chosen by the search, so they are summarized per study instead.", "",
             "| study | objective | trials finished | failed | pruned / killed | running | best value | best trial | "
             "best configuration |", "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for s in studies:
        if s.best is not None:
            settings = {k: v for k, v in s.best.params.items()}
            config = " ".join(f"{k}={settings.get(k, '-')}" for k in s.searched) or "(nothing varied)"
            best = (f"{s.value(s.best):.4g}", s.best.tags.get("trial", "-"), f"`{config}`")
        else:
            best = ("-", "-", "no finished trial")
        lines.append("| " + " | ".join(_cell(c) for c in (
            s.name, f"{s.direction} {s.objective}", str(len(s.finished)), str(s.count("FAILED")),
            str(s.count("KILLED")), str(s.count("RUNNING")), *best)) + " |")
    lines.append("")
    for s in studies:
        if s.name in plots:
            lines += [f"![study {s.name}: objective per trial]({plots[s.name]})", ""]
    return lines


def _counted(values: list[str]) -> str:
    counts = Counter(values)
    if len(counts) == 1:
        return next(iter(counts))
    return ", ".join(f"{v} ({n} run{'s' if n > 1 else ''})" for v, n in sorted(counts.items()))


def _provenance(data: Data) -> list[str]:
    runs = data.runs
    status = Counter(r.status for r in runs)
    in_tables = sum(r.accuracy.n for g in data.groups for r in g.rows)
    ends = [r.end_time for r in runs if r.end_time]
    lines = ["## Provenance", "",
             f"- Store: `{data.uri}`; experiment{'s' if len(data.experiments) > 1 else ''} "
             f"{', '.join(f'`{e}`' for e in data.experiments)}.",
             f"- Runs: {len(runs)} ({', '.join(f'{n} {s}' for s, n in sorted(status.items()))}); "
             f"{in_tables} in the method tables, {len(data.sweep_runs)} sweep runs, "
             f"{len(data.superseded)} FINISHED runs superseded by a later run with the same settings and seed.",
             f"- Dates (UTC): first run started {_date(runs[0].start_time)}, last run ended "
             f"{_date(max(ends) if ends else None)}."]
    with_hw = [r for r in runs if "device_name" in r.tags]
    if with_hw:
        lines.append("- Hardware: " + _counted([
            f"{r.tags['device_name']} (device {r.tags.get('device', '?')}, {r.tags.get('cpu_count', '?')} CPU cores, "
            f"torch threads: {r.tags.get('torch_threads', '?')})" for r in with_hw]) + ".")
        sources = [r.tags["mem_source"] for r in with_hw if "mem_source" in r.tags]
        if sources:
            lines.append(f"- Peak memory measured as: {_counted(sources)} (README: `mem/peak_train_bytes`).")
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
            lines.append("| " + " | ".join(_cell(c) for c in (r.name, r.status, _date(r.start_time), reason)) + " |")
        lines.append("")
    return lines


def render(data: Data, studies: list[Study], group_plots: dict[str, str], sweep_plots: dict[str, str]) -> str:
    finished = sum(r.accuracy.n for g in data.groups for r in g.rows)
    exps = ", ".join(f"`{e}`" for e in data.experiments)
    lines = [f"# Which PEFT method? Report on {exps}", "",
             f"Computed by `python -m bench.report` from {finished} finished runs in the MLflow store "
             f"`{data.uri}`. The same runs give the same report, byte for byte.", "",
             f"**How to read it.** Accuracy is `{ACCURACY}` on the task's test split after the last step, in %: the "
             "mean over seeds ± the half-width of its 95 % confidence interval (Student t, n − 1 degrees of "
             "freedom); one seed (n=1) shows no interval. The other columns are means over seeds, defined in the "
             "README (*What every run records in MLflow*). A row is on the Pareto frontier of a cost (peak train "
             "memory, checkpoint size, train time) when no other row is at least as accurate and at most as "
             "costly, one of the two strictly. Against full fine-tuning (`method=full`, the reference row in "
             "bold, when present) accuracy differs in points and costs as ratios (×). Two accuracies are "
             "*within seed noise* when their 95 % intervals overlap; an interval wider than the accuracy itself "
             "means the seeds disagree wildly (an unstable method or setting), not a measurement error.", ""]
    if not data.groups:
        lines += ["No FINISHED runs with `eval/accuracy` outside sweeps: there is nothing to compare yet.", ""]
    links = ([f"[{g.title}](#{_anchor(g.title)})" for g in data.groups] + (["[Sweeps](#sweeps)"] if studies else [])
             + ["[Provenance](#provenance)"])
    lines += ["Contents: " + ", ".join(links) + ".", ""]
    for g in data.groups:
        lines += _group_section(g, group_plots.get(g.slug))
    if studies:
        lines += _sweeps_section(studies, sweep_plots)
    lines += _provenance(data)
    return "\n".join(lines).rstrip("\n") + "\n"


def _anchor(title: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces to hyphens."""
    return "".join(c for c in title.lower() if c.isalnum() or c in " -_").replace(" ", "-")


def write(text: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
