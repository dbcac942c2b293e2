"""GPU timing for the benchmark scripts: the median of per-call CUDA-event times.

A median of single calls, each bracketed by its own events, is robust to the occasional slow call (a clock
change, another process) that a mean over a loop absorbs; kernel A/Bs compare these medians.
"""
from __future__ import annotations

import statistics
from typing import Callable

import torch


def median_ms(fn: Callable[[], object], warmup: int = 3, reps: int = 10) -> float:
    """Median milliseconds of ``fn()`` on the current CUDA stream, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)
