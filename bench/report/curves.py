"""Learning curves: test accuracy against the number of training examples, per data-efficiency campaign.

A campaign is the runs trained on k examples per class (`task.train_per_class` set; bench/report/data.py keeps them
out of the method tables) of one task × model × quant (and kind of run) with the same `train.max_steps`,
`train.batch_size` and `train.epochs`, plus the runs of the tables with those settings that trained on every example
(`task.train_per_class` and `task.max_train_samples` null): the curve's "all" point. One line per method (and
settings, split as the tables split rows), one point per k: the mean test accuracy over seeds with its seed
interval (stats.mean_ci), at x = `train/examples`.

Each line is compared with full fine-tuning's (`method=full`) at every k both have (`compare`): *ahead* / *behind*
when the paired test on the same test examples (stats.py, via predictions.paired: runs paired by seed, and one seed
draws the same training examples for every method) is significant at 5 %, *within noise* when it is not; where a
point has no predictions for a seed both share, the 95 % seed intervals decide (stats.intervals_apart: apart when
they do not overlap), and with one seed there is nothing to decide (*unresolved*).
"""
from __future__ import annotations

import math
import statistics
from collections import defaultdict
from dataclasses import dataclass

from bench.core import metrics as M
from bench.report import predictions
from bench.report.data import ACCURACY, CLASSIFICATION, Data, run_kind, safe_name
from bench.report.runs import RunRecord, latest_per_seed, seed_order, train_per_class, variants
from bench.report.stats import Estimate, intervals_apart, mean_ci
from bench.report.wording import cell, estimate_pct, test_detail

ALL = "all"                 # the point of the runs trained on every example
AXIS = frozenset({"task.train_per_class", "task.max_train_samples"})   # what varies along a curve
CAMPAIGN = ("train.max_steps", "train.batch_size", "train.epochs")     # what one campaign holds fixed
AHEAD, BEHIND, WITHIN, UNRESOLVED = "ahead", "behind", "within noise", "unresolved"


@dataclass
class Point:
    k: str                       # task.train_per_class, or ALL
    runs: list[RunRecord]        # the latest run per seed, in seed order
    accuracy: Estimate           # test/accuracy over seeds

    @property
    def seeds(self) -> list[str]:
        return [r.seed for r in self.runs]


@dataclass
class Line:
    label: str
    method: str
    points: dict[str, Point]


@dataclass(frozen=True)
class Comparison:
    """A line's point against full fine-tuning's at the same k."""
    k: str
    verdict: str                 # AHEAD, BEHIND, WITHIN or UNRESOLVED
    rule: str                    # "paired test", "seed intervals" or "" (unresolved)
    detail: str


@dataclass
class Campaign:
    task: str
    model: str
    quant: str
    kind: str
    settings: tuple[str | None, ...]   # the CAMPAIGN params' values
    keys: list[str]                    # the points' k, by training examples (ALL last)
    examples: dict[str, float | None]  # k -> train/examples (median over the runs that logged it)
    lines: list[Line]
    reference: Line | None             # full fine-tuning's line, when present
    read: object = None                # run -> predictions.Answers or None (Data.read)

    @property
    def _parts(self) -> tuple[str, ...]:
        return (self.task, self.model, self.quant) + (() if self.kind == CLASSIFICATION else (self.kind,))

    @property
    def budget(self) -> str:
        steps, batch, epochs = self.settings
        trained = f"{steps} steps" if steps not in (None, "None") else f"{epochs} epochs"
        return f"{trained}, batch {batch}"

    @property
    def title(self) -> str:
        return " · ".join(self._parts) + f" ({self.budget})"

    @property
    def slug(self) -> str:
        steps, batch, epochs = self.settings
        return "-".join(safe_name(x) for x in self._parts) + f"-s{safe_name(str(steps))}-b{safe_name(str(batch))}" + (
            f"-e{safe_name(str(epochs))}" if steps in (None, "None") else "")

    def x_label(self, k: str) -> str:
        """The point's training examples as a count (k when the runs did not log train/examples)."""
        n = self.examples.get(k)
        return f"{n:,.0f}" if n is not None else ("all" if k == ALL else f"k={k}")

    def compare(self, line: Line, k: str) -> Comparison | None:
        """`line` against full fine-tuning at k (module doc); None when either has no point there."""
        ref = self.reference
        a, b = line.points.get(k), ref.points.get(k) if ref is not None else None
        if a is None or b is None or line is ref:
            return None
        answers = [{r.seed: found for r in p.runs if (found := self.read(r)) is not None} for p in (a, b)]
        test = predictions.paired(*answers, seed_order)
        if not isinstance(test, str):
            verdict = WITHIN if test.within_noise else AHEAD if test.diff > 0 else BEHIND
            return Comparison(k, verdict, "paired test", test_detail(test))
        sign = intervals_apart(a.accuracy, b.accuracy)
        shown = f"{estimate_pct(a.accuracy)} against {estimate_pct(b.accuracy)}"
        if sign is None:
            return Comparison(k, UNRESOLVED, "", f"{shown}: one seed and no paired predictions")
        return Comparison(k, {1: AHEAD, -1: BEHIND, 0: WITHIN}[sign], "seed intervals", shown)

    def comparisons(self, line: Line) -> list[Comparison]:
        return [c for k in self.keys if (c := self.compare(line, k)) is not None]


def _number(k: str) -> float:
    try:
        return float(k)
    except ValueError:
        return math.inf


def _key(run: RunRecord) -> tuple:
    return (*run.key, run_kind(run), *(run.params.get(p) for p in CAMPAIGN))


def _full_data(run: RunRecord) -> bool:
    return train_per_class(run) is None and run.params.get("task.max_train_samples") in (None, "None")


def campaigns(data: Data) -> list[Campaign]:
    """The learning curves of the data-efficiency runs (data.curve_runs), with the table runs that complete them."""
    by_key: dict[tuple, list[RunRecord]] = defaultdict(list)
    for r in data.curve_runs:
        by_key[_key(r)].append(r)
    table_runs = [r for g in data.groups for row in g.rows for r in row.runs if _full_data(r)]
    for r in table_runs:
        if _key(r) in by_key:
            by_key[_key(r)].append(r)
    out = []
    for key in sorted(by_key, key=lambda t: tuple(map(str, t))):
        task, model, quant, kind, *settings = key
        by_method: dict[str, list[RunRecord]] = defaultdict(list)
        for r in by_key[key]:
            by_method[r.tags.get("method", "?")].append(r)
        lines = []
        for method in sorted(by_method):
            for label, runs in variants(method, by_method[method], AXIS).items():
                by_k: dict[str, list[RunRecord]] = defaultdict(list)
                for r in runs:
                    by_k[train_per_class(r) or ALL].append(r)
                points = {}
                for k, kruns in by_k.items():
                    kept, _ = latest_per_seed(kruns)
                    points[k] = Point(k, kept, mean_ci([r.metrics[ACCURACY] for r in kept]))
                lines.append(Line(label, method, points))
        examples = {}
        for k in {k for line in lines for k in line.points}:
            counts = [r.metrics[M.TRAIN_EXAMPLES] for line in lines if k in line.points
                      for r in line.points[k].runs if math.isfinite(r.metrics.get(M.TRAIN_EXAMPLES, math.nan))]
            examples[k] = float(statistics.median(counts)) if counts else None
        keys = sorted(examples, key=lambda k: (k == ALL, examples[k] if examples[k] is not None else math.inf,
                                               _number(k), k))
        fulls = sorted((line for line in lines if line.method == "full"),
                       key=lambda line: (-len(line.points), -sum(p.accuracy.n for p in line.points.values()),
                                         line.label))
        reference = fulls[0] if fulls else None
        lines.sort(key=lambda line: (line is not reference, line.label))
        out.append(Campaign(task, model, quant, kind, tuple(settings), keys, examples, lines, reference, data.read))
    return out


# --- the report's words ---------------------------------------------------------------------------------------
def _joined(items: list[str]) -> str:
    return ", ".join(items[:-1]) + " and " + items[-1] if len(items) > 1 else "".join(items)


def sentence(campaign: Campaign, line: Line) -> str | None:
    """Where `line` is ahead of, within noise of and behind full fine-tuning, and by which rule; None without a
    shared point. "lora is ahead of full at 48 and 192 examples, within noise at 768, behind at 4,952 (paired
    test at every point)."."""
    found = campaign.comparisons(line)
    if not found:
        return None
    ref = campaign.reference.label
    order = [AHEAD] + [v for v in dict.fromkeys(c.verdict for c in found) if v != AHEAD]
    parts = []
    for verdict in order:
        at = _joined([campaign.x_label(c.k) for c in found if c.verdict == verdict])
        if at:
            parts.append(f"{f'ahead of {ref}' if verdict == AHEAD else verdict} at {at}"
                         + (" examples" if not parts else ""))
    head = f"{line.label} is " + ("" if any(c.verdict == AHEAD for c in found) else f"never ahead of {ref}: ")
    rules = list(dict.fromkeys(c.rule for c in found if c.rule))
    if len(rules) == 1:
        how = f"{rules[0]} at every point" if all(c.rule for c in found) else f"{rules[0]} where resolved"
    else:
        how = "; ".join(f"{rule} at {_joined([campaign.x_label(c.k) for c in found if c.rule == rule])}"
                        for rule in rules) or "no point resolved"
    return f"{head}{', '.join(parts)} ({how})."


RULE = ("*Ahead* / *behind* of full fine-tuning at a point: the paired test on the same test examples is significant "
        "at 5 % (runs paired by seed: one seed draws the same training examples for every method; the exact McNemar "
        "test with one seed, the paired bootstrap over seeds and examples with several, as in the tables); *within "
        "noise*: it is not. Where a point lacks predictions for a seed both share, the 95 % seed intervals decide "
        "instead (apart only when they do not overlap); with one seed and no predictions a point is *unresolved*. "
        "Each sentence names the rule it used.")


def section(campaigns_: list[Campaign], plots: dict[str, str]) -> list[str]:
    if not campaigns_:
        return []
    lines = ["## Learning curves", "",
             "Runs trained on k examples per class (`task.train_per_class=k`) are a data-efficiency campaign: they "
             "are kept out of the method tables (which never average runs trained on different amounts of data) "
             "and drawn here, per task × model × quant and training budget (`train.max_steps`, `train.batch_size`), "
             "with the table runs of the same budget that trained on every example as the last point (*all*). "
             f"Test accuracy (`{ACCURACY}`) is the mean over seeds ± the half-width of its 95 % seed interval, "
             f"against the training examples the runs had (`{M.TRAIN_EXAMPLES}`, log scale). " + RULE, ""]
    for c in campaigns_:
        lines += [f"### {c.title}", ""]
        if c.slug in plots:
            lines += [f"![{c.title}: test accuracy against training examples]({plots[c.slug]})", ""]
        heads = [f"{'all' if k == ALL else f'k={k}'}: {c.x_label(k)} examples" if c.examples.get(k) is not None
                 else ("all" if k == ALL else f"k={k}") for k in c.keys]
        lines += ["| method | " + " | ".join(heads) + " |", "|---|" + "---:|" * len(heads)]
        for line in c.lines:
            cells = [f"**{line.label}**" if line is c.reference else line.label]
            cells += [estimate_pct(line.points[k].accuracy) if k in line.points else "-" for k in c.keys]
            lines.append("| " + " | ".join(cell(x) for x in cells) + " |")
        lines.append("")
        if c.reference is None:
            lines += ["No full fine-tuning line (`method=full`) in this campaign: nothing to compare against.", ""]
            continue
        said = [s for line in c.lines if line is not c.reference and (s := sentence(c, line))]
        lines += [f"- {s}" for s in said] or ["- No method shares a point with full fine-tuning."]
        lines.append("")
    return lines
