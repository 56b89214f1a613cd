"""The "Tuned comparison" section: the runs of a `python -m bench.compare` campaign (bench/sweep/compare.py), found
by their tags, never by their settings.

Tags: `compare` (the campaign's name) and `compare_role`: `study` on the parent run of each method's Optuna study
(its `sweep/*` metrics are the tuning cost), `tuned` on the re-runs of a method's selected configuration over
seeds, `default` on the method at its defaults over the same seeds, `front` (with `compare_trial`) on the re-runs
of each point of a multi-objective study's Pareto front.

Per campaign and method: the selected configuration (the settings where the tuned runs differ from the default
runs), test accuracy at the defaults and tuned (the seed interval and the test-sampling interval of the tables,
bench/report/stats.py), the paired test of tuned against defaults, the tuned runs' costs, and the tuning cost
(trials, training steps, seconds of the study). Then the paired tests between the tuned methods (and the same
pairs at their defaults), and whether the ranking of methods by mean test accuracy changed with tuning; a swap is
only called a change of ranking when the paired test puts the two tuned methods apart.
"""
from __future__ import annotations

import itertools
import math
from collections import defaultdict
from dataclasses import dataclass, field

from bench.core import metrics as M
from bench.fmt import human_bytes
from bench.report.data import ACCURACY, Data, Group, Row, make_row
from bench.report.runs import RunRecord, latest_per_seed, run_settings, seed_order
from bench.report.wording import acc, cell, memory_name, mib, pt, sampling, secs

TAG, ROLE, TRIAL_TAG = "compare", "compare_role", "compare_trial"   # bench/sweep/compare.py sets them
STUDY, TUNED, DEFAULT, FRONT = "study", "tuned", "default", "front"
COST = ("sweep/finished_trials", "sweep/complete_trials", "sweep/pruned_trials", "sweep/fail_trials",
        "sweep/train_steps", "sweep/trial_seconds")


@dataclass
class MethodResult:
    method: str
    default: Row | None
    tuned: Row | None                        # the selected configuration over seeds (one objective)
    front: list[Row] = field(default_factory=list)   # the Pareto front's points over seeds (several objectives)
    study: RunRecord | None = None           # the parent run of its study: the tuning cost
    config: str = ""                         # what tuning changed, "train.lr 0.001 → 0.0032, method.r 8 → 16"

    @property
    def cost(self) -> dict[str, float]:
        return {k: self.study.metrics[k] for k in COST if self.study is not None and k in self.study.metrics}


@dataclass
class Campaign:
    name: str
    group: Group                             # every row (defaults, tuned, front): the paired tests
    methods: list[MethodResult]

    @property
    def tuned(self) -> list[MethodResult]:
        return [m for m in self.methods if m.tuned is not None]


def changed_settings(tuned: RunRecord, default: RunRecord | None, searched: list[str] = ()) -> str:
    """What tuning chose: each searched key (the study's) and every other setting where `tuned` differs from
    `default` (the method's own config), "key default → tuned", or "key value (= default)" when it kept it."""
    a = {k: v for k, v in run_settings(tuned).items() if k != "hardware"}
    b = {} if default is None else {k: v for k, v in run_settings(default).items() if k != "hardware"}
    keys = sorted({k for k in a if b.get(k) != a[k]} | {k for k in searched if k in a})
    parts = [f"{k} {_num(b[k])} → {_num(a[k])}" if k in b and b[k] != a[k] else
             f"{k} {_num(a[k])}" + (" (= default)" if k in b else "") for k in keys]
    return ", ".join(parts) or "the defaults"


def searched_keys(study: RunRecord | None) -> list[str]:
    """The config keys a study searched: its parent run's `best.<key>` tags (bench/report/sweep_outputs.py)."""
    return [] if study is None else sorted(k[len("best."):] for k in study.tags if k.startswith("best."))


def _num(text: str) -> str:
    try:
        v = float(text)
    except (TypeError, ValueError):
        return str(text)
    return str(int(v)) if v.is_integer() and "e" not in str(text) and abs(v) < 1e6 else f"{v:.3g}"


def campaigns(data: Data) -> list[Campaign]:
    """Every campaign in the runs, by name. Runs enter when FINISHED with test/accuracy (the tables' rule)."""
    by_name: dict[str, list[RunRecord]] = defaultdict(list)
    for r in data.runs:
        if TAG in r.tags:
            by_name[r.tags[TAG]].append(r)
    return [c for c in (_campaign(name, by_name[name], data) for name in sorted(by_name)) if c is not None]


def _finished(runs: list[RunRecord]) -> list[RunRecord]:
    return [r for r in runs if r.status == "FINISHED" and math.isfinite(r.metrics.get(ACCURACY, math.nan))]


def _campaign(name: str, runs: list[RunRecord], data: Data) -> Campaign | None:
    by: dict[tuple[str, str], list[RunRecord]] = defaultdict(list)
    for r in runs:
        method = r.tags.get("compare_method") if r.tags.get(ROLE) == STUDY else r.tags.get("method")
        by[(r.tags.get(ROLE, ""), method or "?")].append(r)
    methods = sorted({m for role, m in by if role in (TUNED, DEFAULT, FRONT, STUDY)})
    rows: list[Row] = []
    results = []
    for m in methods:
        default = _row(f"{m} (default)", m, _finished(by[(DEFAULT, m)]), data)
        tuned = _row(f"{m} (tuned)", m, _finished(by[(TUNED, m)]), data)
        points: dict[str, list[RunRecord]] = defaultdict(list)
        for r in _finished(by[(FRONT, m)]):
            points[r.tags.get(TRIAL_TAG, "?")].append(r)
        front = [row for t in sorted(points, key=seed_order)
                 if (row := _row(f"{m} (front t{t})", m, points[t], data)) is not None]
        studies = sorted(by[(STUDY, m)], key=lambda r: (r.start_time, r.run_id))
        result = MethodResult(m, default, tuned, front, studies[-1] if studies else None)
        if tuned is not None:
            result.config = changed_settings(tuned.runs[0], default.runs[0] if default else None,
                                             searched_keys(result.study))
        rows += [r for r in (default, tuned, *front) if r is not None]
        results.append(result)
    if not rows:
        return None
    task, model, quant = rows[0].runs[0].key
    return Campaign(name, Group(task, model, quant, rows, reference=None), results)


def _row(label: str, method: str, runs: list[RunRecord], data: Data) -> Row | None:
    if not runs:
        return None
    kept, _ = latest_per_seed(runs)
    return make_row(label, method, kept, data.read)


# --- the ranking ---------------------------------------------------------------------------------------------
def ranking(rows: list[tuple[str, Row]]) -> list[str]:
    """Methods by mean test accuracy, best first (ties: by name)."""
    return [m for m, row in sorted(rows, key=lambda mr: (-mr[1].accuracy.mean, mr[0]))]


def swaps(before: list[str], after: list[str]) -> list[tuple[str, str]]:
    """Pairs (a, b) with a above b after tuning and below it before, in the tuned order."""
    pos = {m: i for i, m in enumerate(before)}
    return [(a, b) for a, b in itertools.combinations(after, 2) if a in pos and b in pos and pos[a] > pos[b]]


def both(campaign: Campaign) -> list[MethodResult]:
    """The methods with runs at their defaults and tuned (the ranking compares these)."""
    return [m for m in campaign.methods if m.default is not None and m.tuned is not None]


def ranking_verdict(campaign: Campaign) -> tuple[list[str], list[str], list[tuple[str, str, bool | None]]]:
    """(ranking at defaults, ranking tuned, every swapped pair with whether its tuned paired test puts the two
    apart: True apart, False within noise, None unavailable)."""
    methods = both(campaign)
    before = ranking([(m.method, m.default) for m in methods])
    after = ranking([(m.method, m.tuned) for m in methods])
    by = {m.method: m for m in methods}
    out = []
    for a, b in swaps(before, after):
        found = campaign.group.paired(by[a].tuned, by[b].tuned)
        out.append((a, b, None if isinstance(found, str) else not found.within_noise))
    return before, after, out


def tuning_cost(results: list[MethodResult]) -> dict[str, float]:
    """The campaign's tuning cost summed over methods."""
    total: dict[str, float] = defaultdict(float)
    for m in results:
        for k, v in m.cost.items():
            total[k] += v
    return dict(total)



# --- the section ---------------------------------------------------------------------------------------------
def _acc(row: Row | None) -> str:
    return "-" if row is None else f"{acc(row)} (n={row.accuracy.n})"


def _delta(campaign: Campaign, a: Row | None, b: Row | None) -> str:
    """a − b by the paired test, in words."""
    if a is None or b is None:
        return "-"
    found = campaign.group.paired(a, b)
    if isinstance(found, str):
        return f"{pt(a.accuracy.mean - b.accuracy.mean)} (paired test unavailable: {found})"
    noise = "within noise" if found.within_noise else "beyond noise"
    if found.p_value is not None:
        return f"{pt(found.diff)}, McNemar p = {found.p_value:.3g}: {noise}"
    return f"{pt(found.diff)} (95 % CI {pt(found.low)} to {pt(found.high)}): {noise}"


def _cost_cells(campaign: Campaign, row: Row | None) -> list[str]:
    if row is None:
        return ["-"] * 4
    m = row.means
    tp = m[M.PARAMS_TRAINABLE_PCT]
    return ["-" if tp is None else f"{tp:.3g}", mib(m[campaign.group.memory_metric]), secs(m[M.TIME_TRAIN]),
            "-" if m[M.CKPT_BYTES] is None else human_bytes(m[M.CKPT_BYTES])]


def _tuning_cells(result: MethodResult) -> list[str]:
    c = result.cost
    if not c:
        return ["-", "-", "-"]
    trials = (f"{c.get('sweep/finished_trials', 0):.0f} ({c.get('sweep/complete_trials', 0):.0f} complete, "
              f"{c.get('sweep/pruned_trials', 0):.0f} pruned, {c.get('sweep/fail_trials', 0):.0f} failed)")
    return [trials, f"{c.get('sweep/train_steps', 0):,.0f}", secs(c.get("sweep/trial_seconds"))]


def _header(head: list[str]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|"]


def _main_table(campaign: Campaign) -> list[str]:
    memory = memory_name(campaign.group)
    head = ["method", "selected configuration (default → tuned)", "test accuracy at defaults (seeds, 95 % CI)",
            "tuned: test accuracy (seeds, 95 % CI)", "tuned: test sampling (Wilson 95 %)",
            "Δ tuned − defaults (paired)", "trainable %", memory, "train time", "checkpoint",
            "tuning: trials", "tuning: training steps", "tuning: time in trials"]
    lines = _header(head)
    order = sorted(campaign.methods, key=lambda m: (m.tuned is None, -(m.tuned.accuracy.mean if m.tuned else 0),
                                                    m.method))
    for r in order:
        if r.tuned is None and r.front:
            continue   # several objectives: the front table below
        cells = [r.method, r.config or ("no tuned runs" if r.tuned is None else "-"), _acc(r.default), _acc(r.tuned),
                 "-" if r.tuned is None else sampling(r.tuned), _delta(campaign, r.tuned, r.default),
                 *_cost_cells(campaign, r.tuned), *_tuning_cells(r)]
        lines.append("| " + " | ".join(cell(c) for c in cells) + " |")
    return lines if len(lines) > 2 else []


def _pairs_table(campaign: Campaign) -> list[str]:
    methods = sorted(both(campaign), key=lambda m: (-m.tuned.accuracy.mean, m.method))
    if len(methods) < 2:
        return []
    lines = ["Paired tests between the methods (A − B on the same test questions, runs paired by seed), tuned and "
             "at their defaults:", "", *_header(["A", "B", "tuned: A − B", "defaults: A − B"])]
    for a, b in itertools.combinations(methods, 2):
        lines.append("| " + " | ".join(cell(c) for c in (a.method, b.method, _delta(campaign, a.tuned, b.tuned),
                                                          _delta(campaign, a.default, b.default))) + " |")
    return lines + [""]


def _ranking_lines(campaign: Campaign) -> list[str]:
    if len(both(campaign)) < 2:
        return []
    before, after, swapped = ranking_verdict(campaign)
    head = (f"**Ranking by mean test accuracy.** At the defaults: {' > '.join(before)}. Tuned: {' > '.join(after)}. ")
    if not swapped:
        return [head + "The ranking did not change with tuning.", ""]
    apart = [f"{a} over {b}" for a, b, v in swapped if v]
    noise = [f"{a} and {b}" for a, b, v in swapped if v is False]
    unknown = [f"{a} and {b}" for a, b, v in swapped if v is None]
    parts = [f"The order changed for {len(swapped)} pair{'s' if len(swapped) > 1 else ''}"]
    if apart:
        parts.append(f"beyond noise (the tuned paired test puts them apart): {', '.join(apart)}")
    if noise:
        parts.append(f"within noise (the tuned paired test cannot tell them apart, so no change of ranking is "
                     f"claimed): {', '.join(noise)}")
    if unknown:
        parts.append(f"unresolved (paired test unavailable): {', '.join(unknown)}")
    verdict = ("The ranking changed with tuning." if apart else
               "The mean order moved, but no swap is beyond noise: the ranking did not change beyond noise.")
    return [head + "; ".join(parts) + ". " + verdict, ""]


def _front_table(campaign: Campaign) -> list[str]:
    fronts = [m for m in campaign.methods if m.front]
    if not fronts:
        return []
    lines = ["Several objectives: each method's Pareto front (on the validation objectives of its study) re-run over "
             "the seeds; the points ranked by their mean test accuracy, with their costs:", "",
             *_header(["method", "front point (trial) and configuration", "test accuracy (seeds, 95 % CI)",
                       "test sampling (Wilson 95 %)", "trainable %", memory_name(campaign.group), "train time",
                       "checkpoint"])]
    for m in fronts:
        if m.default is not None:
            lines.append("| " + " | ".join(cell(c) for c in (m.method, "at its defaults", _acc(m.default),
                                                              sampling(m.default), *_cost_cells(campaign, m.default)))
                         + " |")
        for row in sorted(m.front, key=lambda r: (-r.accuracy.mean, r.label)):
            config = changed_settings(row.runs[0], m.default.runs[0] if m.default else None, searched_keys(m.study))
            lines.append("| " + " | ".join(cell(c) for c in (m.method, f"{row.label}: {config}", _acc(row),
                                                              sampling(row), *_cost_cells(campaign, row))) + " |")
    return lines + [""]


def section(found: list[Campaign], plots: dict[str, str] | None = None) -> list[str]:
    """The report's "Tuned comparison" section, one part per campaign; nothing without a campaign."""
    if not found:
        return []
    lines = ["## Tuned comparison", "",
             "Runs of `python -m bench.compare` (tag `compare`): each method tuned by its own Optuna study over the "
             "search space of its method YAML (`search:`), with the same number of trials and the same training "
             "budget per trial, selected on the validation split; the selected configuration then re-run over "
             "seeds that no trial trained with, each run tested once, next to the method at its defaults over the "
             "same seeds. Intervals and paired tests read as in the tables above. *Tuning* is the study's cost: "
             "finished trials, the training steps they ran (pruned trials up to their prune) and the seconds spent "
             "in them. Costs are the tuned runs' means.", ""]
    for c in found:
        total = tuning_cost(c.methods)
        lines += [f"### Campaign `{c.name}` ({c.group.task} · {c.group.model} · {c.group.quant})", ""]
        main = _main_table(c)
        lines += main + ([""] if main else [])
        if total:
            lines += [f"Tuning, all methods: {total.get('sweep/finished_trials', 0):.0f} finished trials, "
                      f"{total.get('sweep/train_steps', 0):,.0f} training steps, "
                      f"{secs(total.get('sweep/trial_seconds'))} in trials.", ""]
        if plots and c.name in plots:
            lines += [f"![campaign {c.name}: test accuracy at the defaults and tuned]({plots[c.name]})", ""]
        lines += _ranking_lines(c) + _pairs_table(c) + _front_table(c)
    return lines
