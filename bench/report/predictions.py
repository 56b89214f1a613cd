"""Per-example test predictions (the artifact metrics.PREDICTIONS_ARTIFACT of every finished run: int columns
`index`, `label`, `prediction`) and what the report builds on them: which examples a run got right, and the paired
test of two rows on the same examples (definitions: bench/report/stats.py). A generative label_match run's file
also has `score` (1.0: its normalized first line equals the reference): that verdict is the example's, since its
`label` is -1 for a reference outside the task's answers and its `prediction` -1 for an invalid answer, and
-1 = -1 would count as right.

Where the artifact is read from: a local artifact location (a plain path, a `file:` URI, or `mlflow-artifacts:`
served from an `mlartifacts/` folder next to the SQLite store or in the working directory, or from the server's
artifact folder named by the report's `--artifacts-root`) is checked with one file test and read directly
(pyarrow); any other location is downloaded through MLflow, 8 at a time. A run without the file (old
protocol, another machine's disk, a remote store that cannot be read) has no predictions: its comparisons say
"paired test unavailable" instead of a verdict. Only runs in the method tables are read.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from functools import reduce
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np

from bench.fmt import error_line
from bench.core.metrics import PREDICTIONS_ARTIFACT
from bench.report.stats import PairedTest, mcnemar_test, paired_bootstrap

COLUMNS = ["index", "label", "prediction"]
SCORE = "score"   # label_match runs only (module doc)


@dataclass(frozen=True)
class Answers:
    """One run's test answers: `index` (sorted, distinct example ids) and whether each was `correct`."""
    index: np.ndarray
    correct: np.ndarray

    @classmethod
    def from_columns(cls, index, label, prediction) -> "Answers":
        return cls.from_verdicts(index, np.asarray(prediction) == np.asarray(label))

    @classmethod
    def from_verdicts(cls, index, correct) -> "Answers":
        index, first = np.unique(np.asarray(index), return_index=True)   # sorted; a repeated id counts once
        return cls(index, np.asarray(correct, dtype=bool)[first])

    def on(self, examples: np.ndarray) -> np.ndarray:
        """`correct` for these examples (a sorted subset of `index`)."""
        if len(examples) == len(self.index):
            return self.correct
        return self.correct[np.searchsorted(self.index, examples)]


def _store_dir(store_uri: str) -> Path | None:
    if store_uri.startswith("sqlite:///"):
        path = store_uri[len("sqlite:///"):]
        return Path(path).parent if path not in ("", ":memory:") else None
    return None


def local_candidates(artifact_uri: str, store_uri: str, artifacts_root: str | None = None) -> list[Path] | None:
    """Paths where a run's predictions file may lie on this machine; None when its artifacts are remote.
    artifacts_root: the folder a server serves `mlflow-artifacts:` from (its --artifacts-destination), on this host."""
    parsed = urlparse(artifact_uri)
    if parsed.scheme == "mlflow-artifacts" and artifacts_root:
        return [Path(artifacts_root) / unquote(parsed.path).lstrip("/") / PREDICTIONS_ARTIFACT]
    bases = ([_store_dir(store_uri)] if _store_dir(store_uri) else []) + [Path.cwd()]
    if parsed.scheme == "file":
        return [Path(unquote(parsed.path)) / PREDICTIONS_ARTIFACT]
    if parsed.scheme == "":
        root = Path(artifact_uri)
        return [root / PREDICTIONS_ARTIFACT] if root.is_absolute() else [b / root / PREDICTIONS_ARTIFACT
                                                                          for b in bases]
    if parsed.scheme == "mlflow-artifacts" and not store_uri.startswith(("http://", "https://")):
        # a server proxied the artifacts into its --artifacts-destination (default ./mlartifacts)
        rel = unquote(parsed.path).lstrip("/")
        return [b / "mlartifacts" / rel / PREDICTIONS_ARTIFACT for b in bases]
    return None


def read_answers(path: Path) -> Answers | None:
    """The predictions file as Answers; None when it cannot be read or lacks the columns. Read with pyarrow, the
    Parquet engine pandas itself uses (an MLflow dependency): ~5x faster than pandas.read_parquet on such small
    files, and imported only when a file is there."""
    import pyarrow.parquet as pq
    try:
        found = pq.ParquetFile(path)
        graded = SCORE in found.schema_arrow.names   # a generative label_match run (module doc)
        table = found.read(columns=COLUMNS + [SCORE] if graded else COLUMNS, use_threads=False)
        if graded:
            return Answers.from_verdicts(table.column("index").to_numpy(), table.column(SCORE).to_numpy() == 1.0)
        return Answers.from_columns(*(table.column(c).to_numpy() for c in COLUMNS))
    except Exception:
        return None


class Reader:
    """run -> its Answers or None. Remote downloads stop after the first failure that is not a plain "no such
    artifact" (an unreachable server fails once, not once per run)."""

    THREADS = 8   # concurrent downloads from a server: each is a round trip or two, mostly waiting

    def __init__(self, store_uri: str, artifacts_root: str | None = None):
        self.store_uri, self.artifacts_root = store_uri, artifacts_root
        self.remote_error: str | None = None
        self._fetched: dict[str, Answers | None] = {}

    def __call__(self, run) -> Answers | None:
        candidates = local_candidates(run.artifact_uri or "", self.store_uri, self.artifacts_root)
        if candidates is not None:
            return next((read_answers(p) for p in candidates if p.is_file()), None)
        if run.run_id in self._fetched:
            return self._fetched[run.run_id]
        return self._download(run) if self.remote_error is None else None

    def prefetch(self, runs) -> None:
        """Download the remote predictions of these runs now, THREADS at a time (a server store: one request per
        run otherwise adds up to minutes at thousands of runs)."""
        from concurrent.futures import ThreadPoolExecutor
        remote = [r for r in runs
                  if local_candidates(r.artifact_uri or "", self.store_uri, self.artifacts_root) is None]
        if not remote or self.remote_error is not None:
            return
        self._fetched[remote[0].run_id] = self._download(remote[0])   # an unreachable server fails once, here
        if self.remote_error is not None:
            return
        with ThreadPoolExecutor(self.THREADS) as pool:
            self._fetched.update(zip((r.run_id for r in remote[1:]), pool.map(self._download, remote[1:])))

    def _download(self, run) -> Answers | None:
        import mlflow.artifacts
        from mlflow.exceptions import MlflowException
        # by the run's artifact URI when the record has it: no request to look the run up first
        where = ({"artifact_uri": f"{run.artifact_uri.rstrip('/')}/{PREDICTIONS_ARTIFACT}"} if run.artifact_uri else
                 {"run_id": run.run_id, "artifact_path": PREDICTIONS_ARTIFACT})
        with tempfile.TemporaryDirectory() as tmp:
            try:
                path = mlflow.artifacts.download_artifacts(**where, tracking_uri=self.store_uri, dst_path=tmp)
            except Exception as e:
                missing = isinstance(e, MlflowException) and e.error_code == "RESOURCE_DOES_NOT_EXIST"
                if not missing:
                    self.remote_error = error_line(e)[:200]
                return None
            return read_answers(Path(path))


def pooled(answers: list[Answers]) -> tuple[float, int]:
    """Correct answers over all answers of several runs, and the number of distinct examples they scored."""
    total = sum(len(a.index) for a in answers)
    distinct = len(reduce(np.union1d, (a.index for a in answers)))
    return sum(int(a.correct.sum()) for a in answers) / total, distinct


def paired(a: dict[str, Answers], b: dict[str, Answers], order) -> PairedTest | str:
    """A minus B on the seeds both have predictions for and the examples every one of those runs scored:
    McNemar with one such seed, the two-level bootstrap with several. A string says why no test was possible."""
    seeds = sorted(set(a) & set(b), key=order)
    if not seeds:
        return "no seed with predictions for both"
    runs = [side[s] for s in seeds for side in (a, b)]
    common = reduce(lambda x, y: x if np.array_equal(x, y) else np.intersect1d(x, y, assume_unique=True),
                    (r.index for r in runs))
    if len(common) == 0:
        return "no test example scored by both"
    a_rows = np.array([a[s].on(common) for s in seeds], dtype=bool)
    b_rows = np.array([b[s].on(common) for s in seeds], dtype=bool)
    if len(seeds) == 1:
        return mcnemar_test(a_rows[0], b_rows[0], seeds[0])
    return paired_bootstrap(a_rows, b_rows, tuple(seeds))
