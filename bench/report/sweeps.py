"""A sweep's study, one model for both readers: its trials, read from Optuna at the end of `python -m bench.sweep`
(`from_optuna`: reports/<study>/, bench/report/sweep_outputs.py) or from the MLflow runs the sweep logged
(`from_runs`: the report's Sweeps section), and the one summary of them (`summarize`: counts, steps, the best trial).

Selection (bench/core/metrics.py: the protocol). The objective is a `val/*` metric or a cost, never a test metric;
the best trial is the best COMPLETE trial on it, the lowest trial number on a tie (as Optuna's `best_trial`). Its
`test/*` figures are the one test evaluation of the chosen configuration: shown beside it, never selected on.
A study with several objectives (multi-objective) has no best trial but a Pareto front (`Study.front`): the
COMPLETE trials no other COMPLETE trial dominates (at least as good on every objective, better on one).

From MLflow (tag `study`; trials also tag `trial`, nested under the study's parent run): the objective is the
parent's (or a trial's) `objective` and `direction` tags when the sweep logged them, else val/accuracy, maximized;
several objectives: the parent's `objectives` tag (`val/accuracy:maximize,params/trainable:minimize`).
A run's status maps to a trial state: FINISHED -> COMPLETE, KILLED (pruned, or interrupted) -> PRUNED (a value
only when tagged `pruned`), FAILED -> FAIL, RUNNING -> RUNNING, SCHEDULED -> WAITING.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

from bench.core import metrics as M
from bench.report.runs import RunRecord, run_settings

DEFAULT_OBJECTIVE = M.VAL_ACCURACY
STATES = ("RUNNING", "COMPLETE", "PRUNED", "FAIL", "WAITING")   # optuna's TrialState names, in its order
FINISHED = ("COMPLETE", "PRUNED")        # what counts towards a sweep's --trials
ENDED = ("COMPLETE", "PRUNED", "FAIL")   # trials whose training steps are spent
FROM_MLFLOW = {"FINISHED": "COMPLETE", "KILLED": "PRUNED", "FAILED": "FAIL", "RUNNING": "RUNNING",
               "SCHEDULED": "WAITING"}


@dataclass(frozen=True)
class Trial:
    number: int
    state: str                   # one of STATES
    value: float | None          # the objective: final (COMPLETE) or last reported (PRUNED)
    settings: dict               # the config values it ran with (key -> value); {} when never sampled
    params: dict = field(default_factory=dict)   # the sampler's parameters (Optuna); {} from MLflow
    test: dict = field(default_factory=dict)     # its one test evaluation: test/* metrics
    steps: int | None = None     # training steps executed (up to the prune; for FAIL up to its last evaluation)
    seconds: float | None = None
    run_id: str | None = None
    note: str = ""               # why it was pruned or failed, or which trial it retries
    values: tuple | None = None  # every objective's value, in the study's order (value is the first)

    def test_text(self, metric: str = M.TEST_ACCURACY) -> str:
        v = self.test.get(metric)
        return "-" if v is None else f"{v:.4f}"


@dataclass
class Study:
    name: str
    objective: str
    direction: str               # maximize | minimize
    trials: list[Trial]          # ordered by trial number
    searched: list[str]          # the settings the study varies
    best: Trial | None           # None with several objectives: see front
    counts: dict[str, int]       # trials per state, every one of STATES
    objectives: list = field(default_factory=list)   # (metric, direction) per objective; the first = objective

    @property
    def multi(self) -> bool:
        return len(self.objectives) > 1

    @property
    def front(self) -> list[Trial]:
        """The Pareto front of the COMPLETE trials on all objectives, in trial order (one objective: the best)."""
        if not self.multi:
            return [self.best] if self.best is not None else []
        return pareto_trials(self.trials, self.objectives)

    @property
    def complete(self) -> list[Trial]:
        """COMPLETE trials that reported the objective."""
        return [t for t in self.trials if t.state == "COMPLETE" and t.value is not None]

    @property
    def finished_trials(self) -> int:
        return sum(self.counts[s] for s in FINISHED)

    def summary(self) -> dict:
        """summary.json's figures (less what only the sweep knows: its command line and importances)."""
        best = self.best
        return {
            "study": self.name, "objective": self.objective, "direction": self.direction,
            "finished_trials": self.finished_trials, "states": dict(self.counts),
            "train_steps": sum(t.steps or 0 for t in self.trials if t.state in ENDED),
            "trial_seconds": sum(t.seconds for t in self.trials if t.state in FINISHED and t.seconds),
            "best_value": None if best is None else best.value,
            "best_trial": None if best is None else best.number,
            "best_params": None if best is None else best.params,
            "best_overrides": None if best is None else dict(best.settings),
            "best_run_id": None if best is None else best.run_id,
            # the best trial's one test evaluation: reported beside the selection, not used for it
            "best_test": None if best is None else dict(best.test),
            **({"objectives": [list(o) for o in self.objectives],
                "pareto_front": [{"trial": t.number, "values": dict(zip((m for m, _ in self.objectives), t.values)),
                                  "params": t.params, "overrides": dict(t.settings), "run_id": t.run_id,
                                  "test": dict(t.test)} for t in self.front]} if self.multi else {}),
        }


def best_trial(trials: list[Trial], direction: str) -> Trial | None:
    """The best COMPLETE trial on the objective; the lowest number on a tie."""
    sign = -1 if direction == "maximize" else 1
    scored = [t for t in trials if t.state == "COMPLETE" and t.value is not None and math.isfinite(t.value)]
    return min(scored, key=lambda t: (sign * t.value, t.number, t.run_id or ""), default=None)


def pareto_trials(trials: list[Trial], objectives: list) -> list[Trial]:
    """COMPLETE trials with every objective finite that no other such trial dominates, in trial order."""
    signs = [1 if d == "maximize" else -1 for _, d in objectives]
    scored = [t for t in trials if t.state == "COMPLETE" and t.values is not None and len(t.values) == len(signs)
              and all(v is not None and math.isfinite(v) for v in t.values)]

    def dominates(a: Trial, b: Trial) -> bool:
        pairs = [(s * x, s * y) for s, x, y in zip(signs, a.values, b.values)]
        return all(x >= y for x, y in pairs) and any(x > y for x, y in pairs)
    return [t for t in scored if not any(dominates(o, t) for o in scored if o is not t)]


def summarize(name: str, objective: str, direction: str, trials: list[Trial], searched: list[str],
              objectives: list | None = None) -> Study:
    counts = {s: sum(t.state == s for t in trials) for s in STATES}
    objectives = [tuple(o) for o in (objectives or [(objective, direction)])]
    best = None if len(objectives) > 1 else best_trial(trials, direction)
    return Study(name, objective, direction, trials, searched, best, counts, objectives)


def objectives_tag(objectives: list) -> str:
    """The parent run's `objectives` tag: `val/accuracy:maximize,params/trainable:minimize`."""
    return ",".join(f"{m}:{d}" for m, d in objectives)


def parse_objectives(tag: str | None) -> list[tuple[str, str]] | None:
    if not tag:
        return None
    found = [tuple(part.rsplit(":", 1)) for part in tag.split(",") if ":" in part]
    return found if len(found) > 1 else None


# --- from Optuna: the sweep's own record ----------------------------------------------------------------------
def _optuna_note(t) -> str:
    note = ""
    if t.state.name == "PRUNED":
        note = f"pruned at step {t.user_attrs.get('pruned_at_step', '?')}"
    elif t.state.name == "FAIL":   # no reason of its own: failed for its dead worker (bench/sweep/storage.py)
        note = t.user_attrs.get("fail_reason") or "its worker stopped during the trial (killed, crashed or lost)"
    # Optuna's RetryFailedTrialCallback records the trials retried in system_attrs; an interrupted trial is
    # queued again with the user attribute retry_of
    retried = (t.system_attrs.get("retry_history") or [None])[-1]
    retried = retried if retried is not None else t.user_attrs.get("retry_of")
    if retried is not None:
        note = f"retry of {retried}" + (f"; {note}" if note else "")
    return note


def from_optuna(study, sweep) -> Study:
    """An optuna.Study of the sweep `sweep` (bench/sweep/spec.py), with the user attributes its trials carry
    (bench/sweep/study.py): train_steps, test_metrics, mlflow_run_id, pruned_at_step, fail_reason, retry_of (and
    the retry history Optuna's RetryFailedTrialCallback keeps in system_attrs)."""
    trials = []
    for t in study.get_trials(deepcopy=False):
        steps = t.user_attrs.get("train_steps")
        trials.append(Trial(
            number=t.number, state=t.state.name, value=t.values[0] if t.values else None,
            values=tuple(t.values) if t.values else None,
            settings=sweep.run_overrides(t.params) if set(t.params) == set(sweep.space) else {},
            params=t.params, test=dict(t.user_attrs.get("test_metrics") or {}),
            steps=None if steps is None else int(steps),
            seconds=t.duration.total_seconds() if t.duration else None,
            run_id=t.user_attrs.get("mlflow_run_id"), note=_optuna_note(t)))
    return summarize(study.study_name, sweep.metric, sweep.direction, trials, sweep.searched_keys, sweep.objectives)


# --- from MLflow: the report's reading -------------------------------------------------------------------------
def _number(v) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _trial_number(run: RunRecord) -> int:
    n = _number(run.tags.get("trial"))
    return int(n) if n is not None else 1 << 30


def _run_trial(run: RunRecord, objectives: list) -> Trial:
    state = FROM_MLFLOW.get(run.status, "FAIL")
    values = tuple(run.metrics.get(m) for m, _ in objectives)
    value = values[0]
    if state == "PRUNED" and run.tags.get("pruned") != "true":
        value = None   # interrupted, not pruned: its last figure says nothing about the settings
    steps = run.metrics.get(M.TRAIN_STEPS)
    return Trial(number=_trial_number(run), state=state, value=value, values=values, settings=run_settings(run),
                 test={k: run.metrics[k] for k in M.TEST if k in run.metrics},
                 steps=None if steps is None else int(steps),
                 seconds=(run.end_time - run.start_time) / 1000 if run.end_time else None, run_id=run.run_id,
                 note=run.tags.get("error") or run.tags.get("sweep_error") or "")


def _searched(trials: list[Trial]) -> list[str]:
    """Settings that differ between the complete trials (config keys only)."""
    settings = [t.settings for t in trials]
    return sorted(k for k in {k for s in settings for k in s} if len({s.get(k) for s in settings}) > 1
                  and k != "hardware")


def from_runs(runs: list[RunRecord]) -> list[Study]:
    """One Study per `study` tag, in name order; the parent run (no `trial` tag) names the objective."""
    by_name: dict[str, list[RunRecord]] = defaultdict(list)
    for r in runs:
        by_name[r.tags["study"]].append(r)
    out = []
    for name in sorted(by_name):
        runs_ = sorted((r for r in by_name[name] if "trial" in r.tags),
                       key=lambda r: (_trial_number(r), r.start_time, r.run_id))
        parents = sorted((r for r in by_name[name] if "trial" not in r.tags), key=lambda r: (r.start_time, r.run_id))
        source = {**{k: v for t in runs_ for k, v in t.tags.items()}, **(parents[-1].tags if parents else {})}
        objective, direction = source.get("objective", DEFAULT_OBJECTIVE), source.get("direction", "maximize")
        objectives = parse_objectives(source.get("objectives")) or [(objective, direction)]
        trials = [_run_trial(r, objectives) for r in runs_]
        complete = [t for t in trials if t.state == "COMPLETE" and t.value is not None]
        out.append(summarize(name, objective, direction, trials, _searched(complete), objectives))
    return out


def plot_axes(study: Study) -> tuple[str, str | None] | None:
    """The report's objective plot axes: rank × alpha when the study searched them, else its first one or two
    numeric settings. (The sweep's own plot uses the sweep file's `plot`.)"""
    if {"method.r", "method.alpha"} <= set(study.searched):
        return "method.r", "method.alpha"
    numeric = [k for k in study.searched if all(_number(t.settings.get(k)) is not None for t in study.complete)]
    return (numeric[0], numeric[1] if len(numeric) > 1 else None) if numeric else None
