"""Peak-memory phases reset their high-water mark, so a phase's figure does not inherit an earlier peak."""
from __future__ import annotations

import torch

from bench.core.measure import Meter


def test_cpu_peak_rss_is_per_phase():
    meter = Meter(torch.device("cpu"))
    meter.start("big")
    x = torch.ones(256 * 1024 * 1024 // 4)  # 256 MiB touched
    x += 1
    meter.stop("big")
    del x
    meter.start("small")
    y = torch.ones(16 * 1024 * 1024 // 4)
    y += 1
    meter.stop("small")
    assert meter.rss_resettable, "Linux should allow resetting VmHWM via /proc/self/clear_refs"
    assert meter.peak_bytes["big"] - meter.peak_bytes["small"] > 200 * 1024 * 1024
    assert meter.seconds["big"] > 0 and meter.seconds["small"] > 0


def test_segments_accumulate_time_and_keep_the_max_peak():
    meter = Meter(torch.device("cpu"))
    for _ in range(3):
        meter.start("train")
        meter.stop("train")
    assert not meter.running("train") and meter.seconds["train"] >= 0 and meter.peak_bytes["train"] > 0


def test_page_in_makes_file_mapped_weights_resident(tmp_path):
    """A parameter backed by a memory-mapped file (as safetensors loads weights) is not resident until read; page_in
    reads it, so mem/train_growth_bytes' baseline (taken after page_in) already holds it: after page_in, reading every
    byte adds nothing, and page_in itself grew RSS by the file's size."""
    from bench.core.measure import page_in
    size = 64 * 1024 * 1024
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\x01" * size)
    module = torch.nn.Module()
    module.w = torch.nn.Parameter(torch.from_file(str(path), shared=True, size=size // 4, dtype=torch.float32),
                                  requires_grad=False)
    meter = Meter(torch.device("cpu"))
    before = meter.current_bytes()
    page_in(module)
    paged = meter.current_bytes()
    module.w.detach().sum()                 # every byte read
    after = meter.current_bytes()
    assert paged - before > 0.9 * size, (before, paged)
    assert after - paged < 4 * 1024 * 1024, (paged, after)
