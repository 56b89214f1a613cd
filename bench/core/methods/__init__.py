"""Methods: turn a loaded backbone + head into what trains, by the method YAML's `kind`.

- full: every weight trains.
- head: the backbone is frozen; only the task head (model YAML `head_modules`) trains.
- freeze: frozen fine-tuning: the top `method.trainable_layers` transformer blocks and the head train; the
  embeddings, the lower blocks and whatever sits outside the blocks (BERT's pooler, a final norm) stay frozen.
- bitfit: BitFit (Ben Zaken et al., 2022): every bias term of the backbone and the head train.
- peft: the YAML's keys (but the harness's own: name, kind, lr, ...) are handed to peft's config class for its
  `peft_type`, each knob under one name: its public name, mapped to peft's field name by PEFT_FIELDS where the two
  differ (`method.alpha` -> `lora_alpha`); the task head trains too (peft `modules_to_save`). The bottleneck adapters
  are a peft method registered in bottleneck/.

`step_hook` is the one place a method acts inside the common training loop (AdaLoRA's rank allocation).
"""
from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from bench.errors import BenchError
from bench.files import atomic_path

# kinds that keep the backbone as loaded and save only the tensors that trained, as <kind>.safetensors
PARTIAL_KINDS = ("head", "freeze", "bitfit")
# a transformer block's parameters: BERT `encoder.layer.<i>.`, Llama `model.layers.<i>.`, GPT-2 `h.<i>.`
BLOCK = re.compile(r"(?:^|\.)(?:layer|layers|h)\.(\d+)\.")


def _is_head(param_name: str, head_modules) -> bool:
    return any(part in head_modules for part in param_name.split("."))


def block_index(param_name: str) -> int | None:
    """The transformer block a parameter belongs to (its first `layer.<i>.` / `layers.<i>.` / `h.<i>.`), else None."""
    m = BLOCK.search(param_name)
    return int(m.group(1)) if m else None


def num_blocks(model) -> int:
    """The model's transformer blocks (config num_hidden_layers), checked against its parameter names."""
    n = getattr(model.config, "num_hidden_layers", None)
    found = {block_index(name) for name, _ in model.named_parameters()} - {None}
    if not isinstance(n, int) or found != set(range(n)):
        raise BenchError(f"method.kind: cannot find the {n} transformer blocks of {type(model).__name__} (config "
                         f"num_hidden_layers) among its parameters; block indices found in names *.layer.<i>. / "
                         f"*.layers.<i>. / *.h.<i>.: {sorted(found) or 'none'}; valid here: head, full or a peft method")
    return n


def check_trainable_layers(k, n: int, model_name: str) -> None:
    if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= n:
        raise BenchError(f"method.trainable_layers: {k!r} is not a number of {model_name}'s {n} transformer blocks; "
                         f"valid: an integer from 0 to {n}")


def _bias_names(model, head_modules) -> list[str]:
    names = [n for n, _ in model.named_parameters() if n.rsplit(".", 1)[-1] == "bias" and not _is_head(n, head_modules)]
    if not names:
        raise BenchError(f"method=bitfit: {type(model).__name__} has no bias terms outside the head, so BitFit would "
                         "train the head only; valid here: head or a method that adapts weights (lora, ia3, ...)")
    return names


def trainable_names(model, method_cfg, model_cfg) -> set[str]:
    """The parameters that train under a partial kind (head, freeze, bitfit); works on a meta-device model too."""
    names = _partial_names(model, method_cfg, model_cfg)
    if not names:
        raise BenchError(f"method={method_cfg.name}: nothing of {type(model).__name__} would train (a language model "
                         "has no new head); valid here: freeze, full or a peft method")
    return names


def _partial_names(model, method_cfg, model_cfg) -> set[str]:
    head = {n for n, _ in model.named_parameters() if _is_head(n, model_cfg.head_modules)}
    if method_cfg.kind == "head":
        return head
    if method_cfg.kind == "freeze":
        n = num_blocks(model)
        k = method_cfg.trainable_layers
        check_trainable_layers(k, n, type(model).__name__)
        top = {name for name, _ in model.named_parameters() if (i := block_index(name)) is not None and i >= n - k}
        return head | top
    if method_cfg.kind == "bitfit":
        return head | set(_bias_names(model, model_cfg.head_modules))
    raise BenchError(f"method.kind: {method_cfg.kind!r} is not one of {', '.join(PARTIAL_KINDS)}")


# keys of a peft method YAML that belong to the harness, never handed to peft (peft_type picks the config class);
# `search` is the method's search space for `python -m bench.compare` (bench/sweep/search.py), read by no run
SEARCH_KEY = "search"
HARNESS_KEYS = ("name", "kind", "lr", "peft_type", "trainable_layers", SEARCH_KEY)
# the one place public knob names meet peft's field names: {public name: {peft_type: peft's field}}, for the names
# that differ; every other key of a method YAML is already the field's own name (r, alpha of LoHa / LoKr, ...)
PEFT_FIELDS = {
    "alpha": {"LORA": "lora_alpha", "ADALORA": "lora_alpha"},
    "dropout": {"LORA": "lora_dropout", "ADALORA": "lora_dropout", "BOFT": "boft_dropout", "OFT": "module_dropout",
                "VBLORA": "vblora_dropout"},
    "block_size": {"BOFT": "boft_block_size", "OFT": "oft_block_size"},
    "n_butterfly_factor": {"BOFT": "boft_n_butterfly_factor"},
}


def peft_field(key: str, peft_type: str) -> str:
    """peft's field name for the method key `key` under `peft_type`."""
    return PEFT_FIELDS.get(key, {}).get(peft_type, key)


def peft_spec(method_cfg) -> dict:
    """The arguments of peft's config class for method.peft_type, from the method's keys (public names mapped to
    peft's fields); BenchError naming method.<key> for a key that is none of that class's fields."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    import bench.core.methods.bottleneck  # noqa: F401  registers the BOTTLENECK peft method

    spec = OmegaConf.to_container(method_cfg, resolve=True)
    peft_type = spec.get("peft_type")
    config_cls = PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type) if isinstance(peft_type, str) else None
    if config_cls is None:
        raise BenchError(f"method.peft_type: unknown peft type {peft_type!r}; valid: "
                         f"{', '.join(sorted(getattr(t, 'value', t) for t in PEFT_TYPE_TO_CONFIG_MAPPING))}")
    fields = {f.name for f in dataclasses.fields(config_cls) if f.init} - {"peft_type", "task_type"}
    kwargs, named = {}, {}
    for key, value in spec.items():
        if key in HARNESS_KEYS:
            continue
        field = peft_field(key, peft_type)
        if field not in fields:
            public = {PEFT_FIELDS[k][peft_type]: k for k in PEFT_FIELDS if peft_type in PEFT_FIELDS[k]}
            valid = sorted(f"{public[f]} (= {f})" if f in public else f for f in fields)
            hint = " (the peft: block is gone: set its fields at the top level of the method)" if key == "peft" else ""
            raise BenchError(f"method.{key}: not a field of peft's {config_cls.__name__} for peft_type {peft_type}"
                             f"{hint}; valid: {', '.join(valid)}")
        if field in named:
            raise BenchError(f"method.{key}: sets peft's {field}, as method.{named[field]} does; keep one of them")
        kwargs[field], named[field] = value, key
    return {"peft_type": peft_type, **kwargs}


# peft's task type per (task kind, model family): what PeftModel wraps (bench/core/models.py: model_class)
TASK_TYPES = {"classification": "SEQ_CLS", "decoder": "CAUSAL_LM", "encoder-decoder": "SEQ_2_SEQ_LM"}


def task_type(task_kind: str, family: str) -> str:
    return TASK_TYPES["classification" if task_kind == "classification" else family]


def peft_config(method_cfg, model_cfg, task_type: str = "SEQ_CLS"):
    """peft's config for a peft method: its keys through peft_spec and the task type; a classifier's new head
    trains too (peft modules_to_save); an LM has no new head."""
    import peft

    spec = peft_spec(method_cfg)
    spec["task_type"] = task_type
    config = peft.get_peft_config(spec)
    if (task_type == "SEQ_CLS" and "modules_to_save" in {f.name for f in dataclasses.fields(config)}
            and config.modules_to_save is None):
        config.modules_to_save = list(model_cfg.head_modules)
    return config


def _no_boft_cuda_build() -> None:
    """peft's BOFT builds a CUDA kernel (fbd_cuda, with nvcc and ninja) when its first layer is created and, without
    it, sets boft_n_butterfly_factor to 1. Without CUDA that kernel could never run: skip the doomed build (minutes
    of nvcc where a CUDA toolkit is installed) and take peft's fallback directly. The kernel's cache is private to
    peft (bench/private_apis.py: PEFT_BOFT_KERNEL); where a release drops it, this does nothing."""
    if not torch.cuda.is_available():
        from peft.tuners.boft import layer
        if getattr(layer, "_FBD_CUDA", False) is None:  # None: not built yet; get_fbd_cuda() returns any other value
            layer._FBD_CUDA = False


def _apply_full(model, method_cfg, model_cfg, task_type):
    model.requires_grad_(True)
    return model


def _apply_partial(model, method_cfg, model_cfg, task_type):
    train = trainable_names(model, method_cfg, model_cfg)
    for name, p in model.named_parameters():
        p.requires_grad_(name in train)
    return model


def _apply_peft(model, method_cfg, model_cfg, task_type):
    import peft
    config = peft_config(method_cfg, model_cfg, task_type)
    if config.peft_type == peft.PeftType.BOFT:
        _no_boft_cuda_build()
    return peft.get_peft_model(model, config)


APPLY = {"full": _apply_full, "head": _apply_partial, "freeze": _apply_partial, "bitfit": _apply_partial,
         "peft": _apply_peft}
KINDS = tuple(APPLY)


def apply(model, method_cfg, model_cfg, task_type: str = "SEQ_CLS"):
    """Return the model to train, with requires_grad set by the method (task_type: see TASK_TYPES)."""
    if method_cfg.kind not in APPLY:
        raise BenchError(f"method.kind: unknown kind {method_cfg.kind!r}; valid: {', '.join(KINDS)}")
    return APPLY[method_cfg.kind](model, method_cfg, model_cfg, task_type)


META_ONLY = re.compile(r"\bmeta\b|set_data")  # an error about the meta device (or CPU weights moved to it)


def apply_on_meta(model, method_cfg, model_cfg, task_type: str = "SEQ_CLS"):
    """The method applied to a copy of a meta-device model (names, shapes, dtypes; no weights): what validation
    checks peft against (bench/orchestration/validate_model.py) and what the plan counts (bench/core/plan.py).

    New adapter weights are made on the meta device too. Where peft's initialization needs real values (BOFT's
    permutation matrices call .item()), it builds again with new weights made on the CPU, which peft then moves to
    the meta device of the layer they adapt (adapter-sized, and freed at once). Raises whatever peft raises; an error
    that is only about the meta device (META_ONLY) on both tries is raised too (validation lets the run decide).
    peft's warnings are silenced (the run shows them).
    """
    import contextlib
    import copy
    import warnings
    if method_cfg.kind != "peft":
        return apply(copy.deepcopy(model), method_cfg, model_cfg, task_type)
    import peft
    config = peft_config(method_cfg, model_cfg, task_type)
    for device in ("meta", None):
        try:
            default_device = torch.device(device) if device else contextlib.nullcontext()
            with warnings.catch_warnings(), _no_boft_kernel(config), default_device:
                warnings.simplefilter("ignore")
                return peft.get_peft_model(copy.deepcopy(model), copy.deepcopy(config))
        except Exception as e:
            if device is None or not META_ONLY.search(str(e)):
                raise


def _no_boft_kernel(config):
    """BOFT loads (or builds, with nvcc) a CUDA kernel when it wraps its first layer: not for a meta-device build."""
    import contextlib

    @contextlib.contextmanager
    def guard():
        from peft.tuners.boft import layer
        saved = layer._FBD_CUDA
        layer._FBD_CUDA = saved if saved is not None else False
        try:
            yield
        finally:
            layer._FBD_CUDA = saved
    return guard() if config.peft_type == "BOFT" else contextlib.nullcontext()


def step_hook(model, total_steps: int):
    """What the method does after every optimizer step, as a callable taking the step (1 .. total_steps), or None.

    Called by the common trainer right after optimizer.step(), before the gradients are cleared. The one user:
    AdaLoRA (peft `update_and_allocate`), which scores its singular values from this step's gradients and prunes
    ranks on a schedule over `total_step` steps (its YAML sets that from train.max_steps).
    """
    peft = sys.modules.get("peft")  # not imported: not a peft model
    if peft is None or not isinstance(model, peft.PeftModel):
        return None
    update = getattr(model.base_model, "update_and_allocate", None)
    if update is None:
        return None
    scheduled = getattr(model.peft_config[model.active_adapter], "total_step", None)
    if scheduled is not None and scheduled != total_steps:
        raise ValueError(f"method.total_step: {scheduled}, but the run has {total_steps} steps; they must agree")
    return update


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
    whole model (model.safetensors + config.json); for `head`, `freeze` and `bitfit`, the tensors that trained
    (head.safetensors / freeze.safetensors / bitfit.safetensors; names as in the model's state dict, so they need
    no config to reload). Other files save_pretrained writes (peft's model card README.md) are kept but not
    counted.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir) as tmp:  # a crash never leaves a half-written checkpoint under the final name
        tmp.mkdir(mode=0o700)
        if method_cfg.kind in PARTIAL_KINDS:
            from safetensors.torch import save_file
            state = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
            save_file(state, tmp / f"{method_cfg.kind}.safetensors")
        else:
            model.save_pretrained(tmp, safe_serialization=True)
    return checkpoint_bytes(out_dir)


CKPT_COUNTED = ("*.safetensors", "*config.json")   # weights, and the config that reloads them


def checkpoint_bytes(ckpt_dir: Path) -> int:
    """ckpt/bytes of a checkpoint folder (see save)."""
    files = {f for pattern in CKPT_COUNTED for f in Path(ckpt_dir).rglob(pattern) if f.is_file()}
    return sum(f.stat().st_size for f in files)


def regularize_active(model) -> None:
    """Point a reloaded AdaLoRA model's regularizer at its active adapter (other methods: nothing to do). peft's
    AdaLoRA adds its orthogonality regularizer to every loss it sees, reading the adapter's name from an attribute it
    sets only for a trainable adapter, so a reloaded one fails on any batch with labels (huggingface/peft#571, fixed
    only for batches without labels). Called again after each switch (bench/core/multitask.py: activate)."""
    import peft
    tuner = model.base_model
    if isinstance(tuner, peft.AdaLoraModel):
        tuner.trainable_adapter_name = model.active_adapter


def reload(base_model, method_cfg, ckpt_dir: Path):
    """Load a checkpoint written by save() onto a freshly loaded base model (used by tests and users)."""
    if method_cfg.kind == "peft":
        import peft

        import bench.core.methods.bottleneck  # noqa: F401
        model = peft.PeftModel.from_pretrained(base_model, ckpt_dir)
        regularize_active(model)
        return model
    if method_cfg.kind in PARTIAL_KINDS:
        from safetensors.torch import load_file
        state = load_file(Path(ckpt_dir) / f"{method_cfg.kind}.safetensors")
        unexpected = base_model.load_state_dict(state, strict=False).unexpected_keys
        if unexpected:
            raise BenchError(f"{ckpt_dir}: tensors that are not in {type(base_model).__name__}: {unexpected[:5]}")
        return base_model
    return type(base_model).from_pretrained(ckpt_dir)


