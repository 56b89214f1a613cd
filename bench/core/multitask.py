"""Several tasks' adapters on one base model: switching, cross-talk, load time and memory (python -m bench.multitask).

Each task's run trained one adapter of the same peft method on the same backbone and saved it
(bench/core/methods: save). `measure` loads the base once, attaches every adapter with peft's public API
(`PeftModel.from_pretrained(base, ckpt, adapter_name=task)` for the first, `add_adapter` + `load_adapter` for the
others), then for
each task switches to it (`set_adapter`) and scores its test split with the pipeline's own evaluation
(bench/core/pipeline.py: Parts.evaluate), and compares with the same checkpoint loaded alone on a fresh base the way
a user reloads it (methods.reload): predictions must be identical, and the largest logit difference is recorded.
The metric definitions are in bench/core/metrics.yaml (phase multitask); the README's *Multi-task adapters* repeats
them.

Heads. A classifier's head trains with the adapter (peft `modules_to_save`), and peft keeps one copy of it per
adapter (ModulesToSaveWrapper.modules_to_save[adapter]), made from the base model's head, which has the first task's
size. A task with another number of classes (trec 6, rotten_tomatoes 2) gets an empty head of its own size before
its weights are loaded (`fit_heads`: the one peft internal used here, bench/private_apis.py: PEFT_MODULES_TO_SAVE),
and switching to it also sets the model's num_labels, which a sequence classifier's loss reads (`activate`).
Language models (generative tasks) have no head.

Mixed batches: one forward whose rows name different adapters (peft `adapter_names=`), compared row by row with
each row's adapter switched in, on the same padded batch. Rows of heads of different sizes cannot share one logits
tensor, so only tasks whose heads have one size are mixed (the largest such group). peft 0.21 mixes LoRA only: it
refuses DoRA and AdaLoRA, and drops adapter_names silently for IA3, LoHa, bottleneck adapters and prompt-style
methods (every row then runs under the active adapter, which `mixed_batch` detects); the tag `mixed_batch` says
which tasks were mixed, or why none were.
"""
from __future__ import annotations

import copy
import gc
import itertools
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench.core import deploy, methods, models, pipeline, tasks
from bench.core import metrics as M
from bench.core.measure import Meter, weights_bytes
from bench.fmt import error_line

MIXED_ROWS = 4   # test examples per task in the mixed-adapter batch


@dataclass
class Adapter:
    """One task's trained adapter: the config its run trained under and the checkpoint the run saved."""
    cfg: object
    ckpt: Path

    @property
    def name(self) -> str:
        return str(self.cfg.task.name)


@dataclass
class Outcome:
    metrics: dict[str, float]                                            # the parent run's multitask/* figures
    per_task: dict[str, dict[str, float]] = field(default_factory=dict)  # each task's run: its switched score
    tags: dict[str, str] = field(default_factory=dict)                   # the parent run's: mixed_batch
    task_tags: dict[str, dict[str, str]] = field(default_factory=dict)   # each task's run: equal, max logit diff


@dataclass
class Comparison:
    """One task on the shared base against its adapter alone (see compare)."""
    metric: str           # multitask/test_accuracy_switched, or multitask/test_chrf_switched
    switched: float       # the task's primary test score with its adapter switched in
    equal: bool           # identical test predictions (classes, or generations)
    diff: float           # the largest |logit| difference on the test split
    full_bytes: int       # ckpt/bytes of a full fine-tuned checkpoint of the base with this task's head


def measure(adapters: list[Adapter], device: torch.device) -> Outcome:
    """Every multitask/* figure of these adapters (2 or more, one peft method, one backbone), in this order: memory
    first (base, then adapters), so that nothing loaded for the comparisons counts in it."""
    cfg, first = adapters[0].cfg, adapters[0].name
    data = {a.name: tasks.load(a.cfg.task, int(a.cfg.seed)) for a in adapters}
    source = models.config_source(cfg.model)
    if source is not None:   # the model class's code, imported before the memory figures (its first load would)
        models.meta_model(source, bool(cfg.model.trust_remote_code), data[first].kind)
    meter = Meter(device)
    before = meter.current_bytes()
    base, tokenizer = models.load(cfg.model, cfg.quant, data[first].num_labels, device, data[first].kind)
    loaded = meter.current_bytes()
    base_bytes = weights_bytes(base)
    family = models.family(base.config)
    model, load_s = attach(base, adapters, data)
    attached = meter.current_bytes()
    parts = {a.name: task_parts(a.cfg, data[a.name], tokenizer, model, device, family) for a in adapters}
    switch_ms, switch_iqr = switch_latency(model, list(parts), int(cfg.deploy.repeats), int(cfg.deploy.warmup))
    results = {a.name: compare(model, parts[a.name], a) for a in adapters}
    mixed, why = mixed_batch(model, parts)
    metrics = {M.MULTITASK_TASKS: len(adapters), M.MULTITASK_SWITCH_MS: switch_ms,
               M.MULTITASK_SWITCH_IQR_MS: switch_iqr, M.MULTITASK_LOAD_S: statistics.median(load_s),
               M.MULTITASK_ADAPTERS_BYTES: sum(methods.checkpoint_bytes(a.ckpt) for a in adapters),
               M.MULTITASK_BASE_BYTES: base_bytes,
               M.MULTITASK_FULL_MODELS_BYTES: sum(r.full_bytes for r in results.values()),
               M.MULTITASK_RSS_BASE_BYTES: loaded - before, M.MULTITASK_RSS_ADAPTERS_BYTES: attached - loaded,
               M.MULTITASK_MAX_ABS_LOGIT_DIFF: max(r.diff for r in results.values()),
               M.MULTITASK_PREDICTIONS_EQUAL: float(all(r.equal for r in results.values()))}
    if mixed is not None:
        metrics[M.MULTITASK_MIXED_BATCH_MAX_ABS_DIFF] = mixed
    return Outcome(metrics, {name: {r.metric: r.switched} for name, r in results.items()}, {"mixed_batch": why},
                   {name: {"multitask.predictions_equal": str(r.equal).lower(), "multitask.max_abs_logit_diff":
                           f"{r.diff:g}"} for name, r in results.items()})


def task_parts(cfg, data: tasks.TaskData, tokenizer, model, device: torch.device, family: str) -> pipeline.Parts:
    """A task's tokenized splits and its pipeline evaluation, around the shared model."""
    return pipeline.Parts(data, tokenizer, model, *pipeline.tokenize(cfg, data, tokenizer, family), device, family,
                          cfg=cfg)


def attach(base, adapters: list[Adapter], data: dict) -> tuple[object, list[float]]:
    """(the base with every adapter attached under its task's name, the seconds each attach took): the first with
    PeftModel.from_pretrained, the others as load_adapter would add them (its config, inference mode), with heads of
    their own size (fit_heads), then load_adapter."""
    from peft import PeftConfig, PeftModel

    import bench.core.methods.bottleneck  # noqa: F401  registers the BOTTLENECK peft method
    seconds = []
    start = time.perf_counter()
    model = PeftModel.from_pretrained(base, adapters[0].ckpt, adapter_name=adapters[0].name)
    seconds.append(time.perf_counter() - start)
    for a in adapters[1:]:
        start = time.perf_counter()
        config = PeftConfig.from_pretrained(a.ckpt)
        config.inference_mode = True          # as load_adapter(is_trainable=False) sets it
        model.add_adapter(a.name, config)
        if data[a.name].kind == "classification":
            fit_heads(model, a.name, data[a.name].num_labels)
        model.load_adapter(a.ckpt, adapter_name=a.name)
        seconds.append(time.perf_counter() - start)
    model.eval()
    return model, seconds


def fit_heads(model, adapter: str, num_labels: int) -> None:
    """Give `adapter` heads of num_labels outputs where peft's copy of the base head has another size: the head
    module of this model class built for num_labels (meta device, then empty memory), for load_adapter to fill."""
    from peft.utils import ModulesToSaveWrapper
    base = model.get_base_model()
    config = copy.deepcopy(base.config)
    config.num_labels = num_labels
    with torch.device("meta"):
        shell = type(base)(config)
    for name, wrapper in base.named_modules():
        if not isinstance(wrapper, ModulesToSaveWrapper) or adapter not in wrapper.modules_to_save:
            continue
        copied, sized = wrapper.modules_to_save[adapter], shell.get_submodule(name)
        if [p.shape for p in copied.parameters()] != [p.shape for p in sized.parameters()]:
            device = next(copied.parameters()).device
            wrapper.modules_to_save[adapter] = sized.to_empty(device=device).requires_grad_(False)


def activate(model, parts: pipeline.Parts, adapter: str) -> None:
    """Switch to `adapter` for inference; a classifier's num_labels follows the task (its loss reads it)."""
    model.set_adapter(adapter, inference_mode=True)
    methods.regularize_active(model)
    if not parts.generative:
        base = model.get_base_model()
        base.config.num_labels = base.num_labels = parts.data.num_labels


def switch_latency(model, names: list[str], repeats: int, warmup: int) -> tuple[float, float]:
    """(median ms, interquartile range ms) of one set_adapter call, each call switching to the next adapter."""
    order = itertools.cycle(names)
    return deploy.timed({"switch": lambda: model.set_adapter(next(order), inference_mode=True)},
                        repeats, warmup)["switch"]


def compare(model, parts: pipeline.Parts, adapter: Adapter) -> Comparison:
    """The task's test score with its adapter switched in, against the same checkpoint alone on a fresh base."""
    activate(model, parts, adapter.name)
    switched, switched_predictions = parts.evaluate(model, parts.test, "test")
    alone, full_bytes = load_alone(adapter, parts)
    _, alone_predictions = parts.evaluate(alone, parts.test, "test")
    diff = max_logit_diff(model, alone, parts)
    del alone
    gc.collect()
    primary = M.primary_test(parts.cfg.task.scorer if parts.generative else None)
    metric = {M.TEST_ACCURACY: M.MULTITASK_TEST_ACCURACY_SWITCHED, M.TEST_CHRF: M.MULTITASK_TEST_CHRF_SWITCHED}[primary]
    return Comparison(metric, switched[primary], switched_predictions.equals(alone_predictions), diff, full_bytes)


def load_alone(adapter: Adapter, parts: pipeline.Parts):
    """(the checkpoint on a freshly loaded base, as methods.reload loads it; the bytes of a full fine-tuned
    checkpoint of that base: what method=full saves for this task)."""
    cfg = adapter.cfg
    base, _ = models.load(cfg.model, cfg.quant, parts.data.num_labels, parts.device, parts.data.kind)
    with tempfile.TemporaryDirectory() as folder:
        base.save_pretrained(folder, safe_serialization=True)
        full_bytes = methods.checkpoint_bytes(Path(folder))
    alone = methods.reload(base, cfg.method, adapter.ckpt)
    alone.eval()
    return alone, full_bytes


def _batch(parts: pipeline.Parts, rows: list[dict]) -> dict[str, torch.Tensor]:
    """Tokenized test rows as one padded model input: a generative task's teacher-forced batch, or a classifier's
    inputs without labels."""
    if parts.generative:
        return parts.collate(rows, parts.device)
    keep = [{k: r[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in r} for r in rows]
    return {k: v.to(parts.device) for k, v in parts.tokenizer.pad(keep, return_tensors="pt").items()}


def _diff(a: torch.Tensor, b: torch.Tensor, batch: dict, parts: pipeline.Parts) -> float:
    """max |a - b| over the real positions (a classifier: every logit; an LM: every non-padding position)."""
    d = (a - b).abs()
    if parts.generative:
        real = batch["labels"] != -100 if parts.family == "encoder-decoder" else batch["attention_mask"].bool()
        d = d[real]
    return float(d.max()) if d.numel() else 0.0


@torch.no_grad()
def max_logit_diff(model, alone, parts: pipeline.Parts) -> float:
    """The largest |logit| difference between the switched model and the adapter alone on the test split."""
    rows, size, worst = parts.test.to_list(), int(parts.cfg.train.eval_batch_size), 0.0
    for i in range(0, len(rows), size):
        batch = _batch(parts, rows[i:i + size])
        worst = max(worst, _diff(model(**batch).logits, alone(**batch).logits, batch, parts))
    return worst


def _mixable(parts: dict[str, pipeline.Parts]) -> tuple[list[str], dict[str, int]]:
    """(the tasks one mixed batch can hold, the head sizes of the classifiers left out): generative tasks all;
    classifiers the largest group whose heads have one size (rows of different widths cannot share one logits
    tensor)."""
    sizes = {name: p.data.num_labels for name, p in parts.items() if not p.generative}
    if not sizes:
        return list(parts), {}
    size = Counter(sizes.values()).most_common(1)[0][0]
    return [name for name, n in sizes.items() if n == size], {name: n for name, n in sizes.items() if n != size}


@torch.no_grad()
def mixed_batch(model, parts: dict[str, pipeline.Parts]) -> tuple[float | None, str]:
    """(max |logit difference| between a mixed-adapter batch and each row under its own adapter, the tag
    mixed_batch: the tasks mixed, or why there is no mixed batch)."""
    group, left = _mixable(parts)
    heads = ", ".join(f"{name} {n} classes" for name, n in left.items())
    if len(group) < 2:
        return None, (f"not possible: no two heads have one size ({group[0]} {parts[group[0]].data.num_labels} "
                      f"classes, {heads}); rows of different widths cannot share one logits tensor")
    rows, names = [], []
    for name in group:
        test = parts[name].test
        taken = test.select(range(min(MIXED_ROWS, len(test)))).to_list()
        rows, names = rows + taken, names + [name] * len(taken)
    first = parts[group[0]]
    batch = _batch(first, rows)
    try:
        mixed = model(**batch, adapter_names=names).logits
    except (ValueError, TypeError, NotImplementedError, RuntimeError) as e:   # peft's word on what it cannot mix
        return None, f"not possible: peft: {error_line(e)}"
    active, unmixed = model.active_adapter, torch.equal(mixed, model(**batch).logits)
    worst = 0.0
    for name in group:
        activate(model, parts[name], name)
        own = model(**batch).logits
        mine = torch.tensor([n == name for n in names], device=own.device)
        worst = max(worst, _diff(mixed[mine], own[mine], {k: v[mine] for k, v in batch.items()}, first))
    if unmixed and worst > 0:   # the batch equals the active adapter's output, not the rows' own adapters'
        kind = model.peft_config[active].peft_type.value
        return None, f"not possible: peft ignores adapter_names for {kind}: every row ran under the active adapter"
    return worst, f"mixed: {', '.join(group)}" + (f"; left out, heads of another size: {heads}" if left else "")
