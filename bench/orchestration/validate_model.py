"""Checks of the model and the method against it, on an empty instance built from config.json on the meta device
(names, shapes and signatures, no weights, no memory): head_modules and target_modules name modules of it,
prompt-style methods get the forward arguments they feed, and peft itself builds the method on a copy of it
(peft.get_peft_model), so every objection peft raises while wrapping the layers (unsupported layer types, block
sizes that do not divide a width, ...) is one line here instead of a traceback inside the run.
"""
from __future__ import annotations

import re
from pathlib import Path

from omegaconf import OmegaConf

from bench.core.models import config_source, meta_model
from bench.errors import BenchError
from bench.fmt import MAX_ERROR_CHARS, error_line


def _linear_leaf_names(model) -> list[str]:
    import torch
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})


def _target_key(method_cfg) -> str:
    """The key a user sets for this method's target modules: the model YAML role it reads, else its own."""
    raw = OmegaConf.to_container(method_cfg, resolve=False).get("target_modules")
    m = re.fullmatch(r"\$\{model\.target_modules\.(\w+)\}", str(raw))
    return f"model.target_modules.{m.group(1)}" if m else "method.target_modules"


def _accepts(fn, arg: str) -> bool:
    import inspect
    return arg in inspect.signature(fn).parameters


def check_model(cfg) -> None:
    """config.json exists; head_modules and target_modules name modules of the model; the method fits it."""
    source = config_source(cfg.model)
    if source is None:
        return
    kind = cfg.task.get("kind", "classification")
    model = meta_model(source, bool(cfg.model.trust_remote_code), kind)  # BenchError: an encoder cannot generate
    from bench.core import methods
    from bench.core.models import family
    names = [n for n, _ in model.named_modules()]
    head = list(cfg.model.head_modules)
    if kind == "classification" and not any(part in head for n in names for part in n.split(".")):
        children = ", ".join(n for n, _ in model.named_children())
        raise BenchError(f"model.head_modules: {head} names no module of {type(model).__name__}; its top-level "
                         f"modules: {children}")
    if kind == "generation":
        _check_chat_template(cfg, source)
    if cfg.method.kind in methods.PARTIAL_KINDS:  # trainable_layers in range, blocks / biases found, not nothing
        methods.trainable_names(model, cfg.method, cfg.model)
    if cfg.method.kind != "peft":
        return
    try:
        pc = methods.peft_config(cfg.method, cfg.model, methods.task_type(kind, family(model.config)))
    except BenchError:   # a key that is no field of peft's config class: names method.<key>
        raise
    except Exception as e:  # peft's config classes raise TypeError/ValueError for bad values
        raise BenchError(f"method={cfg.method.name}: peft rejects the config: "
                         f"{error_line(e, with_type=False)}") from e
    if pc.is_prompt_learning:
        _check_prompt(cfg.method.name, pc, model)
    else:
        _check_targets(cfg.method, pc, model)
    _check_peft_builds(cfg.method.name, model, cfg.method, cfg.model, methods.task_type(kind, family(model.config)))


def _check_chat_template(cfg, source: str) -> None:
    """task.template=chat needs a tokenizer with a chat template (read from a local folder's tokenizer files)."""
    folder = Path(source)
    if cfg.task.get("template") != "chat" or not folder.is_dir():
        return
    import json
    config = folder / "tokenizer_config.json"
    has = (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file() or (
        config.is_file() and json.loads(config.read_text()).get("chat_template"))
    if not has:
        raise BenchError(f"task.template: chat, but the tokenizer in {source} has no chat template; valid here: "
                         "alpaca, plain")


def _check_prompt(method: str, pc, model) -> None:
    """Prompt-style methods only on model classes that accept what peft feeds them."""
    kind = type(model).__name__
    backbone = getattr(model, model.base_model_prefix, model)
    if pc.peft_type == "PREFIX_TUNING":
        if not (_accepts(model.forward, "past_key_values") or _accepts(backbone.forward, "past_key_values")):
            raise BenchError(f"method={method}: prefix tuning needs a model that accepts past_key_values; {kind} "
                             "does not. Valid here: prompt, ptuning or a method that adapts weights (lora, ia3, "
                             "adapter, ...)")
    elif not _accepts(model.forward, "inputs_embeds"):
        raise BenchError(f"method={method}: prompt tuning needs a model that accepts inputs_embeds; {kind} does "
                         "not. Valid here: a method that adapts weights (lora, ia3, adapter, ...)")


def _check_targets(method_cfg, pc, model) -> None:
    """target_modules set and matching modules of the model; what peft accepts but gets wrong on them."""
    from peft.tuners.tuners_utils import check_target_module_exists
    kind = type(model).__name__
    target = getattr(pc, "target_modules", None)
    if target is None and "target_modules" in method_cfg:
        key = _target_key(method_cfg)
        from bench.core import architectures
        raise BenchError(f"{key}: no default for model type {model.config.model_type!r} (defaults exist for "
                         f"{', '.join(sorted(architectures.FAMILIES))}); set {key}=[...] to module names of {kind}: "
                         f"{', '.join(_linear_leaf_names(model))}")
    if not target:
        return
    targeted = {n: m for n, m in model.named_modules() if n and check_target_module_exists(pc, n)}
    if not targeted:
        shown = repr(sorted(target)) if isinstance(target, (set, list, tuple)) else f"'{target}'"
        raise BenchError(f"method.target_modules: {shown} matches no module of {kind}; valid names (linear "
                         f"layers): {', '.join(_linear_leaf_names(model))}, or a regex over the full module names")
    from transformers.pytorch_utils import Conv1D
    conv = sorted({n.rsplit(".", 1)[-1] for n, m in targeted.items() if isinstance(m, Conv1D)})
    if conv and getattr(pc, "init_lora_weights", None) == "olora":
        # peft accepts it, but its QR init reads Conv1D's (in, out) weight as (out, in): the first forward fails
        raise BenchError(f"method={method_cfg.name}: peft's OLoRA initialization does not support the Conv1D "
                         f"layers of {kind} ({', '.join(conv)}); valid here: lora, dora, rslora, pissa, ia3, vera, "
                         "fourierft, vblora, adalora, the adapters or a prompt method")
    vector_length = getattr(pc, "vector_length", None)  # VB-LoRA: peft names one layer; this gives a valid value
    if vector_length:
        import math
        widths = {w for m in targeted.values()
                  for w in (getattr(m, "in_features", None), getattr(m, "out_features", None)) if w}
        if any(w % vector_length for w in widths):
            raise BenchError(f"method.vector_length: {vector_length} does not divide the widths of the targeted "
                             f"layers ({', '.join(map(str, sorted(widths)))}); valid: a divisor of "
                             f"{math.gcd(*widths)}")


def _check_peft_builds(method: str, model, method_cfg, model_cfg, task_type: str) -> None:
    """peft.get_peft_model on a copy of the meta-device model (bench/core/methods: apply_on_meta, which the plan
    shares): peft's own objections, as one line. An error that is only about the meta device is not reported: the
    run, on real weights, decides."""
    from bench.core import methods
    try:
        methods.apply_on_meta(model, method_cfg, model_cfg, task_type)
    except Exception as e:
        if methods.META_ONLY.search(str(e)):
            return
        raise BenchError(f"method={method}: peft rejects it on {type(model).__name__}: "
                         f"{_peft_message(e)}") from e


def _peft_message(e: BaseException) -> str:
    """The first line of peft's message; a module's repr inside it (several lines) shortened to its class."""
    lines = str(e).splitlines()
    if len(lines) > 1 and lines[0].endswith("("):  # "Target module BertSelfAttention(\n  ...\n) is not ..."
        end = next((ln for ln in lines[1:] if ln.startswith(")")), None)
        if end is not None:
            return (lines[0] + "..." + end)[:MAX_ERROR_CHARS]
    return error_line(e, with_type=False)
