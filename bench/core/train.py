"""The common trainer: one plain loop that every method and task goes through unchanged.

AdamW, linear warmup then linear decay, gradient clipping, length-bucketed batches with dynamic padding in a
seeded order (identical for every method given the same seed and tokenizer), periodic evaluation on the
validation split without grad on larger batches, a progress bar. The test split never enters this module's loop:
bench/core/pipeline.py scores it once, after training. Classification batches and scores are this module's
(`_pad`, `evaluate`); generative tasks hand in their own (`collate`, `evaluate_fn` from bench/core/generation.py:
response-only labels, greedy generation), and the loop is the same.

The clock of time/train_s runs only around training steps (batch preparation, forward, backward, optimizer
step). Metrics for the store are buffered and handed to `log` at evaluations, with the clock stopped.
A method that must act after each optimizer step (AdaLoRA's rank allocation) does so through one general hook,
`bench.core.methods.step_hook`; every other method gets None and the loop is unchanged.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import accuracy_score, f1_score
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup
from transformers.trainer_pt_utils import LengthGroupedSampler

from bench.core import methods
from bench.core import metrics as M
from bench.core.measure import Meter, optimizer_bytes, page_in

Points = list[tuple[int, dict[str, float]]]   # (step, metrics) pairs for the store
FLUSH_S = 60.0   # between evaluations, buffered points still reach the store at least this often (clock stopped)


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
def evaluate(model, ds, tokenizer, batch_size: int, num_labels: int, device,
             split: str = "val") -> tuple[dict[str, float], pd.DataFrame]:
    """Accuracy and macro-F1 (scikit-learn) and mean cross-entropy on the whole split, named M.SCORES[split]
    (split "val": val/*, "test": test/*), and the per-example predictions: columns index (the example's row in
    its split), label, prediction."""
    model.eval()
    rows = ds.to_list()
    index = [r.pop("index") for r in rows] if rows and "index" in rows[0] else list(range(len(rows)))
    order = np.argsort([len(r["input_ids"]) for r in rows], kind="stable")  # sorted by length: least padding
    preds, loss_sum = np.zeros(len(rows), dtype=np.int64), 0.0
    for i in range(0, len(order), batch_size):
        chunk = order[i:i + batch_size]
        batch = _pad(tokenizer, [rows[j] for j in chunk], device)
        out = model(**batch)
        loss_sum += out.loss.item() * len(chunk)
        preds[chunk] = out.logits.argmax(-1).cpu().numpy()
    labels = np.array([r["labels"] for r in rows], dtype=np.int64)
    accuracy, f1_macro, loss = M.SCORES[split]
    scores = {accuracy: accuracy_score(labels, preds),
              f1_macro: f1_score(labels, preds, average="macro", labels=list(range(num_labels)), zero_division=0),
              loss: loss_sum / len(rows)}
    return scores, pd.DataFrame({"index": np.asarray(index, dtype=np.int64), "label": labels, "prediction": preds})


def total_steps(cfg, n_train: int) -> int:
    if cfg.max_steps:
        return int(cfg.max_steps)
    return int(cfg.epochs * math.ceil(n_train / cfg.batch_size))


def _trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}


# the selection score (train.select=best, val/best_*) and the name its best is logged under
BEST = {M.VAL_ACCURACY: M.VAL_BEST_ACCURACY, M.VAL_CHRF: M.VAL_BEST_CHRF}


class _Best:
    """The best selection score (val/accuracy, or val/chrf) of the periodic evaluations, its step (ties keep the
    earlier one) and, with train.select=best, the trainable weights of that step."""

    def __init__(self, keep_weights: bool, metric: str) -> None:
        self.score, self.step, self.state, self.keep_weights, self.metric = -1.0, 0, None, keep_weights, metric

    def update(self, step: int, val: dict[str, float], model) -> None:
        if val[self.metric] > self.score:
            self.score, self.step = val[self.metric], step
            if self.keep_weights:
                self.state = _trainable_state(model)

    def restore(self, model) -> None:
        """train.select=best: put the kept weights back, to be tested and saved."""
        if self.state is not None:
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if n in self.state:
                        p.copy_(self.state[n])


class _Pending:
    """Points for the store: handed to `log` at the next evaluation, or once FLUSH_S have passed since the last."""

    def __init__(self, log: Callable[[Points], None]) -> None:
        self.log, self.points, self.flushed = log, [], time.monotonic()

    def add(self, step: int, metrics: dict[str, float]) -> None:
        self.points.append((step, metrics))

    def due(self) -> bool:
        return time.monotonic() - self.flushed > FLUSH_S

    def flush(self, *more: tuple[int, dict[str, float]]) -> None:
        self.log([*self.points, *more])
        self.points, self.flushed = [], time.monotonic()


def _step(model, batch, params, optimizer, scheduler, after_step, max_grad_norm: float, step: int) -> torch.Tensor:
    """One optimizer step on `batch` (inside time/train_s); returns its loss."""
    model.train()
    loss = model(**batch).loss
    if not torch.isfinite(loss):
        raise FloatingPointError(f"loss is {loss.item()} at step {step}")
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    if after_step is not None:
        after_step(step)  # sees this step's gradients (before zero_grad)
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def fit(model, train_ds, val_ds, tokenizer, cfg, *, seed: int, num_labels: int, device: torch.device,
        meter: Meter, log: Callable[[Points], None] = lambda points: None,
        on_eval: Callable[[int, dict], None] | None = None, evaluate_fn=None, collate=None,
        select: str = M.VAL_ACCURACY) -> dict[str, float]:
    """Train `model` in place, evaluating on `val_ds`; with cfg.select == "best" the weights of the step with the
    best `select` score are restored at the end. Return the final metrics (names as logged to MLflow).
    evaluate_fn(model, ds, split) and collate(rows, device) default to classification's (`evaluate`, `_pad`);
    generative tasks pass bench/core/generation.py's."""
    # over 60 lines: the one training loop, kept whole so that where the clocks stop and start reads in one place
    if evaluate_fn is None:
        def evaluate_fn(model, ds, split):
            return evaluate(model, ds, tokenizer, cfg.eval_batch_size, num_labels, device, split=split)
    collate = collate or (lambda rows, device: _pad(tokenizer, rows, device))
    steps = total_steps(cfg, len(train_ds))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * steps), steps)
    after_step = methods.step_hook(model, steps)   # None for nearly every method; AdaLoRA: rank allocation
    batches = train_batches(train_ds, cfg.batch_size, seed)
    train_rows = train_ds.to_list()
    eval_every = cfg.eval_every or steps

    tokens = samples = 0          # real (non-padding) tokens and examples seen by training steps
    window: list[float] = []      # losses since the last train/loss point
    pending = _Pending(log)       # store writes wait for the next evaluation or FLUSH_S (clock stopped)
    best = _Best(keep_weights=cfg.select == "best", metric=select)
    last_loss, val, opt_bytes = float("nan"), {}, 0
    page_in(model)                        # mmapped weights resident now, not counted as training's growth
    before_train = meter.current_bytes()  # mem/train_growth_bytes: model and data loaded, nothing trained yet
    bar = tqdm(range(1, steps + 1), desc="train", unit="step", dynamic_ncols=True, mininterval=1.0)
    meter.start("train")
    for step in bar:
        batch = collate([train_rows[i] for i in next(batches)], device)
        loss = _step(model, batch, params, optimizer, scheduler, after_step, cfg.max_grad_norm, step)
        if step == 1:
            opt_bytes = optimizer_bytes(optimizer)  # mem/optimizer_bytes: the state exists after the first step
        tokens += int(batch["attention_mask"].sum())
        samples += len(batch["labels"])
        window.append(loss.item())

        evaluating = step % eval_every == 0 or step == steps
        if step % cfg.log_every == 0 or step == steps:
            last_loss = sum(window) / len(window)  # train/loss: mean training loss over the last log window
            pending.add(step, {M.TRAIN_LOSS: last_loss, M.TRAIN_LR: scheduler.get_last_lr()[0]})
            window.clear()
            bar.set_postfix(loss=f"{last_loss:.4f}")
            if pending.due() and not evaluating:
                meter.stop("train")  # a long stretch without evaluation: show progress in the store now
                pending.flush()
                meter.start("train")
        if evaluating:
            meter.stop("train")
            meter.start("eval")
            val, _ = evaluate_fn(model, val_ds, "val")
            meter.stop("eval")
            best.update(step, val, model)
            pending.flush((step, val))
            bar.set_postfix(loss=f"{loss.item():.4f}", **{select.split("/")[-1]: f"{val[select]:.3f}"})
            if on_eval is not None:
                on_eval(step, val)  # e.g. a sweep's pruner; may raise to stop the run
            if step < steps:
                meter.start("train")
    bar.close()

    best.restore(model)  # train.select=best: test and save the weights of the best validation step
    train_s = meter.seconds["train"]
    return {**val,
            BEST[select]: best.score,             # max of the selection score over the periodic evaluations
            M.VAL_BEST_STEP: best.step,           # the step it was reached at (the earliest, on ties)
            M.TRAIN_SELECTED_STEP: best.step if cfg.select == "best" else steps,
            M.TRAIN_LOSS: last_loss,
            M.TRAIN_STEPS: steps,
            M.TRAIN_TOKENS: tokens,
            M.MEM_TRAIN_GROWTH: meter.peak_bytes["train"] - before_train,   # see bench/core/measure.py
            M.MEM_OPTIMIZER: opt_bytes,
            M.THROUGHPUT_TOKENS: tokens / train_s,   # real tokens (padding excluded) / time/train_s
            M.THROUGHPUT_SAMPLES: samples / train_s}
