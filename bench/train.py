"""The common trainer: one plain loop that every method and task goes through unchanged.

AdamW, linear warmup then linear decay, gradient clipping, length-bucketed batches with dynamic padding in a
seeded order (identical for every method given the same seed and tokenizer), periodic evaluation without
grad on larger batches, a progress bar.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np
import torch
from sklearn.metrics import accuracy_score, f1_score
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup
from transformers.trainer_pt_utils import LengthGroupedSampler

from bench.measure import Meter


def _pad(tokenizer, rows: list[dict], device) -> dict[str, torch.Tensor]:
    batch = tokenizer.pad(rows, return_tensors="pt")
    return {k: v.to(device) for k, v in batch.items()}


def train_batches(ds, batch_size: int, seed: int) -> Iterator[list[int]]:
    """Endless index batches: each epoch a seeded shuffle, grouped into batches of similar length."""
    lengths = [len(x) for x in ds["input_ids"]]
    epoch = 0
    while True:
        g = torch.Generator().manual_seed(seed * 1000 + epoch)
        order = list(LengthGroupedSampler(batch_size, lengths=lengths, generator=g))
        for i in range(0, len(order), batch_size):
            yield order[i:i + batch_size]
        epoch += 1


@torch.no_grad()
def evaluate(model, ds, tokenizer, batch_size: int, num_labels: int, device) -> dict[str, float]:
    """eval/accuracy and eval/f1_macro (scikit-learn) and eval/loss (mean cross-entropy) on the whole split."""
    model.eval()
    rows = ds.to_list()
    order = np.argsort([len(r["input_ids"]) for r in rows])  # sorted by length: least padding
    preds, labels, loss_sum = [], [], 0.0
    for i in range(0, len(order), batch_size):
        batch = _pad(tokenizer, [rows[j] for j in order[i:i + batch_size]], device)
        out = model(**batch)
        loss_sum += out.loss.item() * len(batch["labels"])
        preds += out.logits.argmax(-1).tolist()
        labels += batch["labels"].tolist()
    return {"eval/accuracy": accuracy_score(labels, preds),
            "eval/f1_macro": f1_score(labels, preds, average="macro", labels=list(range(num_labels)),
                                      zero_division=0),
            "eval/loss": loss_sum / len(labels)}


def total_steps(cfg, n_train: int) -> int:
    if cfg.max_steps:
        return int(cfg.max_steps)
    return int(cfg.epochs * math.ceil(n_train / cfg.batch_size))


def fit(model, train_ds, eval_ds, tokenizer, cfg, *, seed: int, num_labels: int, device: torch.device,
        meter: Meter, log: Callable[[dict, int], None] = lambda metrics, step: None,
        on_eval: Callable[[int, dict], None] | None = None) -> dict[str, float]:
    """Train `model` in place; return the final metrics (names as logged to MLflow)."""
    steps = total_steps(cfg, len(train_ds))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * steps), steps)
    batches = train_batches(train_ds, cfg.batch_size, seed)
    train_rows = train_ds.to_list()
    eval_every = cfg.eval_every or steps

    tokens = samples = 0          # real (non-padding) tokens and examples seen by training steps
    window: list[float] = []      # losses since the last train/loss point
    best_accuracy, last_loss, metrics = -1.0, float("nan"), {}
    bar = tqdm(range(1, steps + 1), desc="train", unit="step", dynamic_ncols=True, mininterval=1.0)
    for step in bar:
        if not meter.running("train"):
            meter.start("train")
        model.train()
        batch = _pad(tokenizer, [train_rows[i] for i in next(batches)], device)
        loss = model(**batch).loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at step {step}")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += int(batch["attention_mask"].sum())
        samples += len(batch["labels"])
        window.append(loss.item())

        if step % cfg.log_every == 0 or step == steps:
            last_loss = sum(window) / len(window)  # train/loss: mean training loss over the last log window
            log({"train/loss": last_loss, "train/lr": scheduler.get_last_lr()[0]}, step)
            window.clear()
            bar.set_postfix(loss=f"{last_loss:.4f}")
        if step % eval_every == 0 or step == steps:
            meter.stop("train")
            meter.start("eval")
            metrics = evaluate(model, eval_ds, tokenizer, cfg.eval_batch_size, num_labels, device)
            meter.stop("eval")
            best_accuracy = max(best_accuracy, metrics["eval/accuracy"])
            log(metrics, step)
            bar.set_postfix(loss=f"{loss.item():.4f}", acc=f"{metrics['eval/accuracy']:.3f}")
            if on_eval is not None:
                on_eval(step, metrics)  # e.g. a sweep's pruner; may raise to stop the run
    bar.close()

    train_s = meter.seconds["train"]
    return {**metrics,
            "eval/best_accuracy": best_accuracy,   # max over the periodic evaluations (selected on eval data)
            "train/loss": last_loss,
            "train/steps": steps,
            "train/tokens": tokens,
            "throughput/train_tokens_per_s": tokens / train_s,   # real tokens (padding excluded) / time/train_s
            "throughput/train_samples_per_s": samples / train_s}
