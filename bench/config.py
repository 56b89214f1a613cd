"""Checks on the composed config, run before any model or data is loaded and before any MLflow run exists."""
from __future__ import annotations

import importlib.util

from bench.errors import BenchError


def _positive(cfg, key: str, value, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
        raise BenchError(f"{key}: must be a number > 0, got {value!r}")


def validate(cfg) -> None:
    """Raise BenchError naming the offending key, what is wrong and the valid choices or range."""
    from bench import methods, models, tasks

    if cfg.method.kind not in methods.KINDS:
        raise BenchError(f"method.kind: unknown kind {cfg.method.kind!r}; valid: {', '.join(methods.KINDS)}")
    if cfg.model.source not in models.SOURCES:
        raise BenchError(f"model.source: unknown source {cfg.model.source!r}; valid: {', '.join(models.SOURCES)}")
    if cfg.task.loader not in tasks.LOADERS:
        raise BenchError(f"task.loader: unknown loader {cfg.task.loader!r}; valid: {', '.join(tasks.LOADERS)}")
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise BenchError(f"device: unknown device {cfg.device!r}; valid: auto, cpu, cuda")

    t = cfg.train
    for key in ("lr", "batch_size", "eval_batch_size", "max_length", "log_every"):
        _positive(cfg, f"train.{key}", t[key])
    _positive(cfg, "train.eval_every", t.eval_every, allow_none=True)
    if t.max_steps is None and t.epochs is None:
        raise BenchError("train.max_steps / train.epochs: both unset; set one to a number > 0")
    _positive(cfg, "train.max_steps", t.max_steps, allow_none=True)
    _positive(cfg, "train.epochs", t.epochs, allow_none=True)
    if not 0 <= t.warmup_ratio < 1:
        raise BenchError(f"train.warmup_ratio: must lie in [0, 1), got {t.warmup_ratio!r}")
    for key in ("r", "alpha", "reduction_factor", "num_virtual_tokens"):
        if key in cfg.method:
            _positive(cfg, f"method.{key}", cfg.method[key])
    for key in ("max_train_samples", "max_eval_samples"):
        _positive(cfg, f"task.{key}", cfg.task[key], allow_none=True)

    if cfg.quant.name != "none":
        if cfg.method.kind == "full":
            raise BenchError(f"quant={cfg.quant.name} with method=full: quantized weights cannot be fine-tuned "
                             "directly; use quant=none for full fine-tuning, or a PEFT method (e.g. lora = QLoRA)")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise BenchError(f"quant={cfg.quant.name}: bitsandbytes is not installed (pip install bitsandbytes); "
                             "or use quant=none")
