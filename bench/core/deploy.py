"""What a trained model costs as deployed: inference latency with and without the method, merged or not, and what
merging does to the test score. Measured in `pipeline.run` after the one test evaluation, outside time/train_s and
time/eval_s (config `deploy.*`).

Definitions (the README's metric table repeats them):
- latency/<variant>_ms_b1, latency/<variant>_ms_bN: the median wall-clock milliseconds of one inference call on a
  fixed batch of test inputs: batch 1 = the test split's first example, batch N = its first N examples
  (N = train.eval_batch_size, at most the split's size; logged as latency/batch_size). One call is one forward pass
  (classification) or one greedy generation of exactly task.max_new_tokens new tokens per sequence with the KV
  cache (generation; min_new_tokens = max_new_tokens so every variant generates the same count). `deploy.warmup`
  untimed calls, then `deploy.repeats` timed ones; within each repeat the variants run back to back (base,
  unmerged, merged), so drift on a shared machine hits all of them alike. torch's intra-op thread count is logged
  as latency/threads.
  Variants: base = the backbone without the method (a copy with the method's modules removed by peft's `unload()`;
  prompt-style methods: the wrapped model without the virtual tokens; full, head, freeze and bitfit add no modules:
  the same model), unmerged = the trained model as it ran in training, merged = a copy after
  peft's `merge_and_unload()`, only for methods peft can merge (not prompt-style methods, not bottleneck adapters).
- latency/<variant>_iqr_ms_b1 / _bN: the interquartile range (75th minus 25th percentile) of the same timed calls.
- latency/overhead_pct_b1 / _bN: 100 x (unmerged - base) / base of the medians.
- latency/<variant>_ms_per_token_b1 / _bN (generation only): the median divided by max_new_tokens.
- test/accuracy_merged (test/chrf_merged for chrf_bleu tasks): the task's primary test score of the merged copy on
  the whole test split, scored exactly as the test evaluation; merge/accuracy_delta (merge/chrf_delta): merged
  minus unmerged.
"""
from __future__ import annotations

import copy
import time

import numpy as np
import torch

from bench.core import metrics as M

VARIANTS = ("base", "unmerged", "merged")


def timed(calls: dict[str, callable], repeats: int, warmup: int) -> dict[str, tuple[float, float]]:
    """{name: (median ms, interquartile range ms)} of each zero-argument call, the calls interleaved per repeat."""
    for _ in range(warmup):
        for call in calls.values():
            call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(1000.0 * (time.perf_counter() - start))
    return {name: (float(np.median(t)), float(np.percentile(t, 75) - np.percentile(t, 25)))
            for name, t in times.items()}


def merged_copy(model) -> tuple[object | None, str]:
    """(a merged copy of a peft model, "") or (None, why it cannot be merged). The trained model is untouched."""
    from peft import PeftModel
    if not isinstance(model, PeftModel):
        return None, "not a peft method: the trained weights are the deployed weights"
    config = model.peft_config[model.active_adapter]
    if config.is_prompt_learning:
        return None, f"{config.peft_type.value}: virtual tokens are an input, there is nothing to merge"
    if str(config.peft_type.value) == "BOTTLENECK":
        return None, "BOTTLENECK: bottleneck adapters are non-linear and cannot be merged"
    merged = copy.deepcopy(model)
    try:
        return merged.merge_and_unload(), ""
    except (NotImplementedError, ValueError, TypeError, AttributeError) as e:   # peft's word on what it cannot merge
        return None, f"{config.peft_type.value}: peft cannot merge it: {str(e).splitlines()[0] if str(e) else type(e).__name__}"


def _base(model):
    """(the module to call, a context it runs in) as the backbone without the method: for peft methods that add
    modules, a copy with them removed (peft's `unload()`, the weights untouched), so that no switching overhead is
    timed; where peft cannot unload, the model inside `disable_adapter()`. Prompt-style methods: the wrapped model,
    which never sees the virtual tokens. full, head, freeze and bitfit add no modules: the model itself."""
    from contextlib import nullcontext
    from peft import PeftModel
    if not isinstance(model, PeftModel):
        return model, nullcontext
    if model.peft_config[model.active_adapter].is_prompt_learning:
        return model.get_base_model(), nullcontext
    try:
        return copy.deepcopy(model).unload(), nullcontext
    except (NotImplementedError, ValueError, TypeError, AttributeError):   # peft's word on what it cannot unload
        return model, model.disable_adapter


def _calls(parts, model, rows: list[dict], max_new_tokens: int):
    """A zero-argument call running `model` on `rows` (tokenized test examples), as the test evaluation would."""
    tok, device = parts.tokenizer, parts.device
    if parts.generative:
        from bench.core import generation
        config = generation.greedy_config(model, tok, parts.family, max_new_tokens, exact=True)
        with generation.padding_side(tok, generation.prompt_padding_side(parts.family)):
            batch = tok.pad([{"input_ids": r["prompt_ids"]} for r in rows], return_tensors="pt")
        batch = {k: v.to(device) for k, v in batch.items()}
        return lambda: model.generate(**batch, generation_config=config)
    batch = tok.pad([{k: r[k] for k in ("input_ids", "attention_mask") if k in r} for r in rows],
                    return_tensors="pt")
    batch = {k: v.to(device) for k, v in batch.items()}
    return lambda: model(**batch)


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def latency(parts, model, merged, cfg) -> dict[str, float]:
    """The latency/* metrics of `model` (and of its merged copy, if any) on the first test examples."""
    rows = parts.test.select(range(min(int(cfg.train.eval_batch_size), len(parts.test)))).to_list()
    k = int(cfg.task.max_new_tokens) if parts.generative else 0
    model.eval()
    if merged is not None:
        merged.eval()
    out = {M.LATENCY_BATCH_SIZE: len(rows), M.LATENCY_THREADS: torch.get_num_threads()}
    base_module, base_context = _base(model)
    for size, suffix in ((1, "b1"), (len(rows), "bN")):
        run_model, run_base = _calls(parts, model, rows[:size], k), _calls(parts, base_module, rows[:size], k)
        run_merged = _calls(parts, merged, rows[:size], k) if merged is not None else None

        def base():
            with base_context():
                run_base()
            _sync(parts.device)

        calls = {"base": base, "unmerged": lambda: (run_model(), _sync(parts.device))}
        if run_merged is not None:
            calls["merged"] = lambda: (run_merged(), _sync(parts.device))
        for variant, (median, iqr) in timed(calls, int(cfg.deploy.repeats), int(cfg.deploy.warmup)).items():
            out[f"latency/{variant}_ms_{suffix}"] = median
            out[f"latency/{variant}_iqr_ms_{suffix}"] = iqr
            if k:
                out[f"latency/{variant}_ms_per_token_{suffix}"] = median / k
        out[f"latency/overhead_pct_{suffix}"] = 100.0 * (out[f"latency/unmerged_ms_{suffix}"]
                                                         - out[f"latency/base_ms_{suffix}"]) / out[f"latency/base_ms_{suffix}"]
    return out


def merged_scores(parts, merged, test: dict[str, float]) -> dict[str, float]:
    """test/<primary>_merged and merge/<primary>_delta: the merged copy on the whole test split."""
    primary = M.primary_test(parts.cfg.task.scorer if parts.generative else None)
    scores, _ = parts.evaluate(merged, parts.test, "test")
    name = primary.split("/", 1)[1]
    return {f"test/{name}_merged": scores[primary], f"merge/{name}_delta": scores[primary] - test[primary]}


def measure(parts, model, test: dict[str, float], cfg) -> tuple[dict[str, float], dict[str, str]]:
    """Every deploy metric the config asks for, and the tag `merge` saying why a method has no merged figures."""
    metrics: dict[str, float] = {}
    merged, why = merged_copy(model) if (cfg.deploy.latency or cfg.deploy.merged_test) else (None, "")
    if cfg.deploy.latency:
        metrics.update(latency(parts, model, merged, cfg))
    if cfg.deploy.merged_test and merged is not None:
        metrics.update(merged_scores(parts, merged, test))
    return metrics, ({"merge": why} if why else {"merge": "merged"} if merged is not None else {})
