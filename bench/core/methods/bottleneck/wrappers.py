"""The modules put in place of the targets: one per family of sublayer, and the tap that hands them ``r``."""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from .config import BottleneckConfig
from .layer import BottleneckLayer


class Slot:
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
        self.slot = Slot()

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
                 slot: Optional[Slot] = None, **kwargs) -> None:
        super().__init__()
        BottleneckLayer.__init__(self, base_layer, hidden_size, **kwargs)
        self._residual_slot = slot
        self.set_adapter(adapter_name)
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
        self.set_adapter(adapter_name)
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
