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


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int, device: str) -> dict[str, float]:
    """Seconds per call of each of `fns`, timed in turns (one warm-up each, then `repeats` rounds).

    Taking turns puts every variant under the same background load, so their ratio holds on a
    shared machine even when the absolute times drift.
    """
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
        sync()
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}
