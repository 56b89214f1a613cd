"""Bottleneck adapters (AdapterHub's Houlsby, Pfeiffer and parallel presets) as a regular peft method.

The computation is AdapterHub ``adapters`` 1.3.0's (``methods/modeling.py: Adapter / ParallelAdapter`` with
``pre_forward`` / ``forward`` / ``post_forward``, ``methods/bottleneck.py: bottleneck_layer_forward``), in eval and
in train mode. In one transformer sublayer (self-attention block or feed-forward block) let

- ``r`` be the sublayer's residual input (what the sublayer adds its output to),
- ``h`` the sublayer's output before that addition. BERT: ``h = dropout(dense(x))`` of ``BertSelfOutput`` /
  ``BertOutput``, i.e. after BERT's hidden dropout (the adapter itself is not dropped); Llama: the output of
  ``self_attn`` / ``mlp`` (Llama has no dropout there),
- ``LN`` the sublayer's pretrained LayerNorm (BERT is post-LN: ``LN(h + r)`` ends every sublayer; Llama is pre-LN:
  the decoder layer just adds ``r + h``, there is no LayerNorm at that point),
- ``A(z) = dropout(s * up(act(down(z))))`` the adapter: ``down = Linear(d, m)``, ``up = Linear(m, d)``, both with
  bias, ``m = int(d // reduction_factor)`` (at least 1), ``d`` the hidden size, ``s`` the scaling, the dropout
  ``dropout`` (0 in every preset).

Then, per preset (the method YAMLs conf/method/adapter*.yaml set these knobs):

- ``adapter`` = ``DoubleSeqBnConfig()`` (Houlsby et al. 2019): reduction 16, ``swish`` (SiLU), ``s = 1``, after the
  attention block AND after the feed-forward block. BERT: ``LN(h + A(h) + r)``; Llama: ``r + h + A(h)``.
- ``adapter_pfeiffer`` = ``SeqBnConfig()`` (Pfeiffer et al. 2020): reduction 16, ``relu``, ``s = 1``, after the
  feed-forward block only, ``original_ln_before=True``: the adapter reads the sublayer's normalized output and the
  same pretrained LayerNorm is applied twice. BERT: ``LN(h + A(LN(h + r)) + r)``; Llama: ``r + h + A(h + r)``.
- ``adapter_parallel`` = ``ParBnConfig()`` (He et al. 2022): reduction 2, ``relu``, ``s = 4``, beside the
  feed-forward block: the adapter reads the block's residual input ``r`` (Llama: the residual stream before
  ``post_attention_layernorm``, not the normalized MLP input). BERT: ``LN(h + A(r) + r)``; Llama: ``r + h + A(r)``.

Initialization (``init_weights``): ``"bert"`` (Houlsby and Pfeiffer): down and up weights N(0, 0.02), biases 0, so
a fresh adapter is NOT an identity; ``"mam_adapter"`` (parallel): down weight kaiming-uniform(a=sqrt(5)), down
bias 0, up weight and bias 0, so a fresh adapter adds exactly 0; ``"houlsby"``: both weights truncated N(0, 0.01)
in [-0.02, 0.02], biases 0.

Which module is wrapped (``target_modules``, per architecture in conf/model/*.yaml):

- BERT family (BERT, RoBERTa, ELECTRA, MiniLM, ...): the sublayer-output modules ``*.attention.output``
  (``BertSelfOutput``) and ``*.layer.N.output`` (``BertOutput``), which hold ``dense``, ``dropout`` and
  ``LayerNorm`` and get ``(x, r)``: :class:`BottleneckSublayerOutput` runs dense -> dropout -> adapter -> LayerNorm
  with the module's own submodules. Houlsby: ``r".*\\.(attention\\.output|layer\\.\\d+\\.output)"``; Pfeiffer and
  parallel: ``r".*\\.layer\\.\\d+\\.output"``.
- Llama family (Llama, Mistral, Qwen2, SmolLM2, ...): the ``self_attn`` and ``mlp`` modules of a decoder layer:
  :class:`BottleneckOutput` adds the adapter to their output and the decoder layer adds ``r`` as before. Where a
  preset reads ``r`` (Pfeiffer, parallel), the sibling pre-norm that receives ``r`` (``input_layernorm`` before
  ``self_attn``, ``post_attention_layernorm`` before ``mlp``) is wrapped in a parameter-free :class:`ResidualTap`
  that passes its input on to the adapter. Houlsby: ``r".*\\.(self_attn|mlp)"``; Pfeiffer and parallel:
  ``r".*\\.mlp"``. GPT-2 is wrapped the same way: ``h.N.attn`` and ``h.N.mlp``, with taps on ``ln_1`` / ``ln_2``.
  bench/core/architectures.py holds these sites per model type for ``model=hf``.
- Any other Linear-like module: :class:`BottleneckOutput` on its output, ``y + A(y)`` (the sequential placement
  without ``original_ln_before``; the model adds the residual itself).

Importing this module registers the method with peft under the peft_type ``"BOTTLENECK"`` (parameter prefix
``"adapter_"``), after which ``get_peft_model``, ``save_pretrained``, ``PeftModel.from_pretrained``, ``unload`` and
``get_peft_config({"peft_type": "BOTTLENECK", ...})`` work as for any built-in method. The adapters cannot be merged
into the base weights (they are non-linear).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
from torch import nn
from transformers.activations import get_activation
from transformers.pytorch_utils import Conv1D

import peft


def tested_peft() -> str:
    """The peft range this project declares (pyproject.toml), the one the suite has run."""
    from importlib.metadata import PackageNotFoundError, requires
    try:
        spec = next((r for r in requires("peft-bench") or [] if r.replace(" ", "").startswith("peft")), "peft")
    except PackageNotFoundError:
        spec = "peft"
    return spec.replace(" ", "")


def _internals_changed(what: str) -> ImportError:
    return ImportError(f"bench.core.methods.bottleneck: peft {peft.__version__} changed what the BOTTLENECK registration "
                       f"relies on ({what}); install the tested range: pip install '{tested_peft()}'")


try:  # peft internals the registration uses (tests/test_bottleneck.py: test_peft_internals_*)
    from peft.config import PeftConfig
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
    from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
    from peft.utils import PeftType, register_peft_method
except ImportError as e:
    raise _internals_changed(f"cannot import {e.name or e}") from e


def check_peft_internals() -> None:
    """Raise one clear ImportError if peft no longer offers what registering BOTTLENECK relies on: a closed str enum
    PeftType whose member tables can take a new member, register_peft_method(name, config_cls, model_cls, prefix),
    the two type-to-class mappings, and the BaseTuner hooks the model class overrides."""
    import enum
    import inspect
    problems = []
    if not (issubclass(PeftType, str) and issubclass(PeftType, enum.Enum) and all(
            isinstance(getattr(PeftType, a, None), t)
            for a, t in (("_member_names_", list), ("_member_map_", dict), ("_value2member_map_", dict)))):
        problems.append("peft.utils.PeftType is no longer a str Enum with _member_names_, _member_map_ and "
                        "_value2member_map_")
    missing = {"name", "config_cls", "model_cls", "prefix"} - set(inspect.signature(register_peft_method).parameters)
    if missing:
        problems.append(f"register_peft_method has no parameter {', '.join(sorted(missing))}")
    if not (isinstance(PEFT_TYPE_TO_CONFIG_MAPPING, dict) and isinstance(PEFT_TYPE_TO_TUNER_MAPPING, dict)):
        problems.append("peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING / PEFT_TYPE_TO_TUNER_MAPPING are no longer dicts")
    for hook in ("_create_and_replace", "_replace_module", "_check_merge_allowed", "_check_target_module_exists",
                 "_mark_only_adapters_as_trainable"):
        if not callable(getattr(BaseTuner, hook, None)):
            problems.append(f"BaseTuner.{hook} is gone")
    if "tuner_layer_cls" not in getattr(BaseTuner, "__annotations__", {}):
        problems.append("BaseTuner no longer declares tuner_layer_cls")
    if problems:
        raise _internals_changed("; ".join(problems))


check_peft_internals()

__all__ = [
    "PEFT_TYPE",
    "BottleneckConfig",
    "BottleneckLayer",
    "BottleneckLinear",
    "BottleneckModel",
    "BottleneckOutput",
    "BottleneckSublayerOutput",
    "ResidualTap",
]

_NAME = "bottleneck"  # register_peft_method wants the lower-case name; the peft_type is its upper-case form
_PREFIX = "adapter_"  # every adapter attribute on the tuner layers starts with this


def _ensure_peft_type_member(name: str) -> PeftType:
    """Return ``PeftType[name]``, adding the member to the enum first if it is missing.

    ``register_peft_method`` only accepts names whose upper-case form is already a member of the closed
    ``PeftType`` enum (it raises "please add an entry to peft.utils.peft_types.PeftType" otherwise), and Python
    enums cannot be extended through a public API. So we add the member the same way ``EnumType`` does when it
    builds the class. Because ``PeftType`` is a ``str`` enum, the member equals and hashes like the plain string
    ``"BOTTLENECK"``, so peft's dict look-ups with the string from ``adapter_config.json`` find it, and
    ``PeftType("BOTTLENECK")`` and pickling work too.
    """
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member._sort_order_ = len(PeftType._member_names_)
    member.__objclass__ = PeftType
    PeftType._member_names_.append(name)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    type.__setattr__(PeftType, name, member)  # EnumType.__setattr__ would refuse to set a member-like name
    return member


PEFT_TYPE: PeftType = _ensure_peft_type_member(_NAME.upper())

# AdapterHub's activation names (it resolves them with transformers' get_activation, as we do, so the functions are
# the same objects). Only parameter-free activations, so the adapter has exactly the down and up projections (and a
# learned scaling, if asked for) as parameters; the closed-form parameter count relies on that.
_ACTIVATIONS = ("relu", "gelu", "gelu_new", "swish", "silu", "tanh", "sigmoid", "leakyrelu", "identity")
_INITS = ("bert", "mam_adapter", "houlsby")
_SCALINGS = ("learned", "channel")

# Pre-norm decoder layers: the pre-norm whose INPUT is the residual stream r of the sublayer that follows it
# (Llama family: input_layernorm -> self_attn, post_attention_layernorm -> mlp; GPT-2: ln_1 -> attn, ln_2 -> mlp).
_PRE_NORM_OF = {"self_attn": ("input_layernorm",), "attn": ("ln_1",), "mlp": ("post_attention_layernorm", "ln_2")}
# Decoder layers with norms after their sublayers (Gemma 2/3): there the sublayer output is not what the decoder adds
# to r, and the pre-norm is named differently, so the residual-reading presets are refused.
_POST_NORMS = ("pre_feedforward_layernorm", "post_feedforward_layernorm")


class _LeakyReLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.leaky_relu(x)  # AdapterHub special-cases this name the same way


def _activation(name: str) -> nn.Module:
    if name == "leakyrelu":
        return _LeakyReLU()
    if name == "identity":
        return nn.Identity()
    return get_activation(name)


@dataclass
class BottleneckConfig(PeftConfig):
    """Configuration of a bottleneck adapter; field names and meanings are AdapterHub's ``BnConfig``'s.

    The defaults are AdapterHub's ``DoubleSeqBnConfig`` (Houlsby); which sublayers get an adapter is decided by
    ``target_modules`` (see the module docstring), not by AdapterHub's ``mh_adapter`` / ``output_adapter`` flags.

    Args:
        target_modules: Names (exact or ``.name`` suffix) or a regex (full match) of the modules that get an adapter:
            BERT-style sublayer-output modules, Llama-style ``self_attn`` / ``mlp``, or Linear layers. Required.
        exclude_modules: Names or regex of modules never to adapt (peft's usual semantics).
        reduction_factor: Bottleneck size ``m = max(1, int(d // reduction_factor))`` with ``d`` the hidden size.
        non_linearity: Activation between down and up projection (AdapterHub names).
        original_ln_before: Add the residual and apply the sublayer's pretrained LayerNorm BEFORE the adapter, which
            then reads ``LN(h + r)`` (Pfeiffer). Sequential adapters only.
        original_ln_after: Add the residual and apply the pretrained LayerNorm after the adapter (every preset).
            ``False`` drops the sublayer's residual, which only a post-LN (BERT-style) wrapper can express.
        residual_before_ln: The adapter's own skip connection takes ``h`` (``True``), the adapter input (``False``)
            or, with ``original_ln_before``, ``h + r`` before the LayerNorm (``"post_add"``).
        is_parallel: The adapter reads the sublayer's residual input ``r`` and its output is added beside the
            sublayer's (He et al.); otherwise it is applied after the sublayer (sequential).
        scaling: Factor on the adapter output (a number), or ``"learned"`` (one trained scalar, initialized 1) or
            ``"channel"`` (one trained factor per hidden unit, initialized 1).
        init_weights: ``"bert"``, ``"mam_adapter"`` or ``"houlsby"`` (see the module docstring).
        dropout: Dropout on the adapter branch output (after the scaling).
        modules_to_save: Extra modules (e.g. the classifier head) to train and save in full.
    """

    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "Modules that get an adapter: list of names or a full-match regex."},
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "List of module names or a regex of module names not to adapt."}
    )
    reduction_factor: float = field(default=16, metadata={"help": "Bottleneck size m = int(d // reduction_factor)."})
    non_linearity: str = field(default="swish", metadata={"help": f"One of {list(_ACTIVATIONS)}."})
    original_ln_before: bool = field(default=False, metadata={"help": "Residual + pretrained LN before the adapter."})
    original_ln_after: bool = field(default=True, metadata={"help": "Residual + pretrained LN after the adapter."})
    residual_before_ln: Union[bool, str] = field(
        default=True, metadata={"help": "Adapter skip connection from h (True), the adapter input (False) or 'post_add'."}
    )
    is_parallel: bool = field(default=False, metadata={"help": "Parallel adapter reading the sublayer's residual input."})
    scaling: Union[float, str] = field(default=1.0, metadata={"help": "Output scaling: a number, 'learned' or 'channel'."})
    init_weights: str = field(default="bert", metadata={"help": f"One of {list(_INITS)}."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter branch output."})
    modules_to_save: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Modules besides the adapters to train and save, e.g. ['classifier'] for SEQ_CLS."},
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PEFT_TYPE
        # peft's matching treats a list/set as names and a str as a regex; sets are what built-in methods store
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        rf = self.reduction_factor
        if isinstance(rf, bool) or not isinstance(rf, (int, float)) or not rf > 0:
            raise ValueError(f"reduction_factor must be a number > 0, got {rf!r}")
        if self.non_linearity not in _ACTIVATIONS:
            raise ValueError(f"Unknown non_linearity {self.non_linearity!r}; choose one of {list(_ACTIVATIONS)}")
        if self.init_weights not in _INITS:
            raise ValueError(f"Unknown init_weights {self.init_weights!r}; choose one of {list(_INITS)}")
        if self.residual_before_ln not in (True, False, "post_add"):
            raise ValueError(f"residual_before_ln must be true, false or 'post_add', got {self.residual_before_ln!r}")
        if self.residual_before_ln == "post_add" and not (self.original_ln_before and not self.is_parallel):
            raise ValueError("residual_before_ln='post_add' needs original_ln_before=True (a sequential adapter)")
        if isinstance(self.scaling, str):
            if self.scaling not in _SCALINGS:
                raise ValueError(f"scaling must be a number, 'learned' or 'channel', got {self.scaling!r}")
        elif isinstance(self.scaling, bool) or not isinstance(self.scaling, (int, float)):
            raise ValueError(f"scaling must be a number, 'learned' or 'channel', got {self.scaling!r}")
        else:
            self.scaling = float(self.scaling)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    def reads_residual(self) -> bool:
        """Whether the adapter needs the sublayer's residual input r before the sublayer adds it."""
        return bool(self.is_parallel or self.original_ln_before)


@dataclass(frozen=True)
class _Options:
    """The per-adapter options the forward pass needs (a copy, so a later config edit cannot change a built adapter)."""

    is_parallel: bool
    original_ln_before: bool
    original_ln_after: bool
    residual_before_ln: Union[bool, str]
    scaling: Optional[float]  # None: the learned adapter_scale parameter


class BottleneckLayer(BaseTunerLayer):
    """Adapter state of one wrapped module, one entry per adapter name in each container.

    :meth:`_adapt` is AdapterHub's ``bottleneck_layer_forward`` for a ``Stack`` of the active adapters.
    """

    # containers holding trainable adapter weights (peft toggles requires_grad on these when switching adapters)
    adapter_layer_names = ("adapter_down", "adapter_up", "adapter_scale")
    # parameter-free per-adapter state; listed so peft moves/deletes it with the adapter
    other_param_names = ("adapter_act", "adapter_dropout", "adapter_options")

    def __init__(self, base_layer: nn.Module, hidden_size: int, **kwargs) -> None:
        self.base_layer = base_layer
        self.hidden_size = int(hidden_size)
        self.adapter_down = nn.ModuleDict({})
        self.adapter_up = nn.ModuleDict({})
        self.adapter_scale = nn.ParameterDict({})
        self.adapter_act = nn.ModuleDict({})
        self.adapter_dropout = nn.ModuleDict({})
        self.adapter_options: dict[str, _Options] = {}
        self._disable_adapters = False
        self.merged_adapters = []

    # what the wrapper can give the adapter: the residual input r, and a LayerNorm (post-LN wrappers only)
    provides_residual = False
    post_ln = False

    def update_layer(self, adapter_name: str, config: BottleneckConfig, **kwargs) -> None:
        if config.reads_residual() and not self.provides_residual:
            raise ValueError(
                f"{type(self.get_base_layer()).__name__}: this bottleneck adapter (is_parallel={config.is_parallel}, "
                f"original_ln_before={config.original_ln_before}) reads the sublayer's residual input, which this "
                "module does not see; target the sublayer-output module instead (BERT: '*.attention.output', "
                "'*.layer.N.output'; Llama: 'self_attn', 'mlp' inside a decoder layer)"
            )
        if not config.original_ln_after and not self.post_ln:
            raise ValueError(
                f"{type(self.get_base_layer()).__name__}: original_ln_after=False drops the sublayer's residual, "
                "which only a post-LN sublayer-output module (BERT-style '*.output') can express"
            )
        d = self.hidden_size
        m = max(1, int(d // config.reduction_factor))
        down, up = nn.Linear(d, m, bias=True), nn.Linear(m, d, bias=True)
        with torch.no_grad():
            if config.init_weights == "bert":
                for lin in (down, up):
                    lin.weight.normal_(mean=0.0, std=0.02)
                    lin.bias.zero_()
            elif config.init_weights == "mam_adapter":
                nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
                nn.init.zeros_(down.bias)
                nn.init.zeros_(up.weight)
                nn.init.zeros_(up.bias)
            else:  # "houlsby"
                for lin in (down, up):
                    nn.init.trunc_normal_(lin.weight, mean=0.0, std=1e-2, a=-2e-2, b=2e-2)
                    nn.init.zeros_(lin.bias)
        self.adapter_down[adapter_name] = down
        self.adapter_up[adapter_name] = up
        if isinstance(config.scaling, str):
            size = 1 if config.scaling == "learned" else d
            self.adapter_scale[adapter_name] = nn.Parameter(torch.ones(size))
            scaling = None
        else:
            scaling = float(config.scaling)
        self.adapter_act[adapter_name] = _activation(config.non_linearity)
        self.adapter_dropout[adapter_name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.adapter_options[adapter_name] = _Options(
            is_parallel=bool(config.is_parallel),
            original_ln_before=bool(config.original_ln_before),
            original_ln_after=bool(config.original_ln_after),
            residual_before_ln=config.residual_before_ln,
            scaling=scaling,
        )
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def _get_base_layer_device_and_dtype(self, base_layer):
        # a wrapped container (BertOutput, LlamaMLP) has no .weight: take its first floating / quantized parameter
        device, dtype = super()._get_base_layer_device_and_dtype(base_layer)
        if device is None:
            for p in base_layer.parameters():
                device = p.device
                dtype = p.dtype if p.dtype.is_floating_point else None
                break
            for mod in base_layer.modules():
                if hasattr(mod, "compute_dtype") and mod.compute_dtype is not None:  # bnb Linear4bit
                    dtype = mod.compute_dtype
                    break
        return device, dtype

    def _active_names(self) -> list[str]:
        return [name for name in self.active_adapters if name in self.adapter_down]

    def _branch(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """dropout(scaling * up(act(down(x)))): AdapterHub's Adapter.forward up to its skip connection."""
        down = self.adapter_down[name]
        # adapters may be kept in fp32 while the base runs in bf16/fp16 (peft autocasts adapter weights)
        z = self._cast_input_dtype(x, down.weight.dtype)
        up = self.adapter_up[name](self.adapter_act[name](down(z)))
        scaling = self.adapter_options[name].scaling
        up = up * (self.adapter_scale[name] if scaling is None else scaling)
        return self.adapter_dropout[name](up).to(x.dtype)

    def _adapt(
        self, h: torch.Tensor, r: Optional[torch.Tensor], layer_norm: Optional[nn.Module], names: list[str]
    ) -> torch.Tensor:
        """AdapterHub's ``bottleneck_layer_forward(h, r, layer_norm)`` with ``Stack(*names)``.

        Post-LN wrappers pass the sublayer's LayerNorm and get the sublayer's final output (residual and LayerNorm
        included); pre-LN wrappers pass ``layer_norm=None`` and get the output WITHOUT the final ``+ r``, which the
        decoder layer adds itself (AdapterHub adds it inside the adapter layer; same sum, same bits).
        """
        h0 = h
        for name in names:
            opt = self.adapter_options[name]
            if opt.is_parallel:  # ParallelAdapter.pre_forward: the adapter reads the residual input
                x = residual = r
            else:  # Adapter.pre_forward
                residual = h if opt.residual_before_ln is True else None
                if opt.original_ln_before:
                    h = h + r
                    if opt.residual_before_ln == "post_add":
                        residual = h
                    if layer_norm is not None:
                        h = layer_norm(h)
                if not opt.residual_before_ln:
                    residual = h
                x = h
            out = self._branch(name, x)
            h = out if opt.is_parallel else out + residual  # Adapter.forward's skip connection
        last = self.adapter_options[names[-1]]
        if last.is_parallel:  # ParallelAdapter.post_forward
            h = h + h0
        if last.original_ln_after and layer_norm is not None:  # post_forward
            h = layer_norm(h + r)
        return h

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        raise NotImplementedError(
            "Bottleneck adapters are non-linear and cannot be merged into the base weights; use unload() to drop them."
        )

    def unmerge(self) -> None:
        raise NotImplementedError("Bottleneck adapters are never merged, so there is nothing to unmerge.")


class _Slot:
    """Hands one tensor from a ResidualTap to the adapter of the sublayer that follows it."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value: Optional[torch.Tensor] = None


class ResidualTap(nn.Module):
    """Parameter-free wrapper of a pre-norm (Llama ``post_attention_layernorm`` / ``input_layernorm``).

    It records the norm's input, which is the residual stream ``r`` of the sublayer that follows, for that
    sublayer's adapter, and returns the norm's output unchanged. The decoder layer calls the norm right before the
    sublayer in every forward (and in a gradient-checkpointing recompute), so the adapter always reads the ``r`` of
    the same call. peft's ``unload`` puts the norm back (the tap has a ``base_layer``).
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.slot = _Slot()

    def get_base_layer(self) -> nn.Module:
        base = self.base_layer
        while hasattr(base, "base_layer"):
            base = base.base_layer
        return base

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        self.slot.value = x
        return self.base_layer(x, *args, **kwargs)

    def __repr__(self) -> str:
        return "bottleneck.residual_tap." + super().__repr__()


class BottleneckOutput(nn.Module, BottleneckLayer):
    """A module (Llama ``self_attn`` / ``mlp``, or a Linear) whose output gets the adapter(s).

    The module's output ``h`` (the first element if it returns a tuple) becomes ``h + A(...)`` per the preset; the
    model then adds the sublayer residual ``r`` itself. Presets that read ``r`` get it from a :class:`ResidualTap`
    on the pre-norm that precedes the module (see :meth:`BottleneckModel._create_and_replace`).
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: BottleneckConfig, hidden_size: int,
                 slot: Optional[_Slot] = None, **kwargs) -> None:
        super().__init__()
        BottleneckLayer.__init__(self, base_layer, hidden_size, **kwargs)
        self._residual_slot = slot
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    @property
    def provides_residual(self) -> bool:
        return self._residual_slot is not None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        # Only base_layer(...) is called on the wrapped module, so quantized base layers work unchanged.
        result = self.base_layer(*args, **kwargs)
        r = None
        if self._residual_slot is not None:
            r, self._residual_slot.value = self._residual_slot.value, None
        names = [] if self.disable_adapters else self._active_names()
        if not names:
            return result
        h = result[0] if isinstance(result, tuple) else result
        if r is None and any(self.adapter_options[n].is_parallel or self.adapter_options[n].original_ln_before
                             for n in names):
            raise RuntimeError(f"{type(self.base_layer).__name__}: the residual input was not recorded: the pre-norm "
                               "before this module was not called right before it")
        h = self._adapt(h, r, None, names)
        return (h,) + tuple(result[1:]) if isinstance(result, tuple) else h

    def __repr__(self) -> str:
        return "bottleneck." + super().__repr__()


BottleneckLinear = BottleneckOutput  # the name of the Linear wrapper before the sublayer-level wrappers existed


class BottleneckSublayerOutput(nn.Module, BottleneckLayer):
    """A BERT-style sublayer-output module (``BertSelfOutput`` / ``BertOutput``: ``dense``, ``dropout``,
    ``LayerNorm``; ``forward(hidden_states, input_tensor)`` = ``LN(dropout(dense(x)) + input_tensor)``) with the
    adapter(s) placed as AdapterHub's ``Bert*OutputWithAdapters`` does: ``h = dropout(dense(x))``, then
    ``bottleneck_layer_forward(h, input_tensor, LayerNorm)``."""

    provides_residual = True
    post_ln = True

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: BottleneckConfig, hidden_size: int,
                 **kwargs) -> None:
        super().__init__()
        BottleneckLayer.__init__(self, base_layer, hidden_size, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor, *args: Any, **kwargs: Any):
        names = [] if self.disable_adapters else self._active_names()
        if not names:
            return self.base_layer(hidden_states, input_tensor, *args, **kwargs)
        base = self.base_layer
        h = base.dropout(base.dense(hidden_states))
        return self._adapt(h, input_tensor, base.LayerNorm, names)

    def __repr__(self) -> str:
        return "bottleneck." + super().__repr__()


def _is_post_ln_sublayer_output(module: nn.Module) -> bool:
    return all(isinstance(getattr(module, a, None), nn.Module) for a in ("dense", "dropout", "LayerNorm"))


def _out_features(module: nn.Module) -> Optional[int]:
    if isinstance(module, Conv1D):  # GPT-2 style, weight stored as (in, out)
        return module.weight.shape[1]
    return getattr(module, "out_features", None)  # nn.Linear and the bitsandbytes Linear subclasses


class BottleneckModel(BaseTuner):
    """Wraps the modules selected by ``BottleneckConfig.target_modules`` (see the module docstring for which
    wrapper each kind of module gets)."""

    prefix: str = _PREFIX
    tuner_layer_cls = BottleneckLayer
    target_module_mapping: dict[str, list[str]] = {}  # no defaults: the placement is the preset's choice

    def _hidden_size(self, target: nn.Module) -> int:
        config = getattr(self.model, "config", None)
        d = getattr(config, "hidden_size", None)
        if d is None:
            d = getattr(getattr(config, "get_text_config", lambda: None)(), "hidden_size", None)
        if d is None:
            raise ValueError(f"{type(target).__name__}: cannot tell the hidden size (the model config has no "
                             "hidden_size); target Linear layers instead")
        return int(d)

    def _residual_slot(self, parent: nn.Module, target_name: str, config: BottleneckConfig) -> Optional[_Slot]:
        """The slot fed by a ResidualTap on the pre-norm before ``parent.<target_name>``; installs the tap once."""
        if not config.reads_residual():
            return None
        norm_name = next((n for n in _PRE_NORM_OF.get(target_name, ()) if hasattr(parent, n)), None)
        norm = getattr(parent, norm_name, None) if norm_name else None
        if norm is None or any(hasattr(parent, n) for n in _POST_NORMS):
            raise ValueError(
                f"{type(parent).__name__}.{target_name}: this bottleneck adapter (is_parallel={config.is_parallel}, "
                f"original_ln_before={config.original_ln_before}) reads the sublayer's residual input; that is "
                "supported for BERT-style '*.output' modules and for 'self_attn' / 'mlp' of pre-norm decoder layers "
                "(input_layernorm -> self_attn, post_attention_layernorm -> mlp; GPT-2: ln_1 -> attn, ln_2 -> mlp)"
            )
        if not isinstance(norm, ResidualTap):
            norm = ResidualTap(norm)
            setattr(parent, norm_name, norm)
        return norm.slot

    def _create_and_replace(
        self,
        peft_config: BottleneckConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **kwargs: Any,
    ) -> None:
        if isinstance(target, BottleneckLayer):  # a second adapter on an already wrapped module
            if isinstance(target, BottleneckOutput) and target._residual_slot is None and peft_config.reads_residual():
                target._residual_slot = self._residual_slot(parent, target_name, peft_config)
            target.update_layer(adapter_name, peft_config)
            return
        if _is_post_ln_sublayer_output(target):
            d = getattr(target.LayerNorm, "normalized_shape", None)
            d = d[-1] if d else (_out_features(target.dense) or self._hidden_size(target))
            new_module = BottleneckSublayerOutput(target, adapter_name, peft_config, d)
        else:
            d = _out_features(target) or self._hidden_size(target)
            slot = None if _out_features(target) else self._residual_slot(parent, target_name, peft_config)
            new_module = BottleneckOutput(target, adapter_name, peft_config, d, slot=slot)
        if adapter_name not in self.active_adapters:
            # an additionally added adapter is not trainable until it is activated
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _replace_module(self, parent, child_name, new_module, child) -> None:
        # peft's version copies `.weight` from the wrapped module onto a module that has no base_layer, which is what
        # unload() hands it; a wrapped container (BertOutput, LlamaMLP) has no weight of its own: just put it back.
        base = child.get_base_layer() if hasattr(child, "base_layer") else child
        if not hasattr(new_module, "base_layer") and not hasattr(base, "weight"):
            setattr(parent, child_name, new_module)
            return
        super()._replace_module(parent, child_name, new_module, child)

    def _check_merge_allowed(self):
        raise ValueError(
            "Bottleneck adapters are non-linear and cannot be merged into the base weights; use unload() to drop them."
        )


def _register() -> None:
    """Register with peft once; importing this module again must not raise."""
    if PEFT_TYPE not in PEFT_TYPE_TO_CONFIG_MAPPING:
        register_peft_method(name=_NAME, config_cls=BottleneckConfig, model_cls=BottleneckModel, prefix=_PREFIX)
    else:
        # Already registered, e.g. by importlib.reload() or the module imported under a second name: the classes were
        # re-created, so point peft at the current ones (register_peft_method itself would raise KeyError).
        PEFT_TYPE_TO_CONFIG_MAPPING[PEFT_TYPE] = BottleneckConfig
        PEFT_TYPE_TO_TUNER_MAPPING[PEFT_TYPE] = BottleneckModel


_register()
