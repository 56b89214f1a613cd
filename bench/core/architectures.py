"""Per-architecture defaults for `model=hf`: the head, the modules kept out of quantization and the target modules
of every role, read from the model's config.json, for whatever a model YAML leaves as `${arch:<role>}`.

conf/model/hf.yaml writes `attention: ${arch:attention}`; the method YAMLs read `${model.target_modules.attention}`,
so `model=hf model.name_or_path=Qwen/Qwen2.5-0.5B method=lora` trains q_proj and v_proj without further overrides,
and a YAML or command-line value (`model.target_modules.attention=[q_proj,k_proj,v_proj]`) replaces the default.
The values are resolved when the config is (`OmegaConf.resolve`, the MLflow params, the run key), so every run
records the modules it actually targeted.

- attention, ia3, ia3_feedforward, layer_norm: peft's own per-model mappings (the lists peft itself falls back on
  for LoRA, IA3 and LN-tuning; `peft.utils.TRANSFORMERS_MODELS_TO_*_TARGET_MODULES_MAPPING`), where peft has an
  entry for the model type; else the family's value below.
- adapter_houlsby, adapter_pfeiffer, adapter_parallel: the bottleneck-adapter sites of the family (see
  bench/core/methods/bottleneck/__init__.py for what each wrapper computes).
- head_modules: the model's top-level modules with parameters outside its backbone (`classifier` for BERT-style
  encoders, `score` for decoders); quant_skip_modules: those plus `pooler` where the backbone has one.

A model type outside FAMILIES resolves to null; bench.orchestration.validate_model.check_model names the key to set.
"""
from __future__ import annotations

import functools

from omegaconf import ListConfig, OmegaConf

# role: (BERT-style post-LN encoder, Llama-style pre-norm decoder, GPT-2). Encoders end every sublayer in an `*.output`
# module holding dense, dropout and LayerNorm; decoders have layers.N.self_attn and layers.N.mlp (GPT-2: h.N.attn
# and h.N.mlp, Conv1D projections), the residual added by the decoder layer.
SITES = {
    "attention": (["query", "value"], ["q_proj", "v_proj"], ["c_attn"]),
    "ia3": (r".*\.(key|value|layer\.\d+\.output\.dense)", r".*\.(k_proj|v_proj|down_proj)", r".*\.(c_attn|mlp\.c_proj)"),
    "ia3_feedforward": (r".*\.layer\.\d+\.output\.dense", r".*\.down_proj", r".*\.mlp\.c_proj"),
    "layer_norm": (["LayerNorm"], ["input_layernorm", "post_attention_layernorm", "norm"], ["ln_1", "ln_2", "ln_f"]),
    # bottleneck adapters: after attention and after the FFN (Houlsby); after / beside the FFN (Pfeiffer, parallel)
    "adapter_houlsby": (r".*\.(attention\.output|layer\.\d+\.output)", r".*\.layers\.\d+\.(self_attn|mlp)",
                        r".*\.h\.\d+\.(attn|mlp)"),
    "adapter_pfeiffer": (r".*\.layer\.\d+\.output", r".*\.layers\.\d+\.mlp", r".*\.h\.\d+\.mlp"),
    "adapter_parallel": (r".*\.layer\.\d+\.output", r".*\.layers\.\d+\.mlp", r".*\.h\.\d+\.mlp"),
}
ENCODER, DECODER, GPT2 = ({role: sites[i] for role, sites in SITES.items()} for i in range(3))
FAMILIES = {
    **dict.fromkeys(("bert", "roberta", "xlm-roberta", "electra", "deberta", "deberta-v2"), ENCODER),
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3"), DECODER),
    "gpt2": GPT2,
}
TARGET_ROLES = tuple(SITES)
ROLES = (*TARGET_ROLES, "head_modules", "quant_skip_modules")
PEFT_MAPPING = {"attention": "TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING",
                "ia3": "TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING",
                "ia3_feedforward": "TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING",
                "layer_norm": "TRANSFORMERS_MODELS_TO_LNTUNING_TARGET_MODULES_MAPPING"}


def target_default(role: str, model_type: str):
    """The default target modules of `role` for `model_type`: peft's mapping, else the family's; None if neither."""
    if role in PEFT_MAPPING:
        import peft.utils
        mapped = getattr(peft.utils, PEFT_MAPPING[role]).get(model_type)
        if mapped:
            return list(mapped)
    family = FAMILIES.get(model_type)
    return family[role] if family else None


def head_default(model) -> list[str]:
    """Top-level modules of a sequence classifier that hold parameters and are not its backbone."""
    backbone = getattr(model, "base_model_prefix", "")
    return [name for name, child in model.named_children()
            if name != backbone and any(True for _ in child.parameters())]


def quant_skip_default(model) -> list[str]:
    pooler = any(name.rsplit(".", 1)[-1] == "pooler" for name, _ in model.named_modules())
    return head_default(model) + (["pooler"] if pooler else [])


@functools.cache
def _defaults(source: str, trust_remote_code: bool) -> dict:
    from bench.core.models import meta_model
    model = meta_model(source, trust_remote_code)
    model_type = model.config.model_type
    out = {role: target_default(role, model_type) for role in TARGET_ROLES}
    out.update(head_modules=head_default(model), quant_skip_modules=quant_skip_default(model))
    return out


def defaults(model_cfg) -> dict | None:
    """Every role's default for this model YAML's model, or None when its config.json cannot be read (validation,
    bench.orchestration.validate_model.check_model, reports that as one line)."""
    from bench.core.models import config_source
    try:
        source = config_source(model_cfg)
        return None if source is None else _defaults(source, bool(model_cfg.trust_remote_code))
    except Exception:  # no config.json, hub unreachable, name_or_path unset: reported by validation
        return None


def _resolve(role: str, *, _root_):
    if role not in ROLES:
        raise ValueError(f"${{arch:{role}}}: unknown role; valid: {', '.join(ROLES)}")
    found = defaults(_root_.model)
    value = None if found is None else found[role]
    return ListConfig(value) if isinstance(value, list) else value  # OmegaConf.resolve() cannot store a plain list


OmegaConf.register_new_resolver("arch", _resolve, replace=True)
