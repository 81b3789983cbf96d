"""Tests for nai_fast.data.images: RGB loading, EXIF orientation, load errors and bucket fitting."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import ExifTags, Image, ImageFile, JpegImagePlugin

from nai_fast.data.images import FitGeometry, ImageLoadError, fit, fit_geometry, load_rgb, to_rgb
from nai_fast.data.scan import displayed_size

RED = (255, 0, 0)
BLUE = (0, 0, 255)
GREY = (128, 128, 128)


def exif_with_orientation(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    return exif


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def assert_colour(image: Image.Image, xy: tuple[int, int], expected: tuple[int, int, int], tolerance: int = 40) -> None:
    actual = image.getpixel(xy)
    assert all(abs(a - e) <= tolerance for a, e in zip(actual, expected, strict=True)), (
        f"{actual} at {xy}, expected {expected}"
    )


def tensor_to_image(pixels: torch.Tensor) -> Image.Image:
    """Inverse of the [-1, 1] CHW encoding, to inspect fitted pixels."""
    array = ((pixels + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(array)


# --- load_rgb and to_rgb ---------------------------------------------------------------------


def test_transparent_rgba_becomes_white(tmp_path: Path) -> None:
    image = Image.new("RGBA", (4, 2), (255, 0, 0, 255))
    image.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent black
    image.putpixel((1, 0), (0, 0, 0, 128))  # half transparent black
    image.save(tmp_path / "sticker.png")

    loaded = load_rgb(tmp_path / "sticker.png")

    assert loaded.mode == "RGB"
    assert loaded.getpixel((0, 0)) == (255, 255, 255)
    assert_colour(loaded, (1, 0), GREY, tolerance=2)
    assert loaded.getpixel((3, 1)) == RED


def test_grey_with_alpha_becomes_white_where_transparent(tmp_path: Path) -> None:
    image = Image.new("LA", (2, 1), (0, 255))
    image.putpixel((1, 0), (0, 0))
    image.save(tmp_path / "grey.png")

    loaded = load_rgb(tmp_path / "grey.png")

    assert [loaded.getpixel((x, 0)) for x in range(2)] == [(0, 0, 0), (255, 255, 255)]


def test_palette_transparency_becomes_white(tmp_path: Path) -> None:
    image = Image.new("P", (2, 1), 1)
    image.putpalette([0, 0, 0, *BLUE])
    image.putpixel((0, 0), 0)
    image.save(tmp_path / "palette.png", transparency=0)
    image.save(tmp_path / "palette.gif", transparency=0)

    for name in ("palette.png", "palette.gif"):
        loaded = load_rgb(tmp_path / name)
        assert [loaded.getpixel((x, 0)) for x in range(2)] == [(255, 255, 255), BLUE]


def test_rgb_colour_key_transparency_becomes_white(tmp_path: Path) -> None:
    image = Image.new("RGB", (2, 1), BLUE)
    image.putpixel((0, 0), (1, 2, 3))
    image.save(tmp_path / "keyed.png", transparency=(1, 2, 3))

    loaded = load_rgb(tmp_path / "keyed.png")

    assert [loaded.getpixel((x, 0)) for x in range(2)] == [(255, 255, 255), BLUE]


def test_16_bit_grey_is_scaled_not_clipped(tmp_path: Path) -> None:
    levels = np.array([[0, 257 * 64, 32896, 65535]], dtype=np.uint16)
    Image.fromarray(levels).save(tmp_path / "depth.png")
    with Image.open(tmp_path / "depth.png") as stored:
        assert stored.mode == "I;16"

    loaded = load_rgb(tmp_path / "depth.png")

    assert [loaded.getpixel((x, 0)) for x in range(4)] == [(0, 0, 0), (64, 64, 64), (128, 128, 128), (255, 255, 255)]


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        (Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.int32)), [0, 128, 255]),  # mode I, 16-bit data
        (Image.fromarray(np.array([[-5, 70000, 140000]], dtype=np.int32)), [0, 128, 255]),  # beyond 16 bits: stretched
        (Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32)), [0, 128, 255]),  # mode F
        (Image.fromarray(np.array([[0, 128, 255]], dtype=np.uint8)), [0, 128, 255]),  # mode L
        (Image.fromarray(np.array([[False, True, True]])), [0, 255, 255]),  # mode 1
    ],
    ids=["I", "I-wide", "F", "L", "1"],
)
def test_single_channel_modes_keep_relative_brightness(image: Image.Image, expected: list[int]) -> None:
    rgb = to_rgb(image)

    assert rgb.mode == "RGB"
    assert [rgb.getpixel((x, 0)) for x in range(3)] == [(level,) * 3 for level in expected]


def test_cmyk_and_ycbcr_convert_to_rgb(tmp_path: Path) -> None:
    cmyk = Image.new("CMYK", (16, 8), (0, 255, 255, 0))  # red ink
    cmyk.paste((0, 0, 0, 0), (8, 0, 16, 8))  # no ink: white paper
    cmyk.save(tmp_path / "print.jpg", quality=95)

    loaded = load_rgb(tmp_path / "print.jpg")

    assert loaded.mode == "RGB"
    assert_colour(loaded, (3, 4), RED, tolerance=10)
    assert_colour(loaded, (12, 4), (255, 255, 255), tolerance=10)
    assert to_rgb(Image.new("RGB", (1, 1), BLUE).convert("YCbCr")).getpixel((0, 0)) == pytest.approx(BLUE, abs=3)


@pytest.mark.parametrize("extension", ["png", "jpg"])
@pytest.mark.parametrize(
    ("orientation", "red_corner"),
    [(1, "top_left"), (3, "bottom_right"), (6, "top_right"), (8, "bottom_left")],
)
def test_exif_orientation_is_applied(tmp_path: Path, extension: str, orientation: int, red_corner: str) -> None:
    stored = Image.new("RGB", (80, 40), BLUE)
    stored.paste(RED, (0, 0, 16, 16))  # marks the stored top-left corner
    path = tmp_path / f"photo.{extension}"
    stored.save(path, exif=exif_with_orientation(orientation), quality=95)

    loaded = load_rgb(path)

    expected_size = (40, 80) if orientation in (6, 8) else (80, 40)
    assert loaded.size == expected_size
    with Image.open(path) as header_only:
        assert displayed_size(header_only) == expected_size  # what scan reports
    right, bottom = expected_size[0] - 1, expected_size[1] - 1
    corners = {
        "top_left": (4, 4),
        "top_right": (right - 4, 4),
        "bottom_left": (4, bottom - 4),
        "bottom_right": (right - 4, bottom - 4),
    }
    for corner, xy in corners.items():
        assert_colour(loaded, xy, RED if corner == red_corner else BLUE)


def truncate_jpeg(path: Path) -> None:
    noise_image(96, 64).save(path, quality=95)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def truncate_png(path: Path) -> None:
    noise_image(96, 64).save(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def write_text(path: Path) -> None:
    path.write_text("1girl, solo")


def write_nothing(path: Path) -> None:
    path.touch()


@pytest.mark.parametrize(
    ("name", "damage"),
    [
        ("cut.jpg", truncate_jpeg),
        ("cut.png", truncate_png),
        ("text.png", write_text),
        ("empty.webp", write_nothing),
        ("missing.png", None),
    ],
)
def test_unusable_files_raise_image_load_error(tmp_path: Path, name: str, damage) -> None:
    path = tmp_path / name
    if damage is not None:
        damage(path)

    with pytest.raises(ImageLoadError, match=f"cannot load image .*{name}") as raised:
        load_rgb(path)
    assert raised.value.path == path
    assert raised.value.reason
    with pytest.raises(ImageLoadError):
        fit(path, 32, 32, rng=0)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


# --- fit_geometry ----------------------------------------------------------------------------


def assert_valid_geometry(
    geometry: FitGeometry, width: int, height: int, bucket_width: int, bucket_height: int
) -> None:
    scaled_width, scaled_height = geometry.scaled_width, geometry.scaled_height
    # Covers the bucket, fitting it exactly along the side that limits the scale.
    assert scaled_width >= bucket_width and scaled_height >= bucket_height
    if Fraction(bucket_width, width) >= Fraction(bucket_height, height):
        assert scaled_width == bucket_width
        assert abs(scaled_height - max(bucket_height, Fraction(height * bucket_width, width))) <= Fraction(1, 2)
    else:
        assert scaled_height == bucket_height
        assert abs(scaled_width - max(bucket_width, Fraction(width * bucket_height, height))) <= Fraction(1, 2)
    assert 0 <= geometry.crop_left <= scaled_width - bucket_width
    assert 0 <= geometry.crop_top <= scaled_height - bucket_height


@settings(max_examples=300, deadline=None)
@given(
    width=st.integers(1, 100_000),
    height=st.integers(1, 100_000),
    bucket_width=st.integers(1, 4096),
    bucket_height=st.integers(1, 4096),
    seed=st.integers(0, 2**32 - 1),
)
def test_geometry_covers_the_bucket(width: int, height: int, bucket_width: int, bucket_height: int, seed: int) -> None:
    geometry = fit_geometry(width, height, bucket_width, bucket_height, seed)

    assert_valid_geometry(geometry, width, height, bucket_width, bucket_height)


@pytest.mark.parametrize(("width", "height"), [(1, 1), (1, 100_000), (100_000, 1), (100_000, 100_000), (3, 7)])
@pytest.mark.parametrize(("bucket_width", "bucket_height"), [(1, 1), (64, 2048), (2048, 64), (512, 512)])
def test_geometry_of_extreme_shapes(width: int, height: int, bucket_width: int, bucket_height: int) -> None:
    for seed in range(5):
        geometry = fit_geometry(width, height, bucket_width, bucket_height, seed)
        assert_valid_geometry(geometry, width, height, bucket_width, bucket_height)


def test_geometry_is_deterministic_and_random() -> None:
    assert fit_geometry(1000, 300, 256, 256, 7) == fit_geometry(1000, 300, 256, 256, 7)
    first, second = np.random.default_rng(3), np.random.default_rng(3)
    assert fit_geometry(1000, 300, 256, 256, first) == fit_geometry(1000, 300, 256, 256, second)
    offsets = {fit_geometry(1000, 300, 256, 256, seed).crop_left for seed in range(50)}
    assert len(offsets) > 20 and max(offsets) <= 853 - 256
    assert fit_geometry(512, 256, 128, 64, 0) == FitGeometry(128, 64, 0, 0)  # same aspect: nothing to crop


def test_geometry_rejects_empty_sizes() -> None:
    with pytest.raises(ValueError, match="bucket_height=0"):
        fit_geometry(10, 10, 64, 0)
    with pytest.raises(ValueError, match="width=0"):
        fit(Image.new("RGB", (8, 8)), 0, 64)


# --- fit -------------------------------------------------------------------------------------


def test_fit_output_matches_the_bucket_for_many_sizes(tmp_path: Path) -> None:
    rng = np.random.default_rng(1234)
    for case in range(30):
        width, height = (int(side) for side in rng.integers(1, 300, size=2))
        bucket_width, bucket_height = (8 * int(side) for side in rng.integers(1, 13, size=2))
        image = noise_image(width, height, seed=case)
        source = image if case % 2 else tmp_path / f"{case}.png"
        if not isinstance(source, Image.Image):
            image.save(source)

        fitted = fit(source, bucket_width, bucket_height, rng=case)

        assert fitted.pixels.shape == (3, bucket_height, bucket_width)
        assert fitted.pixels.dtype == torch.float32 and fitted.pixels.is_contiguous()
        assert -1.0 <= fitted.pixels.min() <= fitted.pixels.max() <= 1.0
        assert fitted.original_size == (height, width)
        assert fitted.target_size == (bucket_height, bucket_width)
        expected = fit_geometry(width, height, bucket_width, bucket_height, case)
        assert fitted.crop_top_left == (expected.crop_top, expected.crop_left)


def test_fit_is_deterministic_for_a_seed(tmp_path: Path) -> None:
    path = tmp_path / "noise.jpg"
    noise_image(300, 200).save(path)

    first, second = fit(path, 128, 128, rng=5), fit(path, 128, 128, rng=np.random.default_rng(5))

    assert torch.equal(first.pixels, second.pixels)
    assert first.crop_top_left == second.crop_top_left
    assert any(fit(path, 128, 128, rng=seed).crop_top_left != first.crop_top_left for seed in range(6, 12))


def test_fit_of_a_path_equals_fit_of_the_loaded_image(tmp_path: Path) -> None:
    path = tmp_path / "noise.png"
    noise_image(150, 90).save(path)

    from_path, from_image = fit(path, 64, 48, rng=9), fit(load_rgb(path), 64, 48, rng=9)

    assert torch.equal(from_path.pixels, from_image.pixels)
    assert from_path.crop_top_left == from_image.crop_top_left


def test_marker_lands_at_its_scaled_position_without_crop() -> None:
    image = Image.new("RGB", (256, 128), GREY)
    image.paste(BLUE, (160, 32, 192, 64))

    fitted = fit(image, 128, 64, rng=0)  # same aspect ratio: scale by 1/2, no crop

    assert fitted.crop_top_left == (0, 0)
    pixels = tensor_to_image(fitted.pixels)
    assert_colour(pixels, (88, 24), BLUE, tolerance=2)  # centre of the marker, now (80..96, 16..32)
    assert_colour(pixels, (70, 24), GREY, tolerance=2)
    assert_colour(pixels, (88, 40), GREY, tolerance=2)


@pytest.mark.parametrize("landscape", [True, False])
def test_marker_moves_with_the_random_crop(landscape: bool) -> None:
    # 120x100 covering 96x96 scales by 0.96 to 115x96 and crops up to 19 columns; the
    # marker, centred at (60, 50), survives every crop and must shift by exactly the offset.
    size, marker, centre = (120, 100), (50, 40, 70, 60), (60 * 0.96, 50 * 0.96)
    if not landscape:
        size, marker, centre = size[::-1], (40, 50, 60, 70), centre[::-1]
    image = Image.new("RGB", size, GREY)
    image.paste(RED, marker)

    for seed in range(8):
        fitted = fit(image, 96, 96, rng=seed)
        top, left = fitted.crop_top_left
        assert (top == 0) if landscape else (left == 0)
        pixels = tensor_to_image(fitted.pixels)
        assert_colour(pixels, (round(centre[0] - left), round(centre[1] - top)), RED, tolerance=2)
        assert_colour(pixels, (round(centre[0] - left) + 15, round(centre[1] - top)), GREY, tolerance=2)


def test_fit_decodes_rotated_jpeg_at_reduced_scale(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stored = Image.new("RGB", (1600, 800), BLUE)
    stored.paste(RED, (0, 0, 200, 200))  # stored top-left: displayed top-right under orientation 6
    path = tmp_path / "phone.jpg"
    stored.save(path, exif=exif_with_orientation(6), quality=90)
    drafts = []
    real_draft = JpegImagePlugin.JpegImageFile.draft

    def recording_draft(self, mode, size):
        drafts.append((mode, size))
        return real_draft(self, mode, size)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", recording_draft)

    fitted = fit(path, 64, 128, rng=0)

    # Requested in the stored (landscape) orientation, so libjpeg can decode at 1/8 scale.
    assert drafts == [("RGB", (128, 64))]
    assert fitted.original_size == (1600, 800)
    assert fitted.crop_top_left == (0, 0)
    pixels = tensor_to_image(fitted.pixels)
    assert_colour(pixels, (60, 3), RED)
    assert_colour(pixels, (3, 3), BLUE)
    assert_colour(pixels, (60, 124), BLUE)
