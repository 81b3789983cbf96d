"""Aspect-ratio buckets: make them, assign images to them, plan epochs over them.

NovelAI trains on batches whose images share one resolution (a *bucket*) while
resolutions differ between batches, so no image is center-cropped to a square.
This module is the NumPy-only core of that scheme: no torch, no PIL, no Python
loop over images.

- :func:`make_buckets` lists the resolutions of a pixel budget.
- :func:`assign` puts each image in the bucket nearest its aspect ratio.
- :class:`EpochPlan` turns assignments into each rank's batches of an epoch:
  shuffled, sharded, weighted by bucket size, resumable.

Sizes and buckets are always ``(width, height)`` pairs.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

__all__ = [
    "PRESETS",
    "EpochPlan",
    "aspect_keys",
    "assign",
    "assign_with_errors",
    "crop_fractions",
    "make_buckets",
    "nearest_buckets",
    "preset_buckets",
    "scaled_buckets",
]

# Bucket-grid settings of the models nai_fast knows. "sd1" is NovelAI's 2022
# setting for SD 1.x (512x768 pixels of budget); "sdxl" is its 1024x1024-area
# counterpart.
PRESETS: dict[str, dict[str, Any]] = {
    "sd1": dict(max_area=512 * 768, max_side=1024, min_side=256, step=64, base=(512, 512)),
    "sdxl": dict(max_area=1024 * 1024, max_side=2048, min_side=512, step=64, base=(1024, 1024)),
}

METRICS = ("log", "linear")

# Images are matched in slices of this many: the temporaries stay in cache and
# memory stays flat however large the dataset (10M sizes at once would need
# about 1 GB of them).
_SLICE = 1 << 16


def make_buckets(
    max_area: int = 512 * 768,
    max_side: int = 1024,
    min_side: int = 256,
    step: int = 64,
    base: tuple[int, int] = (512, 512),
) -> np.ndarray:
    """Return the bucket resolutions of a pixel budget as an int64 ``(K, 2)`` array.

    For each width from ``min_side`` to ``max_side`` in steps of ``step``, the
    largest height (a multiple of ``step``, at most ``max_side``) with
    ``width * height <= max_area``; the same with the sides exchanged; plus the
    ``base`` bucket. Widths whose largest height would fall below ``min_side``
    are left out. Duplicates are removed; rows are sorted by width ascending,
    then height descending (the order of NovelAI's 2022 bucketer, which decides
    ties in :func:`assign` with ``metric="linear"``).
    """
    for name, value in (("max_area", max_area), ("max_side", max_side), ("min_side", min_side), ("step", step)):
        if int(value) != value or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if min_side > max_side:
        raise ValueError(f"min_side ({min_side}) must not exceed max_side ({max_side})")
    if min_side % step:
        raise ValueError(f"min_side ({min_side}) must be a multiple of step ({step})")
    if min_side * min_side > max_area:
        raise ValueError(f"max_area ({max_area}) is below min_side**2 ({min_side**2}): no bucket fits")

    widths = np.arange(min_side, max_side + 1, step, dtype=np.int64)
    heights = np.minimum(max_side, max_area // (widths * step) * step)
    fits = heights >= min_side
    half = np.stack([widths[fits], heights[fits]], axis=1)
    pairs = np.unique(np.concatenate([half, half[:, ::-1], np.asarray([base], dtype=np.int64)]), axis=0)
    return pairs[np.lexsort((-pairs[:, 1], pairs[:, 0]))]


def preset_buckets(name: str) -> np.ndarray:
    """The buckets of a named preset (see :data:`PRESETS`)."""
    try:
        return make_buckets(**PRESETS[name])
    except KeyError:
        raise ValueError(f"unknown bucket preset {name!r}; choose one of {sorted(PRESETS)}") from None


def scaled_buckets(resolution: int, unit: int = 64) -> np.ndarray:
    """The ``sd1`` grid (512x768 budget, sides 256..1024, step 64, base 512x512) scaled to a
    base side of ``resolution``, every side a multiple of ``unit`` (the pixels one latent
    cell of the U-Net's deepest level covers: 64 for SD 1.x). ``scaled_buckets(512)`` is
    ``preset_buckets("sd1")``."""
    if resolution < unit or resolution % unit:
        raise ValueError(f"resolution must be a positive multiple of {unit} for this model, got {resolution}")
    scale = resolution / 512
    step = max(unit, round(64 * scale / unit) * unit)
    min_side = max(step, round(256 * scale / step) * step)
    max_side = max(min_side, round(1024 * scale / step) * step)
    return make_buckets(round(512 * 768 * scale * scale), max_side, min_side, step, (resolution, resolution))


def aspect_keys(sizes: np.ndarray, metric: str = "log") -> np.ndarray:
    """The number compared between images and buckets: ``log(w/h)`` or ``w/h``.

    In log space a 2:1 landscape and a 1:2 portrait are equally far from
    square; in linear space (the 2022 reference) portraits are squeezed into
    ``(0, 1)`` and landscapes spread over ``(1, inf)``.
    """
    _check_metric(metric)
    return _keys(_as_sizes(sizes, "sizes"), metric)


def nearest_buckets(sizes: np.ndarray, buckets: np.ndarray, metric: str = "log") -> tuple[np.ndarray, np.ndarray]:
    """Each image's nearest bucket in aspect ratio, and its aspect error.

    Returns ``(ids, errors)``: int64 bucket indices and ``|key(bucket) - key(image)|``
    in the metric's units. Ties go to the lower bucket index, as ``np.argmin``
    over all buckets would decide them. Works through the images in slices,
    so memory beyond the two outputs stays small for any N.
    """
    _check_metric(metric)
    sizes = _as_sizes(sizes, "sizes")
    bucket_keys = _keys(_as_sizes(buckets, "buckets"), metric)
    ids = np.empty(len(sizes), dtype=np.int64)
    errors = np.empty(len(sizes), dtype=np.float64)
    for start in range(0, len(sizes), _SLICE):
        part = slice(start, start + _SLICE)
        ids[part], errors[part] = _nearest_by_key(_keys(sizes[part], metric), bucket_keys)
    return ids, errors


def assign(
    sizes: np.ndarray,
    buckets: np.ndarray,
    max_aspect_error: float | None = None,
    metric: str = "log",
) -> np.ndarray:
    """Bucket index of each image, ``-1`` where no bucket is near enough.

    An image is kept when its aspect error is strictly below
    ``max_aspect_error`` (the 2022 reference's rule); ``None`` keeps all. With
    ``metric="linear"`` this reproduces NovelAI's 2022 bucketer exactly,
    including its tie-breaking, given its bucket order from :func:`make_buckets`.
    """
    return assign_with_errors(sizes, buckets, max_aspect_error, metric)[0]


def assign_with_errors(
    sizes: np.ndarray,
    buckets: np.ndarray,
    max_aspect_error: float | None = None,
    metric: str = "log",
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`assign`, also returning each image's aspect error to its
    nearest bucket (pruned images included)."""
    ids, errors = nearest_buckets(sizes, buckets, metric)
    if max_aspect_error is not None:
        ids[errors >= max_aspect_error] = -1
    return ids, errors


def crop_fractions(sizes: np.ndarray, buckets: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Fraction of each image's area that scale-to-cover then crop removes.

    The image is scaled so it covers its bucket, then the overhang is cropped;
    ``0.0`` means the aspect ratios match. ``NaN`` where ``ids`` is ``-1``.
    """
    sizes = _as_sizes(sizes, "sizes")
    buckets = _as_sizes(buckets, "buckets")
    ids = np.asarray(ids)
    if ids.shape != (len(sizes),):
        raise ValueError(f"ids must have shape ({len(sizes)},), got {ids.shape}")
    chosen = buckets[np.maximum(ids, 0)].astype(np.float64)
    w, h = sizes[:, 0].astype(np.float64), sizes[:, 1].astype(np.float64)
    scale = np.maximum(chosen[:, 0] / w, chosen[:, 1] / h)
    kept = chosen[:, 0] * chosen[:, 1] / (w * h * scale * scale)
    return np.where(ids >= 0, 1.0 - kept, np.nan)


class EpochPlan:
    """Each rank's sequence of single-resolution batches, epoch by epoch.

    For epoch ``e``: the eligible items (bucket id >= 0) are shuffled with a
    generator seeded by ``(seed, e)``, identical on every rank; the tail is
    trimmed so the count divides by ``world_size * batch_size``; rank ``r``
    takes every ``world_size``-th item from ``r``, so shards are disjoint and
    equal. Within the shard, each bucket yields its full batches; the
    remainders go to a catch-all whose batches group neighbours in aspect
    ratio and take the bucket nearest their mean, instead of all being forced
    to one square resolution. Batches are then drawn at random with weight
    equal to each source's remaining size, as the 2022 reference does; because
    every source holds whole batches, that draw is a uniform shuffle of the
    batches, built here in one vectorized step instead of one draw per batch.

    Every rank yields ``len(plan)`` batches per epoch. The plan remembers how
    far the current epoch has been consumed: :meth:`state_dict` saves that and
    :meth:`load_state_dict` restores it, so :meth:`batches` continues exactly
    where an interrupted run stopped.

    Args:
        bucket_ids: ``(N,)`` bucket index per item, ``-1`` for pruned items.
        buckets: ``(K, 2)`` bucket resolutions ``(width, height)``.
        batch_size: items per batch.
        world_size, rank: this process's place among the data-parallel ranks.
        seed: non-negative int, the same on every rank.
        item_ids: what a batch yields for each item (default ``arange(N)``).
        sizes: ``(N, 2)`` image sizes; lets the catch-all group by the images'
            own aspect ratios (else by their buckets') and enables crop figures.
        metric: aspect metric of the catch-all's grouping ("log" or "linear").
    """

    def __init__(
        self,
        bucket_ids: np.ndarray,
        buckets: np.ndarray,
        batch_size: int,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 0,
        *,
        item_ids: np.ndarray | None = None,
        sizes: np.ndarray | None = None,
        metric: str = "log",
    ) -> None:
        self.buckets = _as_sizes(buckets, "buckets")
        bucket_ids = np.asarray(bucket_ids)
        if bucket_ids.ndim != 1 or not np.issubdtype(bucket_ids.dtype, np.integer):
            raise ValueError(f"bucket_ids must be a 1-D integer array, got {bucket_ids.dtype} {bucket_ids.shape}")
        if bucket_ids.size and (bucket_ids.min() < -1 or bucket_ids.max() >= len(self.buckets)):
            raise ValueError(f"bucket_ids must lie in [-1, {len(self.buckets)})")
        if int(batch_size) != batch_size or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if int(world_size) != world_size or world_size < 1:
            raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in [0, {world_size}), got {rank!r}")
        if int(seed) != seed or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.batch_size, self.world_size, self.rank, self.seed = int(batch_size), int(world_size), int(rank), int(seed)

        eligible = np.flatnonzero(bucket_ids >= 0)
        # int32 positions halve the memory traffic of the epoch's shuffles and gathers.
        self._eligible = eligible.astype(np.int32) if len(bucket_ids) < 2**31 else eligible
        per_step = self.world_size * self.batch_size
        if len(self._eligible) < per_step:
            raise ValueError(
                f"{len(self._eligible)} eligible items cannot fill one batch of {self.batch_size} "
                f"on each of {self.world_size} ranks (need at least {per_step})"
            )
        self._batches_per_epoch = len(self._eligible) // per_step
        # Small ints let NumPy's stable sort use radix sort: grouping stays linear.
        self._bucket_of = bucket_ids.astype(np.int16 if len(self.buckets) < 2**15 else np.int64)

        self.item_ids = np.arange(len(bucket_ids)) if item_ids is None else np.asarray(item_ids)
        if self.item_ids.shape[:1] != bucket_ids.shape:
            raise ValueError(f"item_ids must have {len(bucket_ids)} entries, got {self.item_ids.shape[:1]}")
        self.sizes = None if sizes is None else _as_sizes(sizes, "sizes")
        if self.sizes is not None and len(self.sizes) != len(bucket_ids):
            raise ValueError(f"sizes must have {len(bucket_ids)} rows, got {len(self.sizes)}")
        self.metric = metric
        self._bucket_keys = aspect_keys(self.buckets, metric)
        self._item_keys = (
            self._bucket_keys[np.maximum(self._bucket_of, 0)] if self.sizes is None else aspect_keys(self.sizes, metric)
        )
        self.epoch = 0
        self.position = 0

    def __len__(self) -> int:
        """Batches per epoch, the same on every rank and in every epoch."""
        return self._batches_per_epoch

    @property
    def num_items(self) -> int:
        """Items that take part in an epoch (bucket id >= 0), trimmed ones included."""
        return len(self._eligible)

    def batches(self, epoch: int) -> Iterator[tuple[tuple[int, int], np.ndarray]]:
        """Yield this rank's ``((width, height), item_ids)`` batches of ``epoch``.

        If ``epoch`` is the plan's current epoch, iteration continues from the
        current position (after :meth:`load_state_dict`, from the saved one),
        so an epoch that was consumed to its end yields nothing more; any other
        epoch starts from its first batch.
        """
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0
        bucket_seq, items = self.layout(epoch)
        resolutions = [tuple(size) for size in self.buckets[bucket_seq].tolist()]
        items = self.item_ids[items]
        while self.position < len(resolutions):
            self.position += 1
            yield resolutions[self.position - 1], items[self.position - 1]

    def layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """This rank's whole epoch at once: bucket index per batch ``(M,)`` and
        item positions (indices into ``bucket_ids``) per batch ``(M, batch_size)``."""
        bucket_seq, items, _ = self._build(epoch)
        return bucket_seq, items

    def trimmed(self, epoch: int) -> np.ndarray:
        """Item ids left out of ``epoch`` so every rank gets equal whole batches
        (fewer than ``world_size * batch_size``; the same on every rank)."""
        return self.item_ids[self._shuffled(epoch)[len(self) * self.world_size * self.batch_size :]]

    def catchall_summary(self, epoch: int = 0) -> dict[str, float | int | None]:
        """How this rank's catch-all batches of ``epoch`` fare against forcing
        them all to a square bucket, as the 2022 reference did.

        The crop fractions (mean over catch-all items) need ``sizes``; without
        them they are ``None``.
        """
        bucket_seq, items, from_catchall = self._build(epoch)
        summary: dict[str, float | int | None] = {
            "catchall_batches": int(from_catchall.sum()),
            "catchall_mean_crop": None,
            "catchall_mean_crop_square": None,
        }
        if self.sizes is None or not from_catchall.any():
            return summary
        members = self.sizes[items[from_catchall].ravel()]
        chosen = np.repeat(bucket_seq[from_catchall], self.batch_size)
        # The cropped fraction depends only on aspect ratios, so a 1x1 bucket
        # stands for every square resolution.
        square = crop_fractions(members, np.array([[1, 1]]), np.zeros(len(members), dtype=np.int64))
        summary["catchall_mean_crop"] = float(crop_fractions(members, self.buckets, chosen).mean())
        summary["catchall_mean_crop_square"] = float(square.mean())
        return summary

    def state_dict(self) -> dict[str, int]:
        """A small, JSON-friendly state: where the current epoch stands, and
        what the plan was built from (checked on load)."""
        return {
            "epoch": int(self.epoch),
            "position": int(self.position),
            "seed": self.seed,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "num_items": self.num_items,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore a position saved by :meth:`state_dict` (by any rank: the
        position is the same on all of them)."""
        for key in ("seed", "batch_size", "world_size", "num_items"):
            if key in state and int(state[key]) != getattr(self, key):
                raise ValueError(
                    f"cannot resume: the saved plan had {key}={state[key]}, this one has {getattr(self, key)}; "
                    "resuming would repeat or skip items"
                )
        position = int(state["position"])
        if not 0 <= position <= len(self):
            raise ValueError(f"saved position {position} is outside the epoch's {len(self)} batches")
        self.epoch, self.position = int(state["epoch"]), position

    def _build(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The epoch's batches in drawing order: bucket per batch, item
        positions per batch, and whether each batch came from the catch-all."""
        shard = self._shard(epoch)
        bucket_of = self._bucket_of[shard]
        grouped = shard[np.argsort(bucket_of, kind="stable")]  # stable: keeps the shuffled order
        counts = np.bincount(bucket_of, minlength=len(self.buckets))
        ends = np.cumsum(counts)
        starts = ends - counts
        full_ends = ends - counts % self.batch_size
        # Few buckets, many items: slicing per bucket is cheaper than masks.
        bounds = list(zip(starts.tolist(), full_ends.tolist(), ends.tolist()))
        in_full_batches = np.concatenate([grouped[start:full] for start, full, _ in bounds])
        leftovers = np.concatenate([grouped[full:end] for _, full, end in bounds])
        full_batches = (full_ends - starts) // self.batch_size
        leftovers = leftovers[np.argsort(self._item_keys[leftovers], kind="stable")].reshape(-1, self.batch_size)
        catchall_buckets, _ = _nearest_by_key(self._item_keys[leftovers].mean(axis=1), self._bucket_keys)

        bucket_seq = np.concatenate([np.repeat(np.arange(len(self.buckets)), full_batches), catchall_buckets])
        items = np.concatenate([in_full_batches.reshape(-1, self.batch_size), leftovers])
        from_catchall = np.arange(len(bucket_seq)) >= len(bucket_seq) - len(leftovers)
        order = np.random.default_rng([self.seed, epoch, self.rank]).permutation(len(bucket_seq))
        return bucket_seq[order], items[order], from_catchall[order]

    def _shuffled(self, epoch: int) -> np.ndarray:
        """All eligible positions in the epoch's shared random order."""
        if int(epoch) != epoch or epoch < 0:
            raise ValueError(f"epoch must be a non-negative integer, got {epoch!r}")
        return np.random.default_rng([self.seed, int(epoch)]).permutation(self._eligible)

    def _shard(self, epoch: int) -> np.ndarray:
        kept = self._shuffled(epoch)[: len(self) * self.world_size * self.batch_size]
        return kept[self.rank :: self.world_size]


def _nearest_by_key(keys: np.ndarray, bucket_keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index of the nearest bucket key for each key, and the distance.

    Only the two sorted neighbours of a key can be nearest (rounded
    subtraction is monotonic), so a binary search replaces the (N, K) distance
    matrix; the result equals ``argmin`` over all buckets, ties included.
    """
    order = np.argsort(bucket_keys, kind="stable")
    unique_keys, first = np.unique(bucket_keys[order], return_index=True)
    unique_ids = order[first]  # the lowest bucket index among equal keys
    above = np.minimum(np.searchsorted(unique_keys, keys), len(unique_keys) - 1)
    below = np.maximum(above - 1, 0)
    error_above = np.abs(unique_keys[above] - keys)
    error_below = np.abs(unique_keys[below] - keys)
    take_above = (error_above < error_below) | ((error_above == error_below) & (unique_ids[above] < unique_ids[below]))
    return unique_ids[np.where(take_above, above, below)], np.minimum(error_above, error_below)


def _keys(sizes: np.ndarray, metric: str) -> np.ndarray:
    ratio = sizes[:, 0] / sizes[:, 1]
    return np.log(ratio) if metric == "log" else ratio


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")


def _as_sizes(sizes: Any, name: str) -> np.ndarray:
    """Validate an ``(N, 2)`` array of positive (width, height) integers."""
    array = np.asarray(sizes)
    if array.ndim != 2 or array.shape[1] != 2:
        raise ValueError(f"{name} must have shape (N, 2) of (width, height), got {array.shape}")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        if not np.array_equal(array, np.round(array)):
            raise ValueError(f"{name} must hold integer pixel sizes")
        array = array.astype(np.int64)
    if array.size and array.min() <= 0:
        bad = int((array <= 0).any(axis=1).sum())
        raise ValueError(f"{name} must be positive; {bad} row(s) have a zero or negative side")
    return array
