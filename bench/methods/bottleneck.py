"""Bottleneck adapters (Houlsby / Pfeiffer) as a regular peft method.

The adapter wraps a Linear layer that ends a transformer sublayer (BERT ``attention.output.dense`` and
``output.dense``, Llama ``o_proj`` and ``down_proj``) and adds a small residual bottleneck to its output::

    y = base(x)
    return y + dropout(up(act(down(y))))

which is where AdapterHub's ``SeqBnConfig`` (Pfeiffer: FFN output only) and ``DoubleSeqBnConfig`` (Houlsby:
attention output and FFN output) put theirs: after the output projection, before the sublayer's own residual +
LayerNorm. Houlsby vs. Pfeiffer is purely a matter of ``target_modules``, e.g. for BERT::

    Houlsby:  r".*\\.(attention\\.output|layer\\.\\d+\\.output)\\.dense"
    Pfeiffer: r".*\\.layer\\.\\d+\\.output\\.dense"

Importing this module registers the method with peft under the peft_type ``"BOTTLENECK"`` (parameter prefix
``"adapter_"``), after which ``get_peft_model``, ``save_pretrained``, ``PeftModel.from_pretrained`` and
``get_peft_config({"peft_type": "BOTTLENECK", ...})`` work as for any built-in method.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from peft.config import PeftConfig
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import PeftType, register_peft_method

__all__ = ["PEFT_TYPE", "BottleneckConfig", "BottleneckLayer", "BottleneckLinear", "BottleneckModel"]

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

# AdapterHub's activation names. Only parameter-free activations, so the adapter has exactly the down and up
# projections as parameters (the closed-form parameter count relies on that).
_ACTIVATIONS = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "gelu_new": lambda: nn.GELU(approximate="tanh"),
    "swish": nn.SiLU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "leakyrelu": nn.LeakyReLU,
    "identity": nn.Identity,
}


@dataclass
class BottleneckConfig(PeftConfig):
    """Configuration of a bottleneck adapter (Houlsby / Pfeiffer).

    Args:
        target_modules: Names (exact or ``.name`` suffix) or a regex (full match) of the Linear layers whose
            OUTPUT gets an adapter. Required: there is no per-architecture default.
        exclude_modules: Names or regex of modules never to adapt (peft's usual semantics).
        reduction_factor: Bottleneck size is ``m = max(1, d_out // reduction_factor)``.
        non_linearity: Activation between down and up projection (AdapterHub names, default ``"relu"``).
        init_scale: Std of the normal init of the down projection. The up projection (weight and bias) starts at
            zero, so a fresh adapter is an exact identity and the adapted model equals the base model.
        dropout: Dropout on the adapter branch output (before it is added back to the layer output).
        modules_to_save: Extra modules (e.g. the classifier head) to train and save in full.
    """

    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "Linear layers whose output gets an adapter: list of names or a full-match regex."},
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "List of module names or a regex of module names not to adapt."}
    )
    reduction_factor: int = field(default=16, metadata={"help": "Bottleneck size m = max(1, d // reduction_factor)."})
    non_linearity: str = field(default="relu", metadata={"help": f"One of {sorted(_ACTIVATIONS)}."})
    init_scale: float = field(default=1e-2, metadata={"help": "Std of the down projection init (up starts at 0)."})
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
        if int(self.reduction_factor) < 1:
            raise ValueError(f"reduction_factor must be >= 1, got {self.reduction_factor}")
        if self.non_linearity not in _ACTIVATIONS:
            raise ValueError(f"Unknown non_linearity {self.non_linearity!r}; choose one of {sorted(_ACTIVATIONS)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


class BottleneckLayer(BaseTunerLayer):
    """Adapter state of one wrapped layer, one entry per adapter name in each container."""

    # containers holding trainable adapter weights (peft toggles requires_grad on these when switching adapters)
    adapter_layer_names = ("adapter_down", "adapter_up")
    # parameter-free per-adapter modules; listed so peft moves/deletes them with the adapter
    other_param_names = ("adapter_act", "adapter_dropout")

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        self.adapter_down = nn.ModuleDict({})
        self.adapter_up = nn.ModuleDict({})
        self.adapter_act = nn.ModuleDict({})
        self.adapter_dropout = nn.ModuleDict({})
        self._disable_adapters = False
        self.merged_adapters = []

        # Only out_features matters: the adapter acts on the layer output. get_base_layer() unwraps nested tuner
        # layers; bitsandbytes Linear8bitLt / Linear4bit subclass nn.Linear, so they carry out_features as well.
        base = self.get_base_layer()
        if isinstance(base, Conv1D):  # GPT-2 style, weight stored as (in, out)
            self.out_features = base.weight.shape[1]
        elif hasattr(base, "out_features"):
            self.out_features = base.out_features
        else:
            raise TypeError(f"Bottleneck adapters need a Linear-like layer with out_features, got {type(base)}")

    def update_layer(self, adapter_name: str, config: BottleneckConfig, **kwargs) -> None:
        d = self.out_features
        m = max(1, d // int(config.reduction_factor))
        down, up = nn.Linear(d, m, bias=True), nn.Linear(m, d, bias=True)
        # near-identity init: the up projection is exactly zero, so the adapter branch adds exactly 0 at first
        nn.init.normal_(down.weight, std=config.init_scale)
        nn.init.zeros_(down.bias)
        nn.init.zeros_(up.weight)
        nn.init.zeros_(up.bias)
        self.adapter_down[adapter_name] = down
        self.adapter_up[adapter_name] = up
        self.adapter_act[adapter_name] = _ACTIVATIONS[config.non_linearity]()
        self.adapter_dropout[adapter_name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        raise NotImplementedError(
            "Bottleneck adapters are non-linear and cannot be merged into the base weights; use unload() to drop them."
        )

    def unmerge(self) -> None:
        raise NotImplementedError("Bottleneck adapters are never merged, so there is nothing to unmerge.")


class BottleneckLinear(nn.Module, BottleneckLayer):
    """A Linear(-like) layer followed by its bottleneck adapter(s)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: BottleneckConfig, **kwargs) -> None:
        super().__init__()
        BottleneckLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        # Only base_layer(x) is called on the wrapped layer, so quantized base layers work unchanged.
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        y = result
        # Several active adapters all read the layer output and their branches are summed (as LoRA does).
        for name in self.active_adapters:
            if name not in self.adapter_down:
                continue
            down, up = self.adapter_down[name], self.adapter_up[name]
            # adapters may be kept in fp32 while the base runs in bf16/fp16 (peft autocasts adapter weights)
            h = self._cast_input_dtype(y, down.weight.dtype)
            h = self.adapter_dropout[name](up(self.adapter_act[name](down(h))))
            result = result + h.to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "bottleneck." + super().__repr__()


class BottleneckModel(BaseTuner):
    """Injects :class:`BottleneckLinear` wrappers into the modules selected by ``BottleneckConfig.target_modules``."""

    prefix: str = _PREFIX
    tuner_layer_cls = BottleneckLayer
    target_module_mapping: dict[str, list[str]] = {}  # no defaults: placement is the Houlsby/Pfeiffer choice

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
        if isinstance(target, BottleneckLayer):  # a second adapter on an already wrapped layer
            target.update_layer(adapter_name, peft_config)
            return
        new_module = BottleneckLinear(target, adapter_name, peft_config)
        if adapter_name not in self.active_adapters:
            # an additionally added adapter is not trainable until it is activated
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

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
