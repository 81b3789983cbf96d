"""Median times of a callable: CUDA events on the GPU, the wall clock on the CPU (dry run).

METHOD.md's rules: warm up first (compilation, caches, handles stay out), then time many
repeats and take the median; on the GPU, events around each call, one synchronisation at
the end. Callables take the repeat's index, so they can rotate through input sets larger
than the L2 cache (see :func:`rotations_for`).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

# More than the L2 of any GPU the check runs on (H100 50 MB, H200 60 MB): input sets
# rotated through this many bytes never find their data cached.
L2_BYTES = 64 << 20


def rotations_for(set_bytes: float, limit: int = 64) -> int:
    """How many input sets of ``set_bytes`` to rotate through so each call misses L2."""
    return max(1, min(limit, int(L2_BYTES // max(set_bytes, 1)) + 1))


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[int], object], device: torch.device | str, *, warmup: int, repeats: int) -> float:
    """Median milliseconds of ``fn(i)`` over ``repeats`` calls after ``warmup`` calls."""
    for i in range(warmup):
        fn(i)
    synchronize(device)
    if torch.device(device).type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
        for i, (start, end) in enumerate(events):
            start.record()
            fn(warmup + i)
            end.record()
        torch.cuda.synchronize(device)
        return statistics.median(start.elapsed_time(end) for start, end in events)
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        fn(warmup + i)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def wall_seconds(fn: Callable[[], object], device: torch.device | str) -> float:
    """Seconds of one call, the device's queue drained before and after."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


@contextmanager
def peak_memory(device: torch.device | str) -> Iterator[dict[str, float]]:
    """Within the block, the device's peak allocated memory; yields a dict whose ``"gib"``
    is set on exit (None on the CPU, where PyTorch keeps no such count)."""
    found: dict[str, float | None] = {"gib": None}
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    try:
        yield found
    finally:
        if cuda:
            torch.cuda.synchronize(device)
            found["gib"] = torch.cuda.max_memory_allocated(device) / 2**30
