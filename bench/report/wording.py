"""How the report writes figures and verdicts: percentages, points, MiB, seconds, table cells; a paired test's
verdict; whether two costs are apart. Definitions: bench/report/stats.py; the reader is told them in
bench/report/markdown.py's HOW_TO_READ.

Wording rules:
- two methods are "within noise" only when their paired test is not significant; without one, the report says
  "paired test unavailable" and makes no claim;
- a cost claim ("fits", "the only method that fits", "fastest", "smallest") needs a difference beyond the
  figure's measurement noise; otherwise the report says "within measurement noise".
"""
from __future__ import annotations

from bench.report.data import Group, Row
from bench.report.stats import RESOLUTION, Estimate, PairedTest, cost_spread, costs_apart


# --- formatting ---------------------------------------------------------------------------------------------
def pct(v: float) -> str:
    return f"{100 * v:.1f}"


def pt(v: float) -> str:
    return f"{100 * v:+.1f} pt"


def acc(row: Row, with_n: bool = False) -> str:
    est = row.accuracy
    text = pct(est.mean) + (f" ± {pct(est.half_width)}" if est.half_width is not None else "") + " %"
    return f"{text}, n={est.n}" if with_n else text


def estimate_pct(est: Estimate) -> str:
    """An accuracy over seeds: "93.5 ± 1.2 % (n=3)" (one seed: no interval)."""
    return pct(est.mean) + (f" ± {pct(est.half_width)}" if est.half_width is not None else "") + f" % (n={est.n})"


def sampling(row: Row) -> str:
    found = row.test_sampling
    if found is None:
        return "-"
    low, high, n = found
    return f"{pct(low)}–{pct(high)} % (n={n:,})"


def mib(v: float | None) -> str:
    return "-" if v is None else f"{v / 2**20:,.0f} MiB"


def secs(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f} s"


def ratio(v: float | None, ref: float | None) -> str:
    return "" if v is None or not ref else f" (×{v / ref:.2g})"


def cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


# --- accuracy: the paired test ------------------------------------------------------------------------------
def test_detail(t: PairedTest) -> str:
    seeds = (f"seed {t.seeds[0]}" if len(t.seeds) == 1 else f"seeds {', '.join(t.seeds)}" if len(t.seeds) <= 5
             else f"{len(t.seeds)} seeds")
    if t.p_value is not None:
        return (f"McNemar p = {t.p_value:.3g}, {t.a_only} vs {t.b_only} discordant of {t.examples:,} examples, "
                f"{seeds}")
    return (f"paired bootstrap {pt(t.diff)}, 95 % CI {pt(t.low)} to {pt(t.high)}, {seeds} × "
            f"{t.examples:,} examples")


def within(group: Group, a: Row, b: Row) -> bool | None:
    """The paired test's verdict: True within noise, False beyond it, None unavailable."""
    found = group.paired(a, b)
    return None if isinstance(found, str) else found.within_noise


def verdict(group: Group, a: Row, b: Row) -> str:
    """`a` against `b` in words: within noise / beyond noise / unavailable, with the test's figures."""
    found = group.paired(a, b)
    if isinstance(found, str):
        return f"paired test unavailable: {found}"
    return f"{'within' if found.within_noise else 'beyond'} noise ({test_detail(found)})"


# --- costs: measurement noise -------------------------------------------------------------------------------
def memory_name(group: Group) -> str:
    return "peak train (allocated)" if group.cuda else "train growth"


def apart(a: Row, b: Row, metric: str) -> bool:
    return costs_apart(a.values[metric], b.values[metric])


def spread(row: Row, metric: str, fmt) -> str:
    values = row.values[metric]
    return f"{fmt(cost_spread(values))}" + (f" ({100 * RESOLUTION:.0f} %, one seed)" if len(values) == 1 else "")
