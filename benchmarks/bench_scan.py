"""Benchmark reading image sizes: header-only scan vs decoding every image, and the cached rescan.

Run ``pytest benchmarks/bench_scan.py`` for the full 2000-file tree; with
``--benchmark-disable`` each benchmark runs once on 50 files, as a smoke test.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import BASELINE, FAST, smoke_mode
from PIL import Image

from nai_fast.data.scan import scan

FULL_FILE_COUNT = 2000
SMOKE_FILE_COUNT = 50
ROUNDS = 3


@pytest.fixture(scope="module")
def image_tree(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of small real JPEG and PNG files of random sizes (64 to 512 pixels a side)."""
    smoke = smoke_mode(request.config)
    root = tmp_path_factory.mktemp("bench_scan")
    rng = np.random.default_rng(0)
    for index in range(SMOKE_FILE_COUNT if smoke else FULL_FILE_COUNT):
        width, height = (int(side) for side in rng.integers(64, 513, size=2))
        # A gradient, not flat colour, so files and decode times are realistic.
        row = np.linspace(0, 255, width, dtype=np.uint8)
        pixels = np.broadcast_to(row[None, :, None], (height, width, 3)) ^ rng.integers(0, 256, 3, dtype=np.uint8)
        folder = root / f"{index // 100:02d}"  # 100 files a folder, so the walk recurses
        folder.mkdir(exist_ok=True)
        extension = "jpg" if index % 2 else "png"
        Image.fromarray(np.ascontiguousarray(pixels)).save(folder / f"{index:05d}.{extension}")
    return root


def image_files(root: Path) -> list[Path]:
    return sorted(path for path in root.rglob("*") if path.suffix in (".jpg", ".png"))


def decode_every_image(root: Path) -> list[list[int]]:
    """The naive baseline: open and fully decode each image just to learn its size."""
    sizes = []
    for path in image_files(root):
        with Image.open(path) as image:
            image.load()
            sizes.append(list(image.size))
    return sizes


def test_read_sizes_from_headers(timed, image_tree: Path) -> None:
    group = f"scan {len(image_files(image_tree)):,} files"
    result = timed(group, FAST, lambda: scan(image_tree, cache=False), rounds=ROUNDS)
    assert len(result) == len(image_files(image_tree))


def test_read_sizes_by_decoding(timed, image_tree: Path) -> None:
    group = f"scan {len(image_files(image_tree)):,} files"
    sizes = timed(group, BASELINE, lambda: decode_every_image(image_tree), rounds=ROUNDS)
    assert sizes == scan(image_tree, cache=False).sizes.tolist()


@pytest.mark.parametrize("role", [BASELINE, FAST])
def test_rescan(timed, image_tree: Path, tmp_path: Path, role: str) -> None:
    """A rescan of an unchanged tree: reading every header again versus the warm cache."""
    cache = tmp_path / "sizes.npz"
    expected = scan(image_tree, cache=cache)  # fills the cache; the rescan only stats files
    group = f"rescan {len(expected):,} unchanged files"
    options = {"cache": cache} if role == FAST else {"cache": False}
    result = timed(group, role, lambda: scan(image_tree, **options), rounds=ROUNDS)
    assert result.paths == expected.paths
    np.testing.assert_array_equal(result.sizes, expected.sizes)
