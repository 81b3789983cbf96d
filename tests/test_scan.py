"""Tests for nai_fast.data.scan: header sizes, EXIF orientation, the size cache and skip reasons."""

from __future__ import annotations

import logging
import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import ExifTags, Image, ImageFile

from nai_fast.data.scan import DEFAULT_CACHE_NAME, SKIP_REASONS, ScanResult, read_tags, scan


def save_image(path: Path, size: tuple[int, int], *, orientation: int | None = None) -> Path:
    """Write a small RGB image at path (format from the extension), optionally with an EXIF orientation."""
    path.parent.mkdir(parents=True, exist_ok=True)
    extra = {}
    if orientation is not None:
        exif = Image.Exif()
        exif[ExifTags.Base.Orientation] = orientation
        extra["exif"] = exif
    Image.new("RGB", size, (200, 100, 50)).save(path, **extra)
    return path


def write_png_header(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims width x height with no real pixel data: a decompression bomb's header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit grey
    signature = b"\x89PNG\r\n\x1a\n"
    path.write_bytes(signature + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    return path


def assert_same_result(first: ScanResult, second: ScanResult) -> None:
    assert first.paths == second.paths
    np.testing.assert_array_equal(first.sizes, second.sizes)
    assert first.skipped == second.skipped


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The path of every PIL.Image.open call made from now on."""
    calls: list[str] = []
    real_open = Image.open

    def recording_open(fp, *args, **kwargs):
        calls.append(os.fspath(fp))
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(Image, "open", recording_open)
    return calls


@pytest.fixture
def mixed_tree(tmp_path: Path) -> Path:
    """Good images in nested folders plus one empty file and one non-image."""
    save_image(tmp_path / "a.png", (30, 20))
    save_image(tmp_path / "sub" / "b.jpg", (16, 30))
    save_image(tmp_path / "sub" / "deeper" / "c.webp", (25, 25))
    (tmp_path / "empty.png").touch()
    (tmp_path / "text.jpg").write_text("not an image")
    return tmp_path


@pytest.mark.parametrize("extension", ["jpg", "jpeg", "png", "webp", "bmp", "gif", "JPG", "Png", "WEBP"])
def test_header_size_equals_decoded_size(tmp_path: Path, extension: str, monkeypatch: pytest.MonkeyPatch) -> None:
    path = save_image(tmp_path / f"image.{extension}", (37, 23))
    with Image.open(path) as image:
        image.load()
        decoded_size = image.size

    def refuse_to_decode(self):
        raise AssertionError("scan decoded pixels")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse_to_decode)
    result = scan(tmp_path, cache=False)

    assert result.paths == [f"image.{extension}"]
    assert result.sizes.dtype == np.int64
    assert result.sizes.tolist() == [list(decoded_size)] == [[37, 23]]


def test_finds_images_recursively_in_sorted_posix_order(tmp_path: Path) -> None:
    for relative in ["b/z.png", "a/y.jpg", "a.png", "c/d/e.gif", "a/B.bmp"]:
        save_image(tmp_path / relative, (8, 8))
    (tmp_path / "notes.txt").write_text("1girl, solo")
    save_image(tmp_path / "other.tiff", (8, 8))

    result = scan(tmp_path, cache=False)

    assert result.paths == ["a.png", "a/B.bmp", "a/y.jpg", "b/z.png", "c/d/e.gif"]
    assert result.image_path(1) == tmp_path / "a" / "B.bmp"


@pytest.mark.parametrize("extension", ["jpg", "png", "webp"])
@pytest.mark.parametrize(("orientation", "expected"), [(1, (40, 20)), (3, (40, 20)), (6, (20, 40)), (8, (20, 40))])
def test_exif_orientation_gives_displayed_size(
    tmp_path: Path, extension: str, orientation: int, expected: tuple[int, int]
) -> None:
    save_image(tmp_path / f"photo.{extension}", (40, 20), orientation=orientation)

    assert scan(tmp_path, cache=False).sizes.tolist() == [list(expected)]


def test_rescan_of_unchanged_tree_opens_no_file(mixed_tree: Path, opened: list[str]) -> None:
    first = scan(mixed_tree)
    assert (mixed_tree / DEFAULT_CACHE_NAME).is_file()
    assert len(opened) == 4  # every file but the empty one, which is judged by its size
    opened.clear()

    second = scan(mixed_tree)

    assert opened == []
    assert_same_result(first, second)


def test_modified_file_is_reread_and_deleted_file_dropped(mixed_tree: Path, opened: list[str]) -> None:
    scan(mixed_tree)
    modified = mixed_tree / "a.png"
    old_mtime_ns = modified.stat().st_mtime_ns
    save_image(modified, (64, 10))
    os.utime(modified, ns=(old_mtime_ns + 10**9, old_mtime_ns + 10**9))  # coarse clocks: force a new mtime
    (mixed_tree / "sub" / "b.jpg").unlink()
    opened.clear()

    result = scan(mixed_tree)

    assert opened == [os.fspath(modified)]
    assert result.paths == ["a.png", "sub/deeper/c.webp"]
    assert result.sizes.tolist() == [[64, 10], [25, 25]]
    opened.clear()
    assert_same_result(scan(mixed_tree), result)
    assert opened == []


def test_changed_limits_reuse_the_cache(mixed_tree: Path, opened: list[str]) -> None:
    scan(mixed_tree)
    opened.clear()

    result = scan(mixed_tree, min_side=20, max_pixels=610)  # a.png has 600 pixels, c.webp 625

    assert opened == []
    assert result.paths == ["a.png"]
    assert result.skipped["too_small"] == ["sub/b.jpg"]
    assert result.skipped["too_large"] == ["sub/deeper/c.webp"]


def write_garbage(path: Path) -> None:
    path.write_bytes(b"definitely not a zip file")


def write_truncated_cache(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def write_foreign_npz(path: Path) -> None:
    with path.open("wb") as file:
        np.savez(file, something=np.arange(3))


def write_pickled_npz(path: Path) -> None:
    with path.open("wb") as file:
        np.savez(file, format=np.array(1), paths=np.array([{"evil": True}], dtype=object))


def write_mismatched_lengths(path: Path) -> None:
    with np.load(path) as arrays:
        columns = dict(arrays)
    columns["widths"] = columns["widths"][:1]
    with path.open("wb") as file:
        np.savez(file, **columns)


@pytest.mark.parametrize(
    "corrupt",
    [write_garbage, write_truncated_cache, write_foreign_npz, write_pickled_npz, write_mismatched_lengths],
)
def test_corrupt_cache_is_ignored_with_a_warning_and_rebuilt(
    mixed_tree: Path, opened: list[str], corrupt, caplog: pytest.LogCaptureFixture
) -> None:
    expected = scan(mixed_tree)
    corrupt(mixed_tree / DEFAULT_CACHE_NAME)

    with caplog.at_level(logging.WARNING, logger="nai_fast.data.scan"):
        result = scan(mixed_tree)
    assert [record.levelno for record in caplog.records] == [logging.WARNING]
    assert "ignoring unreadable scan cache" in caplog.records[0].getMessage()

    assert_same_result(result, expected)
    opened.clear()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="nai_fast.data.scan"):
        scan(mixed_tree)
    assert not caplog.records
    assert opened == []


def test_cache_can_be_disabled_or_moved(mixed_tree: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    for disabled in (False, None):
        scan(mixed_tree, cache=disabled)
    assert not (mixed_tree / DEFAULT_CACHE_NAME).exists()

    elsewhere = tmp_path_factory.mktemp("caches") / "sizes.npz"
    scan(mixed_tree, cache=elsewhere)
    assert elsewhere.is_file()
    assert not (mixed_tree / DEFAULT_CACHE_NAME).exists()
    assert [path.name for path in elsewhere.parent.iterdir()] == ["sizes.npz"]  # no temp file left behind


def test_unwritable_cache_warns_but_scans(mixed_tree: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="nai_fast.data.scan"):
        result = scan(mixed_tree, cache=mixed_tree / "missing-folder" / "sizes.npz")
    assert [record.levelno for record in caplog.records] == [logging.WARNING]
    assert "could not write scan cache" in caplog.records[0].getMessage()

    assert len(result) == 3


def test_every_bad_kind_is_skipped_with_its_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save_image(tmp_path / "good.png", (32, 32))
    (tmp_path / "empty.png").touch()
    (tmp_path / "text.png").write_text("this is a caption, not a picture")
    png = (tmp_path / "good.png").read_bytes()
    (tmp_path / "cut_header.png").write_bytes(png[:16])
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    noise.save(tmp_path / "cut_pixels.jpg", quality=95)
    jpeg = (tmp_path / "cut_pixels.jpg").read_bytes()
    (tmp_path / "cut_pixels.jpg").write_bytes(jpeg[: len(jpeg) // 2])  # header intact: only decoding fails
    write_png_header(tmp_path / "bomb.png", 100_000, 100_000)
    save_image(tmp_path / "sliver.bmp", (2, 50))
    locked = save_image(tmp_path / "locked.gif", (10, 10))
    real_open = Image.open

    def open_denying_locked(fp, *args, **kwargs):
        if os.fspath(fp) == os.fspath(locked):
            raise PermissionError(13, "Permission denied", os.fspath(fp))
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(Image, "open", open_denying_locked)

    result = scan(tmp_path, cache=False, min_side=4)

    assert result.paths == ["cut_pixels.jpg", "good.png"]
    assert result.skipped == {
        "empty": ["empty.png"],
        "not_image": ["text.png"],
        "unreadable": ["cut_header.png", "locked.gif"],
        "too_large": ["bomb.png"],
        "too_small": ["sliver.bmp"],
    }
    assert list(result.skipped) == list(SKIP_REASONS)
    assert result.counts() == {"ok": 2, "empty": 1, "not_image": 1, "unreadable": 2, "too_large": 1, "too_small": 1}
    assert result.summary() == "2 images; skipped 1 empty, 1 not_image, 2 unreadable, 1 too_large, 1 too_small"


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root can read any file")
def test_file_without_read_permission_is_unreadable(tmp_path: Path) -> None:
    locked = save_image(tmp_path / "locked.png", (10, 10))
    locked.chmod(0)
    try:
        assert scan(tmp_path, cache=False).skipped["unreadable"] == ["locked.png"]
    finally:
        locked.chmod(0o644)


def test_bad_files_are_cached_too(tmp_path: Path, opened: list[str]) -> None:
    (tmp_path / "text.png").write_text("not an image")
    write_png_header(tmp_path / "bomb.png", 100_000, 100_000)
    first = scan(tmp_path)
    opened.clear()

    assert_same_result(scan(tmp_path), first)
    assert opened == []
    assert first.counts()["ok"] == 0


def test_max_pixels_and_pillow_limits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save_image(tmp_path / "medium.png", (40, 40))  # 1600 pixels
    save_image(tmp_path / "large.png", (100, 100))  # 10000 pixels

    assert scan(tmp_path, cache=False).counts()["ok"] == 2
    assert scan(tmp_path, cache=False, max_pixels=5000).skipped["too_large"] == ["large.png"]

    # Pillow warns above its limit and refuses above twice its limit; both end as too_large,
    # and the warning must not escape (as an error here it would turn into "unreadable").
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = scan(tmp_path, cache=False)
    assert result.skipped["too_large"] == ["large.png", "medium.png"]


def test_workers_and_progress_bar_do_not_change_the_result(mixed_tree: Path) -> None:
    for index in range(150):  # more than one batch of work
        save_image(mixed_tree / "many" / f"{index:03d}.png", (8 + index % 7, 9))

    serial = scan(mixed_tree, cache=False, workers=1)
    parallel = scan(mixed_tree, cache=False, workers=4, progress=True)

    assert_same_result(serial, parallel)
    assert len(serial) == 153


def test_non_utf8_file_name_round_trips_through_the_cache(tmp_path: Path, opened: list[str]) -> None:
    name = os.fsdecode(b"caf\xe9.png")  # Latin-1 bytes: not valid UTF-8
    save_image(tmp_path / name, (12, 7))
    first = scan(tmp_path)
    opened.clear()

    second = scan(tmp_path)

    assert opened == []
    assert second.paths == [name]
    assert_same_result(first, second)


def test_empty_tree_and_missing_root(tmp_path: Path) -> None:
    result = scan(tmp_path)
    assert result.paths == []
    assert result.sizes.shape == (0, 2)
    assert result.summary() == "0 images"
    assert_same_result(scan(tmp_path), result)

    with pytest.raises(NotADirectoryError, match="not a directory"):
        scan(tmp_path / "nowhere")


def test_read_tags(tmp_path: Path) -> None:
    image = save_image(tmp_path / "portrait.final.png", (8, 8))
    assert read_tags(image) is None

    (tmp_path / "portrait.final.txt").write_bytes(b"\xef\xbb\xbf  1girl, solo, caf\xc3\xa9 \n")
    assert read_tags(image) == "1girl, solo, café"

    (tmp_path / "portrait.final.txt").write_bytes(b"bad \xff byte")
    assert read_tags(image) == "bad \ufffd byte"

    result = scan(tmp_path, cache=False)
    assert result.tags(0) == "bad \ufffd byte"
