"""Measurements taken while a run executes: peak memory and wall-clock per phase, and exact memory components.

Definitions (the README repeats them):
- mem/peak_<phase>_bytes: on CUDA, the peak of torch.cuda.memory_allocated() during the phase
  (mem/peak_<phase>_reserved_bytes: the peak of memory_reserved(), i.e. what the caching allocator held);
  on CPU, the peak resident set size (VmHWM) of the whole process during the phase: interpreter, libraries,
  weights and data included. Before a phase's peak is reset, memory freed earlier is handed back (CUDA:
  torch.cuda.empty_cache(), so *_reserved_bytes never carries the previous phase's pool; CPU with glibc:
  malloc_trim), then the high-water mark is reset (CUDA: reset_peak_memory_stats; Linux: writing 5 to
  /proc/self/clear_refs), so a figure never carries a peak from an earlier phase or an earlier run.
- mem/train_growth_bytes: the peak during training minus the memory in use right before the first training
  step (model and data loaded): what training itself adds (gradients, optimizer state, activations). CPU: RSS;
  CUDA: allocated bytes. The weights are made resident first (`page_in`): a model loaded from memory-mapped
  safetensors is paged in on first read, which would otherwise count as training's growth. This is the figure that separates methods on CPU, where the process's total is dominated
  by the interpreter, the libraries and the frozen weights.
- mem/weights_bytes: bytes of the model's parameters and buffers as stored (4-bit weights at their packed size;
  a tensor shared by two modules counted once).
- mem/grad_bytes: bytes of the gradients training keeps: trainable parameters x their element size.
- mem/optimizer_bytes: bytes of the tensors in the optimizer's state after its first step (AdamW: exp_avg and
  exp_avg_sq per trainable parameter, plus a 4-byte step counter per parameter tensor).
- time/<phase>_s: wall-clock seconds spent inside the phase's segments (CUDA synchronized at each end).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import resource
import time
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


@functools.cache
def _libc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return libc if libc is not None and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def _release_freed_cpu_memory() -> None:
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)  # glibc keeps freed heap pages resident; hand them back so RSS reflects live memory


def _reset_rss_peak() -> bool:
    try:
        _CLEAR_REFS.write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _status_bytes(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _rss_peak_bytes() -> int:
    peak = _status_bytes("VmHWM:")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # lifetime


class Meter:
    """Accumulates time and peak memory over possibly interleaved segments of named phases."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.seconds: dict[str, float] = {}
        self.peak_bytes: dict[str, int] = {}
        self.peak_reserved_bytes: dict[str, int] = {}
        self.rss_resettable = True
        self._open: dict[str, float] = {}

    def current_bytes(self) -> int:
        """Memory in use now: CUDA allocated bytes, or the process's RSS (after handing freed pages back)."""
        if self.cuda:
            return torch.cuda.memory_allocated()
        _release_freed_cpu_memory()
        rss = _status_bytes("VmRSS:")
        return rss if rss is not None else _rss_peak_bytes()

    def start(self, phase: str) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()  # release cached blocks, so the reserved peak starts from this phase's pool
            torch.cuda.reset_peak_memory_stats()
        else:
            _release_freed_cpu_memory()
            self.rss_resettable = _reset_rss_peak() and self.rss_resettable
        self._open[phase] = time.perf_counter()

    def stop(self, phase: str) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.peak_reserved_bytes[phase] = max(self.peak_reserved_bytes.get(phase, 0),
                                                  torch.cuda.max_memory_reserved())
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = _rss_peak_bytes()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - self._open.pop(phase)
        self.peak_bytes[phase] = max(self.peak_bytes.get(phase, 0), peak)

    def running(self, phase: str) -> bool:
        return phase in self._open


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def weights_bytes(model: torch.nn.Module) -> int:
    """mem/weights_bytes: parameters and buffers as stored, each tensor's storage counted once."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        key = (t.device, t.data_ptr()) if t.numel() else id(t)
        if key not in seen:
            seen.add(key)
            total += _tensor_bytes(t)
    return total


def page_in(model: torch.nn.Module) -> None:
    """Read one element per 4 KiB page of every CPU parameter and buffer, so that weights mapped from a safetensors
    file are resident before mem/train_growth_bytes takes its baseline (reading them is what pages them in)."""
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if t.device.type == "cpu" and t.numel():
                t.detach().reshape(-1)[::max(1, 4096 // t.element_size())].sum()


def grad_bytes(model: torch.nn.Module) -> int:
    """mem/grad_bytes: one gradient per trainable parameter, in the parameter's dtype."""
    return sum(_tensor_bytes(p) for p in model.parameters() if p.requires_grad)


def optimizer_bytes(optimizer: torch.optim.Optimizer) -> int:
    """mem/optimizer_bytes: every tensor in the optimizer's state (call after its first step)."""
    return sum(_tensor_bytes(v) for state in optimizer.state.values() for v in state.values()
               if isinstance(v, torch.Tensor))
