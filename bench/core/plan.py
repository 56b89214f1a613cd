"""What a run will cost, before a single weight is loaded: `estimate(cfg, setting)` builds the model the task trains
from its config.json on the meta device (`models.meta_model`: shapes and dtypes, no weights), applies the method
there as validation does (`methods.apply_on_meta`), and reads every figure off that model.

Exact (equal to what a run logs; tests/test_plan.py holds them to real builds, saves and training steps):
- trainable, total: `methods.count_parameters` of the meta model (a 4-bit weight of odd size counts one element
  more in a run: bitsandbytes packs two per byte and count_parameters doubles the packed count).
- ckpt_bytes: what `methods.save` writes, from the tensors' names, shapes and dtypes: a safetensors file is an 8-byte
  header length, its JSON header (safetensors' own order: dtype descending, then name; padded with spaces to a
  multiple of 8) and the data; plus adapter_config.json as peft serializes it (peft methods) or config.json (and
  generation_config.json) as transformers does (full). AdaLoRA: the checkpoint before rank pruning (an upper bound;
  a run's pruned ranks shrink it).
- weights_bytes (= mem/weights_bytes): parameters and buffers as stored; weights of quantized linear layers (the
  ones transformers' bitsandbytes integration converts) at 1 byte (int8) or half a byte (nf4) per element.
  quant_state_bytes: bitsandbytes' quantization constants, which mem/weights_bytes leaves out: NF4 absmax per
  64-element block (float32; with double quantization uint8, plus a float32 absmax per 256 blocks and an offset)
  and the code tables; int8 one float32 scale per output row.
- grad_bytes (= mem/grad_bytes): trainable elements x element size; optimizer_bytes (= mem/optimizer_bytes): AdamW's
  two moments per element that receives a gradient plus a 4-byte step per such tensor.

Estimated:
- activation_bytes: the peak of a training step's own tensors (activations autograd keeps, the forward's and the
  backward's temporaries; gradients and optimizer state excluded), from a *simulated step*: one forward pass,
  backward pass and AdamW step of the meta model on a meta batch (batch_size x seq_len token ids, training mode,
  labels) under a TorchDispatchMode that records every new storage and, through a weakref on each tensor, when its
  last tensor dies (`Allocations`). Nothing is computed or allocated; the simulation sees what the method changes
  (frozen layers keep less, virtual tokens lengthen the sequence, a language model keeps its log-probabilities over
  the vocabulary) and runs attention as the device would: the fused kernel (query, key, value, output and a float32
  log-sum-exp; GQA keys and values repeated, as transformers does for a padded batch) except on CPU with attention
  dropout, where PyTorch takes the math path (scores, softmax, a float32 dropout mask per head), which the
  simulation then runs itself; dropout masks are float32 on CPU, one byte on CUDA. The same recorder on real CPU
  steps finds the same bytes within 3 % (tests/test_plan.py). Gradient checkpointing (non-reentrant, per block) is
  simulated as transformers runs it. Fallback, the *formula* (a model the meta forward cannot run): per
  transformer block, for b sequences of s tokens, hidden size h, FFN size i, a heads, element size e, t = b·s:
    encoder (BERT-style, post-LN, GELU, dropout, CPU math attention): t·e·(10·h + 2·i) + 3·b·a·s²·e
    decoder (Llama-style, pre-norm, SwiGLU, no dropout, fused attention): t·e·(11·h + 4·i) + 4·b·a·s
  (what the simulation keeps for full fine-tuning, to within a few %), plus t·h·e outside the blocks (a language
  model: t·V·e for its vocabulary log-probabilities) and 2 x the largest tensor for the backward pass.
- overhead_bytes: what the framework adds on top. CPU: OVERHEAD["cpu"] x activation_bytes: a training step's
  resident memory (glibc keeps freed heap pages, kernels keep per-thread buffers) exceeds its live tensors by a
  factor 1.74 on this machine, fitted (minimax) on the MiniLM calibration runs and checked on SmolLM2 (README,
  *Planning*); CUDA: 0 (not measured here). Quantized layers add one layer dequantized to float32.
- train_bytes = weights + quant_state + grad + optimizer + activation + overhead: the device memory of training
  (CUDA: compare with mem/peak_train_bytes, an upper bound where gradients reuse freed activation memory;
  step_peak_bytes has the simulated live peak; CPU: train_bytes - weights_bytes - quant_state_bytes with
  mem/train_growth_bytes, since a CPU figure is the process's resident memory with interpreter and libraries).
- inference_bytes = weights + quant_state + kv_cache + inference working set: KV cache (decoders, encoder-decoders)
  = 2 (key, value) x layers x kv heads x head size x tokens held (gen_len; prefix tuning adds its virtual tokens)
  x eval batch x e; the working set is 2 x the largest tensor of a forward pass at the eval batch (not measured).

How close the estimates come to measured runs: README, *Planning* (tests/test_plan.py: the slow calibration test).
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
from dataclasses import asdict, dataclass, field

import torch

from bench.core import methods, models
from bench.errors import BenchError

DTYPES = {"float32": 4, "bfloat16": 2, "float16": 2}
DEVICES = ("cpu", "cuda")
# framework overhead per activation byte (see the module doc): on CPU the resident memory training adds beyond its
# live tensors (allocator and kernel buffers), calibrated on this machine's runs (tests/test_plan.py: the calibration
# test); CUDA's allocated bytes are the live bytes (an assumption: no GPU here to measure it)
OVERHEAD = {"cpu": 0.74, "cuda": 0.0}
NF4_BLOCK = 64            # bitsandbytes' 4-bit block size: one absmax per 64 elements
NESTED_BLOCK = 256        # double quantization: the absmaxes quantized to 8 bits in blocks of 256
MAX_SHARD_BYTES = 50 * 10**9   # transformers' save_pretrained max_shard_size default ("50GB")


@dataclass(frozen=True)
class Setting:
    """What the estimate is for: the training batch and where it runs."""
    batch_size: int
    seq_len: int                       # tokens of the longest training batch (its padded length)
    device: str = "cpu"                # cpu | cuda
    dtype: str = "float32"             # weights and compute (the harness loads float32)
    gradient_checkpointing: bool = False
    num_labels: int = 2                # a classifier's head
    pad_token_id: int | None = None    # None: the config's pad, else its eos (as bench/core/models.py: load sets it)
    target_len: int = 16               # encoder-decoder: decoder tokens per training example
    eval_batch_size: int = 1           # inference
    gen_len: int = 0                   # inference: tokens in the KV cache (prompt + generated); 0: none
    padded: bool = True                # the longest batch holds shorter rows (an attention mask; GQA keys repeated)


@dataclass
class Plan:
    method: str
    model: str
    quant: str
    task_kind: str
    family: str
    setting: Setting
    trainable: int
    total: int
    ckpt_bytes: int
    weights_bytes: int
    quant_state_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    activation_bytes: int
    overhead_bytes: int
    kv_cache_bytes: int
    inference_working_bytes: int
    activation_source: str = "trace"   # trace | formula
    saved_bytes: int | None = None     # of the trace: what autograd keeps for one backward pass (information)
    step_peak_bytes: int | None = None  # of the trace: the live peak of a step, gradients and optimizer included
    notes: list[str] = field(default_factory=list)

    @property
    def trainable_pct(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    @property
    def train_bytes(self) -> int:
        return (self.weights_bytes + self.quant_state_bytes + self.grad_bytes + self.optimizer_bytes
                + self.activation_bytes + self.overhead_bytes)

    @property
    def train_growth_bytes(self) -> int:
        """What training adds to the loaded model: comparable with a CPU run's mem/train_growth_bytes."""
        return self.train_bytes - self.weights_bytes - self.quant_state_bytes

    @property
    def inference_bytes(self) -> int:
        return self.weights_bytes + self.quant_state_bytes + self.kv_cache_bytes + self.inference_working_bytes

    def as_dict(self) -> dict:
        out = asdict(self)
        out.update(trainable_pct=self.trainable_pct, train_bytes=self.train_bytes,
                   train_growth_bytes=self.train_growth_bytes, inference_bytes=self.inference_bytes)
        return out


# --- the model on the meta device ---------------------------------------------------------------------------

def _source(model_cfg) -> str:
    source = models.config_source(model_cfg)
    if source is None:  # the shipped SmolLM2 folder is built once from its GGUF (offline); any run builds it too
        from bench import assets
        source = str(assets.smollm2_dir())
    return source


def base_model(cfg, setting: Setting):
    """The model the task trains, on the meta device, as the run loads it (head size): the cached instance, which
    the caller must not change (methods.apply_on_meta works on a copy)."""
    kind = cfg.task.get("kind", "classification")
    return models.meta_model(_source(cfg.model), bool(cfg.model.trust_remote_code), kind,
                             setting.num_labels if kind == "classification" else None, setting.dtype)


def set_pad(model, setting: Setting) -> None:
    """The pad token a run sets on its model's config (bench/core/models.py: load): a decoder classifier pools on it,
    and a full checkpoint's config.json records it."""
    config = model.config
    config.pad_token_id = setting.pad_token_id if setting.pad_token_id is not None else _default_pad(config)


def _default_pad(config):
    if config.pad_token_id is not None:
        return config.pad_token_id
    eos = getattr(config, "eos_token_id", None)
    return eos[0] if isinstance(eos, (list, tuple)) else eos


def quantized_linears(model, quant_cfg, model_cfg, task_kind: str) -> dict[str, torch.nn.Module]:
    """The linear layers bitsandbytes would store quantized: transformers' rule (every nn.Linear / Conv1D but the
    skipped modules: quant_skip_modules for a classifier, the output embedding and tied weights for an LM)."""
    if quant_cfg.name == "none":
        return {}
    from transformers.pytorch_utils import Conv1D
    from transformers.quantizers.base import get_keys_to_not_convert
    from transformers.quantizers.quantizers_utils import should_convert_module
    skip = list(model_cfg.quant_skip_modules) if task_kind == "classification" else get_keys_to_not_convert(model)
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    skip = list({*skip, *keep})
    return {name: m for name, m in model.named_modules()
            if (type(m) is torch.nn.Linear or isinstance(m, Conv1D)) and should_convert_module(name, skip)}


def _storage_key(t: torch.Tensor):
    """Which storage a tensor lives in (a meta tensor has a storage object, but no address)."""
    return ("meta", t.untyped_storage()._cdata) if t.device.type == "meta" else (t.device, t.untyped_storage().data_ptr())


def _pointer_key(t: torch.Tensor):
    """A tensor's data pointer, as measure.weights_bytes keys it (two views at different offsets count twice)."""
    if t.device.type == "meta":
        return "meta", t.untyped_storage()._cdata, t.storage_offset() * t.element_size()
    return t.device, t.data_ptr()


# --- weights, gradients, optimizer ----------------------------------------------------------------------------

def _weights(model, quantized_weights: set[int], quant: str) -> int:
    """mem/weights_bytes of the model a run loads: parameters and buffers, each storage once; quantized weights
    packed (bench/core/measure.py: weights_bytes)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        key = _pointer_key(t) if t.numel() else id(t)
        if key in seen:
            continue
        seen.add(key)
        if id(t) in quantized_weights:
            total += (t.numel() + 1) // 2 if quant == "nf4" else t.numel()
        else:
            total += t.numel() * t.element_size()
    return total


def _quant_state(quantized: dict, quant_cfg) -> int:
    """bitsandbytes' quantization constants of the quantized weights (see the module doc)."""
    if not quantized:
        return 0
    if quant_cfg.name == "int8":
        return sum(4 * m.weight.shape[0] for m in quantized.values())   # SCB: one float32 scale per output row
    total = 0
    for m in quantized.values():
        blocks = math.ceil(m.weight.numel() / NF4_BLOCK)
        if quant_cfg.get("bnb_4bit_use_double_quant", False):
            # uint8 absmax, a float32 absmax per 256 of them, a float32 offset, the 8-bit code table (256 floats)
            total += blocks + 4 * math.ceil(blocks / NESTED_BLOCK) + 4 + 4 * 256
        else:
            total += 4 * blocks
        total += 4 * 16   # the NF4 code table (16 floats)
    return total


def _grad_and_optimizer(trainable: list[torch.Tensor], with_grad: list[torch.Tensor]) -> tuple[int, int]:
    grad = sum(p.numel() * p.element_size() for p in trainable)
    optimizer = sum(2 * p.numel() * p.element_size() + 4 for p in with_grad)
    return grad, optimizer


# --- checkpoint bytes ---------------------------------------------------------------------------------------

# safetensors' dtype order (its Rust enum, ascending); a file lists tensors by dtype descending, then by name
_ST_ORDER = ("BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "I16", "U16", "F16",
             "BF16", "I32", "U32", "F32", "F64", "I64", "U64")
_ST_DTYPE = {torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.float16: "F16",
             torch.bfloat16: "BF16", torch.int32: "I32", torch.float32: "F32", torch.float64: "F64",
             torch.int64: "I64", torch.float8_e5m2: "F8_E5M2", torch.float8_e4m3fn: "F8_E4M3"}


def safetensors_bytes(tensors: dict[str, tuple[tuple[int, ...], torch.dtype]], metadata: dict | None = None) -> int:
    """The size of the safetensors file `safetensors.torch.save_file` writes for tensors {name: (shape, dtype)}."""
    items = sorted(tensors.items(), key=lambda kv: (-_ST_ORDER.index(_ST_DTYPE[kv[1][1]]), kv[0]))
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = metadata
    for name, (shape, dtype) in items:
        size = math.prod(shape) * torch.empty((), dtype=dtype, device="meta").element_size()
        header[name] = {"dtype": _ST_DTYPE[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    n = len(json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode())
    return 8 + n + (-n % 8) + offset


def _spec(state: dict) -> dict:
    return {name: (tuple(t.shape), t.dtype) for name, t in state.items()}


def checkpoint_bytes(model, method_cfg) -> int:
    """ckpt/bytes of what `methods.save` writes for this model (see the module doc)."""
    if method_cfg.kind in methods.PARTIAL_KINDS:
        return safetensors_bytes({n: (tuple(p.shape), p.dtype) for n, p in model.named_parameters()
                                  if p.requires_grad})
    if method_cfg.kind == "peft":
        return _peft_checkpoint_bytes(model)
    return _full_checkpoint_bytes(model)


def _peft_checkpoint_bytes(model) -> int:
    """adapter_model.safetensors + adapter_config.json, as peft's save_pretrained writes them."""
    from peft import get_peft_model_state_dict
    name = model.active_adapter
    with _meta_stays_meta():   # a prompt method's state runs its prompt encoder and copies the result to the CPU
        state = get_peft_model_state_dict(model, adapter_name=name)
    config = copy.deepcopy(model.peft_config[name])
    if config.base_model_name_or_path is None:
        owner = model.base_model if config.is_prompt_learning else model.base_model.model
        config.base_model_name_or_path = owner.__dict__.get("name_or_path", None) or None
    config.inference_mode = True
    out = config.to_dict()
    out = {k: list(v) if isinstance(v, set) else v for k, v in out.items()}
    text = json.dumps(out, indent=2, sort_keys=True)
    return safetensors_bytes(_spec(state), {"format": "pt"}) + len(text.encode())


@contextlib.contextmanager
def _meta_stays_meta():
    """Tensor.cpu() leaves a meta tensor on the meta device (it has no data to copy), for the length of the block."""
    cpu = torch.Tensor.cpu

    def keep(self, *args, **kwargs):
        return self if self.device.type == "meta" else cpu(self, *args, **kwargs)

    torch.Tensor.cpu = keep
    try:
        yield
    finally:
        torch.Tensor.cpu = cpu


def _full_checkpoint_bytes(model) -> int:
    """model.safetensors (shards above 50 GB) + config.json (+ generation_config.json), as transformers writes."""
    from transformers.modeling_utils import remove_tied_weights_from_state_dict
    config = copy.deepcopy(model.config)
    config.dtype = str(model.dtype).split(".")[1]
    config.architectures = [type(model).__name__]
    if type(model).__name__.endswith("ForSequenceClassification") and config.problem_type is None:
        # the first loss sets it (transformers' sequence classifiers), so every trained classifier saves it
        config.problem_type = "regression" if config.num_labels == 1 else "single_label_classification"
    total = len(config.to_json_string(use_diff=True).encode())
    if model.can_generate():
        total += len(_generation_config(model).to_json_string(use_diff=True).encode())
    state = model.state_dict()
    for key in getattr(model, "_keys_to_ignore_on_save", None) or []:
        state.pop(key, None)
    state = remove_tied_weights_from_state_dict(state, model)
    shards, current, size = [], {}, 0
    for name, t in state.items():   # transformers' split: in order, a new shard once the next tensor overflows
        n = t.numel() * t.element_size()
        if current and size + n > MAX_SHARD_BYTES:
            shards.append(current)
            current, size = {}, 0
        current[name], size = t, size + n
    shards.append(current)
    return total + sum(safetensors_bytes(_spec(s), {"format": "pt"}) for s in shards)


def _generation_config(model):
    """The generation config a loaded model saves: the folder's generation_config.json if it has one."""
    from transformers import GenerationConfig
    try:
        return GenerationConfig.from_pretrained(model.name_or_path)
    except Exception:   # none in the folder (or not reachable): the one transformers derives from the config
        return model.generation_config


# --- activations --------------------------------------------------------------------------------------------

class _FusedAttention(torch.autograd.Function):
    """A fused attention kernel's memory, on the meta device: it keeps query, key, value, output and a float32
    log-sum-exp per query row (PyTorch's CPU flash kernel; CUDA's flash and memory-efficient kernels)."""

    @staticmethod
    def forward(ctx, query, key, value):
        out = query.new_empty((*query.shape[:-1], value.shape[-1]))
        lse = query.new_empty(query.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(query, key, value, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):   # never run: the plan only records what is kept
        query, key, value, _, _ = ctx.saved_tensors
        return torch.zeros_like(query), torch.zeros_like(key), torch.zeros_like(value)


@contextlib.contextmanager
def _device_kernels(device: str, padded: bool = True):
    """Attention and dropout as `device` runs them (see the module doc), for a forward on the meta device."""
    functional = torch.nn.functional
    sdpa, dropout = functional.scaled_dot_product_attention, functional.dropout

    def attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if device == "cpu" and dropout_p > 0:   # PyTorch's CPU flash kernel has no dropout: the math path
            return sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                        scale=scale, enable_gqa=enable_gqa)
        groups = query.shape[-3] // key.shape[-3]
        if groups > 1 and padded:   # a padded batch: transformers repeats GQA keys and values before the kernel
            key, value = key.repeat_interleave(groups, -3), value.repeat_interleave(groups, -3)
        return _FusedAttention.apply(query, key, value)

    def cuda_dropout(input, p=0.5, training=True, inplace=False):
        return torch.native_dropout(input, p, training)[0] if training and p > 0 else input

    functional.scaled_dot_product_attention = attention
    if device == "cuda":
        functional.dropout = cuda_dropout
    try:
        yield
    finally:
        functional.scaled_dot_product_attention, functional.dropout = sdpa, dropout


@dataclass
class Trace:
    """What the meta-device simulation of a training step found (see the module doc)."""
    events: list[tuple[int, int]]       # (storage id, +bytes allocated / -bytes freed), in order
    backward_end: int                   # events[:backward_end]: the forward and backward passes
    state_bytes: int                    # the optimizer's state after its first step (its step counters excluded)
    saved_bytes: int                    # what autograd keeps for the backward pass (each storage once)
    with_grad: set[int]                 # ids of the parameters the backward pass reaches

    @property
    def activation_peak_bytes(self) -> int:
        """The peak of the forward and backward passes' own tensors: everything live at once but what outlives the
        backward pass (the gradients)."""
        events = self.events[:self.backward_end]
        alive = {}
        for uid, n in events:
            if n > 0:
                alive[uid] = n
            else:
                alive.pop(uid, None)
        live = peak = 0
        for uid, n in events:
            if uid not in alive:
                live += n
                peak = max(peak, live)
        return peak

    @property
    def peak_bytes(self) -> int:
        """The peak of a training step from the second on: the first step's forward and backward with the
        optimizer's state already allocated, or its optimizer step (gradients, state and the update's
        temporaries), whichever is higher."""
        return max(live_peak(self.events), live_peak(self.events[:self.backward_end]) + self.state_bytes)


class Allocations:
    """Every allocation and release of a storage on `device` while `mode` is active, in order (a TorchDispatchMode:
    each operator's new output storages, but those of `external` tensors (weights, inputs) and their views; a
    weakref on each tensor tells when its storage's last tensor dies). The plan records a meta-device step with it;
    tests record real CPU steps with it to check the plan."""

    def __init__(self, device: str = "meta", external=()):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten
        recorder = self
        self.events: list[tuple[int, int]] = []
        self.live: dict = {}        # storage key -> [bytes, live tensors, id]
        self.external = {t.untyped_storage()._cdata for t in external}
        self._ids = iter(range(1 << 62))

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in tree_flatten(out)[0]:
                    if isinstance(t, torch.Tensor) and t.device.type == device:
                        recorder._track(t)
                return out
        self.mode = Mode()

    def _track(self, t: torch.Tensor) -> None:
        import weakref
        key = t.untyped_storage()._cdata
        if key in self.external:
            return
        entry = self.live.get(key)
        if entry is None:
            entry = self.live[key] = [t.untyped_storage().nbytes(), 0, next(self._ids)]
            self.events.append((entry[2], entry[0]))
        entry[1] += 1
        weakref.finalize(t, self._release, key, entry[2])

    def _release(self, key, uid: int) -> None:
        entry = self.live.get(key)
        if entry is None or entry[2] != uid:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del self.live[key]
            self.events.append((uid, -entry[0]))


def _inputs(setting: Setting, task_kind: str, family: str) -> dict:
    b, s = setting.batch_size, setting.seq_len
    meta = torch.device("meta")
    kwargs = {"input_ids": torch.zeros(b, s, dtype=torch.long, device=meta)}
    if task_kind == "classification":
        kwargs["labels"] = torch.zeros(b, dtype=torch.long, device=meta)
    elif family == "encoder-decoder":
        kwargs["labels"] = torch.zeros(b, setting.target_len, dtype=torch.long, device=meta)
    else:
        kwargs["labels"] = torch.zeros(b, s, dtype=torch.long, device=meta)
    return kwargs


def trace(model, setting: Setting, task_kind: str, family: str) -> Trace:
    """One training step (forward, backward, AdamW step, gradients cleared) of the meta-device model on a meta
    batch, recording every allocation and release (see the module doc)."""
    kwargs = _inputs(setting, task_kind, family)
    if setting.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = [p for p in model.parameters() if p.requires_grad]
    weights = [*model.parameters(), *model.buffers()]
    owned = {_storage_key(t) for t in weights}
    saved: dict = {}

    def pack(t):
        key = _storage_key(t)
        if key not in owned:
            saved[key] = t.untyped_storage().nbytes()
        return t

    optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=setting.device == "cuda")
    recorder = Allocations(external=[*weights, *kwargs.values()])
    model.train()
    with _device_kernels(setting.device, setting.padded), recorder.mode:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(**kwargs).loss
        reached = _reached(loss)
        loss.backward()
        del loss
        backward_end = len(recorder.events)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    state = sum(v.numel() * v.element_size() for st in optimizer.state.values() for v in st.values()
                if isinstance(v, torch.Tensor) and v.device.type == "meta")
    return Trace(recorder.events, backward_end, state, sum(saved.values()), reached)


def _reached(loss) -> set[int]:
    """ids of the leaf tensors (parameters) whose gradient the backward pass from `loss` computes."""
    found, seen, stack = set(), set(), [loss.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        variable = getattr(fn, "variable", None)
        if variable is not None:
            found.add(id(variable))
        stack.extend(f for f, _ in fn.next_functions)
    return found


def live_peak(events: list[tuple[int, int]]) -> int:
    """The peak of the bytes allocated at once: what a caching allocator reports as allocated (CUDA)."""
    live = peak = 0
    for _, n in events:
        live += n
        peak = max(peak, live)
    return peak


def _dims(config) -> dict:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    h = getattr(text, "hidden_size", None) or getattr(text, "d_model", None) or getattr(text, "n_embd")
    a = getattr(text, "num_attention_heads", None) or getattr(text, "n_head", None) or getattr(text, "num_heads")
    kv = getattr(text, "num_key_value_heads", None) or a
    layers = getattr(text, "num_hidden_layers", None) or getattr(text, "n_layer", None) or getattr(text, "num_layers")
    i = getattr(text, "intermediate_size", None) or getattr(text, "d_ff", None) or getattr(text, "n_inner", None) \
        or 4 * h
    head = getattr(text, "head_dim", None) or h // a
    return {"h": h, "a": a, "kv": kv, "L": layers, "i": i, "d": head, "V": text.vocab_size,
            "decoder_layers": getattr(text, "num_decoder_layers", None) or layers}


def activation_formula(config, setting: Setting, task_kind: str, family: str) -> int:
    """The per-family closed form (module doc): the fallback when the meta forward cannot run."""
    d = _dims(config)
    b, s, e = setting.batch_size, setting.seq_len, DTYPES[setting.dtype]
    t = b * s
    if family == "encoder":
        block = t * e * (10 * d["h"] + 2 * d["i"]) + 3 * b * d["a"] * s * s * e
        largest = max(t * d["i"] * e, b * d["a"] * s * s * e)
    else:
        block = t * e * (11 * d["h"] + 4 * d["i"]) + 4 * b * d["a"] * s
        largest = t * d["i"] * e
    outside = t * d["h"] * e
    if task_kind == "generation":
        outside += t * d["V"] * e
        largest = max(largest, t * d["V"] * e)
    if setting.gradient_checkpointing:
        return outside + d["L"] * t * d["h"] * e + block + 2 * largest
    return outside + d["L"] * block + 2 * largest


def _kv_cache(config, setting: Setting, family: str, virtual_tokens: int) -> int:
    if family == "encoder" or not setting.gen_len:
        return 0
    d = _dims(config)
    layers = d["decoder_layers"] if family == "encoder-decoder" else d["L"]
    tokens = setting.gen_len + virtual_tokens
    return 2 * layers * d["kv"] * d["d"] * tokens * setting.eval_batch_size * DTYPES[setting.dtype]


# --- the plan -------------------------------------------------------------------------------------------------

def estimate(cfg, setting: Setting, *, activations: bool = True) -> Plan:
    """The plan of one composed (and validated) job under `setting` (see the module doc). activations=False skips
    the simulated training step (activation_bytes 0, activation_source "skipped"): counts and bytes only."""
    if setting.device not in DEVICES:
        raise BenchError(f"plan device: unknown device {setting.device!r}; valid: {', '.join(DEVICES)}")
    if setting.dtype not in DTYPES:
        raise BenchError(f"plan dtype: unknown dtype {setting.dtype!r}; valid: {', '.join(DTYPES)}")
    kind = cfg.task.get("kind", "classification")
    base = base_model(cfg, setting)
    fam = models.family(base.config)
    quantized = quantized_linears(base, cfg.quant, cfg.model, kind)
    model = methods.apply_on_meta(base, cfg.method, cfg.model, methods.task_type(kind, fam))
    set_pad(model, setting)
    quantized_ids = {id(p) for n, p in model.named_parameters(remove_duplicate=False)
                     if base_name(n).removesuffix(".weight") in quantized and n.endswith(".weight")}
    trainable, total = methods.count_parameters(model)
    total += sum(m.weight.numel() % 2 for m in quantized.values()) if cfg.quant.name == "nf4" else 0
    params = [p for n, p in model.named_parameters() if p.requires_grad]
    notes: list[str] = []
    saved = peak = None
    try:
        if not activations:
            raise _Skipped
        traced = trace(model, setting, kind, fam)
        with_grad = [p for p in params if id(p) in traced.with_grad]
        grad, optimizer = _grad_and_optimizer(params, with_grad)
        activation, peak = traced.activation_peak_bytes, traced.peak_bytes
        source, saved = "trace", traced.saved_bytes
    except _Skipped:
        grad, optimizer = _grad_and_optimizer(params, params)
        activation, source = 0, "skipped"
    except Exception as e:  # a model the meta forward cannot run: the closed form
        from bench.fmt import error_line
        notes.append(f"activations from the per-family formula: the meta forward failed ({error_line(e)})")
        grad, optimizer = _grad_and_optimizer(params, params)
        activation, source = activation_formula(base.config, setting, kind, fam), "formula"
    virtual = int(cfg.method.get("num_virtual_tokens", 0) or 0) if cfg.method.get("peft_type") == "PREFIX_TUNING" \
        else 0
    working = _inference_working(model, setting, kind, fam) if setting.eval_batch_size else 0
    return Plan(
        method=str(cfg.method.name), model=str(cfg.model.name), quant=str(cfg.quant.name), task_kind=kind, family=fam,
        setting=setting, trainable=trainable, total=total, ckpt_bytes=checkpoint_bytes(model, cfg.method),
        weights_bytes=_weights(model, quantized_ids, cfg.quant.name),
        quant_state_bytes=_quant_state(quantized, cfg.quant), grad_bytes=grad, optimizer_bytes=optimizer,
        activation_bytes=activation,
        overhead_bytes=round(OVERHEAD[setting.device] * activation) + _dequant_bytes(quantized),
        kv_cache_bytes=_kv_cache(base.config, setting, fam, virtual), inference_working_bytes=working,
        activation_source=source, saved_bytes=saved, step_peak_bytes=peak, notes=notes)


class _Skipped(Exception):
    pass


def base_name(name: str) -> str:
    """A parameter's name in the base model, from its name in the method's model (peft's prefixes and wrappers)."""
    for prefix in ("base_model.model.", "base_model."):
        if name.startswith(prefix):
            name = name[len(prefix):]
            break
    return name.replace(".base_layer.", ".")


def _dequant_bytes(quantized: dict) -> int:
    """A quantized layer computes on its weight dequantized to float32: the largest one, at a time."""
    return max((4 * m.weight.numel() for m in quantized.values()), default=0)


def _inference_working(model, setting: Setting, kind: str, fam: str) -> int:
    """2 x the largest tensor of a forward pass at the eval batch over the prompt (no cache): input and output of
    the biggest operation (see the module doc)."""
    d = _dims(model.config)
    b, s, e = setting.eval_batch_size, setting.seq_len, DTYPES[setting.dtype]
    largest = b * s * max(d["i"], d["h"]) * e
    if fam == "encoder" and setting.device == "cpu":
        largest = max(largest, b * d["a"] * s * s * e)
    if kind == "generation":
        largest = max(largest, b * d["V"] * e)   # generate computes the next token's logits only
    return 2 * largest


# --- a run's own plan ------------------------------------------------------------------------------------------

def run_setting(cfg, *, train_lengths: list[int], target_lengths: list[int] | None, num_labels: int,
                pad_token_id: int | None, device: str) -> Setting:
    """The setting of a run: its batch size, its longest training example (the length-grouped sampler puts it in
    the first batch, padded to it), its device; the harness loads float32."""
    quant = cfg.quant
    gen = cfg.task.get("kind", "classification") == "generation"
    seq = max(train_lengths, default=1)
    return Setting(batch_size=int(cfg.train.batch_size), seq_len=seq, device=device, dtype="float32",
                   gradient_checkpointing=bool(quant.get("gradient_checkpointing", False)) and quant.name != "none",
                   num_labels=num_labels or 2, pad_token_id=pad_token_id,
                   target_len=max(target_lengths or [1]), eval_batch_size=int(cfg.train.eval_batch_size),
                   gen_len=seq + int(cfg.task.get("max_new_tokens", 0) or 0) if gen else 0,
                   padded=len(set(train_lengths)) > 1)


def metrics(plan: Plan) -> dict[str, float]:
    """The plan/* metrics a run logs next to its measurements (bench/core/metrics.yaml)."""
    from bench.core import metrics as M
    return {M.PLAN_TRAINABLE: plan.trainable, M.PLAN_CKPT_BYTES: plan.ckpt_bytes,
            M.PLAN_WEIGHTS_BYTES: plan.weights_bytes, M.PLAN_GRAD_BYTES: plan.grad_bytes,
            M.PLAN_OPTIMIZER_BYTES: plan.optimizer_bytes, M.PLAN_ACTIVATION_BYTES: plan.activation_bytes,
            M.PLAN_OVERHEAD_BYTES: plan.overhead_bytes, M.PLAN_TRAIN_BYTES: plan.train_bytes}
