"""Bucketed training data for torch: a batch sampler that drives an
:class:`~nai_fast.data.buckets.EpochPlan`, a dataset that loads one bucket's batch,
and an account of every file.

Use them together, with whole batches as the DataLoader's unit of work::

    sampler = BucketBatchSampler(bucket_ids, buckets, batch_size=4, sizes=found.sizes)
    dataset = BucketDataset(found.root, found.paths)
    loader = DataLoader(dataset, sampler=sampler, batch_size=None, num_workers=4)
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for batch in loader: ...

Each worker then fits all images of a batch to the batch's resolution. Several
processes give each sampler its ``rank`` and ``world_size`` and one ``seed``
(a trainer passes its session's), or build it with
:meth:`BucketBatchSampler.from_process_group`, which asks torch.distributed and
shares rank 0's seed, so shards never overlap.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from .buckets import EpochPlan
from .images import ImageLoadError, fit
from .scan import ScanResult, read_tags


@dataclass(frozen=True)
class BatchRequest:
    """What the sampler hands the dataset: one batch of one resolution."""

    epoch: int
    position: int  # the batch's index within its epoch on this rank
    width: int
    height: int
    items: np.ndarray  # item indices into the dataset's paths


def shared_seed(seed: int | None = None) -> int:
    """A seed every rank agrees on: rank 0's (drawn at random when ``None``),
    broadcast when torch.distributed is initialized, so ranks that were given
    different seeds still shard one shuffle instead of overlapping."""
    value = secrets.randbits(63) if seed is None else int(seed)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        value = box[0]
    return value


def _process_group_size() -> int:
    """Ranks of torch.distributed's process group; 1 where none is initialized."""
    initialized = torch.distributed.is_available() and torch.distributed.is_initialized()
    return torch.distributed.get_world_size() if initialized else 1


class BucketBatchSampler(Sampler[BatchRequest]):
    """Yields this rank's :class:`BatchRequest` s, epoch by epoch.

    Call :meth:`set_epoch` before each epoch, as with ``DistributedSampler``;
    iterating again without it moves on to the next epoch once the current
    one is finished. :meth:`state_dict` / :meth:`load_state_dict` save and
    restore the position within an epoch.

    Args mirror :class:`~nai_fast.data.buckets.EpochPlan`: one process by default;
    for several, pass this process's ``rank``, the ``world_size`` and a ``seed``
    all ranks share (or use :meth:`from_process_group`). Leaving ``world_size``
    out inside a process group of several ranks is an error, not one process's
    whole epoch on every rank. ``seed=None`` draws one, which only a single
    process may do.
    """

    def __init__(
        self,
        bucket_ids: np.ndarray,
        buckets: np.ndarray,
        batch_size: int,
        *,
        seed: int | None = None,
        world_size: int | None = None,
        rank: int = 0,
        sizes: np.ndarray | None = None,
        item_ids: np.ndarray | None = None,
    ) -> None:
        if world_size is None:
            running = _process_group_size()
            if running > 1:  # each rank would take the whole epoch: say so rather than train on copies
                raise ValueError(
                    f"torch.distributed runs {running} ranks: pass this process's rank and world_size, or use "
                    "BucketBatchSampler.from_process_group"
                )
            world_size = 1
        if seed is None and world_size > 1:
            raise ValueError(
                "several ranks need one seed: pass the same seed on every rank, or use "
                "BucketBatchSampler.from_process_group, which shares rank 0's"
            )
        seed = secrets.randbits(63) if seed is None else int(seed)
        self.plan = EpochPlan(bucket_ids, buckets, batch_size, world_size, rank, seed, item_ids=item_ids, sizes=sizes)
        self.epoch = 0
        self._epoch_was_set = False

    @classmethod
    def from_process_group(
        cls, bucket_ids: np.ndarray, buckets: np.ndarray, batch_size: int, *, seed: int | None = None, **kwargs: Any
    ) -> BucketBatchSampler:
        """A sampler for this process of torch.distributed's (initialized) process group: its rank
        and world size, and rank 0's ``seed`` (see :func:`shared_seed`); one process when there is
        no process group. ``kwargs``: as the constructor's."""
        world_size, rank = _process_group_size(), 0
        if world_size > 1:
            rank = torch.distributed.get_rank()
        return cls(
            bucket_ids, buckets, batch_size, seed=shared_seed(seed), world_size=world_size, rank=rank, **kwargs
        )

    def __len__(self) -> int:
        return len(self.plan)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self._epoch_was_set = True

    def __iter__(self) -> Iterator[BatchRequest]:
        finished = self.plan.epoch == self.epoch and self.plan.position >= len(self.plan)
        if finished and not self._epoch_was_set:
            self.epoch += 1
        self._epoch_was_set = False
        epoch = self.epoch
        for (width, height), items in self.plan.batches(epoch):
            yield BatchRequest(epoch, self.plan.position - 1, width, height, items)  # the plan counts yielded batches

    def state_dict(self, consumed: int | None = None) -> dict[str, int]:
        """The plan's state. A DataLoader with workers draws batches ahead of
        the training loop: pass ``consumed``, the number of this epoch's
        batches the loop has finished (``batch["position"] + 1``), to save
        that point rather than how far the sampler has run."""
        state = self.plan.state_dict()
        state["epoch"] = self.epoch
        if consumed is not None:
            state["position"] = int(consumed)
        return state

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.plan.load_state_dict(state)
        self.set_epoch(self.plan.epoch)


class BucketDataset(Dataset):
    """Loads a :class:`BatchRequest`'s images, fitted to its resolution.

    Returns a dict: ``pixels`` (n, 3, height, width) in [-1, 1], ``captions``
    (the ``.txt`` tags beside each image, ``""`` if none), ``indices``,
    ``original_size`` / ``crop_top_left`` / ``target_size`` (n, 2) as (h, w)
    and (top, left) for size conditioning, ``epoch`` and ``position``. An image
    that fails to load is left out of its batch and listed, with the reason,
    in ``skipped``, so one bad file never stops an epoch. Crops are seeded by
    ``(seed, epoch, item)``: the same in every run, different every epoch. With
    ``fixed_crops`` they ignore the epoch (seeded as epoch 0's): an image keeps one
    crop per bucket for good, as a cache of its latents needs.
    """

    def __init__(
        self, root: str | Path, paths: Sequence[str], *, seed: int = 0, captions: bool = True, fixed_crops: bool = False
    ) -> None:
        self.root = Path(root)
        self.paths = list(paths)
        self.seed = seed
        self.captions = captions
        self.fixed_crops = fixed_crops

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, request: BatchRequest) -> dict[str, Any]:
        fitted, kept, skipped = [], [], []
        crop_epoch = 0 if self.fixed_crops else request.epoch
        for index in request.items.tolist():
            path = self.root / self.paths[index]
            try:
                image = fit(path, request.width, request.height, np.random.default_rng([self.seed, crop_epoch, index]))
            except ImageLoadError as error:
                skipped.append((self.paths[index], error.reason))
                continue
            fitted.append(image)
            kept.append(index)
        return {
            "pixels": (
                torch.stack([image.pixels for image in fitted])
                if fitted
                else torch.empty(0, 3, request.height, request.width)
            ),
            "captions": [(read_tags(self.root / self.paths[i]) or "") if self.captions else "" for i in kept],
            "indices": torch.tensor(kept, dtype=torch.long),
            "original_size": _pairs([image.original_size for image in fitted]),
            "crop_top_left": _pairs([image.crop_top_left for image in fitted]),
            "target_size": _pairs([image.target_size for image in fitted]),
            "epoch": request.epoch,
            "position": request.position,
            "skipped": skipped,
        }


def _pairs(rows: list[tuple[int, int]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long).reshape(-1, 2)


def account(found: ScanResult, bucket_ids: np.ndarray, plan: EpochPlan, epoch: int = 0) -> dict[str, Any]:
    """Where every file went: assigned, pruned for aspect ratio, unreadable
    (by reason), and trimmed from ``epoch`` to keep batches whole.

    ``found`` are the scanned files, ``bucket_ids`` their assignment (``-1``
    pruned), ``plan`` the epoch plan over them. The counts add up to
    ``files``; load failures during training come on top, in each batch's
    ``skipped``.
    """
    pruned = int((bucket_ids < 0).sum())
    trimmed = len(plan.trimmed(epoch))
    return {
        "files": found.num_files,
        "unreadable": found.skipped_counts(),
        "pruned_aspect": pruned,
        "trimmed": trimmed,
        "in_epoch": len(found.paths) - pruned - trimmed,
    }
