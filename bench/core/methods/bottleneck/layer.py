"""BottleneckLayer: the adapter weights of one wrapped module and AdapterHub's computation with them."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn
from transformers.activations import get_activation

from .config import BottleneckConfig
from .peft_internals import BaseTunerLayer


class _LeakyReLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.leaky_relu(x)  # AdapterHub special-cases this name the same way


def _activation(name: str) -> nn.Module:
    if name == "leakyrelu":
        return _LeakyReLU()
    if name == "identity":
        return nn.Identity()
    return get_activation(name)


def _projections(d: int, m: int, init_weights: str) -> tuple[nn.Linear, nn.Linear]:
    """The adapter's down (d -> m) and up (m -> d) projections, initialized as AdapterHub's ``init_weights``."""
    down, up = nn.Linear(d, m, bias=True), nn.Linear(m, d, bias=True)
    with torch.no_grad():
        if init_weights == "bert":
            for lin in (down, up):
                lin.weight.normal_(mean=0.0, std=0.02)
                lin.bias.zero_()
        elif init_weights == "mam_adapter":
            nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
            nn.init.zeros_(down.bias)
            nn.init.zeros_(up.weight)
            nn.init.zeros_(up.bias)
        else:  # "houlsby"
            for lin in (down, up):
                nn.init.trunc_normal_(lin.weight, mean=0.0, std=1e-2, a=-2e-2, b=2e-2)
                nn.init.zeros_(lin.bias)
    return down, up


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
        down, up = _projections(d, max(1, int(d // config.reduction_factor)), config.init_weights)
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
