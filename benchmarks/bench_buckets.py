"""Bucket assignment and epoch planning: NumPy versus a per-image Python loop.

The baselines below implement the same algorithms one image at a time, with
plain lists (and without the 2022 reference's quadratic per-batch copies, so
the comparison is with a fair loop, not a strawman). Sizes come from the
built-in sample's mixture. Full mode: N = 100k, 1M and 5.3M (NovelAI's 2022
dataset size); smoke mode: N = 3000.

    pytest benchmarks/bench_buckets.py                          # full, ~2 min
    pytest benchmarks/bench_buckets.py --benchmark-disable      # smoke
"""

from __future__ import annotations

import math
import random
import tracemalloc
from collections import defaultdict
from functools import lru_cache

import numpy as np
import pytest
from conftest import BASELINE, FAST, smoke_mode

from nai_fast.data.buckets import EpochPlan, aspect_keys, assign, make_buckets
from nai_fast.data.sample import sample_sizes

FULL_SIZES = [100_000, 1_000_000, 5_300_000]
SMOKE_SIZES = [3_000]
BATCH_SIZE, WORLD_SIZE = 8, 2


def pytest_generate_tests(metafunc):
    if "n" in metafunc.fixturenames:
        metafunc.parametrize("n", SMOKE_SIZES if smoke_mode(metafunc.config) else FULL_SIZES)


@lru_cache(maxsize=1)
def dataset(n: int) -> tuple[np.ndarray, np.ndarray]:
    sizes = sample_sizes(n, seed=1)
    return sizes, assign(sizes, make_buckets(), max_aspect_error=0.5)


# -- the per-image loops --------------------------------------------------------


def assign_loop(sizes: list[list[int]], buckets: list[list[int]], max_aspect_error: float) -> list[int]:
    bucket_keys = [math.log(w / h) for w, h in buckets]
    ids = []
    for width, height in sizes:
        key = math.log(width / height)
        best, best_error = -1, math.inf
        for index, bucket_key in enumerate(bucket_keys):
            error = abs(bucket_key - key)
            if error < best_error:
                best, best_error = index, error
        ids.append(best if best_error < max_aspect_error else -1)
    return ids


def plan_loop(bucket_ids: list[int], item_keys: list[float], bucket_keys: list[float], seed: int, epoch: int, rank: int):
    rng = random.Random(f"{seed}/{epoch}")
    order = [item for item, bucket in enumerate(bucket_ids) if bucket >= 0]
    rng.shuffle(order)
    per_step = WORLD_SIZE * BATCH_SIZE
    shard = order[: len(order) // per_step * per_step][rank::WORLD_SIZE]
    per_bucket = defaultdict(list)
    for item in shard:
        per_bucket[bucket_ids[item]].append(item)
    batches, leftovers = [], []
    for bucket, items in per_bucket.items():
        whole = len(items) - len(items) % BATCH_SIZE
        batches += [(bucket, items[start : start + BATCH_SIZE]) for start in range(0, whole, BATCH_SIZE)]
        leftovers += items[whole:]
    leftovers.sort(key=item_keys.__getitem__)
    for start in range(0, len(leftovers), BATCH_SIZE):
        group = leftovers[start : start + BATCH_SIZE]
        mean = sum(item_keys[item] for item in group) / len(group)
        batches.append((min(range(len(bucket_keys)), key=lambda k: abs(bucket_keys[k] - mean)), group))
    # Drawing sources by remaining size, when each holds whole batches, is a uniform shuffle of the batches.
    random.Random(f"{seed}/{epoch}/{rank}").shuffle(batches)
    return batches


# -- benchmarks -----------------------------------------------------------------


@pytest.mark.parametrize("role", [BASELINE, FAST])
def test_assign(timed, n, role):
    sizes, _ = dataset(n)
    buckets = make_buckets()
    group = f"assign N={n:,}"
    if role == FAST:
        timed(group, FAST, lambda: assign(sizes, buckets, max_aspect_error=0.5), rounds=5)
        return
    size_list, bucket_list = sizes.tolist(), buckets.tolist()
    ids = timed(group, BASELINE, lambda: assign_loop(size_list, bucket_list, 0.5), rounds=1)
    assert ids == assign(sizes, buckets, max_aspect_error=0.5).tolist(), "the loop computes the same assignment"


@pytest.mark.parametrize("role", [BASELINE, FAST])
def test_plan_epoch(timed, n, role):
    sizes, ids = dataset(n)
    buckets = make_buckets()
    group = f"plan one epoch N={n:,}"

    def plan_epoch():
        return list(EpochPlan(ids, buckets, BATCH_SIZE, WORLD_SIZE, 0, seed=3, sizes=sizes).batches(0))

    if role == FAST:
        timed(group, FAST, plan_epoch)
        return
    id_list, key_list, bucket_keys = ids.tolist(), aspect_keys(sizes).tolist(), aspect_keys(buckets).tolist()
    slow = timed(group, BASELINE, lambda: plan_loop(id_list, key_list, bucket_keys, 3, 0, 0), rounds=1)
    fast = plan_epoch()
    assert len(slow) == len(fast), "the loop plans as many batches"
    assert {len(items) for _, items in slow} == {len(items) for _, items in fast} == {BATCH_SIZE}


def test_peak_memory(note, smoke):
    """Peak memory traced while assigning and laying out one epoch."""
    n = SMOKE_SIZES[0] if smoke else FULL_SIZES[-1]
    sizes = sample_sizes(n, seed=1)
    tracemalloc.start()
    try:
        ids = assign(sizes, make_buckets(), max_aspect_error=0.5)
        EpochPlan(ids, make_buckets(), BATCH_SIZE, WORLD_SIZE, 0, seed=3, sizes=sizes).layout(0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    note(f"peak memory, assign + plan one epoch, N={n:,}: {peak / 2**20:.0f} MiB (input sizes: {sizes.nbytes / 2**20:.0f} MiB)")
    assert peak > sizes.nbytes // 2, "tracemalloc saw the arrays"
