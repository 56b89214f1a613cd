"""Bottleneck adapter (bench.methods.bottleneck) on a tiny random-init BERT; CPU, no Hub access."""

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
from transformers import BertConfig, BertForSequenceClassification

import bench.methods.bottleneck as bottleneck
from bench.methods.bottleneck import BottleneckConfig, BottleneckLinear

# the regexes the YAML passes for BERT
HOULSBY = r".*\.(attention\.output|layer\.\d+\.output)\.dense"
PFEIFFER = r".*\.layer\.\d+\.output\.dense"
SITES_PER_LAYER = {"houlsby": (HOULSBY, 2), "pfeiffer": (PFEIFFER, 1)}

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
    assert all(n.endswith(("attention.output.dense", ".output.dense")) for n in houlsby)
    assert not any("attention" in n or "intermediate" in n or "pooler" in n for n in pfeiffer)
    # peft's own matching agrees
    pm = get_peft_model(tiny_random_bert(num_hidden_layers=num_layers), bottleneck_config(HOULSBY))
    assert sorted(pm.base_model.targeted_module_names) == sorted(houlsby)


@pytest.mark.parametrize("variant", ["houlsby", "pfeiffer"])
def test_tiny_random_bert_trainable_params_match_closed_form(variant):
    regex, sites_per_layer = SITES_PER_LAYER[variant]
    pm = get_peft_model(tiny_random_bert(), bottleneck_config(regex))
    m = D // REDUCTION
    per_adapter = (D * m + m) + (m * D + D)  # down Linear(d, m) + up Linear(m, d), both with bias
    classifier = D * LABELS + LABELS
    expected = LAYERS * sites_per_layer * per_adapter + classifier
    trainable, _ = pm.get_nb_trainable_parameters()
    assert trainable == expected
    assert sum(isinstance(mod, BottleneckLinear) for mod in pm.modules()) == LAYERS * sites_per_layer


def test_tiny_random_bert_adapter_starts_as_exact_identity():
    batch = tiny_batch()
    base = tiny_random_bert()
    ref = logits(copy.deepcopy(base), batch)
    pm = get_peft_model(base, bottleneck_config(HOULSBY))
    assert torch.equal(logits(pm, batch), ref)


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


def test_tiny_random_bert_save_and_reload_gives_identical_logits(tmp_path):
    batch = tiny_batch()
    pm = get_peft_model(tiny_random_bert(), bottleneck_config(PFEIFFER, dropout=0.1))
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    pm.train()
    for _ in range(2):
        opt.zero_grad()
        pm(**batch).loss.backward()
        opt.step()
    trained = logits(pm, batch)

    pm.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file()
    saved_cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved_cfg["peft_type"] == "BOTTLENECK" and saved_cfg["reduction_factor"] == REDUCTION

    loaded = PeftModel.from_pretrained(tiny_random_bert(), tmp_path)  # fresh base, same seed
    assert isinstance(loaded.peft_config["default"], BottleneckConfig)
    torch.testing.assert_close(logits(loaded, batch), trained, rtol=0, atol=0)


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
    assert (cfg.reduction_factor, cfg.non_linearity, cfg.init_scale, cfg.dropout) == (8, "gelu", 1e-2, 0.0)


def test_bad_config_values_are_rejected():
    with pytest.raises(ValueError):
        BottleneckConfig(target_modules=PFEIFFER, non_linearity="nope")
    with pytest.raises(ValueError):
        BottleneckConfig(target_modules=PFEIFFER, reduction_factor=0)


def test_tiny_random_bert_merge_refused_but_unload_works():
    batch = tiny_batch()
    base = tiny_random_bert()
    ref = logits(copy.deepcopy(base), batch)
    pm = get_peft_model(base, bottleneck_config(PFEIFFER))
    with pytest.raises(ValueError, match="cannot be merged"):
        pm.merge_and_unload()
    unloaded = pm.unload()
    assert not any(isinstance(mod, BottleneckLinear) for mod in unloaded.modules())
    assert torch.equal(logits(unloaded, batch), ref)


def test_import_twice_is_idempotent(monkeypatch):
    importlib.import_module("bench.methods.bottleneck")  # cached import: no-op
    # Execute the module file a second time under another name (what importlib.reload or a double import does).
    # register_peft_method alone would raise KeyError here; our registration must not.
    spec = importlib.util.spec_from_file_location("bottleneck_second_copy", bottleneck.__file__)
    second = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, second)  # dataclasses look the module up while executing it
    try:
        spec.loader.exec_module(second)
        assert type(get_peft_config({"peft_type": "BOTTLENECK", "target_modules": PFEIFFER})) is second.BottleneckConfig
        assert second.PEFT_TYPE is bottleneck.PEFT_TYPE  # the enum member is not added twice
    finally:
        bottleneck._register()  # point peft back at this session's classes (also a third registration)
    assert type(get_peft_config({"peft_type": "BOTTLENECK", "target_modules": PFEIFFER})) is BottleneckConfig
