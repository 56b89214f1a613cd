"""Every method YAML trains a tiny random-init BERT through the common trainer: loss goes down, frozen weights
stay bit-identical, the saved checkpoint reloads to identical logits. Parameter counts match closed forms."""
from __future__ import annotations

import pytest
import torch
from transformers import set_seed

from bench.core import methods, models, pipeline, tasks, train
from bench.core.measure import Meter
from tests.conftest import METHODS, ROOT, compose

CPU = torch.device("cpu")


def build(cfg):
    p = pipeline.build(cfg, CPU)  # the run's own build step
    return p.data, p.model, p.tokenizer, p.train, p.validation


def logits(model, tok, ds):
    model.eval()
    batch = tok.pad(ds.to_list()[:8], return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits


def test_every_method_yaml_is_tested():
    assert {"full", "head", "lora", "adapter", "adapter_pfeiffer", "prefix", "ptuning_v2", "prompt", "ptuning",
            "ia3", "freeze", "bitfit", "adalora", "oft", "boft", "hra", "ln_tuning", "fourierft", "vblora", "pissa",
            "olora"} <= set(METHODS)


def _numbers_bumped(method_cfg) -> list[str]:
    """Overrides giving every numeric knob of a method a new value (peft's config classes accept them all)."""
    return [f"method.{k}={v + 1 if isinstance(v, int) else v + 0.125}" for k, v in method_cfg.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in methods.HARNESS_KEYS]


@pytest.mark.slow  # a whole command or several runs: kept out of the fast subset
def test_peft_method_yamls_name_each_knob_once_and_peft_gets_it():
    """No key twice in a peft method YAML (no `peft:` block, no key an alias of another); peft's config gets every
    knob through the one mapping (methods.PEFT_FIELDS), defaults and overrides alike (method.alpha=9 is lora_alpha)."""
    import yaml
    from omegaconf import OmegaConf
    checked = 0
    for method in METHODS:
        raw = yaml.safe_load((ROOT / "conf" / "method" / f"{method}.yaml").read_text())
        if raw["kind"] != "peft":
            continue
        assert "peft" not in raw, f"{method}: a `peft:` block repeats the knobs"
        assert not [k for k, v in raw.items() if isinstance(v, str) and v.startswith("${.")], \
            f"{method}: a key that only repeats another"
        fields = [methods.peft_field(k, raw["peft_type"]) for k in raw if k not in methods.HARNESS_KEYS]
        assert len(fields) == len(set(fields)), f"{method}: two keys set one peft field: {sorted(fields)}"
        default = compose(f"method={method}").method
        for cfg in (default, compose(f"method={method}", *_numbers_bumped(default)).method):
            spec = OmegaConf.to_container(cfg, resolve=True)
            config = methods.peft_config(cfg, compose().model)
            assert config.peft_type == spec["peft_type"] and config.task_type == "SEQ_CLS"
            for key, value in spec.items():
                if key in methods.HARNESS_KEYS:
                    continue
                got = getattr(config, methods.peft_field(key, spec["peft_type"]))
                want = set(value) if isinstance(value, list) and isinstance(got, set) else value
                assert got == want, (method, key, got, want)
        checked += 1
    assert checked == sum(compose(f"method={m}").method.kind == "peft" for m in METHODS) >= 20
    lora = methods.peft_config(compose("method=lora", "method.alpha=9", "method.dropout=0.25").method,
                               compose().model)
    assert (lora.lora_alpha, lora.lora_dropout) == (9, 0.25)
    boft = methods.peft_config(compose("method=boft", "method.block_size=8").method, compose().model)
    assert boft.boft_block_size == 8


@pytest.mark.parametrize("method,override,message", [
    ("lora", "+method.nonsense=1", r"^method.nonsense: not a field of peft's LoraConfig for peft_type LORA; valid: "
                                   r".*\balpha \(= lora_alpha\), .*\br, "),
    ("lora", "+method.lora_alpha=4", r"^method.lora_alpha: sets peft's lora_alpha, as method.alpha does; keep one"),
    ("adapter", "+method.peft={peft_type:BOTTLENECK}", r"^method.peft: not a field of peft's BottleneckConfig for "
                                                        r"peft_type BOTTLENECK \(the peft: block is gone"),
    ("adapter", "+method.alpha=4", r"^method.alpha: not a field of peft's BottleneckConfig .*valid: .*dropout, "),
    ("lora", "method.peft_type=LORAX", r"^method.peft_type: unknown peft type 'LORAX'; valid: .*BOTTLENECK.*LORA"),
])
def test_peft_config_refuses_a_key_peft_does_not_take(method, override, message):
    from bench.errors import BenchError
    with pytest.raises(BenchError, match=message):
        methods.peft_config(compose(f"method={method}", override).method, compose().model)


# the fast subset trains one method of each kind and mechanism; the rest (same code paths, other peft classes) are slow
FAST = {"full", "head", "freeze", "bitfit", "lora", "adalora", "ia3", "adapter", "adapter_parallel", "prefix", "prompt"}


@pytest.mark.parametrize("method", [m if m in FAST else pytest.param(m, marks=pytest.mark.slow) for m in METHODS])
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
    weights = {"full": ["model.safetensors", "config.json"], "head": ["head.safetensors"],
               "freeze": ["freeze.safetensors"], "bitfit": ["bitfit.safetensors"]}.get(
        cfg.method.kind, ["adapter_model.safetensors", "adapter_config.json"])
    assert size == sum(files[name] for name in weights) > 0, files
    assert set(files) - set(weights) <= {"README.md"}, files
    assert all(f.suffix != ".bin" for f in ckpt.rglob("*")), "checkpoints are safetensors only"
    set_seed(cfg.seed + 1)  # a different seed: the reloaded head must come from the checkpoint, not the RNG
    base, _ = models.load(cfg.model, cfg.quant, data.num_labels, CPU)
    reloaded = methods.reload(base, cfg.method, ckpt)
    if cfg.method.get("peft_type") == "ADALORA":
        # peft stores AdaLoRA at its allocated ranks (pruned triplets dropped) and rebuilds the smaller matrices on
        # reload: the same function through narrower matmuls, so equal up to float rounding (measured: 4e-9)
        torch.testing.assert_close(logits(reloaded, tok, eval_ds), expected, rtol=0, atol=1e-6)
    else:
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


def _bert_block_params(d: int, inter: int) -> int:
    """One BERT transformer block: q, k, v, o (d x d + bias), two LayerNorms, the feed-forward d -> inter -> d."""
    return 4 * (d * d + d) + 2 * (2 * d) + (d * inter + inter) + (inter * d + d)


@pytest.mark.parametrize("k", [0, 1, 2])
def test_freeze_trainable_params_closed_form(k, tiny_overrides):
    cfg = compose("method=freeze", f"method.trainable_layers={k}", *tiny_overrides)
    data = tasks.load(cfg.task, cfg.seed)
    model, _ = models.load(cfg.model, cfg.quant, data.num_labels, CPU)
    d, inter, layers = model.config.hidden_size, model.config.intermediate_size, model.config.num_hidden_layers
    model = methods.apply(model, cfg.method, cfg.model)
    trainable, _ = methods.count_parameters(model)
    head = d * data.num_labels + data.num_labels
    assert trainable == head + k * _bert_block_params(d, inter)
    if k == 0:
        assert trainable == _count("head", tiny_overrides=tiny_overrides)[0]   # k=0 is `head`
    train_names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.startswith("classifier.") or methods.block_index(n) >= layers - k for n in train_names)
    assert not any(n.startswith(("bert.embeddings.", "bert.pooler.")) for n in train_names)


@pytest.mark.parametrize("k,message", [(3, "method.trainable_layers: 3 is not a number of BertForSequenceClassification's "
                                            "2 transformer blocks; valid: an integer from 0 to 2"),
                                       (-1, "method.trainable_layers: must be an integer from 0")])
def test_freeze_trainable_layers_out_of_range_is_one_line(k, message, tiny_overrides):
    from bench.orchestration.validate import validate
    from bench.errors import BenchError
    with pytest.raises(BenchError) as e:
        validate(compose("method=freeze", f"method.trainable_layers={k}", *tiny_overrides))
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_bitfit_trainable_params_closed_form(tiny_overrides):
    cfg = compose("method=bitfit", *tiny_overrides)
    data = tasks.load(cfg.task, cfg.seed)
    model, _ = models.load(cfg.model, cfg.quant, data.num_labels, CPU)
    c, labels = model.config, data.num_labels
    d, inter = c.hidden_size, c.intermediate_size
    biases = sum(p.numel() for n, p in model.named_parameters() if n.endswith(".bias"))
    # embedding LayerNorm; per block q, k, v, o, two LayerNorms, feed-forward in and out; pooler; classifier
    assert biases == d + c.num_hidden_layers * (4 * d + 2 * d + inter + d) + d + labels
    trainable, _ = methods.count_parameters(methods.apply(model, cfg.method, cfg.model))
    assert trainable == biases + d * labels   # every bias (the head's included) + the head's weight


def test_adalora_reallocates_ranks_through_the_step_hook(tiny_overrides):
    cfg = compose("method=adalora", *tiny_overrides)
    data, model, tok, train_ds, eval_ds = build(cfg)
    assert methods.step_hook(model, 60) is not None
    with pytest.raises(ValueError, match="total_step"):
        methods.step_hook(model, 61)
    train.fit(model, train_ds, eval_ds, tok, cfg.train, seed=cfg.seed, num_labels=data.num_labels, device=CPU,
              meter=Meter(CPU))
    pattern = model.peft_config["default"].rank_pattern   # fixed at the last step (tfinal=0): total_step = 60
    matrices = 2 * model.config.num_hidden_layers           # query and value
    assert len(pattern) == matrices
    assert sum(map(sum, pattern.values())) == cfg.method.target_r * matrices   # the budget: target_r on average


def test_step_hook_is_none_for_other_methods(tiny_overrides):
    for method in ("lora", "head"):
        cfg = compose(f"method={method}", *tiny_overrides)
        _, model, *_ = build(cfg)
        assert methods.step_hook(model, 60) is None


def test_adalora_needs_max_steps(tiny_overrides):
    from bench.orchestration.validate import validate
    from bench.errors import BenchError
    with pytest.raises(BenchError, match=r"^train.max_steps: method=adalora .*set train.max_steps"):
        validate(compose("method=adalora", *tiny_overrides, "train.max_steps=null", "train.epochs=1"))
