"""Which method to choose, per group: the best test accuracy within each memory budget the data supports, the
smallest checkpoint and the fastest training within 1 point of the best, and a recommendation per budget. Every
claim follows the wording rules (bench/report/wording.py): accuracy only beyond a paired test's noise, a cost only
beyond its measurement noise."""
from __future__ import annotations

from operator import attrgetter

from bench.core import metrics as M
from bench.fmt import human_bytes
from bench.report.data import Group, Row
from bench.report.wording import (acc, apart, cell, memory_name, mib, pt, sampling, secs, spread, test_detail,
                                  verdict, within)

ONE_POINT = 0.01  # "within 1 point": accuracy is a fraction; one percentage point
LABEL = attrgetter("label")


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
    unresolved = [r for r in rows if r.means[metric] > budget and not any(apart(r, s, metric) for s in setters)]
    return fits, unresolved


def _rivals(group: Group, pick: Row, fits: list[Row], unresolved: list[Row]) -> dict[bool | None, list[Row]]:
    """The other rows at a budget (those that fit, then those whose fit is not resolved) by the paired test's verdict
    against `pick`: True within noise, False beyond it, None unavailable."""
    others = [r for r in fits if r is not pick] + unresolved
    return {verdict: [r for r in others if within(group, pick, r) is verdict] for verdict in (True, False, None)}


def _clause(head: str, rows: list[Row], text, sep: str, tail: str = "") -> list[str]:
    """[head + each row's text joined by sep + tail], or [] when there are no rows."""
    return [head + sep.join(map(text, rows)) + tail] if rows else []


def _rivals_clause(group: Group, pick: Row, fits: list[Row], unresolved: list[Row]) -> str:
    name, metric = memory_name(group), group.memory_metric
    rivals = _rivals(group, pick, fits, unresolved)
    if not any(rivals.values()):
        return (f"the only method whose measured {name} fits this budget: every other row needs more, beyond "
                "measurement noise.")
    parts = _clause("within noise of it (paired test): ", rivals[True],
                    lambda r: f"{r.label} ({acc(r)}; {test_detail(group.paired(pick, r))})", "; ",
                    "; choose among them by checkpoint size or speed")
    for r in rivals[False]:
        test = group.paired(pick, r)
        parts.append(f"{'ahead of' if test.diff > 0 else 'behind'} {r.label} beyond noise ({test_detail(test)})")
    parts += _clause("paired test unavailable against ", rivals[None],
                     lambda r: f"{r.label} ({pt(r.accuracy.mean - pick.accuracy.mean)}: {group.paired(pick, r)})",
                     ", ", ", so no claim either way")
    parts += _clause("", unresolved, lambda r: f"{r.label}'s {name} ({mib(r.means[metric])}, spread "
                                               f"{spread(r, metric, mib)})", ", ",
                     " exceeds this budget by less than the measurement noise: whether it fits is not resolved")
    return "; ".join(parts) + "."


def _budget_table(group: Group, tiers: list[tuple[float, Row]]) -> list[str]:
    name = memory_name(group)
    lines = [f"Best test accuracy within each {name} budget the data supports (the budgets are the {name} "
             "figures on the memory frontier):", "",
             f"| budget: {name} | best method | test accuracy (seeds, 95 % CI) | test sampling (Wilson 95 %) | "
             "within noise of it (paired test) | fit not resolved (within measurement noise of the budget) |",
             "|---:|---|---:|---:|---|---|"]
    for budget, pick in tiers:
        fits, unresolved = _budget_rows(group, budget)
        rivals = _rivals(group, pick, fits, unresolved)
        noise = "; ".join(_clause("", rivals[True], LABEL, ", ")
                          + _clause("paired test unavailable: ", rivals[None], LABEL, ", ")) or "none"
        lines.append("| " + " | ".join(cell(c) for c in (
            f"≤ {mib(budget)}", pick.label, acc(pick, with_n=True), sampling(pick), noise,
            ", ".join(r.label for r in unresolved) or "none")) + " |")
    lines.append("")
    metric = group.memory_metric
    rows = [r for r in group.rows if r.means[metric] is not None]
    if len(rows) > 1 and not any(apart(a, b, metric) for a in rows for b in rows if a is not b):
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
        f"{pt(pick.accuracy.mean - best.accuracy.mean)} against the best, {verdict(group, pick, best)}")
    head = f"- **{what} within 1 point of the best test accuracy** ({best.label}, {acc(best)}): "
    tied = [r for r in near if r is not pick and not apart(r, pick, metric)]
    if tied:
        shown = ", ".join(f"{r.label} ({fmt(r.means[metric])}, spread {spread(r, metric, fmt)})" for r in tied)
        return (head + f"no single one: **{pick.label}** ({fmt(pick.means[metric])}, spread "
                f"{spread(pick, metric, fmt)}; {acc(pick, with_n=True)}; {accuracy}) and {shown} are within "
                "measurement noise of each other.")
    line = head + f"**{pick.label}**, {fmt(pick.means[metric])} ({acc(pick, with_n=True)}; {accuracy})."
    runners = sorted((r for r in near if r is not pick), key=lambda r: (r.means[metric], r.label))
    if runners:
        line += (f" Next: {runners[0].label} ({fmt(runners[0].means[metric])}), beyond measurement noise (the gap "
                 "exceeds both rows' run-to-run spread).")
    return line


def _recommendations(group: Group, tiers: list[tuple[float, Row]]) -> list[str]:
    name, metric = memory_name(group), group.memory_metric
    lines = ["Recommendation per memory budget:", ""]
    for i, (budget, pick) in enumerate(tiers):
        cheaper = [p for _, p in tiers[:i] if p is not pick and within(group, pick, p) is True]
        if cheaper:
            c = cheaper[0]
            why = ("so the extra memory buys nothing measurable" if apart(pick, c, metric) else
                   f"and their {name} are within measurement noise of each other: either will do")
            lines.append(f"- **≤ {mib(budget)}**: use **{c.label}** ({acc(c, with_n=True)}, "
                         f"{mib(c.means[metric])}): {pick.label}'s {pt(pick.accuracy.mean - c.accuracy.mean)} at "
                         f"this budget is within noise ({test_detail(group.paired(pick, c))}), {why}.")
        else:
            fits, unresolved = _budget_rows(group, budget)
            lines.append(f"- **≤ {mib(budget)}**: use **{pick.label}** ({acc(pick, with_n=True)}); "
                         f"{_rivals_clause(group, pick, fits, unresolved)}")
    return lines + [""]


def selection(group: Group) -> list[str]:
    rows = group.rows
    best = min(rows, key=lambda r: (-r.accuracy.mean, r.label))
    lines = [f"### Which method to choose: {group.title}", ""]
    tiers = _memory_tiers(group)
    if tiers:
        lines += _budget_table(group, tiers)
    for metric, what, fmt in ((M.CKPT_BYTES, "Smallest checkpoint", human_bytes), (M.TIME_TRAIN, "Fastest", secs)):
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
