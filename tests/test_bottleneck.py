"""Bottleneck adapters (bench.core.methods.bottleneck): the peft plumbing on a tiny random-init BERT and Llama, and the
reference check against AdapterHub's presets (tests/fixtures/adapterhub_bottleneck.*, made by
tests/fixtures/make_adapterhub_fixture.py in AdapterHub's own environment); CPU, no Hub access."""

from __future__ import annotations

import copy
import importlib
import importlib.util
import json
import re
import sys

import pytest
import torch
from peft import PeftModel, get_peft_config, get_peft_model
from peft.utils import PeftType
from safetensors.torch import load_file
from transformers import BertConfig, BertForSequenceClassification

import bench.core.methods.bottleneck as bottleneck
import bench.core.methods.bottleneck.peft_internals as internals
from bench.core import methods
from bench.core.methods.bottleneck import (BottleneckConfig, BottleneckLayer, BottleneckOutput, BottleneckSublayerOutput,
                                      ResidualTap)
from tests.conftest import compose
from tests.fixtures import make_adapterhub_fixture as ref

# the regexes the YAML passes for BERT (conf/model/minilm.yaml, hf.yaml): the sublayer-output modules
HOULSBY = r".*\.(attention\.output|layer\.\d+\.output)"
PFEIFFER = r".*\.layer\.\d+\.output"
PARALLEL = PFEIFFER
# the presets' knobs (conf/method/adapter*.yaml = AdapterHub's DoubleSeqBnConfig, SeqBnConfig, ParBnConfig)
HOULSBY_KW = dict(non_linearity="swish")
PFEIFFER_KW = dict(non_linearity="relu", original_ln_before=True)
PARALLEL_KW = dict(non_linearity="relu", is_parallel=True, scaling=4.0, init_weights="mam_adapter")
SITES_PER_LAYER = {"houlsby": (HOULSBY, 2, HOULSBY_KW), "pfeiffer": (PFEIFFER, 1, PFEIFFER_KW),
                   "parallel": (PARALLEL, 1, PARALLEL_KW)}
# and for Llama (conf/model/smollm2.yaml)
LLAMA_HOULSBY = r".*\.layers\.\d+\.(self_attn|mlp)"
LLAMA_FFN = r".*\.layers\.\d+\.mlp"

D, LAYERS, LABELS, REDUCTION = 32, 2, 3, 4


def tiny_random_bert(seed: int = 0, num_hidden_layers: int = LAYERS) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=100,
        hidden_size=D,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=LABELS,
    )
    return BertForSequenceClassification(cfg).eval()


def tiny_batch(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(0, 100, (4, 8), generator=g),
        "attention_mask": torch.ones(4, 8, dtype=torch.long),
        "labels": torch.randint(0, LABELS, (4,), generator=g),
    }


def bottleneck_config(target_modules, **kw) -> BottleneckConfig:
    return BottleneckConfig(
        task_type="SEQ_CLS", target_modules=target_modules, reduction_factor=REDUCTION, modules_to_save=["classifier"], **kw
    )


def logits(model, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def test_registration_produces_peft_type_bottleneck():
    assert PeftType.BOTTLENECK.value == "BOTTLENECK"
    assert PeftType("BOTTLENECK") is bottleneck.PEFT_TYPE
    assert BottleneckConfig().peft_type == "BOTTLENECK"


@pytest.mark.parametrize("num_layers", [2, 6])
def test_tiny_random_bert_yaml_regexes_pick_houlsby_and_pfeiffer_sites(num_layers):
    names = [n for n, _ in tiny_random_bert(num_hidden_layers=num_layers).named_modules()]
    houlsby = [n for n in names if re.fullmatch(HOULSBY, n)]
    pfeiffer = [n for n in names if re.fullmatch(PFEIFFER, n)]
    assert len(houlsby) == 2 * num_layers and len(pfeiffer) == num_layers
    assert all(n.endswith((".attention.output", ".output")) for n in houlsby)
    assert not any("attention" in n or "intermediate" in n or "pooler" in n or "dense" in n for n in pfeiffer)
    # peft's own matching agrees
    pm = get_peft_model(tiny_random_bert(num_hidden_layers=num_layers), bottleneck_config(HOULSBY))
    assert sorted(pm.base_model.targeted_module_names) == sorted(houlsby)


@pytest.mark.parametrize("variant", ["houlsby", "pfeiffer", "parallel"])
def test_tiny_random_bert_trainable_params_match_closed_form(variant):
    regex, sites_per_layer, kw = SITES_PER_LAYER[variant]
    pm = get_peft_model(tiny_random_bert(), bottleneck_config(regex, **kw))
    m = D // REDUCTION
    # down Linear(d, m) + up Linear(m, d), both with bias; the placement (after or beside the sublayer, before or
    # after its LayerNorm) adds no parameters: the pretrained LayerNorm is reused, the activation has none
    per_adapter = (D * m + m) + (m * D + D)
    classifier = D * LABELS + LABELS
    expected = LAYERS * sites_per_layer * per_adapter + classifier
    trainable, _ = pm.get_nb_trainable_parameters()
    assert trainable == expected
    wrappers = [mod for mod in pm.modules() if isinstance(mod, BottleneckLayer)]
    assert len(wrappers) == LAYERS * sites_per_layer
    assert all(isinstance(mod, BottleneckSublayerOutput) for mod in wrappers)


@pytest.mark.parametrize("variant", ["houlsby", "pfeiffer", "parallel"])
def test_tiny_random_bert_mam_adapter_init_starts_as_exact_identity(variant):
    # "mam_adapter" (ParBnConfig's init): up projection exactly zero, so every placement adds exactly nothing
    regex, _, kw = SITES_PER_LAYER[variant]
    batch = tiny_batch()
    base = tiny_random_bert()
    expected = logits(copy.deepcopy(base), batch)
    pm = get_peft_model(base, bottleneck_config(regex, **{**kw, "init_weights": "mam_adapter"}))
    assert torch.equal(logits(pm, batch), expected)


def test_tiny_random_bert_bert_init_is_adapterhubs():
    # "bert" (DoubleSeqBnConfig / SeqBnConfig): down and up weights N(0, 0.02), biases 0: not an identity
    torch.manual_seed(0)
    pm = get_peft_model(tiny_random_bert(num_hidden_layers=6), bottleneck_config(HOULSBY))
    weights = torch.cat([p.detach().flatten() for n, p in pm.named_parameters()
                         if ".adapter_" in n and n.endswith("weight")])
    biases = [p for n, p in pm.named_parameters() if ".adapter_" in n and n.endswith("bias")]
    assert weights.numel() == 6 * 2 * 2 * D * (D // REDUCTION)
    assert abs(weights.std().item() - 0.02) < 0.002 and abs(weights.mean().item()) < 0.002
    assert all(torch.equal(b, torch.zeros_like(b)) for b in biases)
    batch = tiny_batch()
    assert not torch.equal(logits(pm, batch), logits(tiny_random_bert(num_hidden_layers=6), batch))


def test_tiny_random_bert_training_moves_only_adapters_and_head():
    batch = tiny_batch()
    base = tiny_random_bert()
    ref_logits = logits(copy.deepcopy(base), batch)
    # get_peft_model keeps the original Parameter objects, so these references track the frozen base weights
    base_params = dict(base.named_parameters())
    before = {n: p.detach().clone() for n, p in base_params.items()}

    pm = get_peft_model(base, bottleneck_config(HOULSBY))
    trainable = {n: p for n, p in pm.named_parameters() if p.requires_grad}
    assert all(".adapter_" in n or ".modules_to_save." in n for n in trainable)
    trainable_before = {n: p.detach().clone() for n, p in trainable.items()}

    opt = torch.optim.AdamW(trainable.values(), lr=1e-2)
    pm.train()
    for _ in range(3):
        opt.zero_grad()
        pm(**batch).loss.backward()
        opt.step()

    for n, p in trainable.items():
        assert not torch.equal(p, trainable_before[n]), f"{n} did not change"
    for n, p in base_params.items():  # includes the original (wrapped) classifier
        assert torch.equal(p, before[n]), f"base weight {n} changed"

    # disabling the adapters (and the trained head copy) gives back the base model exactly
    with pm.disable_adapter():
        assert torch.equal(logits(pm, batch), ref_logits)
    assert not torch.equal(logits(pm, batch), ref_logits)


def train_steps(pm, batch, steps: int = 2) -> None:
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    pm.train()
    for _ in range(steps):
        opt.zero_grad()
        pm(**batch).loss.backward()
        opt.step()


def test_tiny_random_bert_save_and_reload_gives_identical_logits(tmp_path):
    batch = tiny_batch()
    pm = get_peft_model(tiny_random_bert(), bottleneck_config(PFEIFFER, **PFEIFFER_KW, dropout=0.1))
    train_steps(pm, batch)
    trained = logits(pm, batch)

    pm.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file()
    saved_cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved_cfg["peft_type"] == "BOTTLENECK" and saved_cfg["reduction_factor"] == REDUCTION

    loaded = PeftModel.from_pretrained(tiny_random_bert(), tmp_path)  # fresh base, same seed
    assert isinstance(loaded.peft_config["default"], BottleneckConfig)
    torch.testing.assert_close(logits(loaded, batch), trained, rtol=0, atol=0)


def test_peft_internals_check_passes_on_the_tested_peft():
    from packaging.requirements import Requirement
    import peft
    bottleneck.check_peft_internals()
    tested = Requirement(bottleneck.tested_peft())
    assert tested.name == "peft" and str(tested.specifier), "pyproject.toml must pin a peft range"
    assert tested.specifier.contains(peft.__version__), (peft.__version__, str(tested.specifier))


@pytest.mark.parametrize("break_it,names", [
    (lambda mp: mp.delattr(internals.BaseTuner, "_replace_module"), "BaseTuner._replace_module is gone"),
    (lambda mp: mp.delattr(internals.BaseTunerLayer, "_cast_input_dtype"), "BaseTunerLayer._cast_input_dtype is gone"),
    (lambda mp: mp.setattr(internals, "register_peft_method", lambda name, config_cls, model_cls: None),
     "register_peft_method has no parameter prefix"),
    (lambda mp: mp.setattr(internals, "PeftType", type("PeftType", (str,), {})), "PeftType is no longer a str Enum"),
])
def test_peft_internals_changed_is_one_clear_error(monkeypatch, break_it, names):
    """What a peft release that changes the registration's footing would do: one ImportError naming the change
    and the range to install, not an AttributeError deep in peft."""
    break_it(monkeypatch)
    with pytest.raises(ImportError, match=rf"peft \S+ changed what the BOTTLENECK registration relies on \(.*"
                                          rf"{re.escape(names)}.*\); install the tested range: pip install 'peft[<>=]"):
        bottleneck.check_peft_internals()


def test_get_peft_config_from_plain_dict():
    cfg = get_peft_config(
        {
            "peft_type": "BOTTLENECK",
            "task_type": "SEQ_CLS",
            "target_modules": HOULSBY,
            "reduction_factor": 8,
            "non_linearity": "gelu",
            "modules_to_save": ["classifier"],
        }
    )
    assert isinstance(cfg, BottleneckConfig)
    assert cfg.peft_type == PeftType.BOTTLENECK
    assert (cfg.reduction_factor, cfg.non_linearity, cfg.init_weights, cfg.dropout) == (8, "gelu", "bert", 0.0)
    # the other defaults are AdapterHub's DoubleSeqBnConfig's
    assert (cfg.original_ln_before, cfg.original_ln_after, cfg.residual_before_ln, cfg.is_parallel, cfg.scaling) == (
        False, True, True, False, 1.0)


@pytest.mark.parametrize("bad", [dict(non_linearity="nope"), dict(reduction_factor=0), dict(init_weights="nope"),
                                 dict(scaling="nope"), dict(residual_before_ln="post_add"), dict(dropout=1.0)])
def test_bad_config_values_are_rejected(bad):
    with pytest.raises(ValueError):
        BottleneckConfig(target_modules=PFEIFFER, **bad)


def test_residual_reading_adapter_on_a_linear_layer_is_refused():
    # a Linear's output has no residual input to read: Pfeiffer / parallel need the sublayer-output module
    for kw in (PFEIFFER_KW, PARALLEL_KW):
        with pytest.raises(ValueError, match="residual input"):
            get_peft_model(tiny_random_bert(), bottleneck_config(r".*\.layer\.\d+\.output\.dense", **kw))
    # the sequential placement on a Linear still works: y + A(y)
    pm = get_peft_model(tiny_random_bert(), bottleneck_config(r".*\.layer\.\d+\.output\.dense"))
    assert sum(isinstance(mod, BottleneckOutput) for mod in pm.modules()) == LAYERS


def test_tiny_random_bert_merge_refused_but_unload_works():
    batch = tiny_batch()
    base = tiny_random_bert()
    expected = logits(copy.deepcopy(base), batch)
    pm = get_peft_model(base, bottleneck_config(PFEIFFER, **PFEIFFER_KW))
    with pytest.raises(ValueError, match="cannot be merged"):
        pm.merge_and_unload()
    unloaded = pm.unload()
    assert not any(isinstance(mod, BottleneckLayer) for mod in unloaded.modules())
    assert torch.equal(logits(unloaded, batch), expected)


def test_import_twice_is_idempotent(monkeypatch):
    importlib.import_module("bench.core.methods.bottleneck")  # cached import: no-op
    # Execute the package a second time under another name (what importlib.reload or a double import does): its
    # modules run again as bottleneck_second_copy.*, so every class is created anew.
    # register_peft_method alone would raise KeyError here; our registration must not.
    spec = importlib.util.spec_from_file_location("bottleneck_second_copy", bottleneck.__file__)
    second = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, second)  # dataclasses look the module up while executing it
    try:
        spec.loader.exec_module(second)
        assert second.BottleneckConfig is not BottleneckConfig
        assert type(get_peft_config({"peft_type": "BOTTLENECK", "target_modules": PFEIFFER})) is second.BottleneckConfig
        assert second.PEFT_TYPE is bottleneck.PEFT_TYPE  # the enum member is not added twice
    finally:
        bottleneck._register()  # point peft back at this session's classes (also a third registration)
        for name in [n for n in sys.modules if n.startswith(f"{spec.name}.")]:
            del sys.modules[name]
    assert type(get_peft_config({"peft_type": "BOTTLENECK", "target_modules": PFEIFFER})) is BottleneckConfig


# --- Llama family: adapters on self_attn / mlp, the residual read through a tap on the pre-norm ------------------

def tiny_llama():
    return ref.base_model("llama").eval()  # 2 layers, hidden 64, random weights from the fixture's generator


def llama_config(target_modules, **kw) -> BottleneckConfig:
    return BottleneckConfig(task_type="SEQ_CLS", target_modules=target_modules, modules_to_save=["score"], **kw)


def llama_batch() -> dict[str, torch.Tensor]:
    return ref.inputs("llama")


@pytest.mark.parametrize("variant,regex,kw,sites_per_layer,taps", [
    ("houlsby", LLAMA_HOULSBY, HOULSBY_KW, 2, 0),
    ("pfeiffer", LLAMA_FFN, PFEIFFER_KW, 1, 1),
    ("parallel", LLAMA_FFN, PARALLEL_KW, 1, 1),
])
def test_tiny_llama_wrappers_taps_and_closed_form(variant, regex, kw, sites_per_layer, taps):
    base = tiny_llama()
    d, layers, labels = base.config.hidden_size, base.config.num_hidden_layers, base.config.num_labels
    pm = get_peft_model(base, llama_config(regex, **kw))
    m = d // 16  # BottleneckConfig's default reduction_factor (the parallel preset's 2 comes from its YAML)
    trainable, _ = pm.get_nb_trainable_parameters()
    assert trainable == layers * sites_per_layer * ((d * m + m) + (m * d + d)) + d * labels  # score has no bias
    assert sum(isinstance(mod, BottleneckOutput) for mod in pm.modules()) == layers * sites_per_layer
    found = [n for n, mod in pm.named_modules() if isinstance(mod, ResidualTap)]
    assert len(found) == layers * taps and all(n.endswith("post_attention_layernorm") for n in found)


def test_tiny_llama_save_reload_unload_and_disable(tmp_path):
    batch = llama_batch()
    base_logits = logits(tiny_llama(), batch)
    pm = get_peft_model(tiny_llama(), llama_config(LLAMA_FFN, **PFEIFFER_KW))
    train_steps(pm, batch)
    trained = logits(pm, batch)
    assert not torch.equal(trained, base_logits)
    pm.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert torch.equal(logits(loaded, batch), trained)
    with loaded.disable_adapter():
        assert torch.equal(logits(loaded, batch), base_logits)
    unloaded = loaded.unload()  # keeps the trained head copy, drops adapters and taps
    assert not any(isinstance(mod, (BottleneckLayer, ResidualTap)) for mod in unloaded.modules())
    plain = tiny_llama()
    plain.score.load_state_dict(unloaded.score.state_dict())
    assert torch.equal(logits(unloaded, batch), logits(plain, batch))


@pytest.mark.parametrize("kw", [PFEIFFER_KW, PARALLEL_KW], ids=["pfeiffer", "parallel"])
def test_tiny_llama_gradient_checkpointing_gives_the_same_gradients(kw):
    # the recompute in the backward pass calls the tapped pre-norm and the adapted MLP again, in the same order
    batch = llama_batch()
    grads = []
    for checkpointing in (False, True):
        model = tiny_llama()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        pm = get_peft_model(model, llama_config(LLAMA_FFN, **{**kw, "init_weights": "bert"}))
        torch.manual_seed(0)
        for n, p in pm.named_parameters():
            if ".adapter_" in n:
                p.data.copy_(ref.det_tensor(n, p.shape, 0.05))
        pm.train()
        pm(**batch).loss.backward()
        grads.append({n: p.grad.clone() for n, p in pm.named_parameters() if ".adapter_" in n})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-7)


# --- reference check against AdapterHub 1.3.0 (tests/fixtures/make_adapterhub_fixture.py) ---------------------------

TOL = 1e-5
YAML_MODEL = {"minilm": "minilm", "llama": "smollm2"}  # the model YAML whose target_modules the model family uses
# trainable adapter parameters on MiniLM-L6 (d = 384, 6 layers), closed form 6 * sites * ((d*m + m) + (m*d + d))
MINILM_ADAPTER_PARAMS = {"adapter": 6 * 2 * (2 * 384 * 24 + 24 + 384),        # 226,080 (m = 24, 2 sites per layer)
                         "adapter_pfeiffer": 6 * 1 * (2 * 384 * 24 + 24 + 384),  # 113,040 (m = 24)
                         "adapter_parallel": 6 * 1 * (2 * 384 * 192 + 192 + 384)}  # 888,192 (m = 192)
KNOBS = ("reduction_factor", "non_linearity", "original_ln_before", "original_ln_after", "residual_before_ln",
         "is_parallel", "scaling", "init_weights", "dropout")


@pytest.fixture(scope="module")
def fixture():
    return load_file(str(ref.FIXTURE)), json.loads(ref.META.read_text())


def preset_config(preset: str, model_key: str, **peft_overrides) -> BottleneckConfig:
    cfg = compose(f"method={preset}", f"model={YAML_MODEL[model_key]}")
    pc = methods.peft_config(cfg.method, cfg.model)
    for k, v in peft_overrides.items():
        setattr(pc, k, v)
    return pc


def harness_model(model_key: str, preset: str, hidden_dropout: float = 0.0, **peft_overrides):
    """The harness's adapter from the method and model YAMLs, with the fixture's adapter weights loaded."""
    model = ref.base_model(model_key, hidden_dropout)
    pm = get_peft_model(model, preset_config(preset, model_key, **peft_overrides))
    inner = pm.get_base_model()
    layers = inner.config.num_hidden_layers
    wrapped = {n for n, mod in inner.named_modules() if isinstance(mod, BottleneckLayer)}
    assert wrapped == {ref.harness_module(model_key, i, s) for i in range(layers) for s in ref.sites(preset)}
    params = {}
    with torch.no_grad():
        for i in range(layers):
            for site in ref.sites(preset):
                layer = inner.get_submodule(ref.harness_module(model_key, i, site))
                for proj, lin in (("down", layer.adapter_down["default"]), ("up", layer.adapter_up["default"])):
                    for kind in ("weight", "bias"):
                        canon = f"layer{i}.{site}.{proj}.{kind}"
                        p = getattr(lin, kind)
                        p.copy_(ref.adapter_tensor(model_key, preset, canon, p.shape))
                        params[canon] = p
    if not hidden_dropout:
        ref.no_dropout(pm)
    return pm, params


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.to(torch.float64) - b.to(torch.float64)).abs().max().item()


def test_adapterhub_fixture_is_small_and_its_weights_regenerate(fixture):
    tensors, meta = fixture
    assert ref.FIXTURE.stat().st_size + ref.META.stat().st_size < 1_000_000
    assert meta["made_with"]["adapters"] == "1.3.0" and meta["made_with"]["transformers"].startswith("4.57.")
    assert {"command", "environment", "date", "torch"} <= set(meta["made_with"])
    llama = ref.base_model("llama")
    assert ref.sha256_of(dict(llama.named_parameters())) == meta["sha256"]["llama/base"]
    minilm = ref.base_model("minilm")
    assert ref.sha256_of({n: p for n, p in minilm.named_parameters() if n.startswith("classifier.")}) == \
        meta["sha256"]["minilm/head"]
    for model_key in ref.MODELS:
        for preset in ref.PRESETS:
            _, params = harness_model(model_key, preset)
            assert ref.sha256_of(params) == meta["sha256"][f"{model_key}/{preset}"], (model_key, preset)


def test_yaml_presets_are_adapterhubs_configs(fixture):
    _, meta = fixture
    for preset in ref.PRESETS:
        resolved = meta["presets"][preset]["resolved"]
        assert resolved["mh_adapter"] == (preset == "adapter") and resolved["output_adapter"]
        assert not (resolved["ln_before"] or resolved["ln_after"] or resolved["use_gating"] or resolved["phm_layer"])
        for model_key in ref.MODELS:
            pc = preset_config(preset, model_key)
            assert {k: getattr(pc, k) for k in KNOBS} == {k: resolved[k] for k in KNOBS}, (preset, model_key)


@pytest.mark.parametrize("model_key", ref.MODELS)
def test_base_models_agree_with_adapterhubs_environment(model_key, fixture):
    tensors, _ = fixture
    batch = {k.rpartition("/")[2]: v for k, v in tensors.items() if k.startswith(f"{model_key}/inputs/")}
    logits_, hidden, _ = ref.run(ref.base_model(model_key), batch, train=False)
    assert max_diff(logits_, tensors[f"{model_key}/base/eval/logits"]) <= TOL
    assert max_diff(hidden, tensors[f"{model_key}/base/eval/last_hidden_state"]) <= TOL


@pytest.mark.parametrize("preset", list(ref.PRESETS))
@pytest.mark.parametrize("model_key", ref.MODELS)
def test_presets_match_adapterhub_in_eval_and_train_mode(model_key, preset, fixture):
    tensors, meta = fixture
    batch = {k.rpartition("/")[2]: v for k, v in tensors.items() if k.startswith(f"{model_key}/inputs/")}
    pm, params = harness_model(model_key, preset)
    expected_params = meta["models"][model_key]["presets"][preset]["adapter_params"]
    assert sum(p.numel() for p in params.values()) == expected_params
    head = sum(p.numel() for n, p in pm.named_parameters() if p.requires_grad and ".modules_to_save." in n)
    assert pm.get_nb_trainable_parameters()[0] == expected_params + head
    if model_key == "minilm":
        assert expected_params == MINILM_ADAPTER_PARAMS[preset]

    diffs = {}
    for mode in ("eval", "train"):
        pm.zero_grad(set_to_none=True)
        logits_, hidden, loss = ref.run(pm, batch, train=mode == "train")
        diffs[mode] = max(max_diff(logits_, tensors[f"{model_key}/{preset}/{mode}/logits"]),
                          max_diff(hidden, tensors[f"{model_key}/{preset}/{mode}/last_hidden_state"]))
    print(f"{model_key} {preset}: max |difference| eval {diffs['eval']:.3g}, train {diffs['train']:.3g}")
    assert diffs["eval"] <= TOL and diffs["train"] <= TOL, diffs
    assert max_diff(loss.reshape(1), tensors[f"{model_key}/{preset}/train/loss"]) <= TOL
    order = meta["models"][model_key]["presets"][preset]["grad_probe_order"]
    assert sorted(order) == sorted(params)
    got = torch.tensor([ref.grad_probe(model_key, preset, c, params[c].grad) for c in order], dtype=torch.float64)
    torch.testing.assert_close(got, tensors[f"{model_key}/{preset}/train/grad_probe"], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("preset", list(ref.PRESETS))
def test_presets_match_adapterhub_in_train_mode_with_bert_hidden_dropout(preset, fixture):
    # same seed, same dropout draws: equal only if the adapter reads dropout(dense(x)) and is not dropped itself
    tensors, _ = fixture
    batch = {k.rpartition("/")[2]: v for k, v in tensors.items() if k.startswith("minilm/inputs/")}
    pm, _ = harness_model("minilm", preset, hidden_dropout=ref.HIDDEN_DROPOUT)
    torch.manual_seed(ref.DROPOUT_SEED)
    logits_, hidden, _ = ref.run(pm, batch, train=True)
    diff = max(max_diff(logits_, tensors[f"minilm/{preset}/train_dropout/logits"]),
               max_diff(hidden, tensors[f"minilm/{preset}/train_dropout/last_hidden_state"]))
    assert diff <= TOL, diff


@pytest.mark.parametrize("model_key", ref.MODELS)
def test_reference_check_tells_placements_apart(model_key, fixture):
    # the check is not vacuous: Pfeiffer without original_ln_before (the adapter reading h instead of LN(h + r)) misses
    tensors, _ = fixture
    batch = {k.rpartition("/")[2]: v for k, v in tensors.items() if k.startswith(f"{model_key}/inputs/")}
    pm, _ = harness_model(model_key, "adapter_pfeiffer", original_ln_before=False)
    logits_, hidden, _ = ref.run(pm, batch, train=False)
    assert max_diff(hidden, tensors[f"{model_key}/adapter_pfeiffer/eval/last_hidden_state"]) > 1e-3
