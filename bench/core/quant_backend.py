"""bitsandbytes on CPU: its import-time kernel warning kept off the console, one line of our own instead.

bitsandbytes >= 0.49 on a CPU with AVX512-BF16 (AMD Zen 4, Intel Sapphire Rapids) tries at import to fetch a fast
4-bit kernel from the Hugging Face Hub (`kernels-community`) and, without the `kernels` package, logs "Failed to
load CPU gemm_4bit_forward from kernels-community ..." (logger `bitsandbytes.backends.cpu.ops`). peft imports
bitsandbytes at `import peft` whenever it is installed (peft/helpers.py), and transformers' trainer utilities import
peft, so every process of the harness imports bitsandbytes, quantized run or not. `quiet()` must therefore run
before anything imports peft: bench.core.models calls it at import, and every harness path (python -m bench, the
bench.orchestration.worker worker, bench.sweep) imports bench.core.models before peft. A 4-bit run on CPU then prints `cpu_note()`.

A process that will run no quantized job can skip the import altogether: with BENCH_HIDE_BITSANDBYTES=1 in its
environment (or after `hide_bitsandbytes()`, before peft is imported) bitsandbytes counts as not installed there.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import sys
from pathlib import Path

HIDE_ENV = "BENCH_HIDE_BITSANDBYTES"
KERNEL_WARNING = "kernels-community"   # in the message bitsandbytes logs when its fast CPU kernel is missing
_noted = False


class _KernelWarning(logging.Filter):
    """Drops bitsandbytes' kernel warning (remembering that it came); every other record passes."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = False

    def filter(self, record: logging.LogRecord) -> bool:
        if KERNEL_WARNING in str(record.msg):
            self.seen = True
            return False
        return True


_FILTER = _KernelWarning()


def quiet() -> _KernelWarning:
    """Put the filter on the logger of every bitsandbytes module, found on disk without importing it (a logger's
    filter sees only its own records, not its children's). Idempotent; call before bitsandbytes is imported, which
    logs the warning once, at import. Also applies BENCH_HIDE_BITSANDBYTES=1."""
    if os.environ.get(HIDE_ENV) == "1":
        hide_bitsandbytes()
    spec = importlib.util.find_spec("bitsandbytes")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        for path in Path(folder).rglob("*.py"):
            parts = ("bitsandbytes", *path.relative_to(folder).with_suffix("").parts)
            logging.getLogger(".".join(parts[:-1] if parts[-1] == "__init__" else parts)).addFilter(_FILTER)
    return _FILTER


def hide_bitsandbytes() -> None:
    """Make this process treat bitsandbytes as not installed: with None in sys.modules, `import bitsandbytes`
    raises ImportError and importlib.util.find_spec returns None (Python's documented meaning), which peft and
    transformers handle as "not installed". For processes that run only quant=none jobs; no effect once imported."""
    sys.modules.setdefault("bitsandbytes", None)


def cpu_note(quant_name: str, device_type: str) -> str | None:
    """The harness's own line for a 4-bit run on CPU when bitsandbytes' fast AVX512-BF16 kernel is missing."""
    if quant_name != "nf4" or device_type != "cpu":
        return None
    ops = sys.modules.get("bitsandbytes.backends.cpu.ops")  # its kernel is None there when the fetch failed
    if not (_FILTER.seen or getattr(ops, "gemm_4bit_forward_kernel", "") is None):
        return None
    return (f"note: quant={quant_name}: bitsandbytes' fast AVX512-BF16 CPU kernel (kernels-community) is not "
            "available; using its portable CPU path")


def print_cpu_note(quant_name: str, device_type: str) -> None:
    """Print cpu_note() once per process (a multirun's worker processes print it once each)."""
    global _noted
    note = cpu_note(quant_name, device_type)
    if note and not _noted:
        _noted = True
        print(note, flush=True)
