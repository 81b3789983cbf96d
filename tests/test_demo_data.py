import hashlib

import numpy as np
import pytest
from PIL import Image

from nai_fast.engine.demo_data import COLORS, POSITIONS, SIZES, make_demo_dataset
from nai_fast.data.scan import scan


def digest(folder):
    return hashlib.sha256(b"".join(path.read_bytes() for path in sorted(folder.iterdir()))).hexdigest()


def test_same_seed_same_files(tmp_path):
    assert digest(make_demo_dataset(tmp_path / "a", 6, seed=3)) == digest(make_demo_dataset(tmp_path / "b", 6, seed=3))
    assert digest(make_demo_dataset(tmp_path / "c", 6, seed=4)) != digest(tmp_path / "a")


def test_tags_describe_the_pixels(tmp_path):
    folder = make_demo_dataset(tmp_path, 20)
    for tags_file in sorted(folder.glob("*.txt")):
        color_shape, size, background, position = tags_file.read_text().strip().split(", ")
        color, shape = color_shape.split(" ")
        pixels = np.asarray(Image.open(tags_file.with_suffix(".png")))
        height, width, _ = pixels.shape
        assert (width, height) in SIZES
        fx, fy = POSITIONS[position]
        assert tuple(pixels[int(fy * height), int(fx * width)]) == COLORS[color], tags_file.name
        far_corner = (height - 1 if fy < 0.5 else 0, width - 1 if fx < 0.5 else 0)
        assert tuple(pixels[far_corner]) == COLORS[background.removesuffix(" background")], tags_file.name
        assert size in ("large", "small") and shape in ("circle", "square", "triangle")


def test_scan_reads_every_image_and_its_tags(tmp_path):
    found = scan(make_demo_dataset(tmp_path, 10))
    assert len(found.paths) == 10 and not found.skipped_counts()
    assert {tuple(size) for size in found.sizes} <= set(SIZES)


def test_needs_at_least_one_image(tmp_path):
    with pytest.raises(ValueError, match="at least 1"):
        make_demo_dataset(tmp_path, 0)


def test_the_hue_shift_style_draws_the_same_scenes_in_the_shifted_colours(tmp_path):
    from nai_fast.engine.demo_data import HUE_SHIFT

    plain = make_demo_dataset(tmp_path / "plain", 12, seed=5)
    shifted = make_demo_dataset(tmp_path / "shifted", 12, seed=5, hue_shift=True)
    turned = 0
    for tags_file in sorted(plain.glob("*.txt")):
        assert (shifted / tags_file.name).read_text() == tags_file.read_text()
        before = np.asarray(Image.open(tags_file.with_suffix(".png")))
        after = np.asarray(Image.open(shifted / tags_file.with_suffix(".png").name))
        colors = {tuple(rgb) for rgb in before.reshape(-1, 3)}
        for name, rgb in COLORS.items():  # every pixel of one colour is now of its shifted colour
            if rgb in colors:
                assert (after[(before == rgb).all(-1)] == COLORS[HUE_SHIFT[name]]).all(), (tags_file.name, name)
        turned += (before != after).any()
    assert turned >= 10  # scenes of white and black alone keep their pixels


def test_the_outline_style_draws_the_same_scenes_ringed_in_black(tmp_path):
    from nai_fast.engine.demo_data import OUTLINE_COLOR

    plain = make_demo_dataset(tmp_path / "plain", 12, seed=5)
    outlined = make_demo_dataset(tmp_path / "outlined", 12, seed=5, outline=True)
    for tags_file in sorted(plain.glob("*.txt")):
        assert (outlined / tags_file.name).read_text() == tags_file.read_text()
        before = np.asarray(Image.open(tags_file.with_suffix(".png")))
        after = np.asarray(Image.open(outlined / tags_file.with_suffix(".png").name))
        changed = (before != after).any(-1)
        assert (after[changed] == OUTLINE_COLOR).all()  # only a black ring is added
        color, background = tags_file.read_text().split(" ")[0], tags_file.read_text().split(", ")[2].split(" ")[0]
        assert changed.any() == (COLORS[background] != OUTLINE_COLOR)
        if COLORS[color] != OUTLINE_COLOR:  # the shape keeps its pixels: the ring lies outside it
            assert ((before == COLORS[color]).all(-1) <= (after == COLORS[color]).all(-1)).all()
