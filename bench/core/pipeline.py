"""One run, the straight line, read top to bottom:

    task data -> backbone (+ quantization) [-> forgetting: before] -> method -> train (+ periodic validation)
      -> test once [-> forgetting: after] -> save [-> deployment: latency, merged copy]

The task's kind picks the path: classification (a new head, argmax scores) or generation (a causal or seq2seq LM
by the backbone's family, response-only loss, scored on greedy generations: bench/core/generation.py).

`build(cfg)` makes a run's parts (used by `run`, sweeps and tests alike); `run(cfg, ...)` measures one run and
returns its metrics. Where they go is the caller's business (bench/orchestration/worker.py logs them to MLflow):
this module takes a `log` object with `log_metrics(metrics, step)` and `log_points(points)` and nothing else.
The config arrives validated (bench/orchestration/validate.py); nothing here checks it again.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from bench.core import deploy, generation, methods, models, tasks, train
from bench.core import forgetting as forgetting_module
from bench.core import metrics as M
from bench.core.measure import Meter, grad_bytes, weights_bytes
from bench.errors import BenchError
from bench.files import atomic_path


class Log(Protocol):
    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None: ...
    def log_points(self, points: list[tuple[int, dict[str, float]]]) -> None: ...


@dataclass
class Parts:
    """What one run is made of, built from its config."""
    data: tasks.TaskData
    tokenizer: object
    model: torch.nn.Module
    train: object          # tokenized datasets.Dataset splits
    validation: object
    test: object
    device: torch.device
    family: str = "encoder"              # the backbone's family (bench/core/models.py: family)
    forget_base: object = None           # what the base model gave on the forgetting sample (build(forgetting=True))
    cfg: object = None

    @property
    def generative(self) -> bool:
        return self.data.kind == "generation"

    def evaluate(self, model, ds, split: str):
        """(scores named val/* or test/*, per-example frame) of `model` on a tokenized split."""
        t = self.cfg.train
        if self.generative:
            return generation.evaluate(model, ds, self.tokenizer, family=self.family, scorer=self.cfg.task.scorer,
                                       answers=self.data.label_names, batch_size=t.eval_batch_size,
                                       max_new_tokens=self.cfg.task.max_new_tokens, device=self.device, split=split,
                                       collate_fn=self.collate)
        return train.evaluate(model, ds, self.tokenizer, t.eval_batch_size, self.data.num_labels, self.device,
                              split=split)

    @property
    def collate(self):
        return generation.collate(self.tokenizer) if self.generative else None

    @property
    def select(self) -> str:
        """The validation score selection reads: val/accuracy, or val/chrf for chrf_bleu tasks."""
        return generation.SELECT[self.cfg.task.scorer] if self.generative else M.VAL_ACCURACY


@dataclass
class Outcome:
    """What `run` measured: the metrics under their registry names (bench/core/metrics.py), tags, and where the
    test predictions were written."""
    metrics: dict[str, float]
    tags: dict[str, str] = field(default_factory=dict)
    predictions: Path | None = None


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise BenchError("device: cuda requested but no CUDA device is available; valid here: auto, cpu")
    return torch.device(name)


def build(cfg, device: torch.device | None = None, *, forgetting: bool = False) -> Parts:
    """The run's data, tokenizer and model under its method, seeded so that only the method differs. With
    forgetting, the base model's figures on the forgetting sample are taken before the method is added."""
    device = device or pick_device(cfg.device)
    seed = int(cfg.seed)
    data = tasks.load(cfg.task, seed)
    _seed(seed)  # the new head's init depends on the seed only, not on the method
    model, tokenizer = models.load(cfg.model, cfg.quant, data.num_labels, device, data.kind)
    family = models.family(model.config)
    base = forgetting_module.before(model, tokenizer, data.kind, family, device) if forgetting else None
    _seed(seed)  # set again right before the method is built, so the seed reaches adapter initialization
    model = methods.apply(model, cfg.method, cfg.model, methods.task_type(data.kind, family))
    return Parts(data, tokenizer, model, *tokenize(cfg, data, tokenizer, family), device, family, base, cfg)


def tokenize(cfg, data: tasks.TaskData, tokenizer, family: str):
    """(train, validation, test): the task's splits as the run's tokenizer and settings encode them."""
    gen = data.kind == "generation"
    return tasks.tokenize(data, tokenizer, cfg.train.max_length, family=family,
                          template=cfg.task.template if gen else "alpaca",
                          max_new_tokens=cfg.task.max_new_tokens if gen else 0)


def run(cfg, out_dir: Path, device: torch.device, log: Log, *, on_eval=None) -> Outcome:
    """Build, train with periodic validation, test once, save; return every end-of-run metric."""
    started = time.perf_counter()  # time/total_s: wall-clock from here (before data and model load) to saved ckpt
    out_dir = Path(out_dir)
    meter = Meter(device)
    parts = build(cfg, device, forgetting=bool(cfg.get("forgetting", True)))
    model = parts.model
    trainable, total = methods.count_parameters(model)
    log.log_metrics({M.PARAMS_TRAINABLE: trainable, M.PARAMS_TOTAL: total})  # a run that fails later has them too

    metrics = train.fit(model, parts.train, parts.validation, parts.tokenizer, cfg.train, seed=int(cfg.seed),
                        num_labels=parts.data.num_labels, device=device, meter=meter, on_eval=on_eval,
                        log=log.log_points, evaluate_fn=parts.evaluate, collate=parts.collate, select=parts.select)
    # the one test evaluation: the final (train.select) weights on the test split, after all selection
    meter.start("eval")
    test, predictions = parts.evaluate(model, parts.test, "test")
    meter.stop("eval")
    if parts.forget_base is not None:  # forget/*: bench/core/forgetting.py (outside the train and eval clocks)
        metrics.update(forgetting_module.metrics(parts.forget_base, model, parts.tokenizer, parts.data.kind,
                                                 parts.family, device))
    ckpt_bytes = methods.save(model, cfg.method, out_dir / "ckpt")
    metrics.update(test)
    metrics.update({
        M.PARAMS_TRAINABLE: trainable,                       # parameters with requires_grad during training
        M.PARAMS_TOTAL: total,                               # see methods.count_parameters
        M.PARAMS_TRAINABLE_PCT: 100.0 * trainable / total,
        M.CKPT_BYTES: ckpt_bytes,                            # see methods.save
        M.MEM_WEIGHTS: weights_bytes(model),                 # see bench/core/measure.py
        M.MEM_GRAD: grad_bytes(model),
        M.TIME_TRAIN: meter.seconds["train"],                # training steps only: no evaluation, no store I/O
        M.TIME_EVAL: meter.seconds["eval"],                  # all periodic evaluations + the test evaluation
        M.TIME_TOTAL: time.perf_counter() - started,
        M.MEM_PEAK_TRAIN: meter.peak_bytes["train"],         # see bench/core/measure.py
        M.MEM_PEAK_EVAL: meter.peak_bytes["eval"],
        M.TRAIN_EXAMPLES: len(parts.train),                  # after task.train_per_class / max_train_samples
    })
    if device.type == "cuda":
        metrics[M.MEM_PEAK_TRAIN_RESERVED] = meter.peak_reserved_bytes["train"]
        metrics[M.MEM_PEAK_EVAL_RESERVED] = meter.peak_reserved_bytes["eval"]
    tags = {"mem_source": "cuda_allocated" if device.type == "cuda"
            else ("rss_phase_peak" if meter.rss_resettable else "rss_lifetime_peak")}
    # plan/*: the estimate from the config alone, logged next to mem/* (after time/total_s and every measurement)
    planned, plan_tags = _plan(cfg, parts)
    metrics.update(planned)
    tags.update(plan_tags)
    path = write_predictions(predictions, out_dir)
    # latency/*, test/accuracy_merged, merge/*: the trained model as deployed (bench/core/deploy.py), after the test
    # evaluation and outside every time/* figure
    deployed, deploy_tags = deploy.measure(parts, model, test, cfg)
    metrics.update(deployed)
    tags.update(deploy_tags)
    return Outcome(metrics, tags, path)


def _plan(cfg, parts: Parts) -> tuple[dict[str, float], dict[str, str]]:
    """plan/*: bench/core/plan.py's estimate of this job (from its config on the meta device) for its longest
    training batch on its device; tag plan_activation: trace or formula. An estimate that fails costs the run
    nothing: no plan/* metrics, the reason in the tag plan_error."""
    from bench.core import plan
    from bench.fmt import error_line
    targets = (parts.train["labels"] if parts.generative and parts.family == "encoder-decoder" else None)
    try:
        setting = plan.run_setting(cfg, train_lengths=[len(x) for x in parts.train["input_ids"]],
                                   target_lengths=None if targets is None else [len(x) for x in targets],
                                   num_labels=parts.data.num_labels, pad_token_id=parts.tokenizer.pad_token_id,
                                   device=parts.device.type)
        estimate = plan.estimate(cfg, setting)
    except Exception as e:  # noqa: BLE001  an estimate must never fail the run it sits beside
        return {}, {"plan_error": error_line(e)}
    return plan.metrics(estimate), {"plan_activation": estimate.activation_source}


def write_predictions(predictions, out_dir: Path) -> Path:
    """The test predictions as out_dir/predictions/test.parquet, written atomically: classification: index, label,
    prediction; generation: index, reference, generation, score (+ label, prediction for label_match)."""
    path = Path(out_dir) / M.PREDICTIONS_ARTIFACT
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        predictions.to_parquet(tmp, index=False)
    return path


def _seed(seed: int) -> None:
    from transformers import set_seed
    set_seed(seed)  # python, numpy and torch (all devices)
