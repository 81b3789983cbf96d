"""The torch side of bucketing: sampler, dataset, DataLoader, torch.distributed."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from torch.utils.data import DataLoader

from nai_fast.data.buckets import assign, make_buckets
from nai_fast.data.loading import BatchRequest, BucketBatchSampler, BucketDataset, account
from nai_fast.data.scan import scan

# A small grid keeps every decode and resize cheap.
BUCKETS = make_buckets(max_area=96 * 128, max_side=192, min_side=64, step=32, base=(96, 96))


def make_folder(root: Path, count: int = 40, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for index in range(count):
        width, height = (int(v) for v in rng.integers(40, 300, size=2))
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        folder = root / ("sub" if index % 3 else "")
        folder.mkdir(exist_ok=True)
        Image.new("RGB", (width, height), colour).save(folder / f"img{index:03d}.{('png', 'jpg')[index % 2]}")
        if index % 4 == 0:
            (folder / f"img{index:03d}.txt").write_text(f"tag{index}, 1girl, smile\n")


def make_sampler(found, batch_size=4, **kwargs):
    ids = assign(found.sizes, BUCKETS, max_aspect_error=0.5)
    return ids, BucketBatchSampler(ids, BUCKETS, batch_size, sizes=found.sizes, **kwargs)


def test_loader_yields_whole_bucket_batches(tmp_path):
    make_folder(tmp_path)
    found = scan(tmp_path, cache=False)
    ids, sampler = make_sampler(found, seed=1, world_size=1, rank=0)
    dataset = BucketDataset(found.root, found.paths, seed=5)
    loader = DataLoader(dataset, sampler=sampler, batch_size=None, num_workers=2)

    seen = []
    for batch in loader:
        count = len(batch["indices"])
        assert count == 4 and batch["skipped"] == []
        height, width = batch["pixels"].shape[-2:]
        assert batch["pixels"].shape == (count, 3, height, width) and (width, height) in map(tuple, BUCKETS)
        assert batch["pixels"].min() >= -1 and batch["pixels"].max() <= 1
        assert batch["target_size"].tolist() == [[height, width]] * count
        for index, original, caption in zip(batch["indices"].tolist(), batch["original_size"].tolist(), batch["captions"]):
            assert original == found.sizes[index][::-1].tolist()
            assert caption == (found.tags(index) or "")
        seen += batch["indices"].tolist()
    assert len(seen) == len(set(seen)) == len(sampler) * 4
    report = account(found, ids, sampler.plan)
    assert report["in_epoch"] == len(seen)
    assert report["in_epoch"] + report["trimmed"] + report["pruned_aspect"] + sum(report["unreadable"].values()) == 40
    assert any("tag0" in caption for caption in [found.tags(i) or "" for i in range(len(found))])


def test_bad_file_is_skipped_and_reported_not_fatal(tmp_path):
    make_folder(tmp_path, count=12)
    noise = np.random.default_rng(0).integers(0, 256, size=(96, 128, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "broken.jpg")
    truncated = (tmp_path / "broken.jpg").read_bytes()
    (tmp_path / "broken.jpg").write_bytes(truncated[: len(truncated) // 2])  # the header parses; decoding fails
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.jpg").write_text("not an image")
    found = scan(tmp_path, cache=False)
    ids, sampler = make_sampler(found, batch_size=1, seed=0)
    dataset = BucketDataset(found.root, found.paths)
    batches = list(DataLoader(dataset, sampler=sampler, batch_size=None))
    skipped = [entry for batch in batches for entry in batch["skipped"]]
    delivered = sum(len(batch["indices"]) for batch in batches)
    assert ids[found.paths.index("broken.jpg")] >= 0
    assert [path for path, _ in skipped] == ["broken.jpg"] and skipped[0][1]
    assert delivered == len(sampler) - 1
    report = account(found, ids, sampler.plan)
    assert report["unreadable"] == {"empty": 1, "not_image": 1}
    assert report["files"] == 15


def test_crops_are_seeded_by_item_and_epoch(tmp_path):
    image = np.zeros((64, 256, 3), dtype=np.uint8)
    image[:, :, 0] = np.arange(256, dtype=np.uint8)  # a horizontal ramp shows where the crop is
    Image.fromarray(image).save(tmp_path / "wide.png")
    dataset = BucketDataset(tmp_path, ["wide.png"], seed=3)

    def crop(epoch):
        return dataset[BatchRequest(epoch, 0, 64, 64, np.array([0]))]["crop_top_left"].tolist()

    assert crop(0) == crop(0)
    assert len({tuple(map(tuple, crop(epoch))) for epoch in range(8)}) > 1

    fixed = BucketDataset(tmp_path, ["wide.png"], seed=3, fixed_crops=True)
    batches = [fixed[BatchRequest(epoch, 0, 64, 64, np.array([0]))] for epoch in range(8)]
    assert [batch["crop_top_left"].tolist() for batch in batches] == [crop(0)] * 8  # epoch 0's, in every epoch
    assert [batch["epoch"] for batch in batches] == list(range(8))


def test_set_epoch_resume_and_auto_advance(tmp_path):
    make_folder(tmp_path, count=30)
    found = scan(tmp_path, cache=False)
    _, sampler = make_sampler(found, seed=11)
    epochs = [[request.items.tolist() for request in sampler] for _ in range(2)]
    assert epochs[0] != epochs[1], "iterating again moves on to the next epoch"

    sampler.set_epoch(5)
    requests = list(sampler)
    assert {request.epoch for request in requests} == {5}
    assert [request.position for request in requests] == list(range(len(sampler)))

    # A loader with workers runs ahead: save what the loop consumed, not what the sampler drew.
    _, resumed = make_sampler(found, seed=11)
    resumed.load_state_dict(sampler.state_dict(consumed=3))
    assert [r.items.tolist() for r in resumed] == [r.items.tolist() for r in requests[3:]]


def test_random_seed_when_none_is_given(tmp_path):
    make_folder(tmp_path, count=20)
    found = scan(tmp_path, cache=False)
    seeds = {make_sampler(found)[1].plan.seed for _ in range(3)}
    assert len(seeds) == 3
    with pytest.raises(ValueError, match="one seed"):
        make_sampler(found, world_size=2, rank=1)  # each rank would draw its own


def _distributed_worker(rank, world_size, init_file, sizes, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        ids = assign(sizes, BUCKETS)
        # Each rank is given a different seed: rank 0's must win, or shards would overlap.
        sampler = BucketBatchSampler.from_process_group(ids, BUCKETS, 3, seed=100 + rank, sizes=sizes)
        batches = [request.items for request in sampler]
        try:  # leaving the ranks out would give every rank the whole epoch: refused
            BucketBatchSampler(ids, BUCKETS, 3, seed=1, sizes=sizes)
        except ValueError as error:
            assert "runs 2 ranks" in str(error), error
        else:
            raise AssertionError("a sampler without world_size under 2 ranks was accepted")
        np.save(os.path.join(out_dir, f"rank{rank}.npy"), np.stack(batches))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two processes
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
def test_ranks_under_torch_distributed_get_disjoint_equal_shards(tmp_path):
    sizes = np.random.default_rng(0).integers(50, 400, size=(200, 2))
    world_size = 2
    mp.spawn(_distributed_worker, args=(world_size, tmp_path / "init", sizes, tmp_path), nprocs=world_size)
    shards = [np.load(tmp_path / f"rank{rank}.npy") for rank in range(world_size)]
    assert shards[0].shape == shards[1].shape
    assert not set(shards[0].ravel()) & set(shards[1].ravel())
    assert len(set(shards[0].ravel()) | set(shards[1].ravel())) == 200 // 6 * 6
