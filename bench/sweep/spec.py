"""Sweep definitions (`sweeps/*.yaml`): read, check, and turn into Optuna distributions, sampler and pruner.

Schema (README: Sweeps):
    study: name                      # optional; default: the file's stem
    overrides: [method=lora, ...]    # base run overrides, as on the `python -m bench` command line
    objective: {metric: val/accuracy, direction: maximize}   # a val/* metric or a cost (see OBJECTIVES);
                                     # direction defaults to the metric's own (DEFAULT_DIRECTION)
    objectives:                      # or several (multi-objective: a Pareto front, no pruner), not both
      - {metric: val/accuracy}
      - {metric: params/trainable}
    trials: 30                       # finished (COMPLETE + PRUNED) trials to reach; --trials overrides
    search_space:                    # name -> {type: categorical|int|float, ...}
      method.r: {type: categorical, choices: [2, 4, 8]}
      alpha_per_rank: {type: categorical, choices: [0.5, 1, 2, 4]}   # not a config key: a helper for derived
    derived:                         # config key -> product of searched names and numbers
      method.alpha: method.r * alpha_per_rank
    sampler: {type: TPESampler, seed: 0}      # any optuna.samplers class + its keyword arguments
    pruner: {type: MedianPruner, n_warmup_steps: 200}   # any optuna.pruners class; absent or null: no pruning
    importance: {type: FanovaImportanceEvaluator, seed: 0}   # any optuna.importance evaluator + its arguments
    plot: {x: method.r, y: method.alpha}      # axes of the objective plot (searched or derived keys)

Optuna 5 changed defaults that move results: TPE became multivariate with constant liar, TPE became the default
multi-objective sampler (NSGA-II before), PED-ANOVA the default importance evaluator (fANOVA before). A sweep
therefore names its sampler (PINNED fills TPE's two flags when a file leaves them out) and its importance evaluator
(DEFAULT_IMPORTANCE when a file names none), so a study samples and ranks the same under Optuna 4 and 5.
"""
from __future__ import annotations

import hashlib
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import yaml
from omegaconf import OmegaConf

from bench.core import metrics as M
from bench.errors import BenchError
from bench.fmt import error_line

# Optuna 5 changed TPE's defaults (multivariate, with constant liar); a sweep names them, so that a study samples the
# same under Optuna 4 and 5 (pyproject allows both): a file that leaves them out gets these
PINNED = {"TPESampler": {"multivariate": True, "constant_liar": True}}
KEYS = ("study", "overrides", "objective", "objectives", "trials", "search_space", "derived", "sampler", "pruner",
        "importance", "plot")
DEFAULT_IMPORTANCE = {"type": "FanovaImportanceEvaluator", "seed": 0}   # Optuna 4's default, named
SINGLE_OBJECTIVE_SAMPLERS = ("CmaEsSampler",)   # optuna.samplers that cannot take several objectives
PARAM_TYPES = ("categorical", "int", "float")
DIRECTIONS = ("maximize", "minimize")
# What a sweep may select on, from the registry (bench/core/metrics.py: the protocol): the validation metrics with a
# direction (one way is better), and the costs. Selection uses the validation split; the test split is scored
# once per run, after selection, so a test/* objective would select on test data. Costs are measured on the run
# itself. The periodic evaluation reports VAL_PERIODIC at each eval step: pruning needs one.
OBJECTIVES = (*(n for n in M.names(phase="validation") if M.REGISTRY[n].direction), *M.COSTS)
DEFAULT_OBJECTIVE = M.VAL_ACCURACY
# an objective's direction when the sweep file names none: the metric's own
DEFAULT_DIRECTION = {n: {"max": "maximize", "min": "minimize"}[M.REGISTRY[n].direction] for n in OBJECTIVES}


def check_objective(where: str, metric) -> None:
    """A valid objective, else a BenchError whose one line says why (a test metric; a renamed eval/* one)."""
    if metric in OBJECTIVES:
        return
    valid = f"valid: {', '.join(OBJECTIVES)}"
    if metric in M.TEST or str(metric).startswith(M.TEST_PREFIX):
        raise BenchError(f"{where}: {metric} is a test metric; sweeps select on validation (test data is scored "
                         f"once, after selection); {valid}")
    if str(metric).startswith(M.OLD_VAL_PREFIX):
        renamed = M.VAL_PREFIX + str(metric)[len(M.OLD_VAL_PREFIX):]
        what = (f"{metric} was renamed" if renamed in OBJECTIVES
                else f"{metric}: the {M.OLD_VAL_PREFIX}* metrics were renamed")
        hint = f" ({renamed})" if renamed in OBJECTIVES else f" ({M.VAL_PREFIX}*)"
        raise BenchError(f"{where}: {what}: periodic evaluation now runs on the validation split{hint}; {valid}")
    raise BenchError(f"{where}: {metric!r} is not a sweep objective (a {M.VAL_PREFIX}* metric or a cost); {valid}")


class NoStopGridSampler(optuna.samplers.GridSampler):
    """GridSampler without its study.stop() at grid exhaustion: that call only works inside study.optimize,
    and the sweep stops by its own count of finished trials (bench/sweep/study.py)."""

    def after_trial(self, study, trial, state, values) -> None:
        pass


@dataclass
class Sweep:
    path: Path
    study: str
    overrides: list[str]
    metric: str          # the (first) objective: what the pruner reads and a single-objective study selects on
    direction: str
    trials: int | None   # None: the command line must give --trials
    space: dict[str, optuna.distributions.BaseDistribution]
    raw_space: dict
    derived: dict[str, list[str | float]] = field(default_factory=dict)
    sampler: dict = field(default_factory=dict)
    pruner: dict | None = None
    plot: dict = field(default_factory=dict)
    helpers: set[str] = field(default_factory=set)   # searched names that are not config keys (set by check)
    objectives: list[tuple[str, str]] = field(default_factory=list)   # (metric, direction), the first = metric
    importance: dict = field(default_factory=lambda: dict(DEFAULT_IMPORTANCE))

    def __post_init__(self):
        if not self.objectives:
            self.objectives = [(self.metric, self.direction)]

    @property
    def multi(self) -> bool:
        """Several objectives: the study keeps a Pareto front, not one best trial, and nothing is pruned."""
        return len(self.objectives) > 1

    @property
    def metrics(self) -> list[str]:
        return [m for m, _ in self.objectives]

    @property
    def directions(self) -> list[str]:
        return [d for _, d in self.objectives]

    def run_overrides(self, params: dict) -> dict[str, object]:
        """The config values one trial runs with: searched config keys, then derived keys (in file order)."""
        values = {k: v for k, v in params.items() if k not in self.helpers}
        for key, factors in self.derived.items():
            values[key] = _tidy(math.prod(params[f] if isinstance(f, str) else f for f in factors))
        return values

    @property
    def searched_keys(self) -> list[str]:
        """Config keys a trial sets: searched ones, then derived ones."""
        return [k for k in self.space if k not in self.helpers] + list(self.derived)

    def definition(self, cli_overrides: list[str]) -> dict:
        """What makes a study: resuming with a different definition would mix incomparable trials."""
        objective = [list(o) for o in self.objectives] if self.multi else [self.metric, self.direction]
        return {"overrides": self.overrides + list(cli_overrides), "objective": objective,
                "search_space": self.raw_space, "derived": {k: " * ".join(map(str, v)) for k, v in
                                                             self.derived.items()},
                "sampler": self.sampler, "pruner": self.pruner}

    def fingerprint(self, cli_overrides: list[str]) -> str:
        return hashlib.sha256(json.dumps(self.definition(cli_overrides), sort_keys=True,
                                         default=str).encode()).hexdigest()[:16]

    def make_sampler(self, seed_offset: int = 0) -> optuna.samplers.BaseSampler:
        """The file's sampler; a seeded one gets seed + seed_offset so that workers and resumed invocations
        do not replay each other's random draws. Not GridSampler: its seed fixes the grid's order, which every
        process must share (its trials name cells by index)."""
        kwargs = dict(self.sampler)
        kind = kwargs.pop("type")
        if kwargs.get("seed") is not None and kind != "GridSampler":
            kwargs["seed"] = int(kwargs["seed"]) + seed_offset
        if kind == "GridSampler":
            grid = {name: list(d.choices) for name, d in self.space.items()}
            return _construct(NoStopGridSampler, f"{self.path}: sampler", grid, **kwargs)
        return _construct(getattr(optuna.samplers, kind), f"{self.path}: sampler", **kwargs)

    def make_pruner(self) -> optuna.pruners.BasePruner:
        if not self.pruner:
            return optuna.pruners.NopPruner()
        kwargs = dict(self.pruner)
        return _construct(getattr(optuna.pruners, kwargs.pop("type")), f"{self.path}: pruner", **kwargs)

    def make_importance(self):
        """The file's parameter-importance evaluator (optuna.importance), named, never Optuna's default."""
        kwargs = dict(self.importance)
        return _construct(getattr(optuna.importance, kwargs.pop("type")), f"{self.path}: importance", **kwargs)


def _construct(cls, where: str, *args, **kwargs):
    try:
        with warnings.catch_warnings():   # e.g. TPE's multivariate is "experimental": the file chose it
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return cls(*args, **kwargs)
    except (TypeError, ValueError) as e:
        raise BenchError(f"{where}: {cls.__name__}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}) "
                         f"rejected: {e}") from None


def _tidy(v):
    """16.0 -> 16, so derived integers read (and compose) as integers."""
    return int(v) if isinstance(v, float) and v.is_integer() else v


def _classes(module, base) -> list[str]:
    return sorted(n for n in dir(module) if isinstance(getattr(module, n), type)
                  and issubclass(getattr(module, n), base) and getattr(module, n) is not base)


def _distribution(where: str, spec) -> optuna.distributions.BaseDistribution:
    if not isinstance(spec, dict) or spec.get("type") not in PARAM_TYPES:
        raise BenchError(f"{where}: needs type: one of {', '.join(PARAM_TYPES)}; got {spec!r}")
    spec = dict(spec)
    kind = spec.pop("type")
    allowed = {"categorical": {"choices"}, "int": {"low", "high", "step", "log"},
               "float": {"low", "high", "step", "log"}}[kind]
    unknown = set(spec) - allowed
    if unknown:
        raise BenchError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; valid for {kind}: "
                         f"{', '.join(sorted(allowed))}")
    try:
        if kind == "categorical":
            choices = spec.get("choices")
            if not isinstance(choices, list) or not choices:
                raise ValueError("choices must be a non-empty list")
            return optuna.distributions.CategoricalDistribution(choices)
        if "low" not in spec or "high" not in spec:
            raise ValueError("low and high are required")
        cls = optuna.distributions.IntDistribution if kind == "int" else optuna.distributions.FloatDistribution
        if kind == "float":
            spec = {k: (float(v) if k in ("low", "high", "step") and v is not None else v) for k, v in spec.items()}
        return cls(**spec)
    except (TypeError, ValueError) as e:
        raise BenchError(f"{where}: {e}") from None


def _factors(where: str, expr, space) -> list[str | float]:
    factors = []
    for part in str(expr).split("*"):
        part = part.strip()
        if part in space:
            factors.append(part)
            continue
        try:
            factors.append(float(part))
        except ValueError:
            raise BenchError(f"{where}: {part!r} is neither a searched name nor a number; the expression is a "
                             f"product like 'method.r * alpha_per_rank'; searched: {', '.join(space)}") from None
    return factors


def _read(path: Path) -> dict:
    """The file as a mapping of known keys."""
    if not path.is_file():
        shipped = sorted(p.name for p in (Path(__file__).resolve().parents[2] / "sweeps").glob("*.yaml"))
        raise BenchError(f"{path}: no such sweep file; shipped: {', '.join(f'sweeps/{n}' for n in shipped)}")
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise BenchError(f"{path}: not valid YAML: {error_line(e, with_type=False)}") from None
    if not isinstance(doc, dict):
        raise BenchError(f"{path}: must be a mapping with keys {', '.join(KEYS)}")
    unknown = set(doc) - set(KEYS)
    if unknown:
        raise BenchError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}; valid: {', '.join(KEYS)}")
    return doc


def _one_objective(where: str, objective) -> tuple[str, str]:
    if not isinstance(objective, dict) or set(objective) - {"metric", "direction"}:
        raise BenchError(f"{where}: must be {{metric: METRIC, direction: maximize|minimize}}, got {objective!r}")
    metric = objective.get("metric", DEFAULT_OBJECTIVE)
    check_objective(f"{where}.metric", metric)
    direction = objective.get("direction", DEFAULT_DIRECTION[metric])
    if direction not in DIRECTIONS:
        raise BenchError(f"{where}.direction: {direction!r}; valid: {', '.join(DIRECTIONS)}")
    return metric, direction


def _objectives(path: Path, doc: dict) -> list[tuple[str, str]]:
    """`objective` (one) or `objectives` (a list of two or more, each metric once)."""
    if "objectives" not in doc:
        return [_one_objective(f"{path}: objective", doc.get("objective") or {})]
    if "objective" in doc:
        raise BenchError(f"{path}: objective and objectives: set one of them (objectives: a list, for several)")
    listed = doc["objectives"]
    if not isinstance(listed, list) or len(listed) < 2:
        raise BenchError(f"{path}: objectives: must list two or more {{metric, direction}} (one objective: "
                         f"objective: {{metric: ...}}), got {listed!r}")
    found = [_one_objective(f"{path}: objectives[{i}]", o) for i, o in enumerate(listed)]
    metrics = [m for m, _ in found]
    twice = sorted({m for m in metrics if metrics.count(m) > 1})
    if twice:
        raise BenchError(f"{path}: objectives: {', '.join(twice)} listed twice; each metric once")
    return found


def _importance(path: Path, doc: dict) -> dict:
    found = doc.get("importance")
    found = dict(DEFAULT_IMPORTANCE) if found is None else found
    valid = _classes(optuna.importance, optuna.importance.BaseImportanceEvaluator)
    if not isinstance(found, dict) or found.get("type") not in valid:
        raise BenchError(f"{path}: importance.type: {found!r}; valid: {', '.join(valid)}")
    return dict(found)


def _sampler_pruner(path: Path, doc: dict, space: dict, objectives: list) -> tuple[dict, dict | None]:
    metric = objectives[0][0]
    sampler, pruner = dict(doc.get("sampler") or {"type": "TPESampler"}), doc.get("pruner")
    for key, value in PINNED.get(sampler.get("type"), {}).items():
        sampler.setdefault(key, value)
    valid = _classes(optuna.samplers, optuna.samplers.BaseSampler)
    if not isinstance(sampler, dict) or sampler.get("type") not in valid:
        raise BenchError(f"{path}: sampler.type: {sampler!r}; valid: {', '.join(valid)}")
    not_grid = [n for n, d in space.items() if not isinstance(d, optuna.distributions.CategoricalDistribution)]
    if sampler["type"] == "GridSampler" and not_grid:
        raise BenchError(f"{path}: search_space.{not_grid[0]}: GridSampler needs every entry to be "
                         "type: categorical (the grid is their choices)")
    valid = _classes(optuna.pruners, optuna.pruners.BasePruner)
    if pruner is not None and (not isinstance(pruner, dict) or pruner.get("type") not in valid):
        raise BenchError(f"{path}: pruner.type: {pruner!r}; valid: {', '.join(valid)}, or null for none")
    if len(objectives) > 1 and sampler["type"] in SINGLE_OBJECTIVE_SAMPLERS:
        raise BenchError(f"{path}: sampler.type: {sampler['type']} takes one objective, the file lists "
                         f"{len(objectives)}; valid with several: TPESampler, NSGAIISampler, NSGAIIISampler, "
                         "RandomSampler, GridSampler")
    if pruner and len(objectives) > 1:
        raise BenchError(f"{path}: pruner: Optuna's pruners do not support multi-objective studies "
                         f"({len(objectives)} objectives); set pruner: null (each trial then trains its whole budget), "
                         "or keep one objective to prune")
    if pruner and metric not in M.VAL_PERIODIC:
        raise BenchError(f"{path}: pruner: needs an objective.metric the periodic evaluation reports "
                         f"({', '.join(M.VAL_PERIODIC)}); got {metric!r}; set pruner: null")
    return sampler, pruner


def load(path: str | Path) -> Sweep:
    """Read and check a sweep file on its own (check_keys then checks it against the composed config)."""
    path = Path(path)
    doc = _read(path)
    overrides = doc.get("overrides") or []
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise BenchError(f"{path}: overrides: must be a list of strings like 'method=lora'")
    objectives = _objectives(path, doc)
    metric, direction = objectives[0]

    raw_space = doc.get("search_space") or {}
    if not isinstance(raw_space, dict) or not raw_space:
        raise BenchError(f"{path}: search_space: must map at least one name to a distribution")
    space = {name: _distribution(f"{path}: search_space.{name}", spec) for name, spec in raw_space.items()}
    derived_raw = doc.get("derived") or {}
    if not isinstance(derived_raw, dict):
        raise BenchError(f"{path}: derived: must map config keys to products like 'method.r * alpha_per_rank'")
    derived = {key: _factors(f"{path}: derived.{key}", expr, space) for key, expr in derived_raw.items()}
    sampler, pruner = _sampler_pruner(path, doc, space, objectives)

    trials = doc.get("trials")
    if trials is None and sampler["type"] == "GridSampler":
        trials = math.prod(len(d.choices) for d in space.values())
    if trials is not None and (not isinstance(trials, int) or isinstance(trials, bool) or trials < 1):
        raise BenchError(f"{path}: trials: must be an integer >= 1, got {trials!r}")

    plot = doc.get("plot") or {}
    if not isinstance(plot, dict) or set(plot) - {"x", "y"}:
        raise BenchError(f"{path}: plot: must be {{x: KEY, y: KEY}} (y optional)")
    return Sweep(path=path, study=str(doc.get("study") or path.stem), overrides=overrides, metric=metric,
                 direction=direction, trials=trials, space=space, raw_space=raw_space, derived=derived,
                 sampler=sampler, pruner=pruner, plot=plot, objectives=objectives,
                 importance=_importance(path, doc))


def check_names(where: str, space: str, derived: str, names, factors: dict, config, valid: str) -> set[str]:
    """Searched `names` must be keys of `config` or feed a `factors` formula; derived targets must be keys and not
    searched too. `space` and `derived` are how the file spells the two blocks (a sweep file's `search_space.` /
    `derived.`, a method YAML's `search.space.` / `search.derived.`). Returns the helper names (searched, not keys)."""
    def exists(key: str) -> bool:
        return OmegaConf.select(config, key, default="<missing>") != "<missing>"

    feeds = {f for fs in factors.values() for f in fs if isinstance(f, str)}
    helpers = {name for name in names if not exists(name)}
    for name in names:
        if name in helpers and name not in feeds:
            raise BenchError(f"{where}: {space}{name}: not a key of the run's config and not used in "
                             f"{derived.rstrip('.')}; valid: {valid}")
    for key in factors:
        if not exists(key):
            raise BenchError(f"{where}: {derived}{key}: not a key of the run's config")
        if key in names:
            raise BenchError(f"{where}: {derived}{key}: is also in {space.rstrip('.')}; keep it in one place")
    return helpers


def check_keys(sweep: Sweep, config) -> None:
    """Against the composed base config: searched names must be config keys or feed `derived`, derived
    targets must be config keys, plot axes must be set by the trials."""
    sweep.helpers = check_names(sweep.path, "search_space.", "derived.", sweep.space, sweep.derived, config,
                                "a key such as method.r, method.alpha, train.lr, method.reduction_factor, "
                                "method.num_virtual_tokens")
    searched = sweep.searched_keys
    for axis in ("x", "y"):
        if axis in sweep.plot and sweep.plot[axis] not in searched:
            raise BenchError(f"{sweep.path}: plot.{axis}: {sweep.plot[axis]!r} is not set by the trials; valid: "
                             f"{', '.join(searched)}")
    if "x" not in sweep.plot:
        sweep.plot = dict(zip(("x", "y"), searched[:2]))
