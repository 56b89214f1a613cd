"""Every metric a run logs to MLflow, declared once in bench/core/metrics.yaml: name, unit, phase, direction and a
one-line definition.

The registry (`REGISTRY`, name -> `Metric`) is the public interface; the README's table *What every run records in
MLflow* repeats its names with longer definitions (tests/test_metrics.py holds the two together). The registry is
data, so it lives in a data file: one entry per metric, keyed by the name of its module constant, read once at import
(`load`) and checked there (an unknown field, unit, phase or direction, a duplicate key or name: ValueError naming
metrics.yaml and the entry). Each key becomes a module constant (`VAL_ACCURACY == "val/accuracy"`), set through
globals(), so editors and type checkers do not see the constants: grep for a constant or a name leads to
metrics.yaml (the declaration) and to where it is measured (bench/core/train.py, bench/core/measure.py,
bench/core/methods, bench/orchestration/worker.py) and read. The groups other modules use (VAL_PERIODIC, TEST,
HISTORY, RUN, COSTS, MULTITASK) are derived from the registry, never listed by hand.

Protocol: selection (periodic evaluation, best step, pruning, sweep objectives) uses the validation split
(`val/*`); the test split is scored once, at the end of a run (`test/*`).
"""
from __future__ import annotations

import re
from dataclasses import MISSING, dataclass, fields
from pathlib import Path

import yaml

UNITS = ("", "bytes", "s", "count", "step", "tokens", "%", "tokens/s", "samples/s", "ms")   # "": a plain number
# validation / test: scores on that split; train: the training loop's own figures; run: what the run cost
# (memory, time, checkpoint, parameters, throughput), measured on the run itself, not on held-out data
# forgetting: on a fixed text sample no task uses; deployment: the trained model's inference cost, after the test
# multitask: several runs' adapters on one base (python -m bench.multitask), logged on its parent run and on each
# task's run afterwards: no single run reports them (run_names, RUN and the sweep objectives leave them out)
PHASES = ("validation", "test", "train", "run", "forgetting", "deployment", "multitask")
DIRECTIONS = ("max", "min", None)   # which way is better; None: neither (a step, a count, a reference size)
# the kinds of run: a classification task, or a generative task by its scorer (bench/core/generation.py: SCORERS)
RUN_KINDS = ("classification", "label_match", "chrf_bleu")
VAL_PREFIX, TEST_PREFIX = "val/", "test/"   # the names of the validation and the test scores
OLD_VAL_PREFIX = "eval/"   # the validation scores' names before the validation/test protocol (run key version 2)

# per-example predictions of the one test evaluation: a Parquet artifact of every finished run, columns
# `index` (the example's row in the task's whole test split), `label` and `prediction` (class ids)
PREDICTIONS_ARTIFACT = "predictions/test.parquet"

DECLARATIONS = Path(__file__).with_name("metrics.yaml")


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
    runs: tuple = RUN_KINDS  # the kinds of run that log it (RUN_KINDS)
    merged_only: bool = False  # logged only by methods peft can merge (bench/core/deploy.py: merged_copy)

    def __post_init__(self):
        prefix = {"validation": VAL_PREFIX, "test": TEST_PREFIX}.get(self.phase)
        problems = []
        if not isinstance(self.name, str) or not self.name:
            problems.append(f"name {self.name!r} is not a non-empty string")
        elif prefix and not self.name.startswith(prefix):
            problems.append(f"name {self.name!r} does not start with {prefix!r} (phase {self.phase})")
        for field, allowed in (("unit", UNITS), ("phase", PHASES), ("direction", DIRECTIONS)):
            if getattr(self, field) not in allowed:
                problems.append(f"{field} {getattr(self, field)!r} is not one of {allowed}")
        if not isinstance(self.definition, str) or not self.definition or "\n" in self.definition:
            problems.append(f"definition {self.definition!r} is not one non-empty line")
        if (not isinstance(self.runs, (list, tuple)) or not self.runs
                or any(kind not in RUN_KINDS for kind in self.runs)):
            problems.append(f"runs {self.runs!r} is not a non-empty list of {RUN_KINDS}")
        else:
            object.__setattr__(self, "runs", tuple(self.runs))
        for flag in ("history", "final", "cuda_only", "merged_only"):
            if not isinstance(getattr(self, flag), bool):
                problems.append(f"{flag} {getattr(self, flag)!r} is not true or false")
        if problems:
            raise ValueError(f"bad declaration of {self.name!r}: {'; '.join(problems)}")


_FIELDS = {f.name: f.default is MISSING for f in fields(Metric)}   # field -> required


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, but a key twice in one mapping is an error (PyYAML would keep the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load(path: Path = DECLARATIONS) -> dict[str, Metric]:
    """The declarations in path, in file order: module constant name -> Metric. ValueError naming the file and the
    entry on anything off: not YAML, a key twice, a key that is not a constant name (UPPER_CASE), an unknown or
    missing field, a value Metric refuses, a metric name declared twice."""
    try:
        with open(path, encoding="utf-8") as stream:
            data = yaml.load(stream, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not a valid declaration file: {e}") from None
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{path}: expected a mapping of constant names to metric entries")
    declared: dict[str, Metric] = {}
    by_name: dict[str, str] = {}
    for const, entry in data.items():
        where = f"{path}: entry {const}"
        if not isinstance(const, str) or not re.fullmatch(r"[A-Z][A-Z0-9_]*", const):
            raise ValueError(f"{where}: the key must be a module constant name (UPPER_CASE)")
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: expected a mapping of fields, got {entry!r}")
        problems = [*(f"unknown field {f!r}" for f in entry if f not in _FIELDS),
                    *(f"missing field {f!r}" for f, required in _FIELDS.items() if required and f not in entry)]
        if problems:
            raise ValueError(f"{where}: {'; '.join(problems)} (the fields: {', '.join(_FIELDS)})")
        try:
            metric = Metric(**entry)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        if metric.name in by_name:
            raise ValueError(f"{where}: name {metric.name!r} already declared by {by_name[metric.name]}")
        by_name[metric.name] = const
        declared[const] = metric
    return declared


def _register(declared: dict[str, Metric]) -> dict[str, Metric]:
    """Each declaration as a module constant (its name); the registry, name -> Metric, in declaration order."""
    _refuse_shadowing([c for c in declared if c in globals()])
    globals().update({const: m.name for const, m in declared.items()})
    return {m.name: m for m in declared.values()}


def _refuse_shadowing(constants: list[str]) -> None:
    if constants:
        raise ValueError(f"{DECLARATIONS}: entries {constants}: a name bench/core/metrics.py defines itself")


_DECLARED = load()
REGISTRY: dict[str, Metric] = _register(_DECLARED)


def run_names(kind: str, *, merged: bool = False, deploy: bool = True) -> tuple[str, ...]:
    """What a finished CPU run of this kind (RUN_KINDS) reports, in declaration order; merged: its method is one peft
    can merge (adds the merged_only figures); deploy: the run measured latencies (config deploy.latency)."""
    return tuple(n for n, m in REGISTRY.items() if m.final and not m.cuda_only and kind in m.runs
                 and m.phase != "multitask" and (merged or not m.merged_only)
                 and (deploy or not n.startswith("latency/")))


def run_kind(task_kind: str, scorer: str | None) -> str:
    """A run's kind (RUN_KINDS): classification, or a generative task's scorer."""
    return "classification" if task_kind == "classification" else str(scorer)


def names(**where) -> tuple[str, ...]:
    """Registry names, in declaration order, of the metrics whose fields equal the given values."""
    return tuple(n for n, m in REGISTRY.items() if all(getattr(m, k) == v for k, v in where.items()))


# what bench/core/train.py: evaluate returns for a split: accuracy, macro-F1, mean loss
SCORES = {"val": (VAL_ACCURACY, VAL_F1_MACRO, VAL_LOSS), "test": (TEST_ACCURACY, TEST_F1_MACRO, TEST_LOSS)}


def primary_test(scorer: str | None) -> str:
    """The task's primary test score: test/chrf for chrf_bleu tasks, else test/accuracy."""
    return TEST_CHRF if scorer == "chrf_bleu" else TEST_ACCURACY
# reported at every periodic evaluation (pruning sees these)
VAL_PERIODIC = names(phase="validation", history=True)
# the one test evaluation of the final (selected) model
TEST = names(phase="test")
# logged over steps by bench/core/train.py: fit (the others are logged once, at the last step)
HISTORY = names(history=True)
# what a finished run of any kind may report (CUDA runs add the cuda_only figures); run_names: one kind's
RUN = tuple(n for n in names(final=True, cuda_only=False) if REGISTRY[n].phase != "multitask")
# the inference cost of the trained model (bench/core/deploy.py)
DEPLOYMENT = names(phase="deployment")
# several adapters on one base (bench/core/multitask.py): the parent run's figures and each task's switched score
MULTITASK = names(phase="multitask")
# costs a sweep may minimize: measured on the run itself, not on held-out data, on every device
COSTS = names(phase="run", direction="min", cuda_only=False)

# nor a name defined after the registry (a group would replace the constant)
_refuse_shadowing([c for c, m in _DECLARED.items() if globals()[c] is not m.name])
