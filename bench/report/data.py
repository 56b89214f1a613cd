"""The runs (bench/report/runs.py), grouped into the report's groups (task × model × quant) and rows (one per method).

Runs enter the tables only when FINISHED with a `test/accuracy`; FINISHED runs without one (the old protocol,
`eval/*` metrics) are only counted in provenance; sweep runs (tag `study`) go to the sweeps section; FAILED,
KILLED and unfinished runs go to provenance. Within one method, runs whose settings differ (say `method.r=8` and
`method.r=16`) become separate rows labelled with what differs; of several FINISHED runs with the same settings
and seed (a rerun) the latest counts. The runs in the tables have their test predictions read
(bench/report/predictions.py) for the test-sampling interval and the paired tests.

Memory: each group has one method-separating memory figure (`Group.memory_metric`): on CUDA
`mem/peak_train_bytes` (peak allocated), else (CPU) `mem/train_growth_bytes`, since the CPU peak is the whole
process's RSS, dominated by what every method shares. Budgets, the memory Pareto frontier and the selection use it.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from functools import cached_property

from bench.core import metrics as M
from bench.report import predictions
from bench.report.runs import RunRecord, read_runs, run_settings
from bench.report.stats import Estimate, PairedTest, mean_ci, pareto_front, wilson

ACCURACY = M.TEST_ACCURACY
# figures averaged over seeds per row (the memory figures: see the module doc)
MEANS = (M.MEM_TRAIN_GROWTH, M.MEM_PEAK_TRAIN, M.CKPT_BYTES, M.TIME_TRAIN, M.PARAMS_TRAINABLE_PCT,
         M.THROUGHPUT_TOKENS)


@dataclass
class Row:
    label: str                   # the method, plus what differs when one method has several settings
    method: str
    runs: list[RunRecord]        # one per seed, in seed order
    accuracy: Estimate           # test/accuracy over seeds (the seed interval)
    values: dict[str, list[float]]           # MEANS figures, one value per seed that reported it
    answers: dict[str, predictions.Answers] = field(default_factory=dict)  # seed -> its test answers
    pareto: list[str] = field(default_factory=list)   # short names of the cost axes it is on the frontier of

    @property
    def seeds(self) -> list[str]:
        return [r.seed for r in self.runs]

    @cached_property
    def means(self) -> dict[str, float | None]:
        return {m: (math.fsum(v) / len(v) if v else None) for m, v in self.values.items()}

    @property
    def without_predictions(self) -> list[str]:
        return [s for s in self.seeds if s not in self.answers]

    @cached_property
    def test_sampling(self) -> tuple[float, float, int] | None:
        """Wilson interval of the pooled accuracy and n distinct test examples; None unless every run of the row
        has its predictions."""
        if not self.answers or self.without_predictions:
            return None
        accuracy, n = predictions.pooled([self.answers[s] for s in self.seeds])
        return (*wilson(accuracy, n), n)


@dataclass
class Group:
    task: str
    model: str
    quant: str
    rows: list[Row]
    reference: Row | None        # full fine-tuning, when present
    _paired: dict = field(default_factory=dict, repr=False)

    @property
    def cuda(self) -> bool:
        return all(r.tags.get("device") == "cuda" for row in self.rows for r in row.runs)

    @property
    def memory_metric(self) -> str:
        """The method-separating memory figure (module doc)."""
        return M.MEM_PEAK_TRAIN if self.cuda else M.MEM_TRAIN_GROWTH

    @property
    def costs(self) -> tuple[tuple[str, str], ...]:
        """Cost axes of the Pareto frontiers and plots: (metric, short name used in the report)."""
        return (self.memory_metric, "memory"), (M.CKPT_BYTES, "checkpoint"), (M.TIME_TRAIN, "train time")

    def paired(self, a: Row, b: Row) -> PairedTest | str:
        """A's test accuracy minus B's, paired on the same examples (and seeds); a string says why unavailable."""
        key = (a.label, b.label)
        if key not in self._paired:
            missing = [f"{row.label} (seed{'s' if len(row.without_predictions) > 1 else ''} "
                       f"{', '.join(row.without_predictions)})" for row in (a, b) if row.without_predictions]
            found = predictions.paired(a.answers, b.answers, _seed_order)
            if isinstance(found, str) and missing:
                found = f"no predictions for {', '.join(missing)}"
            self._paired[key] = found
        return self._paired[key]

    @property
    def title(self) -> str:
        return f"{self.task} · {self.model} · {self.quant}"

    @property
    def slug(self) -> str:
        return "-".join(safe_name(x) for x in (self.task, self.model, self.quant))


@dataclass
class Data:
    uri: str
    experiments: list[str]
    runs: list[RunRecord]                  # everything read, in a stable order
    groups: list[Group]
    sweep_runs: list[RunRecord]
    superseded: list[RunRecord]            # FINISHED runs replaced by a later run with the same settings and seed
    old_protocol: list[RunRecord] = field(default_factory=list)   # FINISHED, no test/accuracy: not in the tables
    remote_error: str | None = None        # why predictions could not be downloaded, when that failed

    @property
    def not_finished(self) -> list[RunRecord]:
        return [r for r in self.runs if r.status != "FINISHED"]


def safe_name(s: str) -> str:
    return "".join(c if c.isalnum() or c in "._" else "_" for c in s)


def _short(param: str) -> str:
    return param.removeprefix("method.")


def _variants(method: str, runs: list[RunRecord]) -> dict[str, list[RunRecord]]:
    """Split one method's runs by the settings that differ between them; label each part with those settings."""
    settings = [run_settings(r) for r in runs]
    differing = sorted(k for k in {k for s in settings for k in s} if len({s.get(k) for s in settings}) > 1)
    if not differing:
        return {method: runs}
    parts: dict[tuple, list[RunRecord]] = defaultdict(list)
    for run, s in zip(runs, settings):
        parts[tuple(s.get(k) for k in differing)].append(run)
    out: dict[str, list[RunRecord]] = {}
    for ident in sorted(parts, key=lambda t: tuple(map(str, t))):
        values = dict(zip(differing, ident))
        named = [f"{_short(k)}={values[k]}" for k in differing if values[k] is not None]  # unset: the default
        label = f"{method} ({', '.join(named)})" if named else method
        out[label if label not in out else f"{label} #{sum(k.startswith(label) for k in out) + 1}"] = parts[ident]
    return out


def _seed_order(seed: str) -> tuple:
    try:
        return 0, int(seed), seed
    except ValueError:
        return 1, 0, seed


def _latest_per_seed(runs: list[RunRecord]) -> tuple[list[RunRecord], list[RunRecord]]:
    by_seed: dict[str, list[RunRecord]] = defaultdict(list)
    for r in runs:
        by_seed[r.seed].append(r)
    kept, dropped = [], []
    for seed in sorted(by_seed, key=_seed_order):
        rs = sorted(by_seed[seed], key=lambda r: (r.start_time, r.run_id))
        kept.append(rs[-1])
        dropped += rs[:-1]
    return kept, dropped


def _row(label: str, method: str, runs: list[RunRecord], read) -> Row:
    values = {m: [r.metrics[m] for r in runs if math.isfinite(r.metrics.get(m, math.nan))] for m in MEANS}
    answers = {r.seed: found for r in runs if (found := read(r)) is not None}
    return Row(label=label, method=method, runs=runs, accuracy=mean_ci([r.metrics[ACCURACY] for r in runs]),
               values=values, answers=answers)


def _no_predictions(run: RunRecord) -> None:
    return None


def build(uri: str, experiments: list[str], runs: list[RunRecord], read=_no_predictions) -> Data:
    """`read`: run -> its predictions.Answers or None (predictions.Reader; by default none are read)."""
    sweep_runs = [r for r in runs if "study" in r.tags]
    finished = [r for r in runs if "study" not in r.tags and r.status == "FINISHED"]
    table_runs = [r for r in finished if math.isfinite(r.metrics.get(ACCURACY, math.nan))]
    old_protocol = [r for r in finished if not math.isfinite(r.metrics.get(ACCURACY, math.nan))]
    by_key: dict[tuple[str, str, str], dict[str, list[RunRecord]]] = defaultdict(lambda: defaultdict(list))
    for r in table_runs:
        by_key[r.key][r.tags.get("method", "?")].append(r)
    groups, superseded = [], []
    for (task, model, quant) in sorted(by_key):
        rows = []
        for method in sorted(by_key[(task, model, quant)]):
            for label, vruns in _variants(method, by_key[(task, model, quant)][method]).items():
                kept, dropped = _latest_per_seed(vruns)
                superseded += dropped
                rows.append(_row(label, method, kept, read))
        fulls = sorted((r for r in rows if r.method == "full"), key=lambda r: (-r.accuracy.n, r.label))
        reference = fulls[0] if fulls else None
        group = Group(task, model, quant, rows, reference)
        for metric, short in group.costs:
            ranked = [r for r in rows if r.means[metric] is not None]
            for row, on in zip(ranked, pareto_front([(r.accuracy.mean, r.means[metric]) for r in ranked])):
                if on:
                    row.pareto.append(short)
        rows.sort(key=lambda r: (r is not reference, -r.accuracy.mean, r.label))
        groups.append(group)
    superseded.sort(key=lambda r: (r.start_time, r.name, r.run_id))
    return Data(uri=uri, experiments=list(experiments), runs=runs, groups=groups, sweep_runs=sweep_runs,
                superseded=superseded, old_protocol=old_protocol)


def load(uri: str, experiments: list[str]) -> Data:
    reader = predictions.Reader(uri)
    data = build(uri, experiments, read_runs(uri, experiments), reader)
    data.remote_error = reader.remote_error
    return data
