"""Checks of the data and of the tracking store, before any model is loaded or MLflow run opened.

Local files (task=local) are read whole, as the run reads them (bench.core.tasks.read_table): every row of every
file must have a non-empty text and a label, and every label must be one of the task's classes. A bad row is
reported as one line naming the file, the row and the column. Packaged data sets are hash-checked; a hub data
set must have the splits the task names. The tracking store must answer within a few seconds.
"""
from __future__ import annotations

import functools
from pathlib import Path

from bench.errors import BenchError
from bench.fmt import error_line

TRACKING_TIMEOUT_S = 5


# --- data -------------------------------------------------------------------------------------------------

def check_data(task) -> None:
    """The data exist, have the text and label columns, and their labels fit the declared classes."""
    if task.loader == "local":
        _check_local(task)
    elif task.loader in ("trec", "rotten_tomatoes", "tatoeba"):
        from bench.assets import asset_file
        asset_file(task.asset, task.file)  # hash-checked; a corrupted file is fetched again once, else AssetError
    elif task.loader == "hf":
        from datasets import get_dataset_split_names
        try:
            splits = get_dataset_split_names(str(task.dataset), task.config)
        except Exception as e:  # not found, offline, bad config name: datasets raises many types
            raise BenchError(f"task.dataset: cannot read the splits of {task.dataset!r}: "
                             f"{error_line(e, with_type=False)}") from e
        for key in ("train_split", "test_split", "validation_split"):
            if task[key] is not None and task[key] not in splits:
                raise BenchError(f"task.{key}: split {task[key]!r} not in {task.dataset}; valid: {', '.join(splits)}")


def _check_local(task) -> None:
    from bench.core import tasks
    files = tasks.local_files(task)
    frames = {split: tasks.read_table(path, key) for split, (key, path) in files.items()}
    if task.get("kind") == "generation" and task.get("label_words") is None:
        return _check_local_instructions(task, files, frames)
    for split, df in frames.items():
        for key in ("text_column", "label_column"):
            if task[key] not in df.columns:
                raise BenchError(f"task.{key}: column {task[key]!r} not in {files[split][1]}; "
                                 f"columns: {', '.join(map(str, df.columns))}")
    names = task.label_names
    if names is None:  # the run's rule (bench.core.tasks.load): the distinct labels of the training file
        labels = frames["train"][task.label_column]
        names = sorted({str(v) for v in labels[~_blank(labels)].tolist()})
    names = [str(n) for n in names]
    for split, df in frames.items():
        _check_filled(df, task, *files[split], names)
    for split, df in frames.items():
        values = df[task.label_column].tolist()
        bad = [i for i, label in enumerate(tasks.match_labels(values, names)) if label is None]
        if bad:
            line = tasks.outside_classes([values[i] for i in bad], names, split)
            raise BenchError(f"{line}; first at {files[split][1]} {_row(files[split][1], bad[0])}, "
                             f"column {task.label_column!r}")


def _check_local_instructions(task, files, frames) -> None:
    """Instruction data: the output column (and the instruction column, unless task.instruction stands in for it)
    exist, and every row has an output."""
    for split, df in frames.items():
        path = files[split][1]
        required = ["output_column"] + ([] if task.get("instruction") else ["instruction_column"])
        for key in required:
            if task.get(key) is None or task[key] not in df.columns:
                raise BenchError(f"task.{key}: column {task.get(key)!r} not in {path}; columns: "
                                 f"{', '.join(map(str, df.columns))}" + (
                                     "; or set task.instruction to one instruction for every row"
                                     if key == "instruction_column" else ""))
        blank = _blank(df[task.output_column]).to_numpy().nonzero()[0].tolist()
        if blank:
            more = f" (and {len(blank) - 1} more row{'s' if len(blank) > 2 else ''})" if len(blank) > 1 else ""
            raise BenchError(f"{files[split][0]}: {path} {_row(path, blank[0])}, column {task.output_column!r}: "
                             f"empty or missing output{more}; every row needs an output")


def _blank(column):
    """Per row of a pandas column: missing (NaN, None, NA) or empty / whitespace-only."""
    return column.isna() | column.astype(str).str.strip().eq("")


def _check_filled(df, task, key: str, path: str, names: list[str]) -> None:
    """Every row has a text and a label."""
    for column, what, valid in ((task.text_column, "empty or whitespace-only text", "every row needs a text"),
                                (task.label_column, "empty or missing label", f"valid labels: {', '.join(names)}")):
        blank = _blank(df[column]).to_numpy().nonzero()[0].tolist()
        if blank:
            more = f" (and {len(blank) - 1} more row{'s' if len(blank) > 2 else ''})" if len(blank) > 1 else ""
            raise BenchError(f"{key}: {path} {_row(path, blank[0])}, column {column!r}: {what}{more}; {valid}")


def _row(path: str, i: int) -> str:
    """Where data row i (0-based) of a file is, as a person finds it: 'row 7 (line 8 of the file)'."""
    n = i + 1
    suffix = Path(str(path)).suffix
    if suffix not in (".csv", ".tsv", ".jsonl"):
        return f"row {n} (1-based, in file order)"
    lines = _record_lines(Path(str(path)).expanduser(), suffix)
    if lines is None or i >= len(lines):
        return f"row {n} (1-based, not counting the header)" if suffix != ".jsonl" else f"row {n} (1-based)"
    return f"row {n} (line {lines[i]} of the file)"


def _record_lines(path: Path, suffix: str) -> list[int] | None:
    """The first line of every data row, as pandas reads the file: header (csv / tsv) not counted, blank lines
    skipped, a quoted text over several lines one row. None if the file cannot be read so."""
    import csv
    starts = []
    try:
        with open(path, newline="", encoding="utf-8", errors="replace") as f:
            if suffix == ".jsonl":
                return [n for n, line in enumerate(f, 1) if line.strip()]
            reader = csv.reader(f, delimiter="\t" if suffix == ".tsv" else ",")
            line = 1
            for record in reader:
                if record and not (len(record) == 1 and not record[0].strip()):  # pandas skips blank lines
                    starts.append(line)
                line = reader.line_num + 1
    except (OSError, csv.Error):
        return None
    return starts[1:]


# --- tracking ---------------------------------------------------------------------------------------------

@functools.cache
def _http_reachable(uri: str) -> None:
    import urllib.error
    import urllib.request
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=TRACKING_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return  # the server answered
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise BenchError(f"tracking.uri: cannot reach {uri} within {TRACKING_TIMEOUT_S} s ({reason}); start the "
                         "server (mlflow server --host 127.0.0.1 --port 5000) or use the local store "
                         "tracking.uri=sqlite:///mlflow.db") from None


def check_tracking(uri: str, experiment) -> None:
    """Fail in seconds instead of letting MLflow retry an unreachable store for minutes."""
    if not isinstance(experiment, str) or not experiment.strip():
        raise BenchError(f"tracking.experiment: must be a non-empty name, got {experiment!r}")
    if uri.startswith(("http://", "https://")):
        try:
            _http_reachable(uri)
        except BenchError:
            _http_reachable.cache_clear()  # the next call probes again
            raise
    elif uri.startswith("sqlite:///"):
        _check_sqlite(Path(uri.removeprefix("sqlite:///")).expanduser())
    elif "://" in uri and not uri.startswith(("sqlite:", "file:", "databricks", "postgresql", "mysql", "mssql")):
        raise BenchError(f"tracking.uri: unsupported scheme in {uri!r}; valid: sqlite:///FILE, http(s)://HOST:PORT, "
                         "or another MLflow store URI (postgresql://, mysql://, file:, databricks)")


def _check_sqlite(path: Path) -> None:
    if path.exists():
        if not path.is_file():
            raise BenchError(f"tracking.uri: {path} is not a file; give a SQLite file, e.g. sqlite:///mlflow.db")
        with open(path, "rb") as f:
            head = f.read(16)
        if head and head != b"SQLite format 3\x00":
            raise BenchError(f"tracking.uri: {path} is not a SQLite database; give another file name")
        return
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    import os
    if not os.access(parent, os.W_OK):
        raise BenchError(f"tracking.uri: cannot create {path}: {parent} is not writable")
