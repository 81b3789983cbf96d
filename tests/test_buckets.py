"""Bucket list, assignment and epoch plans (nai_fast.data.buckets)."""

import itertools
import tracemalloc

import numpy as np
import pytest

from nai_fast.data.buckets import (
    EpochPlan,
    aspect_keys,
    assign,
    crop_fractions,
    make_buckets,
    nearest_buckets,
    preset_buckets,
    scaled_buckets,
)

SD1_BUCKETS = [
    (256, 1024), (320, 1024), (384, 1024), (384, 960), (384, 896), (448, 832), (512, 768),
    (512, 704), (512, 512), (576, 640), (640, 576), (704, 512), (768, 512), (832, 448),
    (896, 384), (960, 384), (1024, 384), (1024, 320), (1024, 256),
]  # fmt: skip


def buckets_by_definition(max_area, max_side, min_side, step, base):
    """The bucket rule spelled out with plain loops."""
    found = {tuple(base)}
    for width in range(min_side, max_side + 1, step):
        height = max((h for h in range(min_side, max_side + 1, step) if width * h <= max_area), default=None)
        if height is not None:
            found |= {(width, height), (height, width)}
    return sorted(found, key=lambda wh: (wh[0], -wh[1]))


def brute_force_nearest(sizes, buckets, metric):
    """argmin over every bucket, as the 2022 reference computes it per image."""
    keys = aspect_keys(sizes, metric)
    distances = np.abs(aspect_keys(buckets, metric)[None, :] - keys[:, None])
    ids = distances.argmin(axis=1)
    return ids, distances[np.arange(len(ids)), ids]


# -- make_buckets -------------------------------------------------------------


def test_sd1_preset_is_exactly_the_defined_list():
    assert [tuple(b) for b in make_buckets()] == SD1_BUCKETS
    assert [tuple(b) for b in preset_buckets("sd1")] == SD1_BUCKETS


@pytest.mark.parametrize(
    "params",
    [
        dict(max_area=1024 * 1024, max_side=2048, min_side=512, step=64, base=(1024, 1024)),
        dict(max_area=768 * 768, max_side=1536, min_side=256, step=32, base=(512, 512)),
        dict(max_area=256 * 256, max_side=256, min_side=256, step=64, base=(256, 256)),
    ],
)
def test_make_buckets_follows_the_rule(params):
    got = [tuple(b) for b in make_buckets(**params)]
    assert got == buckets_by_definition(**params)
    assert all(w * h <= params["max_area"] or (w, h) == params["base"] for w, h in got)


def test_sdxl_preset_has_the_1024_area_grid():
    buckets = preset_buckets("sdxl")
    assert (1024, 1024) in map(tuple, buckets)
    assert (buckets.prod(axis=1) <= 1024 * 1024).all()
    assert buckets.max() == 2048 and buckets.min() == 512


@pytest.mark.parametrize(
    "params, message",
    [
        (dict(step=0), "step"),
        (dict(min_side=2048), "min_side"),
        (dict(min_side=100), "multiple of step"),
        (dict(max_area=1000), "no bucket fits"),
    ],
)
def test_make_buckets_rejects_bad_settings(params, message):
    with pytest.raises(ValueError, match=message):
        make_buckets(**params)


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown bucket preset"):
        preset_buckets("sd3")


# -- assign ---------------------------------------------------------------------


def adversarial_sizes(buckets):
    """Bucket sizes themselves, their multiples, halfway ratios, slivers, 1-pixel images."""
    rows = [tuple(b) for b in buckets]
    rows += [(2 * w, 2 * h) for w, h in buckets] + [(w + 1, h) for w, h in buckets]
    for (w1, h1), (w2, h2) in itertools.pairwise(sorted(map(tuple, buckets), key=lambda b: b[0] / b[1])):
        rows += [(w1 * h2 + w2 * h1, 2 * h1 * h2)]  # the linear midpoint: an exact tie in theory
    rows += [(1, 1), (1, 2), (2, 1), (1, 100000), (100000, 1), (3, 1), (1, 3), (8, 1), (1, 8), (7, 1)]
    return np.array(rows, dtype=np.int64)


@pytest.mark.parametrize("metric", ["log", "linear"])
def test_assign_equals_brute_force_argmin(metric):
    rng = np.random.default_rng()
    for buckets in (make_buckets(), preset_buckets("sdxl")):
        sizes = np.concatenate([rng.integers(1, 5000, size=(20000, 2)), adversarial_sizes(buckets)])
        ids, errors = nearest_buckets(sizes, buckets, metric)
        expected_ids, expected_errors = brute_force_nearest(sizes, buckets, metric)
        np.testing.assert_array_equal(ids, expected_ids)
        np.testing.assert_array_equal(errors, expected_errors)
        np.testing.assert_array_equal(assign(sizes, buckets, metric=metric), expected_ids)


@pytest.mark.parametrize("metric", ["log", "linear"])
def test_equal_aspect_buckets_tie_to_the_first_index(metric):
    buckets = np.array([[1024, 512], [512, 512], [256, 256], [512, 1024], [256, 128]])
    sizes = np.array([[300, 300], [10, 5], [5, 10], [3, 2], [2, 3]])
    np.testing.assert_array_equal(assign(sizes, buckets, metric=metric), brute_force_nearest(sizes, buckets, metric)[0])
    assert assign(sizes[:2], buckets, metric=metric).tolist() == [1, 0]


def test_pruning_follows_the_strict_threshold():
    buckets = make_buckets()
    sizes = np.array([[8192, 1024], [1024, 8192], [4095, 1024], [1024, 4096], [512, 512]])
    # Linear space (the 2022 reference): 8:1 landscape is 4 away from 4:1 and pruned; the
    # 1:8 portrait is only 0.125 away from 1:4 and never pruned.
    assert assign(sizes, buckets, max_aspect_error=4, metric="linear").tolist() == [-1, 0, 18, 0, 8]
    # Log space treats both orientations alike: both are log(2) = 0.693 away.
    log_ids = assign(sizes, buckets, max_aspect_error=0.69, metric="log")
    assert log_ids.tolist() == [-1, -1, 18, 0, 8]
    _, errors = nearest_buckets(sizes, buckets)
    keep = errors < 0.5
    np.testing.assert_array_equal(assign(sizes, buckets, 0.5) >= 0, keep)


def test_assign_rejects_bad_sizes():
    buckets = make_buckets()
    with pytest.raises(ValueError, match="shape"):
        assign(np.array([512, 512]), buckets)
    with pytest.raises(ValueError, match="positive"):
        assign(np.array([[512, 0], [3, 4]]), buckets)
    with pytest.raises(ValueError, match="metric"):
        assign(np.array([[512, 512]]), buckets, metric="cosine")
    assert assign(np.zeros((0, 2), dtype=np.int64), buckets).shape == (0,)


def test_assign_memory_stays_flat_for_ten_million_images():
    sizes = np.random.default_rng(0).integers(1, 4000, size=(10_000_000, 2), dtype=np.int32)
    tracemalloc.start()
    try:
        ids = assign(sizes, make_buckets(), max_aspect_error=0.5)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    outputs = 2 * len(sizes) * 8  # int64 ids and float64 errors
    assert peak < outputs + 32 * 2**20, f"peak {peak / 2**20:.0f} MiB"
    assert ids.shape == (10_000_000,) and ids.min() == -1 and ids.max() == len(make_buckets()) - 1


def test_crop_fraction_is_the_removed_share_of_the_area():
    buckets = np.array([[512, 512], [512, 768]])
    sizes = np.array([[1000, 1000], [1000, 500], [512, 768], [100, 300]])
    got = crop_fractions(sizes, buckets, np.array([0, 0, 1, -1]))
    # 1000x500 scaled to cover 512x512 is 1024x512: half of 1024 is kept.
    np.testing.assert_allclose(got[:3], [0.0, 0.5, 0.0])
    assert np.isnan(got[3])


# -- EpochPlan -----------------------------------------------------------------


def random_dataset(n, seed=0, prune_share=0.05):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(200, 3000, size=(n, 2))
    ids = assign(sizes, make_buckets())
    ids[rng.random(n) < prune_share] = -1
    return sizes, ids


def collect(plan, epoch):
    return list(plan.batches(epoch))


@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
@pytest.mark.parametrize("batch_size", [1, 4, 7])
def test_plan_invariants(world_size, batch_size):
    sizes, ids = random_dataset(1500)
    buckets = make_buckets()
    bucket_sizes = {tuple(b) for b in buckets}
    eligible = set(np.flatnonzero(ids >= 0).tolist())
    orders = []
    for epoch in range(3):
        plans = [EpochPlan(ids, buckets, batch_size, world_size, rank, seed=7, sizes=sizes) for rank in range(world_size)]
        per_rank = [collect(plan, epoch) for plan in plans]
        assert len({len(batches) for batches in per_rank}) == 1, "every rank yields the same number of batches"
        assert len(per_rank[0]) == len(plans[0])
        seen = []
        for batches in per_rank:
            for resolution, items in batches:
                assert resolution in bucket_sizes and len(items) == batch_size
                seen.extend(items.tolist())
        assert len(seen) == len(set(seen)), "no image twice in an epoch, within or across ranks"
        trimmed = plans[0].trimmed(epoch).tolist()
        assert len(trimmed) < world_size * batch_size
        assert set(seen) | set(trimmed) == eligible and not set(seen) & set(trimmed)
        orders.append([items.tolist() for _, items in per_rank[0]])
    assert orders[0] != orders[1] != orders[2], "each epoch has its own order"


def test_batches_hold_their_bucket_except_a_small_catchall():
    sizes, ids = random_dataset(3000)
    buckets = make_buckets()
    plan = EpochPlan(ids, buckets, 8, world_size=2, rank=1, seed=3, sizes=sizes)
    mixed = 0
    for (width, height), items in plan.batches(0):
        own = {tuple(buckets[b]) for b in ids[items]}
        if own != {(width, height)}:
            mixed += 1
    # Each bucket leaves fewer than batch_size items behind, so the catch-all
    # forms fewer batches than there are buckets.
    assert mixed <= plan.catchall_summary(0)["catchall_batches"] < len(buckets)


def test_catchall_is_cropped_less_than_a_square_bucket():
    sizes, ids = random_dataset(4000)
    plan = EpochPlan(ids, make_buckets(), 16, seed=1, sizes=sizes)
    summary = plan.catchall_summary(0)
    assert summary["catchall_batches"] > 0
    assert summary["catchall_mean_crop"] < summary["catchall_mean_crop_square"]
    assert EpochPlan(ids, make_buckets(), 16, seed=1).catchall_summary(0)["catchall_mean_crop"] is None


def test_same_seed_same_order_other_seed_other_order():
    _, ids = random_dataset(800)
    buckets = make_buckets()

    def order(seed):
        return [(res, items.tolist()) for res, items in EpochPlan(ids, buckets, 4, seed=seed).batches(2)]

    assert order(5) == order(5)
    assert order(5) != order(6)


def test_item_ids_are_what_batches_yield():
    _, ids = random_dataset(300)
    item_ids = np.arange(300) * 10 + 3
    plain = collect(EpochPlan(ids, make_buckets(), 4, seed=2), 0)
    mapped = collect(EpochPlan(ids, make_buckets(), 4, seed=2, item_ids=item_ids), 0)
    assert [item_ids[items].tolist() for _, items in plain] == [items.tolist() for _, items in mapped]


def test_draw_order_follows_bucket_sizes():
    # One bucket with 90% of the items, one with 10%: over the first half of
    # the epoch the big bucket's share of batches stays near 90%.
    buckets = np.array([[512, 512], [768, 512]])
    ids = np.repeat([0, 1], [9000, 1000])
    first_half = [res for res, _ in itertools.islice(EpochPlan(ids, buckets, 10, seed=4).batches(0), 500)]
    share = first_half.count((512, 512)) / len(first_half)
    assert 0.85 < share < 0.95


@pytest.mark.parametrize("world_size", [1, 3])
def test_resume_mid_epoch_gives_exactly_the_remaining_batches(world_size):
    sizes, ids = random_dataset(1000)
    buckets = make_buckets()
    full = collect(EpochPlan(ids, buckets, 5, world_size, world_size - 1, seed=9, sizes=sizes), 1)

    plan = EpochPlan(ids, buckets, 5, world_size, world_size - 1, seed=9, sizes=sizes)
    stream = plan.batches(1)
    head = [next(stream) for _ in range(17)]
    state = plan.state_dict()
    assert state["epoch"] == 1 and state["position"] == 17

    resumed = EpochPlan(ids, buckets, 5, world_size, world_size - 1, seed=9, sizes=sizes)
    resumed.load_state_dict(state)
    tail = collect(resumed, 1)
    got = head + tail
    assert [(r, i.tolist()) for r, i in got] == [(r, i.tolist()) for r, i in full]
    assert collect(resumed, 1) == [], "a finished epoch yields nothing more"
    assert len(collect(resumed, 2)) == len(full), "the next epoch starts from its beginning"


def test_resume_refuses_a_different_plan():
    _, ids = random_dataset(400)
    state = EpochPlan(ids, make_buckets(), 4, seed=1).state_dict()
    with pytest.raises(ValueError, match="batch_size"):
        EpochPlan(ids, make_buckets(), 8, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        EpochPlan(ids, make_buckets(), 4, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="outside"):
        EpochPlan(ids, make_buckets(), 4, seed=1).load_state_dict({**state, "position": 10**9})


def test_too_small_dataset_is_a_clear_error():
    ids = np.array([0, 1, 2, -1, -1])
    with pytest.raises(ValueError, match="cannot fill one batch"):
        EpochPlan(ids, make_buckets(), batch_size=2, world_size=2)
    assert len(EpochPlan(ids, make_buckets(), batch_size=3)) == 1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(batch_size=0), "batch_size"),
        (dict(world_size=2, rank=2), "rank"),
        (dict(seed=-1), "seed"),
    ],
)
def test_plan_rejects_bad_arguments(kwargs, message):
    _, ids = random_dataset(100)
    with pytest.raises(ValueError, match=message):
        EpochPlan(ids, make_buckets(), **{"batch_size": 2, **kwargs})
    with pytest.raises(ValueError, match="bucket_ids"):
        EpochPlan(np.array([0, 99]), make_buckets(), 1)


def test_scaled_buckets_are_the_sd1_grid_at_512_and_scale_down():
    assert np.array_equal(scaled_buckets(512, 64), preset_buckets("sd1"))
    small = scaled_buckets(128, 16)
    assert (small % 16 == 0).all() and [128, 128] in small.tolist()
    assert (small.prod(axis=1) <= 128 * 192).all()
    with pytest.raises(ValueError, match="multiple of 64"):
        scaled_buckets(100, 64)
