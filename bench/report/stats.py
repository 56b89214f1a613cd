"""The report's statistics: mean with a t-distribution confidence interval over seeds, and Pareto frontiers."""
from __future__ import annotations

import math
from dataclasses import dataclass

from scipy import stats

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Estimate:
    """Mean of n seeds; `half_width` of its 95 % confidence interval, None when n < 2 (no spread to estimate)."""
    mean: float
    half_width: float | None
    n: int

    @property
    def low(self) -> float:
        return self.mean - (self.half_width or 0.0)

    @property
    def high(self) -> float:
        return self.mean + (self.half_width or 0.0)


def mean_ci(values: list[float], confidence: float = CONFIDENCE) -> Estimate:
    """Student-t interval: mean ± t(1 - (1 - confidence)/2, n - 1) · s / √n, s the sample (n - 1) deviation."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_ci needs at least one value")
    mean = math.fsum(values) / n
    if n == 1:
        return Estimate(mean, None, 1)
    s = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    return Estimate(mean, float(stats.t.ppf(1 - (1 - confidence) / 2, n - 1)) * s / math.sqrt(n), n)


def within_noise(a: Estimate, b: Estimate) -> bool | None:
    """True when the two 95 % intervals overlap, False when they are apart, None when a single seed leaves the
    noise unknown. (Overlapping intervals is the conservative reading: it calls more differences noise.)"""
    if a.half_width is None or b.half_width is None:
        return None
    return a.low <= b.high and b.low <= a.high


def pareto_front(points: list[tuple[float, float]]) -> list[bool]:
    """For (accuracy, cost) points, True where no other point has accuracy >= and cost <= with one strict.
    Ties (identical points) are all on the frontier."""
    front = []
    for i, (acc, cost) in enumerate(points):
        dominated = any(a >= acc and c <= cost and (a > acc or c < cost)
                        for j, (a, c) in enumerate(points) if j != i)
        front.append(not dominated)
    return front
