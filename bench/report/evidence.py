"""What the claims section (bench/report/claims.py) measures a claim with: findings and their verdicts, the
evidence shared by several claims (latency pairs of one run, a row against full fine-tuning's, a figure over
seeds), and how a claim is written (`render`). The noise definitions are stats.py's; this module only words
them."""
from __future__ import annotations

import math
import statistics
from collections import Counter
from dataclasses import dataclass, field

from bench.fmt import human_bytes
from bench.report.data import Data
from bench.report.runs import RunRecord
from bench.report.stats import Estimate, cost_spread, costs_apart, intervals_apart, latency_verdict, mean_ci
from bench.report.wording import cell

HOLDS, FAILS, WITHIN, NOT_MEASURED = "holds", "does not hold", "within noise", "not measured here"
VERDICTS = (HOLDS, FAILS, WITHIN, NOT_MEASURED)


@dataclass(frozen=True)
class Finding:
    where: str                   # a group's or a campaign's title, or a run
    subject: str                 # the row (method and settings) or what was checked
    evidence: str                # the numbers, with their noise and n
    verdict: str                 # one of VERDICTS


@dataclass
class Claim:
    letter: str
    title: str                   # the claim in one line
    source: str
    measured: str                # what is compared, and the rule
    command: str                 # the command that measures it
    findings: list[Finding] = field(default_factory=list)
    missing: str = ""            # why nothing was measured, when there is no finding


def places(data: Data):
    """(group, row) over the accuracy and the score tables, in report order."""
    for group in [*data.groups, *data.score_groups]:
        for row in group.rows:
            yield group, row


def against_full(data: Data):
    """(group, row, full's row) for every row of a group with a full fine-tuning reference."""
    for group, row in places(data):
        if group.reference is not None and row is not group.reference:
            yield group, row, group.reference


def ms(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def finite(run: RunRecord, name: str) -> float | None:
    v = run.metrics.get(name, math.nan)
    return v if math.isfinite(v) else None


# --- latency --------------------------------------------------------------------------------------------------
SUFFIXES = ("b1", "bN")


def latency_pairs(runs: list[RunRecord], a: str, b: str, suffix: str) -> list[tuple[float, float, float, float]]:
    """Per run that timed both variants: (a median, a IQR, b median, b IQR) in ms."""
    out = []
    for r in runs:
        found = [finite(r, f"latency/{v}_{kind}_{suffix}") for v in (a, b) for kind in ("ms", "iqr_ms")]
        if None not in found:
            out.append(tuple(found))
    return out


def latency_evidence(runs: list[RunRecord], a: str, b: str, suffix: str) -> tuple[int, str] | None:
    """(+1 a slower than b in every run beyond the IQRs, -1 faster, 0 otherwise; the evidence), None when no run
    timed both. Shown: the median over runs of each variant's median and IQR, the gap in %, how many runs differ."""
    pairs = latency_pairs(runs, a, b, suffix)
    if not pairs:
        return None
    sign, apart = latency_verdict(pairs)
    am, ai, bm, bi = (median([p[i] for p in pairs]) for i in range(4))
    sizes = [v for r in runs if (v := finite(r, "latency/batch_size")) is not None]
    threads = sorted({int(v) for r in runs if (v := finite(r, "latency/threads")) is not None})
    batch = "batch 1" if suffix == "b1" else f"batch {median(sizes):.0f}" if sizes else "batch N"
    n = len(pairs)
    runs_word = f"{n} run{'s' if n > 1 else ''}" + (f", medians over runs" if n > 1 else "")
    thread_word = f", {'/'.join(map(str, threads))} thread{'s' if threads != [1] else ''}" if threads else ""
    text = (f"{batch} ({runs_word}{thread_word}): {a} {ms(am)} ms (IQR {ms(ai)}) vs {b} {ms(bm)} ms (IQR {ms(bi)}), "
            f"{100 * (am - bm) / bm:+.1f} %; beyond the larger IQR in {apart} of {n} run{'s' if n > 1 else ''}")
    return sign, text


# --- a figure against full fine-tuning's ---------------------------------------------------------------------
def cost_evidence(row, ref, metric: str, fmt) -> tuple[int, float, str] | None:
    """(+1 above full's beyond measurement noise, -1 below, 0 within; the ratio; the evidence), None when either
    lacks the figure. Noise: stats.costs_apart (the larger run-to-run spread)."""
    a, b = row.values.get(metric) or [], ref.values.get(metric) or []
    if not a or not b:
        return None
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    sign = (1 if ma > mb else -1) if costs_apart(a, b) else 0
    ratio = ma / mb if mb else math.inf
    text = (f"{fmt(ma)} vs {ref.label}'s {fmt(mb)} (×{ratio:.2g}; spread {fmt(cost_spread(a))} / "
            f"{fmt(cost_spread(b))}, n={len(a)} / {len(b)})")
    return sign, ratio, text


def seed_evidence(a_values: list[float], b_values: list[float]) -> tuple[int | None, Estimate, Estimate]:
    """(stats.intervals_apart of the two seed means, the estimates)."""
    a, b = mean_ci(a_values), mean_ci(b_values)
    return intervals_apart(a, b), a, b


def estimate(est: Estimate, fmt) -> str:
    """mean ± half-width of the 95 % seed interval (n); one seed: no interval."""
    spread = f" ± {fmt(est.half_width).lstrip('+')}" if est.half_width is not None else ""
    return f"{fmt(est.mean)}{spread} (n={est.n})"


def bytes_(v: float) -> str:
    return human_bytes(v)


# --- the section ---------------------------------------------------------------------------------------------
INTRO = ("Each claim below is checked against the runs of this report, never written by hand: it changes when the "
         "runs do. A verdict is one of *holds*, *does not hold*, *within noise* (the difference the claim is about "
         "is not beyond the measurement's noise) and *not measured here* (then the command that measures it). "
         "Rules: latency medians differ only when |a − b| > max(IQR_a, IQR_b) in every run of a row, with the same "
         "sign (each run times the variants interleaved in one process; the figures shown are medians over runs); "
         "accuracy by the tables' paired test, else the 95 % seed intervals; checkpoint and memory by the tables' "
         "measurement noise (the larger run-to-run spread); forgetting by the 95 % seed intervals; learning curves "
         "by the curves' rule. The claims read the runs of the method tables (above), the learning curves only for "
         "(f) and the multi-task parent runs only for (k); every comparison stays within one group (task × model "
         "× quant), against full fine-tuning's row there where the claim is about full fine-tuning.")


def _summary(claim: Claim) -> str:
    if not claim.findings:
        return f"**Verdict: {NOT_MEASURED}** ({claim.missing}). Measure it: `{claim.command}`."
    counts = Counter(f.verdict for f in claim.findings)
    more = f" Measure the rest: `{claim.command}`." if NOT_MEASURED in counts else ""
    if len(counts) == 1:
        n = len(claim.findings)
        return f"**Verdict: {claim.findings[0].verdict}** ({n} of {n} comparison{'s' if n > 1 else ''}).{more}"
    return "**Verdicts: " + ", ".join(f"{v} {counts[v]}" for v in (HOLDS, FAILS, WITHIN, NOT_MEASURED)
                                      if counts[v]) + "** (one per comparison above)." + more


def render(claims: list[Claim]) -> list[str]:
    """The Claims section: INTRO, then per claim its line and source, what is measured, one table row per finding
    and the verdict (or why nothing was measured, and the command that measures it)."""
    lines = ["## Claims", "", INTRO, ""]
    for claim in claims:
        lines += [f"### {claim.letter}. {claim.title}", "", f"*Claim*: {claim.source}. *Measured*: {claim.measured}.",
                  ""]
        if claim.findings:
            lines += ["| where | what | evidence | verdict |", "|---|---|---|---|"]
            lines += ["| " + " | ".join(cell(c) for c in (f.where, f.subject, f.evidence, f.verdict)) + " |"
                      for f in claim.findings]
            lines.append("")
        lines += [_summary(claim), ""]
    return lines
