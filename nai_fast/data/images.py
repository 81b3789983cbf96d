"""Load one training image as upright 8-bit RGB and fit it to a bucket.

Fitting scales the image, preserving its aspect ratio, until it covers the bucket
(one side equal to the bucket's, the other at least the bucket's), then crops the
overflow at a random offset. The result carries what SDXL-style size conditioning
needs: the original size, the crop's top-left corner and the target size.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps

from .scan import displayed_size

# Pillow first shrinks by an integer factor (a cheap box filter) to within this factor of
# the target, then resamples; at 3.0 the result is practically identical to a full LANCZOS.
_REDUCING_GAP = 3.0
_WHITE = (255, 255, 255, 255)
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "PA"})

# Single-channel modes with more than 8 bits, and the value that means full white.
# Image.convert would clip them to 0..255 instead of scaling.
_FULL_SCALE = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535, "F": 1.0}

# What Pillow raises for missing, unreadable, truncated, oversized or non-image files.
_LOAD_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


class ImageLoadError(Exception):
    """An image file that cannot be decoded: missing, unreadable, truncated, too large or not an image."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        super().__init__(path, reason)  # both kept in args so the error pickles across DataLoader workers
        self.path = path
        self.reason = reason

    def __str__(self) -> str:
        return f"cannot load image {os.fspath(self.path)}: {self.reason}"


@dataclass(frozen=True)
class FitGeometry:
    """Size the image is scaled to so it covers the bucket, and where the bucket is cropped from it."""

    scaled_width: int
    scaled_height: int
    crop_left: int
    crop_top: int


@dataclass(frozen=True, eq=False)
class FittedImage:
    """An image fitted to a bucket, with SDXL-style size conditioning (all pairs are (y, x))."""

    pixels: torch.Tensor  # float32, (3, height, width), in [-1, 1]
    original_size: tuple[int, int]  # (height, width) displayed, before scaling
    crop_top_left: tuple[int, int]  # (top, left) in the scaled image
    target_size: tuple[int, int]  # (height, width) of the bucket


def load_rgb(path: str | os.PathLike[str]) -> Image.Image:
    """Decode an image file upright (EXIF orientation applied) as 8-bit RGB; see ``to_rgb``.

    Raises:
        ImageLoadError: the file is missing, unreadable, truncated, too large or not an image.
    """
    with _open_image(path) as image:
        return _decode_upright_rgb(image, draft_size=None)


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB version of ``image`` in any mode.

    Transparency (alpha channels, palette or colour-key transparency) is composited
    onto white; 16-bit, 32-bit and float greys are scaled to 8 bits, not clipped.
    """
    if image.mode in _FULL_SCALE:
        return _scale_to_8_bit(image, _FULL_SCALE[image.mode]).convert("RGB")
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        composite = Image.new("RGBA", image.size, _WHITE)
        composite.alpha_composite(image.convert("RGBA"))
        return composite.convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def fit(
    image_or_path: Image.Image | str | os.PathLike[str],
    width: int,
    height: int,
    rng: np.random.Generator | int | None = None,
) -> FittedImage:
    """Scale an image to cover a ``width`` x ``height`` bucket and crop it at a random offset.

    A path is decoded like ``load_rgb``, but JPEGs are decoded directly at a reduced
    scale when the bucket is much smaller. An ``Image`` is taken as already upright.
    ``rng`` is a NumPy Generator or a seed; a seed gives the same crop every time.

    Raises:
        ImageLoadError: as ``load_rgb``.
    """
    _require_positive(width=width, height=height)  # here, so a bad bucket is not reported as a bad file
    if isinstance(image_or_path, Image.Image):
        upright = to_rgb(image_or_path)
        original_width, original_height = upright.size
        geometry = fit_geometry(original_width, original_height, width, height, rng)
    else:
        with _open_image(image_or_path) as image:
            original_width, original_height = displayed_size(image)
            geometry = fit_geometry(original_width, original_height, width, height, rng)
            upright = _decode_upright_rgb(image, draft_size=(geometry.scaled_width, geometry.scaled_height))
    return FittedImage(
        pixels=_to_tensor(_scale_and_crop(upright, geometry, width, height)),
        original_size=(original_height, original_width),
        crop_top_left=(geometry.crop_top, geometry.crop_left),
        target_size=(height, width),
    )


def fit_geometry(
    width: int,
    height: int,
    bucket_width: int,
    bucket_height: int,
    rng: np.random.Generator | int | None = None,
) -> FitGeometry:
    """Scale a ``width`` x ``height`` image by the smallest factor that covers the bucket.

    One scaled side equals the bucket's exactly, the other is at least the bucket's
    (rounded to the nearest pixel); the crop offset along it is drawn uniformly from
    every valid position with ``rng`` (a NumPy Generator or a seed).
    """
    _require_positive(width=width, height=height, bucket_width=bucket_width, bucket_height=bucket_height)
    # Scale by the larger of bucket_width / width and bucket_height / height, compared exactly
    # in integers; rounding the other side cannot take it below its bucket side.
    if bucket_width * height >= bucket_height * width:
        scaled_width = bucket_width
        scaled_height = _round_division(height * bucket_width, width)
    else:
        scaled_height = bucket_height
        scaled_width = _round_division(width * bucket_height, height)
    generator = np.random.default_rng(rng)
    return FitGeometry(
        scaled_width=scaled_width,
        scaled_height=scaled_height,
        crop_left=int(generator.integers(scaled_width - bucket_width + 1)),
        crop_top=int(generator.integers(scaled_height - bucket_height + 1)),
    )


def _require_positive(**sides: int) -> None:
    if not_positive := [f"{name}={value}" for name, value in sides.items() if value < 1]:
        raise ValueError(f"image and bucket sizes must be positive, got {', '.join(not_positive)}")


def _round_division(numerator: int, denominator: int) -> int:
    """numerator / denominator rounded half up, exact for any integer size."""
    return (2 * numerator + denominator) // (2 * denominator)


@contextmanager
def _open_image(path: str | os.PathLike[str]) -> Iterator[Image.Image]:
    """``Image.open`` that reports every failure to open or decode, inside the block too, as ImageLoadError."""
    try:
        with Image.open(path) as image:
            yield image
    except _LOAD_ERRORS as exc:
        raise ImageLoadError(path, f"{type(exc).__name__}: {exc}") from exc


def _decode_upright_rgb(image: Image.Image, draft_size: tuple[int, int] | None) -> Image.Image:
    """Decode a lazily opened image, apply its EXIF orientation and convert it to RGB.

    With ``draft_size`` (displayed orientation), JPEGs decode at the smallest
    1/2, 1/4 or 1/8 scale that is still at least that large.
    """
    if draft_size is not None:
        if displayed_size(image) != image.size:  # the decoder works in the stored orientation
            draft_size = draft_size[::-1]
        image.draft("RGB", draft_size)
    image.load()  # decode now, so a truncated file fails here rather than in a later conversion
    ImageOps.exif_transpose(image, in_place=True)
    return to_rgb(image)


def _scale_and_crop(image: Image.Image, geometry: FitGeometry, width: int, height: int) -> Image.Image:
    """Resample just the cropped region: same pixels as scaling the whole image and then cropping."""
    # Per-axis ratios: a JPEG draft or the rounding of the scaled size makes them differ slightly.
    x_ratio = image.width / geometry.scaled_width
    y_ratio = image.height / geometry.scaled_height
    box = (
        geometry.crop_left * x_ratio,
        geometry.crop_top * y_ratio,
        (geometry.crop_left + width) * x_ratio,
        (geometry.crop_top + height) * y_ratio,
    )
    return image.resize((width, height), Image.Resampling.LANCZOS, box=box, reducing_gap=_REDUCING_GAP)


def _scale_to_8_bit(image: Image.Image, full_scale: float) -> Image.Image:
    """Grey "L" image mapping 0..full_scale to 0..255; values above full_scale stretch it instead of clipping."""
    values = np.asarray(image, dtype=np.float32)
    full_scale = max(full_scale, float(values.max(initial=0)))
    grey = np.clip(values, 0, None) * (255 / full_scale)
    return Image.fromarray(np.rint(grey).astype(np.uint8))


def _to_tensor(image: Image.Image) -> torch.Tensor:
    """(3, height, width) float32 in [-1, 1], the range Stable Diffusion's VAE expects."""
    channels_last = torch.from_numpy(np.array(image, dtype=np.uint8))  # np.array copies: a writable buffer
    return channels_last.permute(2, 0, 1).to(torch.float32, memory_format=torch.contiguous_format).div_(127.5).sub_(1.0)
