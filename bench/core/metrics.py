"""Every metric a run logs to MLflow, declared once: name, unit, phase, direction and a one-line definition.

The registry (`REGISTRY`, name -> `Metric`) is the public interface; the README's table *What every run records in
MLflow* repeats its names with longer definitions (tests/test_metrics.py holds the two together). Each name is also
a module constant (`VAL_ACCURACY == "val/accuracy"`), so that grep leads from a name to where it is measured
(bench/core/train.py, bench/core/measure.py, bench/core/methods, bench/orchestration/worker.py) and where it is read.
The groups other modules use (VAL_PERIODIC, TEST, HISTORY, RUN, COSTS) are derived from the registry, never listed by
hand. Each metric is one `_declare` call assigned to its constant rather than a row of a data table, which would
have to create the constants through globals(), out of reach of editors and type checkers.

Protocol: selection (periodic evaluation, best step, pruning, sweep objectives) uses the validation split
(`val/*`); the test split is scored once, at the end of a run (`test/*`).
"""
from __future__ import annotations

from dataclasses import dataclass

UNITS = ("", "bytes", "s", "count", "step", "tokens", "%", "tokens/s", "samples/s")   # "": a plain number
# validation / test: scores on that split; train: the training loop's own figures; run: what the run cost
# (memory, time, checkpoint, parameters, throughput), measured on the run itself, not on held-out data
PHASES = ("validation", "test", "train", "run")
DIRECTIONS = ("max", "min", None)   # which way is better; None: neither (a step, a count, a reference size)
VAL_PREFIX, TEST_PREFIX = "val/", "test/"   # the names of the validation and the test scores
OLD_VAL_PREFIX = "eval/"   # the validation scores' names before the validation/test protocol (run key version 2)


@dataclass(frozen=True)
class Metric:
    name: str                # the MLflow metric name
    unit: str                # one of UNITS
    phase: str               # one of PHASES
    direction: str | None    # one of DIRECTIONS
    definition: str          # one line: exactly what the code measures
    history: bool = False    # also logged over steps (train.log_every, or each periodic evaluation)
    final: bool = True       # in the run's final metrics (Result.metrics, result.json); False: a step history only
    cuda_only: bool = False  # logged only by runs on a CUDA device

    def __post_init__(self):
        prefix = {"validation": VAL_PREFIX, "test": TEST_PREFIX}.get(self.phase)
        if (self.unit not in UNITS or self.phase not in PHASES or self.direction not in DIRECTIONS
                or "\n" in self.definition or not self.definition or (prefix and not self.name.startswith(prefix))):
            raise ValueError(f"bench/core/metrics.py: bad declaration {self}")


REGISTRY: dict[str, Metric] = {}


def _declare(name: str, unit: str, phase: str, direction: str | None, definition: str, **flags) -> str:
    if name in REGISTRY:
        raise ValueError(f"bench/core/metrics.py: {name} declared twice")
    REGISTRY[name] = Metric(name, unit, phase, direction, definition, **flags)
    return name


# periodic evaluation on the validation split (bench/core/train.py: fit, evaluate)
VAL_ACCURACY = _declare(
    "val/accuracy", "", "validation", "max", "fraction of validation examples whose argmax prediction is the label "
    "(scikit-learn), at each periodic evaluation (train.eval_every and the last step); final: the last one's",
    history=True)
VAL_F1_MACRO = _declare(
    "val/f1_macro", "", "validation", "max", "macro-F1 over all the task's classes (scikit-learn, zero_division=0) "
    "on the validation split, at each periodic evaluation; final: the last one's", history=True)
VAL_LOSS = _declare(
    "val/loss", "", "validation", "min", "mean cross-entropy per validation example, at each periodic evaluation; "
    "final: the last one's", history=True)
VAL_BEST_ACCURACY = _declare(
    "val/best_accuracy", "", "validation", "max", "the highest val/accuracy over the periodic evaluations")
VAL_BEST_STEP = _declare(
    "val/best_step", "step", "validation", None, "the step val/best_accuracy was reached at (the earliest on ties)")

# the one test evaluation of the final (selected) weights (bench/orchestration/worker.py, via bench/core/train.py: evaluate)
TEST_ACCURACY = _declare(
    "test/accuracy", "", "test", "max", "fraction of test examples whose argmax prediction is the label "
    "(scikit-learn), scored once after training on the weights train.select chose")
TEST_F1_MACRO = _declare(
    "test/f1_macro", "", "test", "max", "macro-F1 over all the task's classes (scikit-learn, zero_division=0) on "
    "the test split, scored once after training on the weights train.select chose")
TEST_LOSS = _declare(
    "test/loss", "", "test", "min", "mean cross-entropy per test example, scored once after training on the "
    "weights train.select chose")

# the training loop (bench/core/train.py: fit)
TRAIN_LOSS = _declare(
    "train/loss", "", "train", "min", "mean training loss over the last train.log_every steps (the last window "
    "may be shorter)", history=True)
TRAIN_LR = _declare(
    "train/lr", "", "train", None, "the learning rate the scheduler set after the step (linear warmup, then "
    "linear decay), every train.log_every steps", history=True, final=False)
TRAIN_STEPS = _declare(
    "train/steps", "count", "train", None, "optimizer steps trained: train.max_steps, else train.epochs × "
    "batches per epoch")
TRAIN_TOKENS = _declare(
    "train/tokens", "tokens", "train", None, "real (non-padding) input tokens in all training batches "
    "(the sum of their attention masks)")
TRAIN_SELECTED_STEP = _declare(
    "train/selected_step", "step", "train", None, "the step whose weights were tested and saved: the last step "
    "(train.select=last) or val/best_step (best)")

# memory (bench/core/measure.py; read in bench/core/train.py and bench/orchestration/worker.py)
MEM_PEAK_TRAIN = _declare(
    "mem/peak_train_bytes", "bytes", "run", "min", "peak during training steps of CUDA allocated memory, or on CPU "
    "of the whole process's resident set (VmHWM), reset at the start of every training segment")
MEM_PEAK_EVAL = _declare(
    "mem/peak_eval_bytes", "bytes", "run", "min", "peak during evaluations (validation and test) of CUDA allocated "
    "memory, or on CPU of the whole process's resident set (VmHWM), reset at the start of every evaluation")
MEM_PEAK_TRAIN_RESERVED = _declare(
    "mem/peak_train_reserved_bytes", "bytes", "run", "min", "peak of torch.cuda.memory_reserved() during training "
    "steps (cached blocks released before each segment)", cuda_only=True)
MEM_PEAK_EVAL_RESERVED = _declare(
    "mem/peak_eval_reserved_bytes", "bytes", "run", "min", "peak of torch.cuda.memory_reserved() during "
    "evaluations (cached blocks released before each segment)", cuda_only=True)
MEM_TRAIN_GROWTH = _declare(
    "mem/train_growth_bytes", "bytes", "run", "min", "mem/peak_train_bytes minus the memory in use right before "
    "the first step, model and data loaded (CPU: resident set; CUDA: allocated)")
MEM_WEIGHTS = _declare(
    "mem/weights_bytes", "bytes", "run", "min", "bytes of the trained model's parameters and buffers as stored "
    "(4-bit weights packed), each storage counted once")
MEM_GRAD = _declare(
    "mem/grad_bytes", "bytes", "run", "min", "bytes of one gradient per trainable parameter: trainable parameters "
    "× their element size")
MEM_OPTIMIZER = _declare(
    "mem/optimizer_bytes", "bytes", "run", "min", "bytes of every tensor in the optimizer's state after its first "
    "step (AdamW: two moments per trainable parameter and a step counter per parameter tensor)")

# time (bench/core/measure.py: Meter; bench/orchestration/worker.py)
TIME_TRAIN = _declare(
    "time/train_s", "s", "run", "min", "wall-clock seconds of training steps only (batch preparation, forward, "
    "backward, optimizer step); evaluation and store I/O excluded; CUDA synchronized")
TIME_EVAL = _declare(
    "time/eval_s", "s", "run", "min", "wall-clock seconds of all evaluations: the periodic validation ones and the "
    "one test evaluation")
TIME_TOTAL = _declare(
    "time/total_s", "s", "run", "min", "wall-clock seconds from the start of the run (before data and model load) "
    "to the saved checkpoint")

# checkpoint (bench/core/methods/__init__.py: save)
CKPT_BYTES = _declare(
    "ckpt/bytes", "bytes", "run", "min", "bytes on disk of the checkpoint's weight files and the config that "
    "reloads them (*.safetensors, *config.json), nothing else")

# parameters (bench/core/methods/__init__.py: count_parameters)
PARAMS_TRAINABLE = _declare(
    "params/trainable", "count", "run", "min", "parameters with requires_grad during training (4-bit weights "
    "counted unpacked; peft's frozen copy of the head left out)")
PARAMS_TOTAL = _declare(
    "params/total", "count", "run", None, "all parameters of the model as trained: backbone, head and added "
    "weights (4-bit weights counted unpacked; peft's frozen copy of the head left out)")
PARAMS_TRAINABLE_PCT = _declare(
    "params/trainable_pct", "%", "run", "min", "100 × params/trainable / params/total")

# throughput (bench/core/train.py: fit)
THROUGHPUT_TOKENS = _declare(
    "throughput/train_tokens_per_s", "tokens/s", "run", "max", "train/tokens / time/train_s")
THROUGHPUT_SAMPLES = _declare(
    "throughput/train_samples_per_s", "samples/s", "run", "max", "training examples in all training batches / "
    "time/train_s")


def names(**where) -> tuple[str, ...]:
    """Registry names, in declaration order, of the metrics whose fields equal the given values."""
    return tuple(n for n, m in REGISTRY.items() if all(getattr(m, k) == v for k, v in where.items()))


# what bench/core/train.py: evaluate returns for a split: accuracy, macro-F1, mean loss
SCORES = {"val": (VAL_ACCURACY, VAL_F1_MACRO, VAL_LOSS), "test": (TEST_ACCURACY, TEST_F1_MACRO, TEST_LOSS)}
# reported at every periodic evaluation (pruning sees these)
VAL_PERIODIC = names(phase="validation", history=True)
# the one test evaluation of the final (selected) model
TEST = names(phase="test")
# logged over steps by bench/core/train.py: fit (the others are logged once, at the last step)
HISTORY = names(history=True)
# what a finished run reports (CUDA runs add the cuda_only figures)
RUN = names(final=True, cuda_only=False)
# costs a sweep may minimize: measured on the run itself, not on held-out data, on every device
COSTS = names(phase="run", direction="min", cuda_only=False)

# per-example predictions of the one test evaluation: a Parquet artifact of every finished run, columns
# `index` (the example's row in the task's whole test split), `label` and `prediction` (class ids)
PREDICTIONS_ARTIFACT = "predictions/test.parquet"
