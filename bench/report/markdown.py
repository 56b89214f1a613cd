"""The report's Markdown: per task × model × quant a table, plots and the method-selection answer; then sweeps
and provenance. Everything here is a function of the runs alone (stable order, no generation time).

Wording rules (definitions: bench/report/stats.py, told to the reader in HOW_TO_READ):
- two methods are "within noise" only when their paired test is not significant; without one, the report says
  "paired test unavailable" and makes no claim;
- a cost claim ("fits", "the only method that fits", "fastest", "smallest") needs a difference beyond the
  figure's measurement noise; otherwise the report says "within measurement noise".
"""
from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

from bench.core import metrics as M
from bench.fmt import human_bytes
from bench.report.data import ACCURACY, Data, Group, Row
from bench.report.stats import N_RESAMPLES, RESOLUTION, PairedTest, cost_spread, costs_apart
from bench.report.sweeps import Study

ONE_POINT = 0.01  # "within 1 point": accuracy is a fraction; one percentage point
LISTED = 20       # provenance names at most this many runs per line

HOW_TO_READ = (
    f"**How to read it.** The headline is test accuracy (`{ACCURACY}`), in %: every run scores the task's test "
    f"split once, at its end, with the model selected on the validation split (`{M.VAL_PREFIX}*`); nothing is "
    "selected on the test split. Each row shows two sources of noise. *Seeds*: the mean over seeds ± the half-width of "
    "its 95 % confidence interval (Student t, n − 1 degrees of freedom); one seed (n=1) shows no interval; an interval "
    "wider than the accuracy itself means the seeds disagree wildly (an unstable method or setting). "
    "*Test sampling*: the Wilson score 95 % interval of the pooled accuracy (the row's correct answers over all "
    "its answers) with n = the number of distinct test examples. Every seed answers the same test questions, so "
    "pooling seeds adds no independent questions and n is not multiplied by the seeds: this interval is how far "
    "another test set of the same size could move the figure. Two methods are *within noise* of each other "
    "when a paired test on the same test examples (read from each run's `predictions/test.parquet`) is not "
    "significant at 5 %: with one seed each, the exact McNemar test on the examples both runs scored "
    "(p ≥ 0.05); with several seeds, a paired bootstrap over seeds and examples (runs paired by seed; each of "
    f"{N_RESAMPLES:,} resamples draws seeds and examples with replacement, the same ones for both methods, and "
    "takes the difference of mean accuracy) whose 95 % interval of the difference contains 0. Where a run's "
    "predictions are missing the report says *paired test unavailable* and claims nothing. Memory: on CPU the "
    f"figure that separates methods is *train growth* (`{M.MEM_TRAIN_GROWTH}`: peak resident memory during "
    "training minus the resident memory right before the first step, i.e. gradients, optimizer state and "
    f"activations), shown next to *peak train (process)* (`{M.MEM_PEAK_TRAIN}`, the whole process's peak, "
    f"weights and libraries included); on CUDA it is *peak train (allocated)* (`{M.MEM_PEAK_TRAIN}`, peak "
    "allocated). Budgets, the memory Pareto frontier and the selection use the separating figure. A cost's "
    "*run-to-run spread* is its max − min over a row's seeds (one seed: "
    f"{100 * RESOLUTION:.0f} % of the figure, a stated resolution); two rows' costs are *within measurement "
    "noise* when they differ by no more than the larger spread, and then the report claims no \"fits\", "
    "\"fastest\" or \"smallest\" between them. The other columns are means over seeds, defined in the README "
    "(*What every run records in MLflow*). A row is on the Pareto frontier of a cost (memory, checkpoint size, "
    "train time) when no other row has at least its mean test accuracy and at most its mean cost, one of the two "
    "strictly. Against full fine-tuning (`method=full`, the reference row in bold, when present) accuracy "
    "differs in points and costs as ratios (×).")


# --- formatting ---------------------------------------------------------------------------------------------
def _pct(v: float) -> str:
    return f"{100 * v:.1f}"


def _pt(v: float) -> str:
    return f"{100 * v:+.1f} pt"


def _acc(row: Row, with_n: bool = False) -> str:
    est = row.accuracy
    text = _pct(est.mean) + (f" ± {_pct(est.half_width)}" if est.half_width is not None else "") + " %"
    return f"{text}, n={est.n}" if with_n else text


def _sampling(row: Row) -> str:
    found = row.test_sampling
    if found is None:
        return "-"
    low, high, n = found
    return f"{_pct(low)}–{_pct(high)} % (n={n:,})"


def _mib(v: float | None) -> str:
    return "-" if v is None else f"{v / 2**20:,.0f} MiB"


def _secs(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f} s"


def _ratio(v: float | None, ref: float | None) -> str:
    return "" if v is None or not ref else f" (×{v / ref:.2g})"


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _date(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(ms / 1000)) if ms else "-"


def _listed(names: list[str]) -> str:
    more = len(names) - LISTED
    return ", ".join(names[:LISTED]) + (f" and {more} more" if more > 0 else "")


# --- accuracy: the paired test ------------------------------------------------------------------------------
def _test_detail(t: PairedTest) -> str:
    seeds = (f"seed {t.seeds[0]}" if len(t.seeds) == 1 else f"seeds {', '.join(t.seeds)}" if len(t.seeds) <= 5
             else f"{len(t.seeds)} seeds")
    if t.p_value is not None:
        return (f"McNemar p = {t.p_value:.3g}, {t.a_only} vs {t.b_only} discordant of {t.examples:,} examples, "
                f"{seeds}")
    return (f"paired bootstrap {_pt(t.diff)}, 95 % CI {_pt(t.low)} to {_pt(t.high)}, {seeds} × "
            f"{t.examples:,} examples")


def _within(group: Group, a: Row, b: Row) -> bool | None:
    """The paired test's verdict: True within noise, False beyond it, None unavailable."""
    found = group.paired(a, b)
    return None if isinstance(found, str) else found.within_noise


def _verdict(group: Group, a: Row, b: Row) -> str:
    """`a` against `b` in words: within noise / beyond noise / unavailable, with the test's figures."""
    found = group.paired(a, b)
    if isinstance(found, str):
        return f"paired test unavailable: {found}"
    return f"{'within' if found.within_noise else 'beyond'} noise ({_test_detail(found)})"


# --- costs: measurement noise -------------------------------------------------------------------------------
def _memory_name(group: Group) -> str:
    return "peak train (allocated)" if group.cuda else "train growth"


def _apart(a: Row, b: Row, metric: str) -> bool:
    return costs_apart(a.values[metric], b.values[metric])


def _spread(row: Row, metric: str, fmt) -> str:
    values = row.values[metric]
    return f"{fmt(cost_spread(values))}" + (f" ({100 * RESOLUTION:.0f} %, one seed)" if len(values) == 1 else "")


# --- the table ----------------------------------------------------------------------------------------------
def _table(group: Group) -> list[str]:
    ref = group.reference
    memory = [group.memory_metric] if group.cuda else [M.MEM_TRAIN_GROWTH, M.MEM_PEAK_TRAIN]
    memory_head = ["peak train (allocated)"] if group.cuda else ["train growth", "peak train (process)"]
    head = (["method", "seeds", "test accuracy (seeds, 95 % CI)", "test sampling (Wilson 95 %)"]
            + (["Δ test accuracy vs full"] if ref is not None else [])
            + ["trainable %", *memory_head, "train time", "checkpoint", "throughput", "Pareto frontier"])
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 2) + ["---"]) + "|"]
    for row in group.rows:
        m, is_ref = row.means, row is ref
        rm = ref.means if ref is not None and not is_ref else {}
        delta = [] if ref is None else [
            "reference" if is_ref else _pt(row.accuracy.mean - ref.accuracy.mean)]
        tp, tput = m[M.PARAMS_TRAINABLE_PCT], m[M.THROUGHPUT_TOKENS]
        cells = [f"**{row.label}**" if is_ref else row.label,
                 f"n={row.accuracy.n} ({', '.join(row.seeds)})",
                 _acc(row), _sampling(row), *delta,
                 "-" if tp is None else f"{tp:.3g}",
                 *(_mib(m[k]) + _ratio(m[k], rm.get(k)) for k in memory),
                 _secs(m[M.TIME_TRAIN]) + _ratio(m[M.TIME_TRAIN], rm.get(M.TIME_TRAIN)),
                 human_bytes(m[M.CKPT_BYTES]) + _ratio(m[M.CKPT_BYTES], rm.get(M.CKPT_BYTES)),
                 "-" if tput is None else f"{tput:,.0f} tok/s",
                 ", ".join(row.pareto) or "-"]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return lines


# --- which method to choose ---------------------------------------------------------------------------------
def _memory_tiers(group: Group) -> list[tuple[float, Row]]:
    """Each memory figure on the memory frontier is a budget; its answer is the best row that fits in it."""
    metric = group.memory_metric
    rows = [r for r in group.rows if r.means[metric] is not None]
    budgets = sorted({r.means[metric] for r in rows if "memory" in r.pareto})
    tiers = []
    for b in budgets:
        fits = [r for r in rows if r.means[metric] <= b]
        tiers.append((b, min(fits, key=lambda r: (-r.accuracy.mean, r.means[metric], r.label))))
    return tiers


def _budget_rows(group: Group, budget: float) -> tuple[list[Row], list[Row]]:
    """(rows whose mean figure is at most the budget, rows above it by no more than the measurement noise
    against a row that sets the budget: whether those fit is not resolved)."""
    metric = group.memory_metric
    rows = [r for r in group.rows if r.means[metric] is not None]
    setters = [r for r in rows if r.means[metric] == budget]
    fits = [r for r in rows if r.means[metric] <= budget]
    unresolved = [r for r in rows if r.means[metric] > budget and not any(_apart(r, s, metric) for s in setters)]
    return fits, unresolved


def _rivals_clause(group: Group, pick: Row, fits: list[Row], unresolved: list[Row]) -> str:
    name, metric = _memory_name(group), group.memory_metric
    others = [r for r in fits if r is not pick] + unresolved
    if not others:
        return (f"the only method whose measured {name} fits this budget: every other row needs more, beyond "
                "measurement noise.")
    parts = []
    tied = [r for r in others if _within(group, pick, r) is True]
    if tied:
        parts.append("within noise of it (paired test): " + "; ".join(
            f"{r.label} ({_acc(r)}; {_test_detail(group.paired(pick, r))})" for r in tied)
            + "; choose among them by checkpoint size or speed")
    for r in (r for r in others if _within(group, pick, r) is False):
        test = group.paired(pick, r)
        parts.append(f"{'ahead of' if test.diff > 0 else 'behind'} {r.label} beyond noise ({_test_detail(test)})")
    unknown = [r for r in others if _within(group, pick, r) is None]
    if unknown:
        parts.append("paired test unavailable against " + ", ".join(
            f"{r.label} ({_pt(r.accuracy.mean - pick.accuracy.mean)}: {group.paired(pick, r)})" for r in unknown)
            + ", so no claim either way")
    if unresolved:
        parts.append(", ".join(f"{r.label}'s {name} ({_mib(r.means[metric])}, spread {_spread(r, metric, _mib)})"
                               for r in unresolved)
                     + " exceeds this budget by less than the measurement noise: whether it fits is not resolved")
    return "; ".join(parts) + "."


def _budget_table(group: Group, tiers: list[tuple[float, Row]]) -> list[str]:
    name = _memory_name(group)
    lines = [f"Best test accuracy within each {name} budget the data supports (the budgets are the {name} "
             "figures on the memory frontier):", "",
             f"| budget: {name} | best method | test accuracy (seeds, 95 % CI) | test sampling (Wilson 95 %) | "
             "within noise of it (paired test) | fit not resolved (within measurement noise of the budget) |",
             "|---:|---|---:|---:|---|---|"]
    for budget, pick in tiers:
        fits, unresolved = _budget_rows(group, budget)
        others = [r for r in fits if r is not pick] + unresolved
        tied = [r.label for r in others if _within(group, pick, r) is True]
        unknown = [r.label for r in others if _within(group, pick, r) is None]
        noise = "; ".join(([", ".join(tied)] if tied else [])
                          + ([f"paired test unavailable: {', '.join(unknown)}"] if unknown else [])) or "none"
        lines.append("| " + " | ".join(_cell(c) for c in (
            f"≤ {_mib(budget)}", pick.label, _acc(pick, with_n=True), _sampling(pick), noise,
            ", ".join(r.label for r in unresolved) or "none")) + " |")
    lines.append("")
    metric = group.memory_metric
    rows = [r for r in group.rows if r.means[metric] is not None]
    if len(rows) > 1 and not any(_apart(a, b, metric) for a in rows for b in rows if a is not b):
        lines += [f"No two rows' {name} figures differ by more than their run-to-run spread: within measurement "
                  "noise, the memory budget does not separate these methods, so weigh accuracy, checkpoint size and "
                  "time instead.", ""]
    return lines


def _cheapest_line(group: Group, best: Row, metric: str, what: str, fmt) -> str | None:
    """The cheapest row by `metric` among those within 1 point of the best accuracy, claimed only beyond noise."""
    near = [r for r in group.rows if r.accuracy.mean >= best.accuracy.mean - ONE_POINT - 1e-12
            and r.means[metric] is not None]
    if not near:
        return None
    pick = min(near, key=lambda r: (r.means[metric], -r.accuracy.mean, r.label))
    accuracy = "the best itself" if pick is best else (
        f"{_pt(pick.accuracy.mean - best.accuracy.mean)} against the best, {_verdict(group, pick, best)}")
    head = f"- **{what} within 1 point of the best test accuracy** ({best.label}, {_acc(best)}): "
    tied = [r for r in near if r is not pick and not _apart(r, pick, metric)]
    if tied:
        shown = ", ".join(f"{r.label} ({fmt(r.means[metric])}, spread {_spread(r, metric, fmt)})" for r in tied)
        return (head + f"no single one: **{pick.label}** ({fmt(pick.means[metric])}, spread "
                f"{_spread(pick, metric, fmt)}; {_acc(pick, with_n=True)}; {accuracy}) and {shown} are within "
                "measurement noise of each other.")
    line = head + f"**{pick.label}**, {fmt(pick.means[metric])} ({_acc(pick, with_n=True)}; {accuracy})."
    runners = sorted((r for r in near if r is not pick), key=lambda r: (r.means[metric], r.label))
    if runners:
        line += (f" Next: {runners[0].label} ({fmt(runners[0].means[metric])}), beyond measurement noise (the gap "
                 "exceeds both rows' run-to-run spread).")
    return line


def _recommendations(group: Group, tiers: list[tuple[float, Row]]) -> list[str]:
    name, metric = _memory_name(group), group.memory_metric
    lines = ["Recommendation per memory budget:", ""]
    for i, (budget, pick) in enumerate(tiers):
        cheaper = [p for _, p in tiers[:i] if p is not pick and _within(group, pick, p) is True]
        if cheaper:
            c = cheaper[0]
            why = ("so the extra memory buys nothing measurable" if _apart(pick, c, metric) else
                   f"and their {name} are within measurement noise of each other: either will do")
            lines.append(f"- **≤ {_mib(budget)}**: use **{c.label}** ({_acc(c, with_n=True)}, "
                         f"{_mib(c.means[metric])}): {pick.label}'s {_pt(pick.accuracy.mean - c.accuracy.mean)} at "
                         f"this budget is within noise ({_test_detail(group.paired(pick, c))}), {why}.")
        else:
            fits, unresolved = _budget_rows(group, budget)
            lines.append(f"- **≤ {_mib(budget)}**: use **{pick.label}** ({_acc(pick, with_n=True)}); "
                         f"{_rivals_clause(group, pick, fits, unresolved)}")
    return lines + [""]


def _selection(group: Group) -> list[str]:
    rows = group.rows
    best = min(rows, key=lambda r: (-r.accuracy.mean, r.label))
    lines = [f"### Which method to choose: {group.title}", ""]
    tiers = _memory_tiers(group)
    if tiers:
        lines += _budget_table(group, tiers)
    for metric, what, fmt in ((M.CKPT_BYTES, "Smallest checkpoint", human_bytes), (M.TIME_TRAIN, "Fastest", _secs)):
        line = _cheapest_line(group, best, metric, what, fmt)
        if line:
            lines.append(line)
    lines.append("")
    if tiers:
        lines += _recommendations(group, tiers)
    if all(r.accuracy.n < 2 for r in rows):
        lines += ["Every row here has a single seed (n=1): the paired tests cover which test questions were "
                  "asked, not how much another seed would move a method, and no cost has a measured spread; run "
                  "more seeds (`seed=0,1,2 -m`) before choosing on a gap of a point or two.", ""]
    return lines


def _group_section(group: Group, plot: str | None) -> list[str]:
    figure = (f"`{M.MEM_PEAK_TRAIN}` (peak allocated)" if group.cuda
              else f"`{M.MEM_TRAIN_GROWTH}` (train growth; CPU)")
    lines = [f"## {group.title}", "", f"Task `{group.task}`, model `{group.model}`, quantization `{group.quant}`; "
             f"{sum(r.accuracy.n for r in group.rows)} finished runs in {len(group.rows)} rows; memory figure "
             f"that separates the methods: {figure}.", ""]
    if group.reference is None:
        lines += ["No full fine-tuning run (`method=full`) here, so there is no reference row and no deltas.", ""]
    lines += _table(group) + [""]
    if plot:
        lines += [f"![{group.title}: test accuracy against {_memory_name(group)}, checkpoint size and train time]"
                  f"({plot})", ""]
    return lines + _selection(group)


# --- sweeps and provenance ----------------------------------------------------------------------------------
def _sweeps_section(studies: list[Study], plots: dict[str, str]) -> list[str]:
    lines = ["## Sweeps", "", "Sweep trials (runs tagged `study`) are kept out of the method tables above: their "
             "settings are chosen by the search, so they are summarized per study instead. A study selects on its "
             f"objective (a `{M.VAL_PREFIX}*` metric, or a cost); the best trial's "
             f"`{ACCURACY}` is the one test evaluation of the chosen configuration, shown beside the objective and "
             "never used for selection.", "",
             "| study | objective | trials finished | failed | pruned / killed | running | best value | "
             f"best trial's {ACCURACY} | best trial | best configuration |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for s in studies:
        if s.best is not None:
            config = " ".join(f"{k}={s.best.params.get(k, '-')}" for k in s.searched) or "(nothing varied)"
            test = s.test_value(s.best)
            best = (f"{s.value(s.best):.4g}", "-" if test is None else f"{_pct(test)} %",
                    s.best.tags.get("trial", "-"), f"`{config}`")
        else:
            best = ("-", "-", "-", "no finished trial")
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


def _predictions_line(data: Data) -> str:
    rows = [row for g in data.groups for row in g.rows]
    total = sum(len(row.runs) for row in rows)
    missing = [r.name for row in rows for r in row.runs if r.seed not in row.answers]
    line = (f"- Test predictions (`{M.PREDICTIONS_ARTIFACT}`, for the test-sampling intervals and the paired "
            f"tests): read for {total - len(missing)} of the {total} runs in the tables")
    if missing:
        line += f"; missing for {_listed(missing)} (their comparisons say \"paired test unavailable\")"
    if data.remote_error:
        line += f"; downloads stopped after {data.remote_error}"
    return line + "."


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
             f"{len(data.superseded)} FINISHED runs superseded by a later run with the same settings and seed, "
             f"{len(data.old_protocol)} FINISHED runs of the old protocol.",
             f"- Dates (UTC): first run started {_date(runs[0].start_time)}, last run ended "
             f"{_date(max(ends) if ends else None)}."]
    if data.old_protocol:
        lines.append(f"- Old protocol, no `{ACCURACY}` (left out of the tables): "
                     f"{_listed([r.name for r in data.old_protocol])}.")
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
            lines.append("| " + " | ".join(_cell(c) for c in (r.name, r.status, _date(r.start_time), reason)) + " |")
        lines.append("")
    return lines


def render(data: Data, studies: list[Study], group_plots: dict[str, str], sweep_plots: dict[str, str]) -> str:
    finished = sum(r.accuracy.n for g in data.groups for r in g.rows)
    exps = ", ".join(f"`{e}`" for e in data.experiments)
    lines = [f"# Which PEFT method? Report on {exps}", "",
             f"Computed by `python -m bench.report` from {finished} finished runs in the MLflow store "
             f"`{data.uri}`. The same runs give the same report, byte for byte.", "", HOW_TO_READ, ""]
    if not data.groups:
        lines += [f"No FINISHED runs with `{ACCURACY}` outside sweeps: there is nothing to compare yet.", ""]
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
