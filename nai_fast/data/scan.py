"""Find training images under a folder and read their sizes from the file headers.

Sizes come from Pillow's lazy ``Image.open``, which parses the header without
decoding pixels, and are *displayed* sizes (EXIF orientation applied), because
bucketing must use the aspect ratio the model will see. Header results are cached
in an ``.npz`` keyed by relative path, file size and mtime, so rescanning an
unchanged tree only stats files. Files that cannot be used never raise: each is
reported under a reason in ``ScanResult.skipped``.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError
from tqdm import tqdm

from ..files import atomic_write

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"})
DEFAULT_CACHE_NAME = ".nai_fast_sizes.npz"

# Why a file is left out of training: the keys of ScanResult.skipped, in report order.
SKIP_REASONS = ("empty", "not_image", "unreadable", "too_large", "too_small")

# What opening a file's header can tell: "" (readable) or a reason found while opening.
# too_small and max_pixels are judged later, so the cache does not depend on the arguments.
_HEADER_OUTCOMES = ("", "empty", "not_image", "unreadable", "too_large")
_CACHE_FORMAT = 1
_FILES_PER_TASK = 64  # batches keep the thread pool to a few futures even for a million files

# EXIF orientations that transpose or rotate by 90 degrees, swapping width and height.
_AXIS_SWAPPING_ORIENTATIONS = frozenset({5, 6, 7, 8})

logger = logging.getLogger(__name__)


class _FileKey(NamedTuple):
    """Identifies one version of a file; a cached header is valid only for the same key."""

    path: str  # relative POSIX path
    size: int  # bytes
    mtime_ns: int


class _Header(NamedTuple):
    width: int  # displayed, i.e. after EXIF orientation; 0 when unknown
    height: int
    outcome: str  # one of _HEADER_OUTCOMES


@dataclass(frozen=True, eq=False)
class ScanResult:
    """The usable images under ``root`` with their displayed sizes, and what was skipped.

    ``paths`` are relative POSIX paths in sorted order; ``sizes[i]`` is the
    ``(width, height)`` of ``paths[i]``. ``skipped`` maps every reason in
    ``SKIP_REASONS`` to the relative paths skipped for it.
    """

    root: Path
    paths: list[str]
    sizes: np.ndarray  # int64, shape (len(paths), 2)
    skipped: dict[str, list[str]]

    def __len__(self) -> int:
        return len(self.paths)

    def image_path(self, index: int) -> Path:
        return self.root / self.paths[index]

    def tags(self, index: int) -> str | None:
        """The caption of image ``index`` (see ``read_tags``)."""
        return read_tags(self.image_path(index))

    @property
    def num_files(self) -> int:
        """Every image file found: usable and skipped."""
        return len(self.paths) + sum(map(len, self.skipped.values()))

    def skipped_counts(self) -> dict[str, int]:
        """Files skipped per reason, in report order; reasons with none left out."""
        return {reason: len(paths) for reason, paths in self.skipped.items() if paths}

    def skipped_files(self) -> list[dict[str, str]]:
        """Every skipped file as ``{"path": ..., "reason": ...}``, by reason in report order, then path."""
        return [{"path": path, "reason": reason} for reason, paths in self.skipped.items() for path in paths]

    def counts(self) -> dict[str, int]:
        """Number of usable images under ``"ok"``, and of skipped files per reason."""
        return {"ok": len(self.paths)} | self.skipped_counts()

    def summary(self) -> str:
        """One line for logs, e.g. ``"1200 images; skipped 3 empty, 1 not_image"``."""
        skipped = ", ".join(f"{count} {reason}" for reason, count in self.skipped_counts().items())
        return f"{len(self.paths)} images" + (f"; skipped {skipped}" if skipped else "")


def scan(
    root: str | os.PathLike[str],
    *,
    cache: bool | str | os.PathLike[str] | None = True,
    workers: int | None = None,
    progress: bool = False,
    max_pixels: int | None = None,
    min_side: int = 1,
) -> ScanResult:
    """Find every image under ``root`` and read its displayed size from its header.

    Args:
        root: folder searched recursively (directory symlinks are not followed).
        cache: ``True`` for ``<root>/.nai_fast_sizes.npz``, a path for another file,
            ``False``/``None`` to neither read nor write a cache.
        workers: threads reading headers; default ``min(8, 2 * cpu_count)``.
        progress: show a tqdm bar while reading headers.
        max_pixels: images with more pixels are skipped as ``too_large``; default
            Pillow's ``Image.MAX_IMAGE_PIXELS`` (``None`` there means no limit).
        min_side: images with a side shorter than this are skipped as ``too_small``.
    """
    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError(f"scan root is not a directory: {root}")
    if cache is True:
        cache_path: Path | None = root / DEFAULT_CACHE_NAME
    else:
        cache_path = Path(cache) if cache else None
    if max_pixels is None:
        max_pixels = Image.MAX_IMAGE_PIXELS

    files = _list_image_files(root)
    cached = _load_cache(cache_path) if cache_path else {}
    headers = {key: cached[key] for key in files if key in cached}
    unknown = [key for key in files if key not in headers]
    headers |= _read_headers(root, unknown, workers, progress)
    # Rewrite only when something changed: new or modified files read, or deleted ones to drop.
    if cache_path and (unknown or len(cached) != len(files)):
        _save_cache(cache_path, headers)
    return _collect_result(root, files, headers, max_pixels, min_side)


def displayed_size(image: Image.Image) -> tuple[int, int]:
    """``(width, height)`` of a lazily opened image after its EXIF orientation, without decoding it."""
    # Image.Image.getexif rather than image.getexif: PngImageFile overrides it to decode
    # the whole image in search of an eXIf chunk stored after the pixel data.
    orientation = Image.Image.getexif(image).get(ExifTags.Base.Orientation, 1)
    width, height = image.size
    return (height, width) if orientation in _AXIS_SWAPPING_ORIENTATIONS else (width, height)


def read_tags(image_path: str | os.PathLike[str]) -> str | None:
    """The caption beside an image: the ``.txt`` file with the same stem, stripped.

    Decoded as UTF-8 (a byte order mark is dropped, invalid bytes replaced); ``None``
    when there is no caption file.
    """
    try:
        raw = Path(image_path).with_suffix(".txt").read_bytes()
    except FileNotFoundError:
        return None
    return raw.decode("utf-8-sig", errors="replace").strip()


def _list_image_files(root: Path) -> list[_FileKey]:
    """Every file under root with an image extension, sorted by relative path."""
    found: list[_FileKey] = []
    pending = [(root, "")]
    while pending:
        directory, prefix = pending.pop()
        try:
            with os.scandir(directory) as entries:
                for entry in entries:
                    relative = prefix + entry.name
                    if entry.is_dir(follow_symlinks=False):
                        pending.append((Path(entry.path), relative + "/"))
                    elif entry.is_file() and os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
                        found.append(_file_key(entry, relative))
        except OSError as exc:
            logger.warning("skipping folder that cannot be listed: %s (%s)", directory, exc)
    found.sort(key=lambda key: key.path)
    return found


def _file_key(entry: os.DirEntry[str], relative: str) -> _FileKey:
    try:
        stat = entry.stat()
    except OSError:
        # Vanished or unstatable since listing: -1 never matches the cache, so the file
        # is opened and reported like any other unreadable file.
        return _FileKey(relative, -1, -1)
    return _FileKey(relative, stat.st_size, stat.st_mtime_ns)


def _read_headers(
    root: Path, files: Sequence[_FileKey], workers: int | None, progress: bool
) -> dict[_FileKey, _Header]:
    batches = [files[start : start + _FILES_PER_TASK] for start in range(0, len(files), _FILES_PER_TASK)]

    def read_batch(batch: Sequence[_FileKey]) -> list[_Header]:
        return [_read_header(root / key.path, key.size) for key in batch]

    headers: dict[_FileKey, _Header] = {}
    with (
        ThreadPoolExecutor(workers if workers is not None else min(8, 2 * (os.cpu_count() or 1))) as pool,
        tqdm(total=len(files), desc="reading image headers", unit="file", disable=not progress) as bar,
        warnings.catch_warnings(),
    ):
        # Oversized images are reported as too_large; Pillow's warning about them is noise.
        # Set here, in the calling thread, because the filter list is process-wide.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        for batch, batch_headers in zip(batches, pool.map(read_batch, batches), strict=True):
            headers.update(zip(batch, batch_headers, strict=True))
            bar.update(len(batch))
    return headers


def _read_header(path: Path, file_size: int) -> _Header:
    if file_size == 0:
        return _Header(0, 0, "empty")
    try:
        with Image.open(path) as image:
            width, height = displayed_size(image)
    except Image.DecompressionBombError:
        return _Header(0, 0, "too_large")
    except UnidentifiedImageError:
        return _Header(0, 0, "not_image")
    except Exception:  # permission denied, I/O error, broken header or EXIF: unusable all the same
        return _Header(0, 0, "unreadable")
    return _Header(width, height, "")


def _collect_result(
    root: Path,
    files: Sequence[_FileKey],
    headers: dict[_FileKey, _Header],
    max_pixels: int | None,
    min_side: int,
) -> ScanResult:
    paths: list[str] = []
    sizes: list[tuple[int, int]] = []
    skipped: dict[str, list[str]] = {reason: [] for reason in SKIP_REASONS}
    for key in files:
        width, height, outcome = headers[key]
        outcome = outcome or _size_outcome(width, height, max_pixels, min_side)
        if outcome:
            skipped[outcome].append(key.path)
        else:
            paths.append(key.path)
            sizes.append((width, height))
    return ScanResult(root, paths, np.array(sizes, dtype=np.int64).reshape(-1, 2), skipped)


def _size_outcome(width: int, height: int, max_pixels: int | None, min_side: int) -> str:
    if max_pixels is not None and width * height > max_pixels:
        return "too_large"
    if min(width, height) < min_side:
        return "too_small"
    return ""


def _load_cache(path: Path) -> dict[_FileKey, _Header]:
    if not path.exists():
        return {}
    try:
        # Opened here, not by np.load, which leaks the file when it is not a valid archive.
        with path.open("rb") as file, np.load(file, allow_pickle=False) as arrays:
            if int(arrays["format"]) != _CACHE_FORMAT:
                raise ValueError(f"format {int(arrays['format'])}, expected {_CACHE_FORMAT}")
            paths = _decode_paths(arrays["paths"])
            columns = [arrays[name].tolist() for name in ("file_sizes", "mtimes_ns", "widths", "heights", "outcomes")]
            return {
                _FileKey(relative, size, mtime_ns): _Header(width, height, _HEADER_OUTCOMES[outcome])
                for relative, size, mtime_ns, width, height, outcome in zip(paths, *columns, strict=True)
            }
    except Exception as exc:  # whatever the damage (truncated zip, missing array, bad code), rebuild
        logger.warning("ignoring unreadable scan cache %s (%s); it will be rebuilt", path, exc)
        return {}


def _save_cache(path: Path, headers: dict[_FileKey, _Header]) -> None:
    """Write the cache atomically: a reader sees the old file or the new one, never half of one."""
    keys = list(headers)
    arrays: dict[str, Any] = {
        "format": np.array(_CACHE_FORMAT),
        "paths": _encode_paths([key.path for key in keys]),
        "file_sizes": np.array([key.size for key in keys], dtype=np.int64),
        "mtimes_ns": np.array([key.mtime_ns for key in keys], dtype=np.int64),
        "widths": np.array([header.width for header in headers.values()], dtype=np.int64),
        "heights": np.array([header.height for header in headers.values()], dtype=np.int64),
        "outcomes": np.array([_HEADER_OUTCOMES.index(header.outcome) for header in headers.values()], dtype=np.uint8),
    }

    def write(temporary: Path) -> None:
        with temporary.open("wb") as file:  # a file, not a name: np.savez would add .npz to some names
            np.savez_compressed(file, **arrays)

    try:
        atomic_write(path, write)
    except OSError as exc:  # a read-only dataset still scans, only without a cache
        logger.warning("could not write scan cache %s (%s)", path, exc)


# Paths are stored as one NUL-separated UTF-8 byte array: compact where a fixed-width
# string array would pad every path to the longest, and NUL cannot occur in a path.
# surrogateescape round-trips file names that are not valid UTF-8.
def _encode_paths(paths: list[str]) -> np.ndarray:
    return np.frombuffer("\0".join(paths).encode("utf-8", "surrogateescape"), dtype=np.uint8)


def _decode_paths(encoded: np.ndarray) -> list[str]:
    text = encoded.astype(np.uint8, copy=False).tobytes().decode("utf-8", "surrogateescape")
    return text.split("\0") if text else []
