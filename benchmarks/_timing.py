"""Timing shared by the micro-benchmarks: the median wall time of repeated calls."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def median_time(fn: Callable[[], object], repeats: int, device: str) -> float:
    """Seconds per call of `fn`: one warm-up call, then the median of `repeats` (CUDA synchronised)."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
