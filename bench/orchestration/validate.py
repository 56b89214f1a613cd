"""Checks on the composed config, run before any model or data is loaded and before any MLflow run exists.

`validate(cfg)` raises BenchError with one line: the key or file, what is wrong, the valid choices or range.
Cheap checks first (numbers, choices, the tracking store reachable within a few seconds); then the data
files (read, columns, labels) and the model's config.json (an empty meta-device instance: module names for
target_modules and head_modules, forward arguments for prompt-style methods).
`check_command(overrides, multirun)` composes every job of a command line with Hydra and validates each, so
`python -m bench` stops before the first job starts.
"""
from __future__ import annotations

import functools
import importlib.util
import itertools
from pathlib import Path

from omegaconf import OmegaConf

from bench.errors import BenchError
from bench.fmt import error_line

GROUPS = ("method", "model", "task", "quant")
SELECT = ("last", "best")   # train.select: which weights are tested and saved (bench/core/train.py)
TRACKING_TIMEOUT_S = 5
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


def validate(cfg) -> None:
    """Raise BenchError naming the offending key, what is wrong and the valid choices or range."""
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

    t = cfg.train
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
    size = cfg.task.validation_size
    if size is not None and not (isinstance(size, int) and not isinstance(size, bool) and size >= 1
                                 or isinstance(size, float) and 0 < size < 1):
        raise BenchError(f"task.validation_size: must be a count >= 1 or a fraction in (0, 1), or null "
                         f"(10 % of train, at most 500), got {size!r}")
    if cfg.train.select not in SELECT:
        raise BenchError(f"train.select: unknown choice {cfg.train.select!r}; valid: {', '.join(SELECT)}")

    if cfg.quant.name != "none":
        if cfg.method.kind == "full":
            raise BenchError(f"quant={cfg.quant.name} with method=full: quantized weights cannot be fine-tuned "
                             "directly; use quant=none for full fine-tuning, or a PEFT method (e.g. lora = QLoRA)")
        if not has_bitsandbytes():
            raise BenchError(f"quant={cfg.quant.name}: bitsandbytes is not installed (pip install bitsandbytes); "
                             "or use quant=none")

    check_tracking(str(cfg.tracking.uri), cfg.tracking.experiment)

    from bench.core import methods, models, tasks  # torch, transformers, datasets: only past the cheap checks
    if cfg.method.kind not in methods.KINDS:
        raise BenchError(f"method.kind: unknown kind {cfg.method.kind!r}; valid: {', '.join(methods.KINDS)}")
    if cfg.model.source not in models.SOURCES:
        raise BenchError(f"model.source: unknown source {cfg.model.source!r}; valid: {', '.join(models.SOURCES)}")
    if cfg.task.loader not in tasks.LOADERS:
        raise BenchError(f"task.loader: unknown loader {cfg.task.loader!r}; valid: {', '.join(tasks.LOADERS)}")
    check_data(cfg.task)
    check_model(cfg)


# --- data -------------------------------------------------------------------------------------------------

def check_data(task) -> None:
    """The data exist, have the text and label columns, and their labels fit the declared classes."""
    from bench.core import tasks
    if task.loader == "local":
        files = tasks.local_files(task)
        frames = {split: tasks.read_table(path, key) for split, (key, path) in files.items()}
        for split, df in frames.items():
            for key in ("text_column", "label_column"):
                if task[key] not in df.columns:
                    raise BenchError(f"task.{key}: column {task[key]!r} not in {files[split][1]}; "
                                     f"columns: {', '.join(map(str, df.columns))}")
        names = task.label_names
        if names is None:
            names = sorted({str(v) for v in frames["train"][task.label_column].tolist()})
        for split, df in frames.items():
            tasks._label_ids(df[task.label_column].tolist(), [str(n) for n in names], split)
    elif task.loader in ("trec", "rotten_tomatoes"):
        from bench.assets import asset_file
        asset_file(task.asset, task.file)  # hash-checked; a corrupted file is fetched again once, else AssetError
    elif task.loader == "hf":
        from datasets import get_dataset_split_names
        try:
            splits = get_dataset_split_names(str(task.dataset), task.config)
        except Exception as e:  # not found, offline, bad config name: datasets raises many types
            raise BenchError(f"task.dataset: cannot read the splits of {task.dataset!r}: "
                             f"{error_line(e, with_type=False)}") from e
        for key in ("train_split", "test_split", "validation_split"):
            if task[key] is not None and task[key] not in splits:
                raise BenchError(f"task.{key}: split {task[key]!r} not in {task.dataset}; valid: {', '.join(splits)}")


# --- model ------------------------------------------------------------------------------------------------

def config_source(model_cfg) -> str | None:
    """Where the model's config.json is read from: a folder or a hub id; None when not available cheaply."""
    from bench.core import models
    if model_cfg.source == "smollm2_gguf":
        from bench import assets
        folder = assets._smollm2_path()  # built once from the GGUF; before that, checked when it is built
        return str(folder) if assets._check_dir(folder) is None else None
    path = models.resolve_path(model_cfg)
    p = Path(path).expanduser()
    if p.exists() or model_cfg.source == "package" or path.startswith((".", "/", "~")):
        if not p.is_dir():
            raise BenchError(f"model.name_or_path: model folder not found: {path}")
        if not (p / "config.json").is_file():
            raise BenchError(f"model.name_or_path: no config.json in {path}; a model folder needs config.json, "
                             "the weights (*.safetensors) and the tokenizer files")
        return str(p)
    return path  # a hub id


@functools.cache
def meta_model(source: str, trust_remote_code: bool):
    """The sequence classifier built from config.json on the meta device: names and signatures, no weights."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except Exception as e:  # missing/garbled config.json, unknown model type, hub unreachable
        raise BenchError(f"model.name_or_path: cannot read the model config of {source}: "
                         f"{error_line(e, with_type=False)}") from e
    try:
        with torch.device("meta"):
            return AutoModelForSequenceClassification.from_config(config, trust_remote_code=trust_remote_code)
    except ValueError as e:
        raise BenchError(f"model.name_or_path: model type {config.model_type!r} has no sequence-classification "
                         f"class in transformers; {error_line(e, with_type=False)}") from e


def _linear_leaf_names(model) -> list[str]:
    import torch
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})


# peft methods whose layers refuse (or, OLoRA's init, mis-shape) transformers' Conv1D, GPT-2's projections, as of
# the peft range in pyproject.toml; tests/test_architectures.py trains every method on GPT-2 to keep this true
NO_CONV1D = {"BOFT": "BOFT", "HRA": "HRA", "LOHA": "LoHa", "LOKR": "LoKr", "OFT": "OFT"}


def _check_conv1d(method: str, pc, model, targeted) -> None:
    from transformers.pytorch_utils import Conv1D
    what = NO_CONV1D.get(pc.peft_type) or ("OLoRA's initialization" if getattr(pc, "init_lora_weights", None)
                                                == "olora" else None)
    if what is None:
        return
    conv = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n and isinstance(m, Conv1D)
                   and targeted(pc, n)})
    if conv:
        raise BenchError(f"method={method}: peft's {what} does not support the Conv1D layers of "
                         f"{type(model).__name__} ({', '.join(conv)}); valid here: lora, dora, rslora, pissa, ia3, "
                         "vera, fourierft, vblora, adalora, the adapters or a prompt method")


def _target_key(method_cfg) -> str:
    """The key a user sets for this method's target modules: the model YAML role it reads, else its own."""
    import re
    raw = OmegaConf.to_container(method_cfg, resolve=False).get("target_modules")
    m = re.fullmatch(r"\$\{model\.target_modules\.(\w+)\}", str(raw))
    return f"model.target_modules.{m.group(1)}" if m else "method.target_modules"


def _accepts(fn, arg: str) -> bool:
    import inspect
    return arg in inspect.signature(fn).parameters


def check_model(cfg) -> None:
    """config.json exists; head_modules and target_modules name modules of the model; prompt-style methods
    only on model classes that accept what peft feeds them (past_key_values / inputs_embeds)."""
    source = config_source(cfg.model)
    if source is None:
        return
    model = meta_model(source, bool(cfg.model.trust_remote_code))
    kind = type(model).__name__
    names = [n for n, _ in model.named_modules()]
    head = list(cfg.model.head_modules)
    if not any(part in head for n in names for part in n.split(".")):
        children = ", ".join(n for n, _ in model.named_children())
        raise BenchError(f"model.head_modules: {head} names no module of {kind}; its top-level modules: {children}")
    if cfg.method.kind in ("freeze", "bitfit"):
        from bench.core import methods
        methods.trainable_names(model, cfg.method, cfg.model)  # trainable_layers in range, blocks / biases found
    if cfg.method.kind != "peft":
        return
    from bench.core import methods
    try:
        pc = methods.peft_config(cfg.method, cfg.model)
    except BenchError:   # a key that is no field of peft's config class: names method.<key>
        raise
    except Exception as e:  # peft's config classes raise TypeError/ValueError for bad values
        raise BenchError(f"method={cfg.method.name}: peft rejects the config: "
                         f"{error_line(e, with_type=False)}") from e
    if pc.is_prompt_learning:
        backbone = getattr(model, model.base_model_prefix, model)
        if pc.peft_type == "PREFIX_TUNING":
            if not (_accepts(model.forward, "past_key_values") or _accepts(backbone.forward, "past_key_values")):
                raise BenchError(f"method={cfg.method.name}: prefix tuning needs a model that accepts "
                                 f"past_key_values; {kind} does not. Valid here: prompt, ptuning or a method that "
                                 "adapts weights (lora, ia3, adapter, ...)")
        elif not _accepts(model.forward, "inputs_embeds"):
            raise BenchError(f"method={cfg.method.name}: prompt tuning needs a model that accepts inputs_embeds; "
                             f"{kind} does not. Valid here: a method that adapts weights (lora, ia3, adapter, ...)")
        return
    target = getattr(pc, "target_modules", None)
    if target is None and "target_modules" in cfg.method:
        key = _target_key(cfg.method)
        from bench.core import architectures
        raise BenchError(f"{key}: no default for model type {model.config.model_type!r} (defaults exist for "
                         f"{', '.join(sorted(architectures.FAMILIES))}); set {key}=[...] to module names of {kind}: "
                         f"{', '.join(_linear_leaf_names(model))}")
    if target:
        from peft.tuners.tuners_utils import check_target_module_exists
        if not any(check_target_module_exists(pc, n) for n in names if n):
            shown = repr(sorted(target)) if isinstance(target, (set, list, tuple)) else f"'{target}'"
            raise BenchError(f"method.target_modules: {shown} matches no module of {kind}; valid names (linear "
                             f"layers): {', '.join(_linear_leaf_names(model))}, or a regex over the full module names")
        _check_conv1d(cfg.method.name, pc, model, check_target_module_exists)
        vector_length = getattr(pc, "vector_length", None)   # VB-LoRA: sub-vectors must tile every targeted width
        if vector_length:
            import math
            widths = {w for n, m in model.named_modules() if n and check_target_module_exists(pc, n)
                      for w in (getattr(m, "in_features", None), getattr(m, "out_features", None)) if w}
            if any(w % vector_length for w in widths):
                raise BenchError(f"method.vector_length: {vector_length} does not divide the widths of the targeted "
                                 f"layers ({', '.join(map(str, sorted(widths)))}); valid: a divisor of "
                                 f"{math.gcd(*widths)}")


# --- tracking ---------------------------------------------------------------------------------------------

@functools.cache
def _http_reachable(uri: str) -> None:
    import urllib.error
    import urllib.request
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=TRACKING_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return  # the server answered
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise BenchError(f"tracking.uri: cannot reach {uri} within {TRACKING_TIMEOUT_S} s ({reason}); start the "
                         "server (mlflow server --host 127.0.0.1 --port 5000) or use the local store "
                         "tracking.uri=sqlite:///mlflow.db") from None


def check_tracking(uri: str, experiment) -> None:
    """Fail in seconds instead of letting MLflow retry an unreachable store for minutes."""
    if not isinstance(experiment, str) or not experiment.strip():
        raise BenchError(f"tracking.experiment: must be a non-empty name, got {experiment!r}")
    if uri.startswith(("http://", "https://")):
        try:
            _http_reachable(uri)
        except BenchError:
            _http_reachable.cache_clear()  # the next call probes again
            raise
    elif uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///")).expanduser()
        if path.exists():
            if not path.is_file():
                raise BenchError(f"tracking.uri: {path} is not a file; give a SQLite file, e.g. sqlite:///mlflow.db")
            with open(path, "rb") as f:
                head = f.read(16)
            if head and head != b"SQLite format 3\x00":
                raise BenchError(f"tracking.uri: {path} is not a SQLite database; give another file name")
            return
        parent = path.absolute().parent
        while not parent.exists():
            parent = parent.parent
        import os
        if not os.access(parent, os.W_OK):
            raise BenchError(f"tracking.uri: cannot create {path}: {parent} is not writable")
    elif "://" in uri and not uri.startswith(("sqlite:", "file:", "databricks", "postgresql", "mysql", "mssql")):
        raise BenchError(f"tracking.uri: unsupported scheme in {uri!r}; valid: sqlite:///FILE, http(s)://HOST:PORT, "
                         "or another MLflow store URI (postgresql://, mysql://, file:, databricks)")


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


def _check_command(overrides: list[str], multirun: bool) -> list[str] | None:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    if any(o.split("=", 1)[0].lstrip("+~") in ("hydra/sweeper",) for o in overrides):
        return None
    from bench import CONF_DIR
    failed: dict[str, list[str]] = {}  # error line -> the jobs that have it
    jobs: list = []
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3", job_name="bench"):
            parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
            try:
                parsed = parser.parse_overrides(overrides)
            except HydraException as e:
                return [error_line(e, with_type=False)]
            if not multirun and any(o.is_sweep_override() for o in parsed):
                return None  # Hydra explains that a sweep needs -m
            if any(o.is_sweep_override() and not o.is_discrete_sweep() for o in parsed):
                return None  # range / interval sweeps: Hydra's sweeper says what it supports
            jobs = _jobs(overrides, parsed, multirun)
            swept = {o for job in jobs for o in job if sum(o in j for j in jobs) < len(jobs)}  # names a job
            composed = []  # (job, its config, or the line saying why it does not compose)
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
                        validate(cfg)
                    except BenchError as e:
                        line = str(e)
                    except HydraException as e:
                        line = _hydra_error_line(e)
                if line is not None:
                    failed.setdefault(line, []).append(" ".join(o for o in job if o in swept))
            if not failed:
                mark_validated(cfg for _, cfg in composed)
    finally:
        GlobalHydra.instance().clear()
    if len(jobs) == 1:
        return list(failed)
    lines = []
    for line, js in failed.items():  # an error every job shares is said once; else with the first job it hits
        more = f" and {len(js) - 1} more jobs" if len(js) > 1 else ""
        lines.append(line if len(js) == len(jobs) else f"[{js[0]}{more}] {line}")
    return lines
