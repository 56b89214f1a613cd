"""`python -m bench.plan [overrides ...] [-m] [--format table|json|markdown] [--out FILE] [--budget 24GiB] ...`
(or `bench plan ...`): what each method will cost on a model, from its configuration alone, before a single weight
is downloaded.

The command line composes like `python -m bench` (the same groups and overrides; `-m` and comma lists plan several
methods, quants, batch sizes, models); every job is validated as `python -m bench` validates it (the same one-line
errors, exit code 2), without the tracking store and the task's data, which a plan does not read. Each job's plan
(bench/core/plan.py: `estimate`) is one row: parameters, checkpoint bytes, training memory split into weights,
quantization constants, gradients, optimizer state, activations and overhead, and inference memory. The longest
training batch is `train.batch_size` sequences of `--seq-len` tokens (default `train.max_length`). README: Planning.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from bench.errors import BenchError
from bench.fmt import human_bytes

FORMATS = ("table", "json", "markdown")
UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
         "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """'24GiB', '24 GB', '512MiB', '1.5TiB', '1000000' -> bytes (KB/MB/GB decimal, KiB/MiB/GiB binary)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in UNITS or float(m.group(1)) <= 0:
        raise BenchError(f"--budget: {text!r} is not a size; valid: a number > 0 with a unit, e.g. 24GiB, 16GB, "
                         "512MiB (KiB/MiB/GiB binary, KB/MB/GB decimal)")
    return int(float(m.group(1)) * UNITS[unit])


def parse_args(argv: list[str]):
    p = argparse.ArgumentParser(prog="python -m bench.plan", description=(
        "What each method will cost on a model, from its config.json alone (meta device, no weights): parameters, "
        "checkpoint bytes, training and inference memory. Overrides compose as for python -m bench."))
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=smollm2 method=lora,full,prompt")
    p.add_argument("-m", "--multirun", action="store_true", help="plan every combination of comma lists")
    p.add_argument("--format", choices=FORMATS, default="table", help="what to print (default: table)")
    p.add_argument("--out", metavar="FILE", help="also write the plans as JSON to FILE")
    p.add_argument("--budget", metavar="SIZE", help="mark which configurations' training memory fits, e.g. 24GiB")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where training runs (default cpu)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="weights and compute dtype (default float32, what python -m bench loads)")
    p.add_argument("--seq-len", type=int, metavar="N", help="tokens of the longest training batch "
                                                            "(default: train.max_length)")
    p.add_argument("--gen-len", type=int, metavar="N", help="inference: tokens the KV cache holds (default: "
                                                            "train.max_length + task.max_new_tokens for generative "
                                                            "tasks; 0 for classifiers)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="activations with gradient checkpointing per transformer block")
    p.error = _usage_error
    return p.parse_intermixed_args(argv)


def _usage_error(message: str):
    print(f"error: {message}; usage: python -m bench.plan [-m] [--format table|json|markdown] [--out FILE] "
          "[--budget SIZE] [--device cpu|cuda] [--dtype float32|bfloat16] [--seq-len N] [--gen-len N] "
          "[--gradient-checkpointing] [key=value ...]", file=sys.stderr)
    raise SystemExit(2)


def num_labels(cfg) -> int:
    """A classifier's head size: the task's label_names, else its training labels (a local file's are read)."""
    if cfg.task.get("kind", "classification") != "classification":
        return 2
    if cfg.task.get("label_names"):
        return len(cfg.task.label_names)
    from bench.core import tasks
    return tasks.load(cfg.task, int(cfg.seed)).num_labels


def setting(cfg, a):
    from bench.core.plan import Setting
    seq = a.seq_len or int(cfg.train.max_length)
    gen = cfg.task.get("kind", "classification") == "generation"
    gen_len = a.gen_len if a.gen_len is not None else (
        int(cfg.train.max_length) + int(cfg.task.get("max_new_tokens", 0) or 0) if gen else 0)
    quant_ckpt = bool(cfg.quant.get("gradient_checkpointing", False)) and cfg.quant.name != "none"
    return Setting(batch_size=int(cfg.train.batch_size), seq_len=seq, device=a.device, dtype=a.dtype,
                   gradient_checkpointing=a.gradient_checkpointing or quant_ckpt, num_labels=num_labels(cfg),
                   target_len=int(cfg.task.get("max_new_tokens", 16) or 16) + 1,
                   eval_batch_size=int(cfg.train.eval_batch_size), gen_len=gen_len)


# --- output ---------------------------------------------------------------------------------------------------

def rows(plans, budget: int | None) -> tuple[list[str], list[list[str]]]:
    """Column heads and cells, one row per plan (quantization constants and KV cache only when some row has them)."""
    quant = any(p.quant_state_bytes for p in plans)
    kv = any(p.kv_cache_bytes for p in plans)
    head = ["method", "model", "quant", "batch × seq", "trainable", "total", "trainable %", "checkpoint", "weights",
            *(["quant consts"] if quant else []), "gradients", "optimizer", "activations", "overhead",
            "train total", *(["KV cache"] if kv else []), "inference total",
            *([f"fits {human_bytes(budget)}"] if budget else [])]
    out = []
    for p in plans:
        s = p.setting
        out.append([p.method, p.model, p.quant, f"{s.batch_size} × {s.seq_len}", f"{p.trainable:,}", f"{p.total:,}",
                    f"{p.trainable_pct:.3g}", human_bytes(p.ckpt_bytes), human_bytes(p.weights_bytes),
                    *([human_bytes(p.quant_state_bytes)] if quant else []), human_bytes(p.grad_bytes),
                    human_bytes(p.optimizer_bytes),
                    human_bytes(p.activation_bytes) + ("*" if p.activation_source == "formula" else ""),
                    human_bytes(p.overhead_bytes), human_bytes(p.train_bytes),
                    *([human_bytes(p.kv_cache_bytes)] if kv else []), human_bytes(p.inference_bytes),
                    *(["yes" if p.train_bytes <= budget else "no"] if budget else [])])
    return head, out


def notes(plans, a) -> list[str]:
    out = [f"Device {a.device}, {a.dtype}; training memory = weights + quantization constants + gradients + AdamW "
           "state + activations of the longest batch + overhead (bench/core/plan.py)."]
    if a.device == "cuda":
        out.append("The CUDA figures are unverified: no GPU was available to check them against measured runs.")
    if any(p.activation_source == "formula" for p in plans):
        out.append("* activations from the per-family formula (the meta-device forward failed for that model).")
    return out


def markdown(plans, budget, a) -> str:
    head, body = rows(plans, budget)
    right = {"trainable", "total", "trainable %", "checkpoint", "weights", "quant consts", "gradients", "optimizer",
             "activations", "overhead", "train total", "KV cache", "inference total"}
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---:" if h in right else "---" for h in head) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines + [""] + notes(plans, a)) + "\n"


def table(plans, budget, a):
    from rich.table import Table
    head, body = rows(plans, budget)
    t = Table(title="peft-bench plan", caption=" ".join(notes(plans, a)))
    for h in head:
        t.add_column(h, justify="left" if h in ("method", "model", "quant", "batch × seq") else "right")
    for r in body:
        t.add_row(*r)
    return t


def as_json(plans, budget) -> dict:
    out = []
    for p in plans:
        d = p.as_dict()
        if budget:
            d["fits_budget"] = p.train_bytes <= budget
        out.append(d)
    return {"budget_bytes": budget, "plans": out}


def main(argv: list[str] | None = None) -> int:
    a = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        budget = parse_bytes(a.budget) if a.budget else None
        if a.seq_len is not None and a.seq_len < 1:
            raise BenchError(f"--seq-len: must be a number > 0, got {a.seq_len}")
        if a.gen_len is not None and a.gen_len < 0:
            raise BenchError(f"--gen-len: must be a number >= 0, got {a.gen_len}")
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from bench.orchestration.validate import check_jobs
    checked = check_jobs(list(a.overrides), a.multirun, tracking=False, data=False)
    if checked is None:
        print("error: python -m bench.plan takes comma lists with -m (no other sweeper, no range sweeps)",
              file=sys.stderr)
        return 2
    jobs, errors = checked
    for line in errors:
        print(f"error: {line}", file=sys.stderr)
    if errors:
        return 2
    from bench.core.plan import estimate
    plans = []
    try:
        for _, cfg in jobs:
            plans.append(estimate(cfg, setting(cfg, a)))
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    data = as_json(plans, budget)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(data, indent=2) + "\n")
    if a.format == "json":
        print(json.dumps(data, indent=2))
    elif a.format == "markdown":
        print(markdown(plans, budget, a), end="")
    else:
        from rich.console import Console
        Console().print(table(plans, budget, a))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
