"""BottleneckModel: the peft tuner that decides which wrapper each target module gets."""
from __future__ import annotations

from typing import Any, Optional

from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import BottleneckConfig
from .layer import BottleneckLayer
from .peft_internals import PREFIX, BaseTuner
from .wrappers import BottleneckOutput, BottleneckSublayerOutput, ResidualTap, Slot

# Pre-norm decoder layers: the pre-norm whose INPUT is the residual stream r of the sublayer that follows it
# (Llama family: input_layernorm -> self_attn, post_attention_layernorm -> mlp; GPT-2: ln_1 -> attn, ln_2 -> mlp).
_PRE_NORM_OF = {"self_attn": ("input_layernorm",), "attn": ("ln_1",), "mlp": ("post_attention_layernorm", "ln_2")}
# Decoder layers with norms after their sublayers (Gemma 2/3): there the sublayer output is not what the decoder adds
# to r, and the pre-norm is named differently, so the residual-reading presets are refused.
_POST_NORMS = ("pre_feedforward_layernorm", "post_feedforward_layernorm")


def _is_post_ln_sublayer_output(module: nn.Module) -> bool:
    return all(isinstance(getattr(module, a, None), nn.Module) for a in ("dense", "dropout", "LayerNorm"))


def _out_features(module: nn.Module) -> Optional[int]:
    if isinstance(module, Conv1D):  # GPT-2 style, weight stored as (in, out)
        return module.weight.shape[1]
    return getattr(module, "out_features", None)  # nn.Linear and the bitsandbytes Linear subclasses


class BottleneckModel(BaseTuner):
    """Wraps the modules selected by ``BottleneckConfig.target_modules`` (see the package docstring for which
    wrapper each kind of module gets)."""

    prefix: str = PREFIX
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

    def _residual_slot(self, parent: nn.Module, target_name: str, config: BottleneckConfig) -> Optional[Slot]:
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
