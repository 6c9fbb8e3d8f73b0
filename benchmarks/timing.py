"""Timing shared by the benchmark scripts (run as `python benchmarks/<script>.py`)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def cuda_time_ms(fn: Callable[[], object], warmup: int, iters: int) -> float:
    """Median wall time of fn in ms, each call bracketed by CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def cpu_time_ms(fn: Callable[[], object], warmup: int, iters: int) -> float:
    """Median wall time of fn in ms, each call timed with time.perf_counter."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def time_ms(fn: Callable[[], object], warmup: int, iters: int, device: str) -> float:
    """Median ms of fn on `device`: CUDA events on a GPU, time.perf_counter elsewhere."""
    if torch.device(device).type == "cuda":
        return cuda_time_ms(fn, warmup, iters)
    return cpu_time_ms(fn, warmup, iters)


def cuda_peak_extra_mb(fn: Callable[[], object]) -> float:
    """Peak CUDA memory fn allocates on top of what is held before it runs, in MiB."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20
