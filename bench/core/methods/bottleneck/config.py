"""BottleneckConfig: the peft config of a bottleneck adapter, with AdapterHub's ``BnConfig`` field names."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from .peft_internals import PEFT_TYPE, PeftConfig

# AdapterHub's activation names (it resolves them with transformers' get_activation, as we do, so the functions are
# the same objects). Only parameter-free activations, so the adapter has exactly the down and up projections (and a
# learned scaling, if asked for) as parameters; the closed-form parameter count relies on that.
ACTIVATIONS = ("relu", "gelu", "gelu_new", "swish", "silu", "tanh", "sigmoid", "leakyrelu", "identity")
INITS = ("bert", "mam_adapter", "houlsby")
SCALINGS = ("learned", "channel")


@dataclass
class BottleneckConfig(PeftConfig):
    """Configuration of a bottleneck adapter; field names and meanings are AdapterHub's ``BnConfig``'s.

    The defaults are AdapterHub's ``DoubleSeqBnConfig`` (Houlsby); which sublayers get an adapter is decided by
    ``target_modules`` (see the package docstring), not by AdapterHub's ``mh_adapter`` / ``output_adapter`` flags.

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
        init_weights: ``"bert"``, ``"mam_adapter"`` or ``"houlsby"`` (see the package docstring).
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
    non_linearity: str = field(default="swish", metadata={"help": f"One of {list(ACTIVATIONS)}."})
    original_ln_before: bool = field(default=False, metadata={"help": "Residual + pretrained LN before the adapter."})
    original_ln_after: bool = field(default=True, metadata={"help": "Residual + pretrained LN after the adapter."})
    residual_before_ln: Union[bool, str] = field(
        default=True, metadata={"help": "Adapter skip connection from h (True), the adapter input (False) or 'post_add'."}
    )
    is_parallel: bool = field(default=False, metadata={"help": "Parallel adapter reading the sublayer's residual input."})
    scaling: Union[float, str] = field(default=1.0, metadata={"help": "Output scaling: a number, 'learned' or 'channel'."})
    init_weights: str = field(default="bert", metadata={"help": f"One of {list(INITS)}."})
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
        if self.non_linearity not in ACTIVATIONS:
            raise ValueError(f"Unknown non_linearity {self.non_linearity!r}; choose one of {list(ACTIVATIONS)}")
        if self.init_weights not in INITS:
            raise ValueError(f"Unknown init_weights {self.init_weights!r}; choose one of {list(INITS)}")
        if self.residual_before_ln not in (True, False, "post_add"):
            raise ValueError(f"residual_before_ln must be true, false or 'post_add', got {self.residual_before_ln!r}")
        if self.residual_before_ln == "post_add" and not (self.original_ln_before and not self.is_parallel):
            raise ValueError("residual_before_ln='post_add' needs original_ln_before=True (a sequential adapter)")
        if isinstance(self.scaling, str):
            if self.scaling not in SCALINGS:
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
