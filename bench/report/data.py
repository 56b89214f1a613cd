"""Runs out of MLflow, into the report's groups (task × model × quant) and rows (one per method).

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
import sqlite3
from collections import defaultdict
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from urllib.parse import urlparse

from bench.core import metrics as M
from bench.errors import BenchError
from bench.fmt import error_line
from bench.report import predictions
from bench.report.stats import Estimate, PairedTest, mean_ci, pareto_front, wilson

ACCURACY = M.TEST_ACCURACY
# figures averaged over seeds per row (the memory figures: see the module doc)
MEANS = (M.MEM_TRAIN_GROWTH, M.MEM_PEAK_TRAIN, M.CKPT_BYTES, M.TIME_TRAIN, M.PARAMS_TRAINABLE_PCT,
         M.THROUGHPUT_TOKENS)
# settings that do not change what a run measures (where it logs, how often it evaluates, how it is launched)
IGNORED_PARAMS = {"seed", "rerun", "device", "train.isolate", "train.threads", "train.log_every", "train.eval_every",
                  "train.eval_batch_size", "method.lr"}  # method.lr: only a default; train.lr is what trains
IGNORED_PREFIXES = ("tracking.",)


@dataclass(frozen=True)
class RunRecord:
    run_id: str
    name: str
    status: str
    start_time: int            # ms since the epoch, MLflow's own
    end_time: int | None
    experiment: str
    tags: dict[str, str]
    params: dict[str, str]
    metrics: dict[str, float]
    artifact_uri: str = ""

    @property
    def seed(self) -> str:
        return self.tags.get("seed", self.params.get("seed", "?"))

    @property
    def key(self) -> tuple[str, str, str]:
        return self.tags.get("task", "?"), self.tags.get("model", "?"), self.tags.get("quant", "none")


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


def _sqlite_path(uri: str) -> str:
    return uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else urlparse(uri).path


def check_store(uri: str) -> None:
    """MLflow would silently create an empty store at a mistyped path; a report wants an existing one."""
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite":
        path = _sqlite_path(uri)
        if path not in ("", ":memory:") and not Path(path).is_file():
            raise BenchError(f"--tracking-uri: no MLflow store at {path} ({uri}); valid: an existing sqlite:///FILE, "
                             "a file store folder or an http(s):// server")
    elif parsed.scheme in ("", "file"):
        path = parsed.path if parsed.scheme == "file" else uri
        if not Path(path).is_dir():
            raise BenchError(f"--tracking-uri: no MLflow store folder at {path}; valid: an existing sqlite:///FILE, "
                             "a file store folder or an http(s):// server")


def client_for(uri: str):
    check_store(uri)
    from mlflow.tracking import MlflowClient
    return MlflowClient(tracking_uri=uri)


def read_runs(uri: str, experiments: list[str]) -> list[RunRecord]:
    if urlparse(uri).scheme == "sqlite":
        check_store(uri)
        try:
            return _checked(_read_sqlite(Path(_sqlite_path(uri)), uri, experiments), uri, experiments)
        except sqlite3.DatabaseError:
            pass  # a schema this reader does not know, or a lock held too long: let MLflow read it
    return _checked(_read_mlflow(uri, experiments), uri, experiments)


def _checked(runs: list[RunRecord], uri: str, experiments: list[str]) -> list[RunRecord]:
    if not runs:
        raise BenchError(f"--experiment: {', '.join(map(repr, experiments))} in {uri} has no runs; "
                         "run `python -m bench ...` first")
    return sorted(runs, key=lambda r: (r.start_time, r.name, r.run_id))


def _unknown(missing: list[str], known: list[str], uri: str) -> BenchError:
    return BenchError(f"--experiment: no experiment named {', '.join(map(repr, missing))} in {uri}; "
                      f"valid: {', '.join(sorted(known)) or '(none: the store is empty)'}")


def _read_mlflow(uri: str, experiments: list[str]) -> list[RunRecord]:
    client = client_for(uri)
    try:
        known = {e.name: e.experiment_id for e in client.search_experiments()}
    except Exception as e:  # unreachable server, wrong scheme, unreadable file: one line, not a traceback
        raise BenchError(f"--tracking-uri: cannot read {uri}: {error_line(e)}") from None
    missing = [name for name in experiments if name not in known]
    if missing:
        raise _unknown(missing, list(known), uri)
    ids = [known[name] for name in experiments]
    names = {known[name]: name for name in experiments}
    runs, token = [], None
    while True:  # search_runs pages at most 1,000 runs at a time
        page = client.search_runs(ids, max_results=1000, page_token=token)
        runs += [RunRecord(run_id=r.info.run_id, name=r.info.run_name or r.info.run_id, status=r.info.status,
                           start_time=r.info.start_time or 0, end_time=r.info.end_time,
                           experiment=names[r.info.experiment_id], tags=dict(r.data.tags),
                           params=dict(r.data.params), metrics=dict(r.data.metrics),
                           artifact_uri=r.info.artifact_uri or "") for r in page]
        token = page.token
        if not token:
            break
    return runs


def _read_sqlite(store: Path, uri: str, experiments: list[str]) -> list[RunRecord]:
    """The same records as _read_mlflow (tests/test_report.py checks that), read with plain SQL: MLflow's
    search_runs builds ORM objects for every param, tag and metric, ~8 s for 1,000 runs against ~0.3 s here."""
    # read only: a report never writes to the store; wait out a writer's lock like MLflow would
    db = sqlite3.connect(f"{store.absolute().as_uri()}?mode=ro", uri=True, timeout=30)
    try:
        cols = {row[1] for row in db.execute("PRAGMA table_info(experiments)")}
        where = "lifecycle_stage = 'active'" + (" AND workspace = 'default'" if "workspace" in cols else "")
        known = dict(db.execute(f"SELECT name, experiment_id FROM experiments WHERE {where}").fetchall())
        missing = [name for name in experiments if name not in known]
        if missing:
            raise _unknown(missing, list(known), uri)
        names = {known[name]: name for name in experiments}
        marks = ",".join("?" * len(names))
        base = f"SELECT run_uuid FROM runs WHERE experiment_id IN ({marks}) AND lifecycle_stage = 'active'"
        args = list(names)
        tags, params, metrics = defaultdict(dict), defaultdict(dict), defaultdict(dict)
        for rid, key, value in db.execute(f"SELECT run_uuid, key, value FROM tags WHERE run_uuid IN ({base})", args):
            tags[rid][key] = value
        for rid, key, value in db.execute(f"SELECT run_uuid, key, value FROM params WHERE run_uuid IN ({base})",
                                          args):
            params[rid][key] = value
        for rid, key, value, is_nan in db.execute(
                f"SELECT run_uuid, key, value, is_nan FROM latest_metrics WHERE run_uuid IN ({base})", args):
            metrics[rid][key] = float("nan") if is_nan else float(value)
        rows = db.execute("SELECT run_uuid, name, status, start_time, end_time, experiment_id, artifact_uri "
                          f"FROM runs WHERE experiment_id IN ({marks}) AND lifecycle_stage = 'active'",
                          args).fetchall()
    finally:
        db.close()
    return [RunRecord(run_id=rid, name=name or tags[rid].get("mlflow.runName") or rid, status=status,
                      start_time=start or 0, end_time=end, experiment=names[exp], tags=tags[rid],
                      params=params[rid], metrics=metrics[rid], artifact_uri=uri_ or "")
            for rid, name, status, start, end, exp, uri_ in rows]


def run_settings(run: RunRecord) -> dict[str, str]:
    """What a run's figures depend on: its config (params) and, for memory and time, the hardware it ran on."""
    settings = {k: v for k, v in run.params.items() if k not in IGNORED_PARAMS and not k.startswith(IGNORED_PREFIXES)}
    if "device_name" in run.tags:
        settings["hardware"] = run.tags["device_name"]
    return settings


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
