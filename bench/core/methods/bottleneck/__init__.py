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

Importing this package registers the method with peft under the peft_type ``"BOTTLENECK"`` (parameter prefix
``"adapter_"``), after which ``get_peft_model``, ``save_pretrained``, ``PeftModel.from_pretrained``, ``unload`` and
``get_peft_config({"peft_type": "BOTTLENECK", ...})`` work as for any built-in method. The adapters cannot be merged
into the base weights (they are non-linear).

The package: ``peft_internals`` (what the registration needs from peft, checked at import: one clear ImportError
if a peft release changed it), ``config`` (:class:`BottleneckConfig`), ``layer`` (:class:`BottleneckLayer`: the
adapter weights and the computation above), ``wrappers`` (the modules put in place of the targets: one per family,
and :class:`ResidualTap`), ``model`` (:class:`BottleneckModel`: which wrapper each target gets).
"""

from __future__ import annotations

from .peft_internals import PEFT_TYPE, check_peft_internals, register, tested_peft  # first: peft is checked here
from .config import BottleneckConfig
from .layer import BottleneckLayer
from .model import BottleneckModel
from .wrappers import BottleneckLinear, BottleneckOutput, BottleneckSublayerOutput, ResidualTap

__all__ = [
    "PEFT_TYPE",
    "BottleneckConfig",
    "BottleneckLayer",
    "BottleneckLinear",
    "BottleneckModel",
    "BottleneckOutput",
    "BottleneckSublayerOutput",
    "ResidualTap",
    "check_peft_internals",
    "tested_peft",
]


def _register() -> None:
    """Register this package's classes with peft; importing the package again (or a second copy) must not raise."""
    register(BottleneckConfig, BottleneckModel)


_register()
