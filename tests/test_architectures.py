"""`model=hf` without target-module overrides: on tiny random-init configs of each supported family (built from a
config alone, nothing downloaded), every shipped method either builds and trains a step or is refused by validation
with one line, and the defaults are peft's per-model mappings and the families' adapter sites."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification

from bench.core import architectures, methods
from bench.orchestration.validate import validate
from bench.errors import BenchError
from tests.conftest import METHODS, compose

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100,
            max_position_embeddings=64)
FAMILIES = {  # model_type: config kwargs of a tiny random-init model
    "bert": TINY,
    "roberta": {**TINY, "pad_token_id": 1},
    "deberta-v2": TINY,
    "llama": {**TINY, "num_key_value_heads": 2},
    "qwen2": {**TINY, "num_key_value_heads": 2},
    "mistral": {**TINY, "num_key_value_heads": 2},
    "gpt2": dict(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=64),
}
# what validation refuses, and why (a fact about the architecture, not a gap in the harness)
REFUSED = {
    ("llama", "bitfit"): "has no bias terms", ("mistral", "bitfit"): "has no bias terms",
    ("deberta-v2", "prefix"): "accepts past_key_values", ("deberta-v2", "ptuning_v2"): "accepts past_key_values",
    # peft's own objection (its get_peft_model on the meta-device model), and OLoRA, which peft accepts
    **{("gpt2", m): "peft rejects it on GPT2ForSequenceClassification: Target module" for m in ("boft", "hra", "oft")},
    **{("gpt2", m): "Conv1D'> not supported, currently only adapters for Conv2d, Conv1d, Linear"
       for m in ("loha", "lokr")},
    ("gpt2", "olora"): "OLoRA initialization does not support the Conv1D layers",
}


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    out = {}
    for model_type, kwargs in FAMILIES.items():
        d = tmp_path_factory.mktemp(model_type)
        AutoConfig.for_model(model_type, **kwargs).save_pretrained(d)
        out[model_type] = d
    return out


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return f"sqlite:///{tmp_path_factory.mktemp('store')}/mlflow.db"


def _cfg(family_dirs, store, model_type, method):
    return compose(f"method={method}", "model=hf", f"model.name_or_path={family_dirs[model_type]}",
                   f"tracking.uri={store}", "device=cpu", "train.max_steps=10")


def _train_one_step(cfg, directory):
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(directory, num_labels=3)
    config.pad_token_id = config.pad_token_id if config.pad_token_id is not None else 0
    model = methods.apply(AutoModelForSequenceClassification.from_config(config), cfg.method, cfg.model)
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable, "nothing trains"
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(2, 100, (4, 12))
    loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.tensor([0, 1, 2, 0])).loss
    assert torch.isfinite(loss)
    loss.backward()
    opt.step()
    hook = methods.step_hook(model, int(cfg.train.max_steps))
    if hook is not None:
        hook(1)
    assert any(not torch.equal(p, trainable[n]) for n, p in model.named_parameters() if n in trainable)


def _check(family_dirs, store, model_type, method):
    cfg = _cfg(family_dirs, store, model_type, method)
    try:
        validate(cfg)
    except BenchError as e:
        line = str(e)
        assert "\n" not in line and line, line
        assert (model_type, method) in REFUSED, f"{model_type}/{method} refused: {line}"
        expected = REFUSED[(model_type, method)]
        assert expected is None or expected in line, line
        return
    assert (model_type, method) not in REFUSED, f"{model_type}/{method}: validation accepted it"
    _train_one_step(cfg, family_dirs[model_type])


FAST = ("lora", "adapter_pfeiffer", "ln_tuning", "bitfit")  # the roles whose defaults differ most per family


@pytest.mark.parametrize("model_type", FAMILIES)
@pytest.mark.parametrize("method", FAST)
def test_defaults_build_and_train_a_step_tiny_random(model_type, method, family_dirs, store):
    _check(family_dirs, store, model_type, method)


@pytest.mark.slow  # every other method on every family: about 2 min
@pytest.mark.parametrize("model_type", FAMILIES)
@pytest.mark.parametrize("method", [m for m in METHODS if m not in FAST])
def test_every_method_builds_and_trains_a_step_or_is_refused_tiny_random(model_type, method, family_dirs, store):
    _check(family_dirs, store, model_type, method)


@pytest.mark.parametrize("model_type,role,expected", [
    ("bert", "attention", ["query", "value"]),            # peft's LoRA mapping
    ("qwen2", "attention", ["q_proj", "v_proj"]),
    ("gpt2", "attention", ["c_attn"]),
    ("llama", "ia3_feedforward", ["down_proj"]),          # peft's IA3 feed-forward mapping
    ("llama", "layer_norm", ["input_layernorm", "post_attention_layernorm", "norm"]),  # peft's LN-tuning mapping
    ("bert", "layer_norm", ["LayerNorm"]),                # peft has none for BERT: the family's
    ("deberta-v2", "adapter_houlsby", architectures.ENCODER["adapter_houlsby"]),
    ("mistral", "adapter_parallel", architectures.DECODER["adapter_parallel"]),
    ("gpt2", "adapter_pfeiffer", architectures.GPT2["adapter_pfeiffer"]),
    ("bert", "head_modules", ["classifier"]),
    ("bert", "quant_skip_modules", ["classifier", "pooler"]),
    ("llama", "head_modules", ["score"]),
    ("gpt2", "quant_skip_modules", ["score"]),
])
def test_hf_defaults_per_architecture(model_type, role, expected, family_dirs, store):
    cfg = _cfg(family_dirs, store, model_type, "lora")
    value = cfg.model[role] if role.endswith("_modules") else cfg.model.target_modules[role]
    assert (list(value) if not isinstance(value, str) else value) == expected


def test_a_set_value_replaces_the_default(family_dirs, store):
    cfg = compose("method=lora", "model=hf", f"model.name_or_path={family_dirs['llama']}",
                  "model.target_modules.attention=[q_proj,k_proj,v_proj]")
    assert list(cfg.method.target_modules) == ["q_proj", "k_proj", "v_proj"]


def test_unknown_architecture_names_the_key_to_set(tmp_path, store):
    AutoConfig.for_model("mpnet", **TINY).save_pretrained(tmp_path)
    cfg = compose("method=adapter", "model=hf", f"model.name_or_path={tmp_path}", f"tracking.uri={store}")
    with pytest.raises(BenchError, match=r"^model\.target_modules\.adapter_houlsby: no default for model type "
                                         r"'mpnet' .*set model\.target_modules\.adapter_houlsby=\[\.\.\.\]"):
        validate(cfg)


def test_defaults_survive_resolve_as_a_worker_receives_them(family_dirs, store):
    """The parent resolves the config and writes it for the worker: the defaults must become plain values."""
    from omegaconf import OmegaConf
    cfg = _cfg(family_dirs, store, "qwen2", "ia3")
    OmegaConf.resolve(cfg)
    again = OmegaConf.create(OmegaConf.to_yaml(cfg))
    assert list(again.method.target_modules) == ["q_proj", "v_proj", "down_proj"]  # peft's IA3 mapping for qwen2
    assert list(again.model.head_modules) == ["score"]
