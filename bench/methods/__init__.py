"""Methods: turn a loaded backbone + head into what trains, by the method YAML's `kind`.

- full: every weight trains.
- head: the backbone is frozen; only the task head (model YAML `head_modules`) trains.
- peft: the YAML's `peft:` block is handed to peft's config class for its `peft_type`, as written; the task head
  trains too (peft `modules_to_save`). The bottleneck adapters are a peft method registered in bottleneck.py.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from pathlib import Path

import torch
from omegaconf import OmegaConf

from bench.errors import BenchError

KINDS = ("full", "head", "peft")


def _is_head(param_name: str, head_modules) -> bool:
    return any(part in head_modules for part in param_name.split("."))


def peft_config(method_cfg, model_cfg):
    import peft

    import bench.methods.bottleneck  # noqa: F401  registers the BOTTLENECK peft method

    spec = OmegaConf.to_container(method_cfg.peft, resolve=True)
    spec["task_type"] = "SEQ_CLS"
    config = peft.get_peft_config(spec)
    if "modules_to_save" in {f.name for f in dataclasses.fields(config)} and config.modules_to_save is None:
        config.modules_to_save = list(model_cfg.head_modules)
    return config


def apply(model, method_cfg, model_cfg):
    """Return the model to train, with requires_grad set by the method."""
    if method_cfg.kind == "full":
        model.requires_grad_(True)
        return model
    if method_cfg.kind == "head":
        for name, p in model.named_parameters():
            p.requires_grad_(_is_head(name, model_cfg.head_modules))
        return model
    if method_cfg.kind == "peft":
        import peft
        return peft.get_peft_model(model, peft_config(method_cfg, model_cfg))
    raise BenchError(f"method.kind: unknown kind {method_cfg.kind!r}; valid: {', '.join(KINDS)}")


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameters of the model as trained.

    Total counts the backbone, the head and every added weight, once: peft's frozen copy of the head
    (`original_module`, kept only to restore it) is left out. 4-bit weights are packed two per byte, so a
    Params4bit tensor holds half as many elements as the weight it stores (the same rule peft applies).
    """
    trainable = total = 0
    for name, p in model.named_parameters():
        if ".original_module." in name:
            continue
        n = p.numel() * 2 if p.__class__.__name__ == "Params4bit" else p.numel()
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def save(model, method_cfg, out_dir: Path) -> int:
    """Write the checkpoint of what trained to out_dir (atomically); return its bytes on disk.

    ckpt/bytes: the bytes of the weight files plus the config needed to reload them, nothing else: for peft
    methods adapter_model.safetensors (which includes the trained head) + adapter_config.json; for `full`, the
    whole model (model.safetensors + config.json); for `head`, the trained head weights (head.safetensors). Other
    files save_pretrained writes (peft's model card README.md) are kept but not counted.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        if method_cfg.kind == "head":
            from safetensors.torch import save_file
            state = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
            save_file(state, tmp / "head.safetensors")
        else:
            model.save_pretrained(tmp, safe_serialization=True)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)  # a crash never leaves a half-written checkpoint under the final name
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return checkpoint_bytes(out_dir)


CKPT_COUNTED = ("*.safetensors", "*config.json")   # weights, and the config that reloads them


def checkpoint_bytes(ckpt_dir: Path) -> int:
    """ckpt/bytes of a checkpoint folder (see save)."""
    files = {f for pattern in CKPT_COUNTED for f in Path(ckpt_dir).rglob(pattern) if f.is_file()}
    return sum(f.stat().st_size for f in files)


def reload(base_model, method_cfg, ckpt_dir: Path):
    """Load a checkpoint written by save() onto a freshly loaded base model (used by tests and users)."""
    if method_cfg.kind == "peft":
        import peft

        import bench.methods.bottleneck  # noqa: F401
        return peft.PeftModel.from_pretrained(base_model, ckpt_dir)
    if method_cfg.kind == "head":
        from safetensors.torch import load_file
        base_model.load_state_dict(load_file(Path(ckpt_dir) / "head.safetensors"), strict=False)
        return base_model
    return type(base_model).from_pretrained(ckpt_dir)


