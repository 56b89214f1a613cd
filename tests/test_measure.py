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
