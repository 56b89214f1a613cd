"""Measurements taken while a run executes: peak memory and wall-clock per phase.

Definitions (the README repeats them):
- mem/peak_<phase>_bytes: on CUDA, the peak of torch.cuda.memory_allocated() during the phase
  (mem/peak_<phase>_reserved_bytes: the peak of memory_reserved(), i.e. what the caching allocator held);
  on CPU, the peak resident set size (VmHWM) of the process during the phase. The high-water mark is reset
  at the start of every phase segment (CUDA: reset_peak_memory_stats; Linux: writing 5 to
  /proc/self/clear_refs), so a figure never carries a peak from an earlier phase or an earlier run.
- time/<phase>_s: wall-clock seconds spent inside the phase's segments (CUDA synchronized at each end).
"""
from __future__ import annotations

import resource
import time
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _reset_rss_peak() -> bool:
    try:
        _CLEAR_REFS.write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _rss_peak_bytes() -> int:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # not resettable: lifetime peak


class Meter:
    """Accumulates time and peak memory over possibly interleaved segments of named phases."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.seconds: dict[str, float] = {}
        self.peak_bytes: dict[str, int] = {}
        self.peak_reserved_bytes: dict[str, int] = {}
        self.rss_resettable = True
        self._open: dict[str, float] = {}

    def start(self, phase: str) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
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
