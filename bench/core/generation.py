"""Generative tasks: prompts, response-only labels, batched greedy generation and the scorers of what it generates.

A generative example is (instruction, input, output). Its prompt is the task's template (`task.template`):
- alpaca: the Alpaca instruction / input / response layout (the LLaMA + LoRA recipes), the input block only when
  the input is not empty;
- chat: the tokenizer's own chat template, the instruction and input as one user turn, the output as the
  assistant's reply (needs a tokenizer that has one: SmolLM2-Instruct does, T5 does not);
- plain: instruction and input joined by a blank line, then the output directly (prompt/completion pairs).

Tokens (`encode`): decoder-only models see prompt + response + EOS as one sequence whose labels are -100 on the
prompt (the loss counts response tokens only; padding is -100 too, see `collate`); encoder-decoder models read the
prompt in the encoder and predict response + EOS in the decoder. A prompt longer than train.max_length minus
task.max_new_tokens keeps its first tokens and its last TAIL_TOKENS (the response marker), nothing in between.
Padding: right for training and teacher-forced loss, left for batched generation of decoder-only models.

Scorers (`task.scorer`), on the first non-empty line of each generation:
- label_match: accuracy = the normalized line equals the normalized reference; invalid_rate = it is none of the
  task's answers (its label words); both fractions.
- chrf_bleu: sacreBLEU's corpus chrF and BLEU (0-100, sacreBLEU's default settings), one reference per example.
"""
from __future__ import annotations

import contextlib
import re

import numpy as np
import pandas as pd
import torch

from bench.core import metrics as M
from bench.errors import BenchError

TEMPLATES = ("alpaca", "chat", "plain")
SCORERS = ("label_match", "chrf_bleu")
TAIL_TOKENS = 16   # an over-long prompt keeps its last tokens: the template's response marker
# the metric that selection reads (train.select=best, val/best_*), per scorer
SELECT = {"label_match": "val/accuracy", "chrf_bleu": "val/chrf"}

ALPACA = ("Below is an instruction that describes a task, paired with an input that provides further context. "
          "Write a response that appropriately completes the request.\n\n"
          "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_NO_INPUT = ("Below is an instruction that describes a task. "
                   "Write a response that appropriately completes the request.\n\n"
                   "### Instruction:\n{instruction}\n\n### Response:\n")


def prompt_text(tokenizer, template: str, instruction: str, input: str) -> str:
    """The prompt of one example under `template` (see the module doc)."""
    if template == "alpaca":
        return (ALPACA if input else ALPACA_NO_INPUT).format(instruction=instruction, input=input)
    user = "\n\n".join(part for part in (instruction, input) if part)
    if template == "plain":
        return user + "\n"
    if template == "chat":
        return tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                             add_generation_prompt=True)
    raise BenchError(f"task.template: unknown template {template!r}; valid: {', '.join(TEMPLATES)}")


def check_template(tokenizer, template: str) -> None:
    if template not in TEMPLATES:
        raise BenchError(f"task.template: unknown template {template!r}; valid: {', '.join(TEMPLATES)}")
    if template == "chat" and not getattr(tokenizer, "chat_template", None):
        raise BenchError("task.template: chat, but this model's tokenizer has no chat template; valid here: alpaca, "
                         "plain")


def _clip_prompt(ids: list[int], budget: int) -> list[int]:
    if len(ids) <= budget:
        return ids
    tail = min(TAIL_TOKENS, budget)
    return ids[:budget - tail] + ids[len(ids) - tail:]


def encode(data, tokenizer, family: str, template: str, max_length: int, max_new_tokens: int):
    """(train, validation, test) datasets of token ids: input_ids, attention_mask and labels (response tokens; -100
    elsewhere); validation and test also keep `prompt_ids` (what generation starts from), `reference` (the
    output text) and `index`."""
    check_template(tokenizer, template)
    budget = max(1, max_length - max_new_tokens)
    special = template != "chat"  # a chat template writes its own special tokens

    def enc(batch):
        out = {"input_ids": [], "attention_mask": [], "labels": [], "prompt_ids": []}
        for instruction, inp, output in zip(batch["instruction"], batch["input"], batch["output"]):
            text = prompt_text(tokenizer, template, instruction, inp)
            prompt = _clip_prompt(tokenizer(text, add_special_tokens=special)["input_ids"], budget)
            if family == "encoder-decoder":
                response = tokenizer(text_target=output, truncation=True, max_length=max_length)["input_ids"]
                ids, labels = prompt, response
            else:
                response = tokenizer(output, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
                response = response[:max(1, max_length - len(prompt))]
                ids, labels = prompt + response, [-100] * len(prompt) + response
            out["input_ids"].append(ids)
            out["attention_mask"].append([1] * len(ids))
            out["labels"].append(labels)
            out["prompt_ids"].append(prompt)
        return out

    cols = ["instruction", "input", "output"]
    train = data.train.map(enc, batched=True, remove_columns=data.train.column_names)
    train = train.remove_columns("prompt_ids")
    held = []
    for ds in (data.validation, data.test):
        encoded = ds.map(enc, batched=True, remove_columns=cols)
        held.append(encoded.add_column("reference", list(ds["output"])))
    return train, held[0], held[1]


def collate(tokenizer):
    """Training and teacher-forced batches: inputs padded on the right, labels padded with -100."""
    from transformers import DataCollatorForSeq2Seq
    pad = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, return_tensors="pt")

    def fn(rows: list[dict], device) -> dict[str, torch.Tensor]:
        keep = [{k: r[k] for k in ("input_ids", "attention_mask", "labels")} for r in rows]
        with padding_side(tokenizer, "right"):
            batch = pad(keep)
        return {k: v.to(device) for k, v in batch.items()}
    return fn


@contextlib.contextmanager
def padding_side(tokenizer, side: str):
    old = tokenizer.padding_side
    tokenizer.padding_side = side
    try:
        yield
    finally:
        tokenizer.padding_side = old


def greedy_config(model, tokenizer, family: str, max_new_tokens: int, *, exact: bool = False):
    """Greedy decoding with the KV cache; exact: always max_new_tokens new tokens (min_new_tokens too)."""
    from transformers import GenerationConfig
    config = GenerationConfig(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens if exact else None,
                              do_sample=False, num_beams=1, use_cache=True, pad_token_id=tokenizer.pad_token_id,
                              eos_token_id=tokenizer.eos_token_id)
    if family == "encoder-decoder":
        config.decoder_start_token_id = decoder_start(model)
    return config


def prompt_padding_side(family: str) -> str:
    """Decoder-only prompts are padded on the left (generation continues at the right end); encoder inputs right."""
    return "right" if family == "encoder-decoder" else "left"


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], *, family: str, max_new_tokens: int, batch_size: int,
             device) -> list[str]:
    """Greedy continuations of token-id prompts (KV cache on), batched by length with left padding for decoder-only
    models; each decoded without special tokens, in the prompts' order."""
    model.eval()
    config = greedy_config(model, tokenizer, family, max_new_tokens)
    order = np.argsort([len(p) for p in prompts], kind="stable")
    texts: list[str] = [""] * len(prompts)
    side = prompt_padding_side(family)
    for i in range(0, len(order), batch_size):
        chunk = order[i:i + batch_size]
        with padding_side(tokenizer, side):
            batch = tokenizer.pad([{"input_ids": prompts[j]} for j in chunk], return_tensors="pt")
        batch = {k: v.to(device) for k, v in batch.items()}
        out = model.generate(**batch, generation_config=config)
        new = out[:, batch["input_ids"].shape[1]:] if family != "encoder-decoder" else out
        for j, ids in zip(chunk, new.tolist()):
            texts[j] = tokenizer.decode(ids, skip_special_tokens=True)
    return texts


def decoder_start(model) -> int:
    config = getattr(model, "config", None) or model.get_base_model().config
    start = getattr(config, "decoder_start_token_id", None)
    return start if start is not None else config.pad_token_id


def first_line(text: str) -> str:
    """The first non-empty line of a generation, stripped ("" when there is none)."""
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


_EDGE = re.compile(r"^[\W_]+|[\W_]+$")


def normalize(text: str) -> str:
    """label_match's normal form: the first line, lower-cased, punctuation stripped from both ends, spaces collapsed."""
    return " ".join(_EDGE.sub("", first_line(text).lower()).split())


def score_label_match(generations: list[str], references: list[str], answers: list[str], split: str):
    """(scores, per-example frame): accuracy and invalid_rate (see module doc); frame columns label / prediction
    (answer ids; prediction -1 when invalid) and score (1.0 correct, 0.0 not)."""
    ids = {normalize(a): i for i, a in enumerate(answers)}
    got = [normalize(g) for g in generations]
    correct = np.array([g == normalize(r) for g, r in zip(got, references)], dtype=float)
    label = np.array([ids.get(normalize(r), -1) for r in references], dtype=np.int64)
    prediction = np.array([ids.get(g, -1) for g in got], dtype=np.int64)
    prefix = M.VAL_PREFIX if split == "val" else M.TEST_PREFIX
    scores = {f"{prefix}accuracy": float(correct.mean()) if len(correct) else 0.0,
              f"{prefix}invalid_rate": float((prediction == -1).mean()) if len(got) else 0.0}
    return scores, pd.DataFrame({"label": label, "prediction": prediction, "score": correct})


def score_chrf_bleu(generations: list[str], references: list[str], split: str):
    """(scores, per-example frame): sacreBLEU corpus chrF and BLEU of the first lines; score: sentence chrF."""
    import sacrebleu
    hyps = [first_line(g) for g in generations]
    prefix = M.VAL_PREFIX if split == "val" else M.TEST_PREFIX
    scores = {f"{prefix}chrf": sacrebleu.corpus_chrf(hyps, [references]).score,
              f"{prefix}bleu": sacrebleu.corpus_bleu(hyps, [references]).score}
    per = [sacrebleu.sentence_chrf(h, [r]).score for h, r in zip(hyps, references)]
    return scores, pd.DataFrame({"score": np.asarray(per, dtype=float)})


@torch.no_grad()
def token_loss(model, batches, family: str) -> float:
    """Mean cross-entropy per labelled token (labels -100 masked) over `batches`, weighted by tokens. A decoder-only
    model predicts each token from those before it (its own loss shifts the labels), so a sequence's first label is
    never counted. Used by response_loss and by the forgetting loss (bench/core/forgetting.py)."""
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        labels = batch["labels"] if family == "encoder-decoder" else batch["labels"][:, 1:]  # causal: shifted
        n = int((labels != -100).sum())
        total += model(**batch).loss.item() * n
        count += n
    return total / max(count, 1)


def response_loss(model, ds, collate_fn, batch_size: int, device, family: str) -> float:
    """Mean cross-entropy per response token (teacher forcing; prompt and padding masked), over the whole split."""
    rows = ds.to_list()
    order = np.argsort([len(r["input_ids"]) for r in rows], kind="stable")
    return token_loss(model, (collate_fn([rows[j] for j in order[i:i + batch_size]], device)
                              for i in range(0, len(order), batch_size)), family)


def evaluate(model, ds, tokenizer, *, family: str, scorer: str, answers, batch_size: int, max_new_tokens: int,
             device, split: str = "val", collate_fn=None) -> tuple[dict[str, float], pd.DataFrame]:
    """The split's loss (response tokens), its greedy generations and their scores, named val/* or test/*; and the
    per-example frame: index (the example's row in its split), reference, generation, score (+ label, prediction
    for label_match)."""
    collate_fn = collate_fn or collate(tokenizer)
    loss = response_loss(model, ds, collate_fn, batch_size, device, family)
    generations = generate(model, tokenizer, ds["prompt_ids"], family=family, max_new_tokens=max_new_tokens,
                           batch_size=batch_size, device=device)
    references = ds["reference"]
    if scorer == "label_match":
        scores, frame = score_label_match(generations, references, answers, split)
    elif scorer == "chrf_bleu":
        scores, frame = score_chrf_bleu(generations, references, split)
    else:
        raise BenchError(f"task.scorer: unknown scorer {scorer!r}; valid: {', '.join(SCORERS)}")
    scores[(M.VAL_PREFIX if split == "val" else M.TEST_PREFIX) + "loss"] = loss
    frame.insert(0, "index", np.asarray(ds["index"], dtype=np.int64))
    frame.insert(1, "reference", references)
    frame.insert(2, "generation", generations)
    return scores, frame
