"""Checks on the composed config, run before any model or data is loaded and before any MLflow run exists.

`validate(cfg)` raises BenchError with one line: the key or file, what is wrong, the valid choices or range.
Cheap checks first (numbers, choices, here; the tracking store reachable within a few seconds); then the data
(every row of local files: validate_data.py) and the model and method (an empty meta-device instance built from
config.json, with peft building the method on it: validate_model.py).
`check_command(overrides, multirun)` composes every job of a command line with Hydra and validates each, so
`python -m bench` stops before the first job starts; the jobs it validated are not validated again.
"""
from __future__ import annotations

import importlib.util
import itertools

from omegaconf import OmegaConf

from bench.errors import BenchError
from bench.fmt import error_line
from bench.orchestration.validate_data import check_data, check_tracking  # noqa: F401  (public here too)
from bench.orchestration.validate_model import check_model  # noqa: F401

SELECT = ("last", "best")   # train.select: which weights are tested and saved (bench/core/train.py)
EXAMPLES = {"model.name_or_path": "a hub id or a local model folder with config.json",
            "task.path": "a csv / tsv / jsonl / parquet file", "task.dataset": "a hub dataset id or a local folder"}


def _positive(key: str, value, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
        raise BenchError(f"{key}: must be a number > 0, got {value!r}")


def _bool(key: str, value) -> None:
    if not isinstance(value, bool):
        raise BenchError(f"{key}: must be true or false, got {value!r}")


def _check_new_method_knobs(cfg) -> None:
    """Knobs of freeze, AdaLoRA and BOFT that need more than a positive number (the model-dependent range of
    method.trainable_layers is checked in check_model)."""
    m = cfg.method
    if "trainable_layers" in m:
        k = m.trainable_layers
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            raise BenchError(f"method.trainable_layers: must be an integer from 0 to the model's number of transformer "
                             f"blocks (num_hidden_layers), got {k!r}")
    if "total_step" in m:
        if cfg.train.max_steps is None:
            raise BenchError(f"train.max_steps: method={m.name} schedules over a step count fixed before the run; "
                             f"set train.max_steps (train.epochs alone is not supported for it)")
        if m.total_step != cfg.train.max_steps:
            raise BenchError(f"method.total_step: {m.total_step!r} differs from the run's "
                             f"train.max_steps={cfg.train.max_steps}; valid: leave it at ${{train.max_steps}}")
    factor = m.get("n_butterfly_factor", 1)
    if isinstance(factor, int) and factor > 1 and not _cuda_run(cfg):
        raise BenchError(f"method.n_butterfly_factor: {factor} needs peft's CUDA kernel (fbd_cuda); without CUDA "
                         "peft silently trains with 1; valid here: 1")


def _cuda_run(cfg) -> bool:
    if cfg.device == "cpu":
        return False
    import torch
    return torch.cuda.is_available()


def has_bitsandbytes() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def validate(cfg, *, tracking: bool = True, data: bool = True) -> None:
    """Raise BenchError naming the offending key, what is wrong and the valid choices or range. tracking / data:
    also check the store and the task's data (`python -m bench.plan` reads neither)."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        key = missing[0]
        raise BenchError(f"{key}: required but not set; pass {key}=... ({EXAMPLES.get(key, 'a value')})")
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise BenchError(f"device: unknown device {cfg.device!r}; valid: auto, cpu, cuda")
    if not isinstance(cfg.seed, int) or isinstance(cfg.seed, bool):
        raise BenchError(f"seed: must be an integer, got {cfg.seed!r}")
    _bool("rerun", cfg.get("rerun", False))
    _bool("train.isolate", cfg.train.isolate)
    _bool("model.trust_remote_code", cfg.model.trust_remote_code)
    _check_train(cfg.train)
    _check_method_and_task(cfg)
    if cfg.quant.name != "none":
        if cfg.method.kind == "full":
            raise BenchError(f"quant={cfg.quant.name} with method=full: quantized weights cannot be fine-tuned "
                             "directly; use quant=none for full fine-tuning, or a PEFT method (e.g. lora = QLoRA)")
        if not has_bitsandbytes():
            raise BenchError(f"quant={cfg.quant.name}: bitsandbytes is not installed (pip install bitsandbytes); "
                             "or use quant=none")

    if tracking:
        check_tracking(str(cfg.tracking.uri), cfg.tracking.experiment)
    _check_tags(cfg.tracking.get("tags"))

    from bench.core import methods, models, tasks  # torch, transformers, datasets: only past the cheap checks
    if cfg.method.kind not in methods.KINDS:
        raise BenchError(f"method.kind: unknown kind {cfg.method.kind!r}; valid: {', '.join(methods.KINDS)}")
    if cfg.model.source not in models.SOURCES:
        raise BenchError(f"model.source: unknown source {cfg.model.source!r}; valid: {', '.join(models.SOURCES)}")
    if cfg.task.loader not in tasks.LOADERS:
        raise BenchError(f"task.loader: unknown loader {cfg.task.loader!r}; valid: {', '.join(tasks.LOADERS)}")
    if data:
        check_data(cfg.task)
    check_model(cfg)


# tags the harness sets on every run itself (bench/tracking.py, resume.py, sweeps): tracking.tags may not set them
RESERVED_TAGS = ("method", "model", "task", "quant", "seed", "status", "run_key", "error", "study", "trial")
RESERVED_TAG_PREFIXES = ("mlflow.", "owner.", "worker.", "version.")


def _check_tags(tags) -> None:
    if tags is None:
        return
    if not OmegaConf.is_dict(tags):
        raise BenchError(f"tracking.tags: must be a mapping of tag names to values (e.g. "
                         f"+tracking.tags.campaign=nightly), got {tags!r}")
    for name, value in tags.items():
        if str(name) in RESERVED_TAGS or str(name).startswith(RESERVED_TAG_PREFIXES):
            raise BenchError(f"tracking.tags.{name}: the harness sets this tag itself; valid: any other name (not "
                             f"{', '.join(RESERVED_TAGS)}, {', '.join(p + '*' for p in RESERVED_TAG_PREFIXES)})")
        if OmegaConf.is_config(value) or value is None:
            raise BenchError(f"tracking.tags.{name}: must be a plain value (text or a number), got {value!r}")


def _check_train(t) -> None:
    for key in ("lr", "batch_size", "eval_batch_size", "max_length", "log_every", "max_grad_norm"):
        _positive(f"train.{key}", t[key])
    _positive("train.eval_every", t.eval_every, allow_none=True)
    _positive("train.threads", t.threads, allow_none=True)
    if t.max_steps is None and t.epochs is None:
        raise BenchError("train.max_steps / train.epochs: both unset; set one to a number > 0")
    _positive("train.max_steps", t.max_steps, allow_none=True)
    _positive("train.epochs", t.epochs, allow_none=True)
    if not isinstance(t.warmup_ratio, (int, float)) or not 0 <= t.warmup_ratio < 1:
        raise BenchError(f"train.warmup_ratio: must lie in [0, 1), got {t.warmup_ratio!r}")
    if not isinstance(t.weight_decay, (int, float)) or t.weight_decay < 0:
        raise BenchError(f"train.weight_decay: must be a number >= 0, got {t.weight_decay!r}")
    if t.select not in SELECT:
        raise BenchError(f"train.select: unknown choice {t.select!r}; valid: {', '.join(SELECT)}")


def _check_method_and_task(cfg) -> None:
    for key in ("r", "alpha", "reduction_factor", "num_virtual_tokens", "init_r", "target_r", "block_size",
                "n_butterfly_factor", "n_frequency", "num_vectors", "vector_length", "topk"):
        if key in cfg.method:
            _positive(f"method.{key}", cfg.method[key])
    _check_new_method_knobs(cfg)
    if "dropout" in cfg.method and not (isinstance(cfg.method.dropout, (int, float))
                                        and 0 <= cfg.method.dropout < 1):
        raise BenchError(f"method.dropout: must lie in [0, 1), got {cfg.method.dropout!r}")
    for key in ("max_train_samples", "max_eval_samples", "max_test_samples"):  # larger than a split: clamped
        _positive(f"task.{key}", cfg.task[key], allow_none=True)
    _check_per_class(cfg.task)
    _check_deploy(cfg.get("deploy"))
    _check_generation(cfg.task)
    size = cfg.task.validation_size
    if size is not None and not (isinstance(size, int) and not isinstance(size, bool) and size >= 1
                                 or isinstance(size, float) and 0 < size < 1):
        raise BenchError(f"task.validation_size: must be a count >= 1 or a fraction in (0, 1), or null "
                         f"(10 % of train, at most 500), got {size!r}")


def _check_per_class(task) -> None:
    k = task.get("train_per_class")
    if k is None:
        return
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise BenchError(f"task.train_per_class: must be an integer >= 1 (examples per class) or null, got {k!r}")
    if task.get("kind", "classification") == "generation" and task.get("label_words") is None:
        raise BenchError(f"task.train_per_class: task {task.name} has no classes (generation without "
                         "task.label_words); valid here: null, or task.max_train_samples")
    if task.get("max_train_samples") is not None:
        raise BenchError(f"task.train_per_class={k} with task.max_train_samples={task.max_train_samples}: two ways "
                         "to cut the training split; set one of them, the other null")


def _check_deploy(deploy) -> None:
    if deploy is None:
        raise BenchError("deploy: missing; conf/config.yaml declares deploy.latency, merged_test, repeats, warmup")
    _bool("deploy.latency", deploy.latency)
    _bool("deploy.merged_test", deploy.merged_test)
    _positive("deploy.repeats", deploy.repeats)
    if not isinstance(deploy.warmup, int) or isinstance(deploy.warmup, bool) or deploy.warmup < 0:
        raise BenchError(f"deploy.warmup: must be an integer >= 0, got {deploy.warmup!r}")


def _check_generation(task) -> None:
    from bench.core.generation import SCORERS, TEMPLATES  # light: numpy, pandas, torch are imported later anyway
    kind = task.get("kind", "classification")
    if kind not in ("classification", "generation"):
        raise BenchError(f"task.kind: unknown kind {kind!r}; valid: classification, generation")
    if kind != "generation":
        return
    for key, valid in (("template", TEMPLATES), ("scorer", SCORERS)):
        if task.get(key) not in valid:
            raise BenchError(f"task.{key}: unknown {key} {task.get(key)!r}; valid: {', '.join(valid)}")
    _positive("task.max_new_tokens", task.get("max_new_tokens"))
    words = task.get("label_words")
    if words is not None and task.get("label_names") is not None and len(words) != len(task.label_names):
        raise BenchError(f"task.label_words: {len(words)} words for the {len(task.label_names)} classes "
                         f"{list(task.label_names)}; give one per class, in label_names' order")


# --- the whole command line -------------------------------------------------------------------------------

def _group_choice_error(e) -> str | None:
    """One line for Hydra's 'Could not find method/xyz' (it prints the options on several lines)."""
    missing = getattr(e, "missing_cfg_file", None)
    if not missing or "/" not in str(missing):
        return None
    group, name = str(missing).rsplit("/", 1)
    options = [o for o in getattr(e, "options", None) or [] if not o.startswith("_")]  # _splits: shared keys
    return f"{group}: unknown choice {name!r}; valid: {', '.join(sorted(options))}"


def check_command(overrides: list[str], multirun: bool) -> list[str]:
    """Compose every job the command line describes and validate it; return the error lines (empty: all good).

    The jobs that pass are recorded (mark_validated), so that execute() does not check them again. Returns an
    empty list, too, for what this pre-check does not model (another sweeper; a sweep without -m): Hydra then
    reports problems itself, and each job is validated when it starts.
    """
    return _check_command(overrides, multirun) or []


# --- one validation pass: the jobs check_command validated are not validated again ------------------------

VALIDATED_ENV = "BENCH_VALIDATED"   # the command's validated jobs, for a launcher's processes (joblib)
MAX_EXPORTED = 2000                 # above this many jobs the list stays in-process (an environment is ~128 KiB)
_validated: set[str] = set()


def fingerprint(cfg) -> str:
    """A job's composed config, as Hydra hands it to execute(), hashed."""
    import hashlib
    return hashlib.sha256(OmegaConf.to_yaml(cfg).encode()).hexdigest()[:16]


def mark_validated(cfgs) -> None:
    import os
    _validated.clear()
    _validated.update(fingerprint(c) for c in cfgs)
    os.environ.pop(VALIDATED_ENV, None)
    if 0 < len(_validated) <= MAX_EXPORTED:
        os.environ[VALIDATED_ENV] = ",".join(sorted(_validated))


def was_validated(cfg) -> bool:
    """True when this process's command already validated exactly this config."""
    import os
    fp = fingerprint(cfg)
    return fp in _validated or fp in os.environ.get(VALIDATED_ENV, "").split(",")


def _jobs(overrides: list[str], parsed, multirun: bool) -> list[list[str]]:
    """The jobs of a command line, as Hydra's basic sweeper splits them: the cartesian product of the swept
    values, in command-line order."""
    if not multirun:
        return [list(overrides)]
    axes: dict[str, list[str]] = {}
    for o in parsed:
        key = o.get_key_element()
        axes[key] = ([f"{key}={v}" for v in o.sweep_string_iterator()] if o.is_sweep_override()
                     else [f"{key}={o.get_value_element_as_str()}"])
    return [list(job) for job in itertools.product(*axes.values())]


def _hydra_error_line(e) -> str:
    """One line for an error Hydra raised while composing a job."""
    from hydra.errors import MissingConfigException
    if isinstance(e, MissingConfigException):
        return _group_choice_error(e) or error_line(e, with_type=False)
    line = " ".join(ln.strip() for ln in str(e).splitlines() if ln.strip())
    if e.__cause__ is not None and str(e.__cause__):
        line += f" ({error_line(e.__cause__, with_type=False)})"
    return line


# hydra/launcher choices of the `cluster` extra (README: Scaling out) -> (the module each needs, its distribution)
CLUSTER_LAUNCHERS = {"submitit_local": ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher"),
                     "submitit_slurm": ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher"),
                     "slurm": ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher"),
                     "ray": ("ray", "ray")}


def launcher_error(overrides: list[str]) -> str | None:
    """A cluster launcher chosen without its package installed: the line that names the extra installing it."""
    import importlib.util
    for o in overrides:
        key, _, name = o.lstrip("+").partition("=")
        if key == "hydra/launcher" and name in CLUSTER_LAUNCHERS:
            module, dist = CLUSTER_LAUNCHERS[name]
            if importlib.util.find_spec(module) is None:
                return (f"hydra/launcher={name}: needs {dist}, which is not installed; valid: "
                        "pip install -e '.[cluster]' (installs it), or hydra/launcher=basic / joblib")
    return None


def _check_command(overrides: list[str], multirun: bool) -> list[str] | None:
    checked = check_jobs(overrides, multirun)
    if checked is None:
        return None
    jobs, errors = checked
    if not errors:
        mark_validated(cfg for _, cfg in jobs)
    return errors


def check_jobs(overrides: list[str], multirun: bool, **checks) -> tuple[list[tuple[list[str], object]], list[str]] | None:
    """Compose every job of a command line (as Hydra's basic sweeper splits it) and validate each (`checks`: the
    keyword arguments of validate); return ([(job overrides, config)], error lines), an error every job shares said
    once, else with the first job it hits. None for what this pre-check does not model (another sweeper; a sweep
    without -m; range sweeps)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    missing = launcher_error(overrides)
    if missing:
        return [], [missing]
    if any(o.split("=", 1)[0].lstrip("+~") in ("hydra/sweeper",) for o in overrides):
        return None
    from bench import CONF_DIR
    failed: dict[str, list[str]] = {}  # error line -> the jobs that have it
    jobs: list = []
    composed = []  # (job, its config, or the line saying why it does not compose)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3", job_name="bench"):
            parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
            try:
                parsed = parser.parse_overrides(overrides)
            except HydraException as e:
                return [], [error_line(e, with_type=False)]
            if not multirun and any(o.is_sweep_override() for o in parsed):
                return None  # Hydra explains that a sweep needs -m
            if any(o.is_sweep_override() and not o.is_discrete_sweep() for o in parsed):
                return None  # range / interval sweeps: Hydra's sweeper says what it supports
            jobs = _jobs(overrides, parsed, multirun)
            swept = {o for job in jobs for o in job if sum(o in j for j in jobs) < len(jobs)}  # names a job
            for job in jobs:
                try:
                    composed.append((job, compose("config", overrides=list(job))))
                except HydraException as e:
                    composed.append((job, _hydra_error_line(e)))
            if all(not isinstance(cfg, str) and cfg.quant.name == "none" for _, cfg in composed):
                from bench.core import quant_backend
                quant_backend.hide_bitsandbytes()  # no job is quantized: never import bitsandbytes (peft would)
            for job, cfg in composed:
                line = cfg if isinstance(cfg, str) else None
                if line is None:
                    try:
                        validate(cfg, **checks)
                    except BenchError as e:
                        line = str(e)
                    except HydraException as e:
                        line = _hydra_error_line(e)
                if line is not None:
                    failed.setdefault(line, []).append(" ".join(o for o in job if o in swept))
    finally:
        GlobalHydra.instance().clear()
    ok = [(job, cfg) for job, cfg in composed if not isinstance(cfg, str)]
    if len(jobs) == 1:
        return ok, list(failed)
    lines = []
    for line, js in failed.items():  # an error every job shares is said once; else with the first job it hits
        more = f" and {len(js) - 1} more jobs" if len(js) > 1 else ""
        lines.append(line if len(js) == len(jobs) else f"[{js[0]}{more}] {line}")
    return ok, lines
