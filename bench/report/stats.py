"""The report's statistics. Each definition is stated here once; markdown.py's "How to read it" tells the reader.

- Seed interval (`mean_ci`): the mean of a figure over seeds ± the half-width of its 95 % Student-t confidence
  interval (n − 1 degrees of freedom); one seed has no interval.
- Test-sampling interval (`wilson`): the Wilson score 95 % interval of a pooled accuracy, with n the number of
  distinct test examples. Every seed answers the same test questions, so pooling seeds adds no independent
  questions: n is not multiplied by the seeds.
- Paired tests of two methods on the same test examples (accuracy of A minus accuracy of B):
  one seed each: the exact McNemar test on the examples both runs scored (`mcnemar_exact`);
  several seeds: a paired bootstrap over seeds and examples (`paired_bootstrap`): runs paired by seed, each
  resample draws seeds with replacement and examples with replacement, the same draws for both methods, and
  takes the difference of mean accuracy; the 95 % percentile interval of N_RESAMPLES resamples from a
  generator seeded with BOOTSTRAP_SEED (the same runs give the same interval).
  Two methods are *within noise* when the paired test is not significant at 5 %: McNemar p ≥ 0.05, or a
  bootstrap interval that contains 0 (`PairedTest.within_noise`).
- Measurement noise of a cost figure (memory, checkpoint size, train time; `cost_spread`, `costs_apart`): a row's
  run-to-run spread is max − min over its seeds, with one seed RESOLUTION (5 %) of the figure, a stated
  resolution; two rows' figures are apart only when they differ by more than the larger of their spreads.
- Seed intervals apart (`intervals_apart`; learning curves without a paired test, forgetting): two means over
  seeds differ when their 95 % seed intervals do not overlap; with one seed on either side there is no interval
  and nothing is resolved.
- Latency noise (`latency_apart`): a run times each variant (base, unmerged, merged) in the same process, the
  variants interleaved, and logs each one's median and interquartile range (IQR); two medians of one run differ
  when |a − b| > max(IQR_a, IQR_b). Over several runs (`latency_verdict`) a difference counts only when every run
  shows it beyond its IQRs, with the same sign.
- Pareto frontiers (`pareto_front`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
SIGNIFICANCE = 0.05        # a paired test below this p (or an interval without 0) is beyond noise
N_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
RESOLUTION = 0.05          # a cost figure's stated resolution when a single seed leaves its spread unmeasured
_CHUNK = 250               # bootstrap resamples drawn per block (bounds the temporary index arrays)


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


# --- test sampling ------------------------------------------------------------------------------------------
def wilson(accuracy: float, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval of an accuracy measured on n distinct examples (statsmodels; the count
    accuracy · n may be fractional: a pooled accuracy over seeds)."""
    from statsmodels.stats.proportion import proportion_confint
    low, high = proportion_confint(accuracy * n, n, alpha=1 - confidence, method="wilson")
    return float(low), float(high)


# --- paired tests -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PairedTest:
    """Accuracy of A minus accuracy of B on the same test examples (and seeds)."""
    test: str                      # "McNemar" (one seed) or "bootstrap" (several seeds)
    diff: float                    # mean accuracy difference on the paired examples
    examples: int                  # test examples in the comparison
    seeds: tuple[str, ...]         # the seeds paired
    p_value: float | None = None   # McNemar
    low: float | None = None       # bootstrap 95 % interval of the difference
    high: float | None = None
    a_only: int | None = None      # McNemar: examples only A got right (b) ...
    b_only: int | None = None      # ... and only B got right (c)

    @property
    def within_noise(self) -> bool:
        if self.p_value is not None:
            return self.p_value >= SIGNIFICANCE
        return self.low <= 0.0 <= self.high


def mcnemar_exact(a_only: int, b_only: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts (statsmodels: a binomial test on them)."""
    from statsmodels.stats.contingency_tables import mcnemar
    return float(mcnemar([[0, a_only], [b_only, 0]], exact=True).pvalue)


def mcnemar_test(a_correct: np.ndarray, b_correct: np.ndarray, seed: str) -> PairedTest:
    """One run each, aligned on the same examples (boolean arrays of equal length)."""
    a_only = int(np.sum(a_correct & ~b_correct))
    b_only = int(np.sum(~a_correct & b_correct))
    n = len(a_correct)
    return PairedTest("McNemar", (a_only - b_only) / n, n, (seed,), p_value=mcnemar_exact(a_only, b_only),
                      a_only=a_only, b_only=b_only)


def _counts(draws: np.ndarray, size: int) -> np.ndarray:
    """How often each of `size` items was drawn, per resample (row): (resamples, size)."""
    rows = draws.shape[0]
    flat = (draws + size * np.arange(rows)[:, None]).ravel()
    return np.bincount(flat, minlength=rows * size).reshape(rows, size)


@lru_cache(maxsize=1)
def _draws(k: int, n: int, n_resamples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per resample, how often each of k seeds and each of n examples is drawn (with replacement): (R, k) and
    (R, n), the latter 4 · R · n bytes (8 MB for 1,000 examples). The same draws for every comparison of the same
    shape: a fresh generator seeded with `seed`, so no interval depends on the order the report computes them."""
    rng = np.random.default_rng(seed)
    seed_w, example_w = [], []
    for start in range(0, n_resamples, _CHUNK):
        size = min(_CHUNK, n_resamples - start)
        seed_w.append(_counts(rng.integers(0, k, size=(size, k)), k))
        example_w.append(_counts(rng.integers(0, n, size=(size, n)), n).astype(np.float32))  # small ints: exact
    return np.concatenate(seed_w).astype(float), np.concatenate(example_w)


@lru_cache(maxsize=512)
def _sums(shape: tuple[int, int], packed: bytes, n_resamples: int, seed: int) -> np.ndarray:
    """bootstrap_sums of the bit-packed matrix (hashable, so cached); float32 sums of counts are exact."""
    k, n = shape
    correct = np.unpackbits(np.frombuffer(packed, dtype=np.uint8), count=k * n).reshape(k, n).astype(np.float32)
    seed_w, example_w = _draws(k, n, n_resamples, seed)
    per_seed = (example_w @ correct.T).astype(float)   # (R, k): correct answers among each seed's drawn examples
    out = np.einsum("rk,rk->r", seed_w, per_seed)
    out.flags.writeable = False
    return out


def bootstrap_sums(correct: np.ndarray, n_resamples: int = N_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """Per resample, the correct answers among the drawn cells of a (seeds, examples) boolean matrix (cached: a
    row compared with several others is resampled once)."""
    correct = np.asarray(correct, dtype=bool)
    return _sums(correct.shape, np.packbits(correct).tobytes(), n_resamples, seed)


def bootstrap_distribution(a: np.ndarray, b: np.ndarray, n_resamples: int = N_RESAMPLES,
                           seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """Resampled mean accuracy of A minus that of B. `a`, `b`: (seeds, examples) booleans, runs paired by seed
    (row) and example (column). Each resample draws seeds and examples with replacement, the same draws for A
    and B, and averages the drawn cells."""
    k, n = np.shape(a)
    return (bootstrap_sums(a, n_resamples, seed) - bootstrap_sums(b, n_resamples, seed)) / (k * n)


def paired_bootstrap(a: np.ndarray, b: np.ndarray, seeds: tuple[str, ...], n_resamples: int = N_RESAMPLES,
                     seed: int = BOOTSTRAP_SEED, confidence: float = CONFIDENCE) -> PairedTest:
    """Percentile interval of the resampled mean difference (see bootstrap_distribution)."""
    resampled = bootstrap_distribution(a, b, n_resamples, seed)
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(resampled, [tail, 100 - tail])
    diff = float(np.mean(a, dtype=float) - np.mean(b, dtype=float))
    return PairedTest("bootstrap", diff, np.shape(a)[1], seeds, low=float(low), high=float(high))


# --- cost figures -------------------------------------------------------------------------------------------
def cost_spread(values: list[float]) -> float:
    """Run-to-run spread of a cost figure over seeds: max − min; one seed: RESOLUTION of the figure."""
    if len(values) == 1:
        return RESOLUTION * abs(values[0])
    return max(values) - min(values)


def costs_apart(a: list[float], b: list[float]) -> bool:
    """True when two rows' figures (their values over seeds) differ by more than the larger spread."""
    gap = abs(math.fsum(a) / len(a) - math.fsum(b) / len(b))
    return gap > max(cost_spread(a), cost_spread(b))


def intervals_apart(a: Estimate, b: Estimate) -> int | None:
    """+1 when a's 95 % seed interval lies wholly above b's, -1 wholly below, 0 when they overlap; None when either
    mean has a single seed (no interval)."""
    if a.half_width is None or b.half_width is None:
        return None
    return 1 if a.low > b.high else -1 if a.high < b.low else 0


# --- latency ------------------------------------------------------------------------------------------------
def latency_apart(a: float, a_iqr: float, b: float, b_iqr: float) -> bool:
    """Two medians of one run's timed calls differ when the gap exceeds the larger interquartile range."""
    return abs(a - b) > max(a_iqr, b_iqr)


def latency_verdict(pairs: list[tuple[float, float, float, float]]) -> tuple[int, int]:
    """Over runs, each (a median, a IQR, b median, b IQR): (+1 a slower than b in every run beyond its IQRs, -1 a
    faster in every run, 0 otherwise; how many runs differ beyond their IQRs)."""
    signs = [(1 if a > b else -1) if latency_apart(a, ai, b, bi) else 0 for a, ai, b, bi in pairs]
    apart = sum(1 for s in signs if s)
    return (signs[0] if pairs and len(set(signs)) == 1 else 0), apart


def pareto_front(points: list[tuple[float, float]]) -> list[bool]:
    """For (accuracy, cost) points, True where no other point has accuracy >= and cost <= with one strict.
    Ties (identical points) are all on the frontier."""
    front = []
    for i, (acc, cost) in enumerate(points):
        dominated = any(a >= acc and c <= cost and (a > acc or c < cost)
                        for j, (a, c) in enumerate(points) if j != i)
        front.append(not dominated)
    return front
