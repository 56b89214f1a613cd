"""Runs out of MLflow: one `RunRecord` per run (its tags, params and latest metrics), read with plain SQL from a
sqlite store and with MLflow's client from anything else (a file store, a server); `run_settings`, what a
run's figures depend on, and what rows and curves are built from: `variants` (one method's runs split by the
settings that differ), `latest_per_seed`, `train_per_class`, `is_multitask_parent`. The report's grouping
(bench/report/data.py), its learning curves (bench/report/curves.py) and its sweeps (bench/report/sweeps.py) read
these records only."""
from __future__ import annotations

import sqlite3
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from bench.errors import BenchError
from bench.fmt import error_line, redact_url

# settings that do not change what a run measures (where it logs, how often it evaluates, how it is launched)
IGNORED_PARAMS = {"seed", "rerun", "device", "train.isolate", "train.threads", "train.log_every", "train.eval_every",
                  "train.eval_batch_size", "method.lr",   # method.lr: only a default; train.lr is what trains
                  "forgetting"}   # forget/* figures or none; the run's other figures are the same
# method.peft.*: stores written before each knob had one name (method YAMLs with a `peft:` block) repeat the
# method's knobs there; what the run depends on is in the method's own keys
# deploy.*: how the trained model's inference was timed after the test evaluation (bench/core/deploy.py); it
# changes no training figure, and runs logged before it existed share their rows with new ones
# method.search.*: the method's search space (bench.compare), no setting of the run (not logged since it exists)
IGNORED_PREFIXES = ("tracking.", "method.peft.", "deploy.", "method.search.")
# keys added with a null default: a run logged before one existed ran with that default (null is logged as "None")
NULL_DEFAULTS = {"task.train_per_class"}
# the tags that set a run apart from the method tables: a multi-task parent run (its children are ordinary runs)
MULTITASK_TAG, MULTITASK_PARENT = "multitask", "parent"
# the generative tasks' keys (conf/task/_splits.yaml: kind; _generation.yaml, which task=local and task=hf list too):
# a classification run does not read them, and runs logged before them (no task.kind) were classification runs
GENERATIVE_KEYS = {"task.kind", "task.template", "task.max_new_tokens", "task.scorer", "task.instruction",
                   "task.instruction_column", "task.input_column", "task.output_column", "task.label_words"}


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
    """sqlite:///FILE and postgresql://... (an MLflow backend store, e.g. the stack's): plain SQL; anything else
    (a file store, an http(s) server): MLflow's client."""
    scheme = urlparse(uri).scheme
    if scheme == "sqlite":
        check_store(uri)
        db = sqlite3.connect(f"{Path(_sqlite_path(uri)).absolute().as_uri()}?mode=ro", uri=True, timeout=30)
        try:   # read only: a report never writes to the store; wait out a writer's lock like MLflow would
            return _checked(_read_sql(_Sql(db, "?", uri), experiments), uri, experiments)
        except sqlite3.DatabaseError as e:
            raise BenchError(f"--tracking-uri {uri}: cannot read the store: {e}") from None
        finally:
            db.close()
    if scheme.startswith("postgresql"):
        from bench.stack.postgres import driver
        psycopg = driver()
        try:
            db = psycopg.connect(uri.replace("postgresql+psycopg://", "postgresql://", 1), connect_timeout=30)
        except psycopg.Error as e:
            raise BenchError(f"--tracking-uri {redact_url(uri)}: cannot connect: {str(e).strip().splitlines()[0]} "
                             "(the password comes from PGPASSWORD)") from None
        try:
            return _checked(_read_sql(_Sql(db, "%s", redact_url(uri)), experiments), redact_url(uri), experiments)
        finally:
            db.close()
    return _checked(_read_mlflow(uri, experiments), uri, experiments)


def _checked(runs: list[RunRecord], uri: str, experiments: list[str]) -> list[RunRecord]:
    if not runs:
        raise BenchError(f"--experiment: {', '.join(map(repr, experiments))} in {uri} has no runs; "
                         "run `python -m bench ...` first")
    return sorted(runs, key=lambda r: (r.start_time, r.name, r.run_id))


def _unknown(missing: list[str], known: list[str], uri: str) -> BenchError:
    return BenchError(f"--experiment: no experiment named {', '.join(map(repr, missing))} in {uri}; "
                      f"valid: {', '.join(sorted(known)) or '(none: the store is empty)'}")


SLOW_READ_S = 10.0   # a REST read slower than this names the direct read


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
    runs, token, started = [], None, time.perf_counter()
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
    took = time.perf_counter() - started
    if took > SLOW_READ_S and urlparse(uri).scheme in ("http", "https"):
        # an MLflow 3.17 server spends ~5 s of CPU per 1,000 runs building SQLAlchemy objects and JSON (py-spy)
        print(f"read {len(runs):,} runs through the server's REST API in {took:.0f} s; --store-uri "
              "postgresql://USER@HOST:PORT/DB (and --artifacts-root) reads its backend store directly, "
              "~4 s for 10,000 runs (README: Scaling out)", file=sys.stderr)
    return runs


# MLflow's schema revisions (alembic_version) the SQL below was written for and tested on: a store of another
# revision fails in one line instead of being misread (tests/test_report.py holds the installed MLflow's to it)
SCHEMAS = {"dc11669786a5": "mlflow 3.17"}


@dataclass
class _Sql:
    """A DB-API connection to an MLflow backend store (sqlite3 or psycopg) and its parameter mark."""
    db: object
    mark: str
    uri: str

    def rows(self, sql: str, args=()) -> list[tuple]:
        cur = self.db.cursor()
        try:
            cur.execute(sql.replace("?", self.mark), args)
            return cur.fetchall()
        finally:
            cur.close()


def check_schema(sql: _Sql) -> None:
    try:
        found = [r[0] for r in sql.rows("SELECT version_num FROM alembic_version")]
    except Exception:   # no such table: not an MLflow store, or one older than its migrations
        found = []
    if not found or found[0] not in SCHEMAS:
        raise BenchError(f"--tracking-uri {sql.uri}: MLflow schema revision {found[0] if found else '(none)'} is not "
                         f"the one bench/report/runs.py reads ({', '.join(f'{k}, {v}' for k, v in SCHEMAS.items())}); "
                         "install that MLflow (pyproject.toml), or run `mlflow db upgrade` on a copy of an older store")


def _read_sql(sql: _Sql, experiments: list[str] | None = None) -> list[RunRecord]:
    """The same records as _read_mlflow (tests/test_report.py checks that), read with plain SQL: MLflow's
    search_runs builds ORM objects for every param, tag and metric, ~8 s for 1,000 runs against ~0.3 s here."""
    check_schema(sql)
    known = dict(sql.rows("SELECT name, experiment_id FROM experiments WHERE lifecycle_stage = 'active'"
                          + (" AND workspace = 'default'" if _has_workspace(sql) else "")))
    missing = [name for name in experiments if name not in known]
    if missing:
        raise _unknown(missing, list(known), sql.uri)
    names = {known[name]: name for name in experiments}
    marks = ",".join("?" * len(names))
    base = f"SELECT run_uuid FROM runs WHERE experiment_id IN ({marks}) AND lifecycle_stage = 'active'"
    args = list(names)
    tags, params, metrics = defaultdict(dict), defaultdict(dict), defaultdict(dict)
    for rid, key, value in sql.rows(f"SELECT run_uuid, key, value FROM tags WHERE run_uuid IN ({base})", args):
        tags[rid][key] = value
    for rid, key, value in sql.rows(f"SELECT run_uuid, key, value FROM params WHERE run_uuid IN ({base})", args):
        params[rid][key] = value
    for rid, key, value, is_nan in sql.rows(
            f"SELECT run_uuid, key, value, is_nan FROM latest_metrics WHERE run_uuid IN ({base})", args):
        metrics[rid][key] = float("nan") if is_nan else float(value)
    rows = sql.rows("SELECT run_uuid, name, status, start_time, end_time, experiment_id, artifact_uri "
                    f"FROM runs WHERE experiment_id IN ({marks}) AND lifecycle_stage = 'active'", args)
    return [RunRecord(run_id=rid, name=name or tags[rid].get("mlflow.runName") or rid, status=status,
                      start_time=start or 0, end_time=end, experiment=names[exp], tags=tags[rid],
                      params=params[rid], metrics=metrics[rid], artifact_uri=uri_ or "")
            for rid, name, status, start, end, exp, uri_ in rows]


def _has_workspace(sql: _Sql) -> bool:
    if sql.mark == "?":
        return "workspace" in {row[1] for row in sql.rows("PRAGMA table_info(experiments)")}
    return bool(sql.rows("SELECT 1 FROM information_schema.columns WHERE table_name = 'experiments' AND "
                         "column_name = 'workspace'"))


def run_settings(run: RunRecord) -> dict[str, str]:
    """What a run's figures depend on: its config (params) and, for memory and time, the hardware it ran on."""
    ignored = IGNORED_PARAMS | (GENERATIVE_KEYS if run.params.get("task.kind", "classification") == "classification"
                                else set())
    settings = {k: v for k, v in run.params.items() if k not in ignored and not k.startswith(IGNORED_PREFIXES)
                and not (k in NULL_DEFAULTS and v == "None")}
    if "device_name" in run.tags:
        settings["hardware"] = run.tags["device_name"]
    return settings


def train_per_class(run: RunRecord) -> str | None:
    """The run's `task.train_per_class` (k examples per class, as logged), None when it trained on all examples."""
    k = run.params.get("task.train_per_class")
    return None if k in (None, "None", "") else k


def is_multitask_parent(run: RunRecord) -> bool:
    return run.tags.get(MULTITASK_TAG) == MULTITASK_PARENT


def seed_order(seed: str) -> tuple:
    try:
        return 0, int(seed), seed
    except ValueError:
        return 1, 0, seed


def latest_per_seed(runs: list[RunRecord]) -> tuple[list[RunRecord], list[RunRecord]]:
    """Of several runs per seed the latest (in seed order), and the superseded ones."""
    by_seed: dict[str, list[RunRecord]] = defaultdict(list)
    for r in runs:
        by_seed[r.seed].append(r)
    kept, dropped = [], []
    for seed in sorted(by_seed, key=seed_order):
        rs = sorted(by_seed[seed], key=lambda r: (r.start_time, r.run_id))
        kept.append(rs[-1])
        dropped += rs[:-1]
    return kept, dropped


def _short(param: str) -> str:
    return param.removeprefix("method.")


def variants(method: str, runs: list[RunRecord], ignore: frozenset[str] = frozenset()) -> dict[str, list[RunRecord]]:
    """Split one method's runs by the settings that differ between them (but those in `ignore`); label each part
    with those settings."""
    settings = [{k: v for k, v in run_settings(r).items() if k not in ignore} for r in runs]
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
