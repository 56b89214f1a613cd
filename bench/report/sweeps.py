"""Sweep runs (tag `study`, trials also tag `trial`, nested under the study's parent run) per study.

The objective is the parent's (or a trial's) `objective` and `direction` tags when the sweep logged them,
else val/accuracy, maximized: a `val/*` metric or a cost, never a test metric (bench/core/metrics.py: the protocol).
The best trial's `test/accuracy` is the one test evaluation of the chosen configuration: shown, not selected on.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from bench.core import metrics as M
from bench.report.data import RunRecord, run_settings

DEFAULT_OBJECTIVE = M.VAL_ACCURACY


@dataclass
class Study:
    name: str
    parent: RunRecord | None
    trials: list[RunRecord]          # ordered by trial number
    objective: str
    direction: str
    searched: list[str]              # settings that differ between the finished trials
    best: RunRecord | None

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.trials)

    def value(self, run: RunRecord) -> float | None:
        return run.metrics.get(self.objective)

    @staticmethod
    def test_value(run: RunRecord) -> float | None:
        """The run's one test evaluation (test/accuracy), reported beside the objective."""
        return run.metrics.get(M.TEST_ACCURACY)

    @property
    def finished(self) -> list[RunRecord]:
        return [r for r in self.trials if r.status == "FINISHED" and self.objective in r.metrics]

    @property
    def plot_axes(self) -> tuple[str, str | None] | None:
        """rank × alpha when the study searched them, else its first one or two numeric settings."""
        if {"method.r", "method.alpha"} <= set(self.searched):
            return "method.r", "method.alpha"
        numeric = [k for k in self.searched
                   if all(_number(run_settings(r).get(k)) is not None for r in self.finished)]
        return (numeric[0], numeric[1] if len(numeric) > 1 else None) if numeric else None

    def plot_points(self) -> tuple[list[tuple[float, float, float]], tuple[float, float]]:
        """(x, y, objective) per finished trial, and the best trial's (x, y); with one axis, y is the objective."""
        x, y = self.plot_axes

        def xy(run: RunRecord) -> tuple[float, float]:
            s = run_settings(run)
            return float(s[x]), (float(s[y]) if y else self.value(run))
        return [(*xy(r), self.value(r)) for r in self.finished], xy(self.best)


def _number(v) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _trial_number(run: RunRecord) -> int:
    n = _number(run.tags.get("trial"))
    return int(n) if n is not None else 1 << 30


def studies(runs: list[RunRecord]) -> list[Study]:
    by_name: dict[str, list[RunRecord]] = defaultdict(list)
    for r in runs:
        by_name[r.tags["study"]].append(r)
    out = []
    for name in sorted(by_name):
        trials = sorted((r for r in by_name[name] if "trial" in r.tags),
                        key=lambda r: (_trial_number(r), r.start_time, r.run_id))
        parents = sorted((r for r in by_name[name] if "trial" not in r.tags), key=lambda r: (r.start_time, r.run_id))
        parent = parents[-1] if parents else None
        source = {**{k: v for t in trials for k, v in t.tags.items()}, **(parent.tags if parent else {})}
        objective = source.get("objective", DEFAULT_OBJECTIVE)
        direction = source.get("direction", "maximize")
        study = Study(name, parent, trials, objective, direction, [], None)
        done = study.finished
        settings = [run_settings(r) for r in done]
        study.searched = sorted(k for k in {k for s in settings for k in s} if len({s.get(k) for s in settings}) > 1
                                and k != "hardware")  # config keys only
        sign = -1 if direction == "maximize" else 1
        study.best = min(done, key=lambda r: (sign * r.metrics[objective], _trial_number(r), r.run_id), default=None)
        out.append(study)
    return out
