"""Median times of a callable: CUDA events on the GPU, the wall clock on the CPU (dry run).

METHOD.md's rules: warm up first (compilation, caches, handles stay out), then time many
repeats and take the median; on the GPU, events around each call, one synchronisation at
the end. Where the host issues work slower than the device runs it, those events time the
host: :func:`graph_ms` gives the device's own time, :func:`host_ms` the host's. Callables
take the repeat's index, so they can rotate through input sets larger than the L2 cache
(see :func:`rotations_for`).
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


def host_ms(fn: Callable[[int], object], device: torch.device | str, *, repeats: int) -> float:
    """Mean milliseconds the host spends issuing ``fn(i)``, the device's queue drained first:
    Python, dispatch and launches, without waiting for the device (far under the queue's
    depth of launches, so the device never holds the host back)."""
    synchronize(device)
    start = time.perf_counter()
    for i in range(repeats):
        fn(i)
    elapsed = time.perf_counter() - start
    synchronize(device)
    return elapsed * 1e3 / repeats


def graph_ms(fn: Callable[[int], object], device: torch.device | str, *, calls: int, replays: int) -> float:
    """Median milliseconds of one ``fn(i)`` on the device alone: ``calls`` calls captured in
    one CUDA graph, replayed, the replay's time divided by ``calls`` (METHOD.md: a graph
    removes the launch gaps, so host overhead leaves the figure). CUDA only; the callable
    must be capturable (no host synchronisation) and already warm."""
    device = torch.device(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # torch.cuda.graphs' rule: warm up on a side stream
        for i in range(3):
            fn(i)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i)
    graph.replay()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(replays)]
    for start, end in events:
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize(device)
    median = statistics.median(start.elapsed_time(end) for start, end in events)
    del graph
    return median / calls


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
