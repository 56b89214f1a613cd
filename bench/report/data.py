"""The runs (bench/report/runs.py), grouped into the report's groups (task × model × quant, and the kind of run
when it is generative) and rows (one per method).

Kinds of run (metrics.RUN_KINDS, `run_kind`): classification, and the generative tasks by their scorer. Runs with a
`test/accuracy` (classification and label_match) enter the accuracy tables (`Group`); chrf_bleu runs (translation)
have no accuracy: they enter the score tables (`ScoreGroup`: test chrF and BLEU over seeds, costs, forgetting).
Runs enter the tables only when FINISHED with their headline figure; FINISHED runs without one (the old protocol,
`eval/*` metrics) are only counted in provenance; sweep runs (tag `study`) go to the sweeps section; FAILED,
KILLED and unfinished runs go to provenance. Runs trained on k examples per class (`task.train_per_class` set)
never enter the tables: they are learning-curve points (bench/report/curves.py), so no row averages runs trained
on different amounts of data; multi-task parent runs (tag `multitask=parent`) are never rows either (the claims
section reads them; their children are ordinary runs). Within one method, runs whose settings differ (say
`method.r=8` and `method.r=16`) become separate rows labelled with what differs; of several FINISHED runs with the
same settings and seed (a rerun) the latest counts. The runs in the tables have their test predictions read
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
from bench.report.runs import (RunRecord, is_multitask_parent, latest_per_seed, read_runs, seed_order,
                               train_per_class, variants)
from bench.report.stats import Estimate, PairedTest, mean_ci, pareto_front, wilson

ACCURACY = M.TEST_ACCURACY
# figures averaged over seeds per row (the memory figures: see the module doc)
MEANS = (M.MEM_TRAIN_GROWTH, M.MEM_PEAK_TRAIN, M.CKPT_BYTES, M.TIME_TRAIN, M.PARAMS_TRAINABLE_PCT,
         M.THROUGHPUT_TOKENS)
# figures only some kinds of run report (metrics.yaml: `runs`), averaged over the seeds that reported them; a
# table shows a column for one only when a row of its group has it
OPTIONAL = (M.TEST_INVALID_RATE, M.FORGET_LOSS_DELTA, M.FORGET_EMBEDDING_COSINE)
# the score tables' headline figures (chrf_bleu runs), each over seeds; the first one orders rows and frontiers
SCORES = (M.TEST_CHRF, M.TEST_BLEU)
CLASSIFICATION = "classification"


def run_kind(run: RunRecord) -> str:
    """The run's kind (metrics.RUN_KINDS) from its params `task.kind` and `task.scorer`; a run logged without them
    (before generative tasks) by its metrics: classification unless it has chrF or an invalid rate."""
    kind = run.params.get("task.kind")
    if kind is not None:
        found = M.run_kind(kind, run.params.get("task.scorer"))
        if found in M.RUN_KINDS:
            return found
    if M.TEST_CHRF in run.metrics and ACCURACY not in run.metrics:
        return "chrf_bleu"
    return "label_match" if M.TEST_INVALID_RATE in run.metrics else CLASSIFICATION


@dataclass
class Row:
    label: str                   # the method, plus what differs when one method has several settings
    method: str
    runs: list[RunRecord]        # one per seed, in seed order
    accuracy: Estimate           # test/accuracy over seeds (the seed interval)
    values: dict[str, list[float]]           # MEANS and OPTIONAL figures, one value per seed that reported it
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


class _Place:
    """What a group of either table shares: its title, slug, device and cost axes (fields task, model, quant,
    kind, rows)."""

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

    @property
    def _parts(self) -> tuple[str, ...]:
        """task, model, quant, and the kind of run when it is generative (a task=local or task=hf name may hold
        both kinds)."""
        return (self.task, self.model, self.quant) + (() if self.kind == CLASSIFICATION else (self.kind,))

    @property
    def title(self) -> str:
        return " · ".join(self._parts)

    @property
    def slug(self) -> str:
        return "-".join(safe_name(x) for x in self._parts)

    def optional(self) -> list[str]:
        """The OPTIONAL figures some row of the group reported."""
        return [m for m in OPTIONAL if any(row.means[m] is not None for row in self.rows)]


@dataclass
class Group(_Place):
    task: str
    model: str
    quant: str
    rows: list[Row]
    reference: Row | None        # full fine-tuning, when present
    _paired: dict = field(default_factory=dict, repr=False)
    kind: str = CLASSIFICATION   # classification or label_match (metrics.RUN_KINDS)

    def paired(self, a: Row, b: Row) -> PairedTest | str:
        """A's test accuracy minus B's, paired on the same examples (and seeds); a string says why unavailable."""
        key = (a.label, b.label)
        if key not in self._paired:
            missing = [f"{row.label} (seed{'s' if len(row.without_predictions) > 1 else ''} "
                       f"{', '.join(row.without_predictions)})" for row in (a, b) if row.without_predictions]
            found = predictions.paired(a.answers, b.answers, seed_order)
            if isinstance(found, str) and missing:
                found = f"no predictions for {', '.join(missing)}"
            self._paired[key] = found
        return self._paired[key]


@dataclass
class ScoreRow:
    """A row of a score table (chrf_bleu runs): SCORES over seeds instead of an accuracy."""
    label: str
    method: str
    runs: list[RunRecord]        # one per seed, in seed order
    scores: dict[str, Estimate | None]  # each of SCORES over the seeds that reported it (None: none did)
    values: dict[str, list[float]]
    pareto: list[str] = field(default_factory=list)

    @property
    def seeds(self) -> list[str]:
        return [r.seed for r in self.runs]

    @property
    def headline(self) -> Estimate:
        return self.scores[SCORES[0]]

    @cached_property
    def means(self) -> dict[str, float | None]:
        return {m: (math.fsum(v) / len(v) if v else None) for m, v in self.values.items()}


@dataclass
class ScoreGroup(_Place):
    """Runs of one task × model × quant whose headline is a corpus score (chrF, BLEU), not an accuracy: no
    per-example verdicts, so no test-sampling interval, no paired test and no method selection."""
    task: str
    model: str
    quant: str
    kind: str
    rows: list[ScoreRow]
    reference: ScoreRow | None


@dataclass
class Data:
    uri: str
    experiments: list[str]
    runs: list[RunRecord]                  # everything read, in a stable order
    groups: list[Group]
    sweep_runs: list[RunRecord]
    superseded: list[RunRecord]            # FINISHED runs replaced by a later run with the same settings and seed
    old_protocol: list[RunRecord] = field(default_factory=list)   # FINISHED, no headline figure: not in the tables
    score_groups: list[ScoreGroup] = field(default_factory=list)   # chrf_bleu runs
    remote_error: str | None = None        # why predictions could not be downloaded, when that failed
    # data-efficiency runs (task.train_per_class set; bench/report/curves.py): FINISHED, with test/accuracy, never in
    # the method tables, which must not average runs trained on different amounts of data
    curve_runs: list[RunRecord] = field(default_factory=list)
    multitask: list[RunRecord] = field(default_factory=list)   # FINISHED multi-task parent runs: never table rows
    read: object = field(default=None, repr=False)   # run -> its predictions.Answers or None (memoized)

    @property
    def not_finished(self) -> list[RunRecord]:
        return [r for r in self.runs if r.status != "FINISHED"]


def safe_name(s: str) -> str:
    return "".join(c if c.isalnum() or c in "._" else "_" for c in s)


def _values(runs: list[RunRecord], metrics) -> dict[str, list[float]]:
    return {m: [r.metrics[m] for r in runs if math.isfinite(r.metrics.get(m, math.nan))] for m in metrics}


def make_row(label: str, method: str, runs: list[RunRecord], read) -> Row:
    """A table row of these runs (one per seed), their predictions read with `read`."""
    answers = {r.seed: found for r in runs if (found := read(r)) is not None}
    return Row(label=label, method=method, runs=runs, accuracy=mean_ci([r.metrics[ACCURACY] for r in runs]),
               values=_values(runs, MEANS + OPTIONAL), answers=answers)


def _score_row(label: str, method: str, runs: list[RunRecord]) -> ScoreRow:
    values = _values(runs, SCORES)
    return ScoreRow(label=label, method=method, runs=runs,
                    scores={m: mean_ci(values[m]) if values[m] else None for m in SCORES},
                    values=_values(runs, MEANS + OPTIONAL))


def _has(run: RunRecord, metric: str) -> bool:
    return math.isfinite(run.metrics.get(metric, math.nan))


def _rows(runs_by_method: dict[str, list[RunRecord]], make) -> tuple[list, list[RunRecord]]:
    """One row per method and settings (`make(label, method, runs)`), the latest run per seed; the superseded."""
    rows, superseded = [], []
    for method in sorted(runs_by_method):
        for label, vruns in variants(method, runs_by_method[method]).items():
            kept, dropped = latest_per_seed(vruns)
            superseded += dropped
            rows.append(make(label, method, kept))
    return rows, superseded


def _mark_pareto(group, score) -> None:
    """Name on each row the cost axes whose Pareto frontier (max `score(row)`, min the cost) it is on."""
    for metric, short in group.costs:
        ranked = [r for r in group.rows if r.means[metric] is not None]
        for row, on in zip(ranked, pareto_front([(score(r), r.means[metric]) for r in ranked])):
            if on:
                row.pareto.append(short)


def _score_groups(runs: list[RunRecord]) -> tuple[list[ScoreGroup], list[RunRecord]]:
    by_key: dict[tuple[str, str, str, str], dict[str, list[RunRecord]]] = defaultdict(lambda: defaultdict(list))
    for r in runs:
        by_key[(*r.key, run_kind(r))][r.tags.get("method", "?")].append(r)
    groups, superseded = [], []
    for (task, model, quant, kind) in sorted(by_key):
        rows, dropped = _rows(by_key[(task, model, quant, kind)], _score_row)
        superseded += dropped
        fulls = sorted((r for r in rows if r.method == "full"), key=lambda r: (-r.headline.n, r.label))
        reference = fulls[0] if fulls else None
        group = ScoreGroup(task, model, quant, kind, rows, reference)
        _mark_pareto(group, lambda r: r.headline.mean)
        rows.sort(key=lambda r: (r is not reference, -r.headline.mean, r.label))
        groups.append(group)
    return groups, superseded


def _no_predictions(run: RunRecord) -> None:
    return None


def _memo(read):
    """`read` once per run: the learning curves read the predictions of runs the tables have read."""
    cache: dict[str, object] = {}

    def cached(run: RunRecord):
        if run.run_id not in cache:
            cache[run.run_id] = read(run)
        return cache[run.run_id]
    return cached


def build(uri: str, experiments: list[str], runs: list[RunRecord], read=_no_predictions) -> Data:
    """`read`: run -> its predictions.Answers or None (predictions.Reader; by default none are read)."""
    read = _memo(read)
    sweep_runs = [r for r in runs if "study" in r.tags]
    multitask = [r for r in runs if is_multitask_parent(r) and "study" not in r.tags]
    finished = [r for r in runs if "study" not in r.tags and r.status == "FINISHED" and not is_multitask_parent(r)]
    curve_runs = [r for r in finished if train_per_class(r) is not None and _has(r, ACCURACY)]
    table_runs = [r for r in finished if train_per_class(r) is None and _has(r, ACCURACY)]
    score_runs = [r for r in finished if train_per_class(r) is None and not _has(r, ACCURACY)
                  and run_kind(r) == "chrf_bleu" and _has(r, SCORES[0])]
    in_tables = {id(r) for r in table_runs + score_runs + curve_runs}
    old_protocol = [r for r in finished if id(r) not in in_tables]
    by_key: dict[tuple[str, str, str, str], dict[str, list[RunRecord]]] = defaultdict(lambda: defaultdict(list))
    for r in table_runs:
        by_key[(*r.key, run_kind(r))][r.tags.get("method", "?")].append(r)
    groups, superseded = [], []
    for (task, model, quant, kind) in sorted(by_key):
        rows, dropped = _rows(by_key[(task, model, quant, kind)], lambda *a: make_row(*a, read))
        superseded += dropped
        fulls = sorted((r for r in rows if r.method == "full"), key=lambda r: (-r.accuracy.n, r.label))
        reference = fulls[0] if fulls else None
        group = Group(task, model, quant, rows, reference, kind=kind)
        _mark_pareto(group, lambda r: r.accuracy.mean)
        rows.sort(key=lambda r: (r is not reference, -r.accuracy.mean, r.label))
        groups.append(group)
    score_groups, dropped = _score_groups(score_runs)
    superseded += dropped
    superseded.sort(key=lambda r: (r.start_time, r.name, r.run_id))
    return Data(uri=uri, experiments=list(experiments), runs=runs, groups=groups, sweep_runs=sweep_runs,
                superseded=superseded, old_protocol=old_protocol, score_groups=score_groups, curve_runs=curve_runs,
                multitask=[r for r in multitask if r.status == "FINISHED"], read=read)


def load(uri: str, experiments: list[str], store_uri: str | None = None, artifacts_root: str | None = None) -> Data:
    """store_uri: read the runs from the server's backend store (plain SQL); artifacts_root: its artifact folder,
    read directly; else the artifacts come through `uri`."""
    reader = predictions.Reader(uri, artifacts_root)
    runs = read_runs(store_uri or uri, experiments)
    reader.prefetch([r for r in runs if r.status == "FINISHED" and "study" not in r.tags and _has(r, ACCURACY)])
    data = build(uri, experiments, runs, reader)
    data.remote_error = reader.remote_error
    return data
