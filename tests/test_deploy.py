"""The trained model as deployed (bench/core/deploy.py): latencies of the base, the method active and a merged copy,
merge drift; and the data-efficiency draw task.train_per_class (bench/core/tasks.py: per_class). Tiny random-init
models (conftest) for the plumbing; nothing here is about learning."""
from __future__ import annotations

import pytest
import torch

from bench.core import deploy, pipeline, tasks
from bench.core import metrics as M
from tests.conftest import compose
from tests.test_generation import instruct_files, llama_cfg  # noqa: F401  (fixtures)

CPU = torch.device("cpu")
FAST = ["deploy.repeats=3", "deploy.warmup=1", "train.eval_batch_size=16"]


def _perturb(model, pattern: str) -> None:
    """Give the method's freshly initialized weights (LoRA's B is zero) random values, as training would."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if pattern in name:
                p.normal_(0, 0.5)


def _logits(model, parts) -> torch.Tensor:
    rows = parts.test.select(range(16)).to_list()
    batch = parts.tokenizer.pad([{k: r[k] for k in ("input_ids", "attention_mask")} for r in rows],
                                return_tensors="pt")
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def test_tiny_random_bert_lora_merged_copy_predicts_what_the_unmerged_model_does(tiny_overrides):
    cfg = compose(*tiny_overrides, "method=lora", *FAST)
    parts = pipeline.build(cfg, CPU)
    _perturb(parts.model, "lora_B")
    test, _ = parts.evaluate(parts.model, parts.test, "test")
    merged, why = deploy.merged_copy(parts.model)
    assert why == "" and merged is not None
    assert not any("lora" in n for n, _ in merged.named_parameters())          # really merged into the weights
    unmerged_logits, merged_logits = _logits(parts.model, parts), _logits(merged, parts)
    with parts.model.disable_adapter():
        base_logits = _logits(parts.model, parts)
    assert not torch.allclose(base_logits, unmerged_logits, atol=1e-3)       # the method changes the outputs ...
    base, _ = deploy._base(parts.model)         # the timed base: a copy without the method's modules ...
    assert not any("lora" in n for n, _ in base.named_parameters())
    torch.testing.assert_close(_logits(base, parts), base_logits)            # ... that answers as the backbone does
    torch.testing.assert_close(merged_logits, unmerged_logits, atol=1e-4, rtol=1e-4)  # ... and merging keeps them
    metrics, tags = deploy.measure(parts, parts.model, test, cfg)
    assert tags == {"merge": "merged"}
    assert metrics[M.TEST_ACCURACY_MERGED] == pytest.approx(test[M.TEST_ACCURACY])
    assert metrics[M.MERGE_ACCURACY_DELTA] == pytest.approx(0.0, abs=1e-9)
    for variant in deploy.VARIANTS:
        for b in ("b1", "bN"):
            assert metrics[f"latency/{variant}_ms_{b}"] > 0
            assert metrics[f"latency/{variant}_iqr_ms_{b}"] >= 0
    assert metrics[M.LATENCY_BATCH_SIZE] == 16 and metrics[M.LATENCY_THREADS] == torch.get_num_threads()
    assert metrics[M.LATENCY_OVERHEAD_PCT_B1] == pytest.approx(
        100 * (metrics[M.LATENCY_UNMERGED_MS_B1] / metrics[M.LATENCY_BASE_MS_B1] - 1))
    # exactly the registry's deployment figures of a mergeable classification run, nothing undeclared
    assert set(metrics) == {n for n in M.run_names("classification", merged=True) if n in M.DEPLOYMENT}
    assert parts.model.peft_config["default"].peft_type.value == "LORA"    # the trained model was left unmerged
    assert any("lora_B" in n for n, _ in parts.model.named_parameters())


@pytest.mark.parametrize("method, reason", [("adapter", "BOTTLENECK"), ("prefix", "PREFIX_TUNING"),
                                            ("full", "not a peft method")])
def test_tiny_random_bert_unmergeable_method_reports_no_merged_figures(tiny_overrides, method, reason):
    cfg = compose(*tiny_overrides, f"method={method}", *FAST)
    parts = pipeline.build(cfg, CPU)
    test, _ = parts.evaluate(parts.model, parts.test, "test")
    metrics, tags = deploy.measure(parts, parts.model, test, cfg)
    assert reason in tags["merge"]
    assert not set(metrics) & set(M.names(merged_only=True))
    assert metrics[M.LATENCY_BASE_MS_B1] > 0 and metrics[M.LATENCY_UNMERGED_MS_BN] > 0
    assert set(metrics) == {n for n in M.run_names("classification") if n in M.DEPLOYMENT}


def test_tiny_random_bert_deploy_switches_off(tiny_overrides):
    cfg = compose(*tiny_overrides, "method=lora", "deploy.latency=false", "deploy.merged_test=false")
    parts = pipeline.build(cfg, CPU)
    assert deploy.measure(parts, parts.model, {}, cfg) == ({}, {})


def test_timed_interleaves_the_calls_and_reports_median_and_iqr():
    order = []
    calls = {"a": lambda: order.append("a"), "b": lambda: order.append("b")}
    result = deploy.timed(calls, repeats=4, warmup=1)
    assert order == ["a", "b"] * 5                                    # warmup, then a, b, a, b, ...
    assert set(result) == {"a", "b"} and all(m >= 0 and iqr >= 0 for m, iqr in result.values())


@pytest.mark.slow  # two tiny-Llama generation timings per variant: about 20 s
def test_tiny_random_llama_lora_per_token_latency_and_merged_generations(llama_cfg):
    cfg = llama_cfg("method=lora", *FAST, "train.eval_batch_size=4")
    parts = pipeline.build(cfg, CPU)
    _perturb(parts.model, "lora_B")
    test, _ = parts.evaluate(parts.model, parts.test, "test")
    metrics, tags = deploy.measure(parts, parts.model, test, cfg)
    assert tags == {"merge": "merged"}
    k = cfg.task.max_new_tokens
    for variant in deploy.VARIANTS:
        assert metrics[f"latency/{variant}_ms_per_token_bN"] == pytest.approx(metrics[f"latency/{variant}_ms_bN"] / k)
    assert metrics[M.MERGE_ACCURACY_DELTA] == pytest.approx(0.0, abs=1e-9)
    assert set(metrics) == {n for n in M.run_names("label_match", merged=True) if n in M.DEPLOYMENT}


# --- task.train_per_class ------------------------------------------------------------------------------------

def _train_rows(*overrides):
    cfg = compose("task=trec", *overrides)
    data = tasks.load(cfg.task, int(cfg.seed))
    return data.train


@pytest.mark.parametrize("k", [1, 8])
def test_trec_train_per_class_draws_exactly_k_of_every_class_the_same_for_every_method(k):
    train = _train_rows(f"task.train_per_class={k}", "method=lora")
    counts = {c: train["label"].count(c) for c in range(6)}
    assert counts == {c: k for c in range(6)}
    assert _train_rows(f"task.train_per_class={k}", "method=full")["text"] == train["text"]   # the method plays no part
    assert _train_rows(f"task.train_per_class={k}", "seed=1")["text"] != train["text"]        # the seed does


def test_trec_train_per_class_smaller_draw_is_inside_the_larger_one():
    small, large = (set(_train_rows(f"task.train_per_class={k}")["text"]) for k in (4, 32))
    assert small < large


def test_train_per_class_gives_all_of_a_class_with_fewer_examples():
    from datasets import Dataset
    ds = Dataset.from_dict({"text": [str(i) for i in range(7)], "label": [0, 0, 0, 0, 0, 1, 1]})
    drawn = tasks.per_class(ds, 3, "label", seed=0)
    assert sorted(drawn["label"]) == [0, 0, 0, 1, 1]
