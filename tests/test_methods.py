"""Every method YAML trains a tiny random-init BERT through the common trainer: loss goes down, frozen weights
stay bit-identical, the saved checkpoint reloads to identical logits. Parameter counts match closed forms."""
from __future__ import annotations

import pytest
import torch
from transformers import set_seed

from bench import methods, models, tasks, train
from bench.measure import Meter
from tests.conftest import METHODS, compose

CPU = torch.device("cpu")


def build(cfg):
    data = tasks.load(cfg.task, cfg.seed)
    set_seed(cfg.seed)
    model, tok = models.load(cfg.model, cfg.quant, data.num_labels, CPU)
    set_seed(cfg.seed)
    model = methods.apply(model, cfg.method, cfg.model)
    train_ds, eval_ds, _ = tasks.tokenize(data, tok, cfg.train.max_length)
    return data, model, tok, train_ds, eval_ds


def logits(model, tok, ds):
    model.eval()
    batch = tok.pad(ds.to_list()[:8], return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits


def test_every_method_yaml_is_tested():
    assert {"full", "head", "lora", "adapter", "adapter_pfeiffer", "prefix", "ptuning_v2", "prompt", "ptuning",
            "ia3"} <= set(METHODS)


@pytest.mark.parametrize("method", METHODS)
def test_method_trains_tiny_random_bert(method, tiny_overrides, tmp_path):
    cfg = compose(f"method={method}", *tiny_overrides)
    data, model, tok, train_ds, eval_ds = build(cfg)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable, "nothing trains"
    if method != "full":
        assert frozen, "a PEFT method must freeze the backbone"
    before = train.evaluate(model, train_ds, tok, 64, data.num_labels, CPU)[0]["val/loss"]

    metrics = train.fit(model, train_ds, eval_ds, tok, cfg.train, seed=cfg.seed, num_labels=data.num_labels,
                        device=CPU, meter=Meter(CPU))
    after = train.evaluate(model, train_ds, tok, 64, data.num_labels, CPU)[0]["val/loss"]
    if method in ("head", "prompt"):  # a probe / soft prompt on a random backbone's near-constant features: the
        # loss barely moves in 60 steps (either way by luck of the split); they must at least not diverge
        assert after < before + 1e-3, f"{method}: training loss went up ({before:.4f} -> {after:.4f})"
    else:
        assert after < before, f"{method}: training loss did not go down ({before:.4f} -> {after:.4f})"
    assert metrics["train/steps"] == 60 and metrics["train/tokens"] > 0

    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"{method}: frozen weight {n} changed"
    assert any(not torch.equal(p, trainable[n]) for n, p in model.named_parameters() if n in trainable)

    expected = logits(model, tok, eval_ds)
    ckpt = tmp_path / "ckpt"
    size = methods.save(model, cfg.method, ckpt)
    files = {f.name: f.stat().st_size for f in ckpt.rglob("*") if f.is_file()}
    # ckpt/bytes: the weights and the config that reloads them; peft's model card (README.md) is not counted
    weights = {"full": ["model.safetensors", "config.json"], "head": ["head.safetensors"]}.get(
        cfg.method.kind, ["adapter_model.safetensors", "adapter_config.json"])
    assert size == sum(files[name] for name in weights) > 0, files
    assert set(files) - set(weights) <= {"README.md"}, files
    assert all(f.suffix != ".bin" for f in ckpt.rglob("*")), "checkpoints are safetensors only"
    set_seed(cfg.seed + 1)  # a different seed: the reloaded head must come from the checkpoint, not the RNG
    base, _ = models.load(cfg.model, cfg.quant, data.num_labels, CPU)
    reloaded = methods.reload(base, cfg.method, ckpt)
    assert torch.equal(logits(reloaded, tok, eval_ds), expected)


def _count(method, *extra, tiny_overrides):
    cfg = compose(f"method={method}", *tiny_overrides, *extra)
    data = tasks.load(cfg.task, cfg.seed)
    model, _ = models.load(cfg.model, cfg.quant, data.num_labels, CPU)
    d, layers, labels = model.config.hidden_size, model.config.num_hidden_layers, data.num_labels
    trainable, total = methods.count_parameters(methods.apply(model, cfg.method, cfg.model))
    return trainable, d, layers, labels


@pytest.mark.parametrize("r", [2, 8])
def test_lora_trainable_params_closed_form(r, tiny_overrides):
    trainable, d, layers, labels = _count("lora", f"method.r={r}", tiny_overrides=tiny_overrides)
    head = d * labels + labels
    # query and value: d -> d each; LoRA adds A (r x d_in) and B (d_out x r)
    assert trainable == layers * 2 * r * (d + d) + head


@pytest.mark.parametrize("method,adapters_per_layer", [("adapter", 2), ("adapter_pfeiffer", 1)])
@pytest.mark.parametrize("reduction_factor", [4, 16])
def test_bottleneck_trainable_params_closed_form(method, adapters_per_layer, reduction_factor, tiny_overrides):
    trainable, d, layers, labels = _count(method, f"method.reduction_factor={reduction_factor}",
                                          tiny_overrides=tiny_overrides)
    m = d // reduction_factor
    per_adapter = (d * m + m) + (m * d + d)
    assert trainable == layers * adapters_per_layer * per_adapter + d * labels + labels


def test_head_method_trains_only_the_head(tiny_overrides):
    trainable, d, layers, labels = _count("head", tiny_overrides=tiny_overrides)
    assert trainable == d * labels + labels
