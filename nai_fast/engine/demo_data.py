"""A small procedural tagged image set, so training runs with no data to download.

Each image is one coloured shape on a plain background, at one of several aspect ratios,
with a ``.txt`` file of tags in the style of tag-trained models:
``red circle, large, blue background, top left``. The set is a pure function of its seed.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

__all__ = ["COLORS", "POSITIONS", "SHAPES", "SIZES", "make_demo_dataset"]

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 180),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
# (horizontal, vertical) place of the shape's centre, as fractions of the image's sides
POSITIONS = {
    "top left": (0.25, 0.25),
    "top right": (0.75, 0.25),
    "bottom left": (0.25, 0.75),
    "bottom right": (0.75, 0.75),
    "center": (0.5, 0.5),
}
# (width, height): square, portrait and landscape, small enough for CPU training
SIZES = ((192, 192), (160, 224), (224, 160), (128, 256), (256, 128))


def make_demo_dataset(folder: str | os.PathLike[str], count: int = 64, seed: int = 0) -> Path:
    """Write ``count`` images (``00000.png``...) and their tags (``00000.txt``) into ``folder``.

    Files already there with the same names are overwritten; returns the folder.
    """
    from PIL import Image, ImageDraw  # lazily: the CLI imports this module only to train

    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    colors = list(COLORS)
    for index in range(count):
        width, height = SIZES[rng.integers(len(SIZES))]
        shape = SHAPES[rng.integers(len(SHAPES))]
        color, background = rng.choice(colors, size=2, replace=False)
        position = list(POSITIONS)[rng.integers(len(POSITIONS))]
        large = bool(rng.integers(2))

        image = Image.new("RGB", (width, height), COLORS[background])
        radius = (0.22 if large else 0.12) * min(width, height)
        fx, fy = POSITIONS[position]
        box = _shape_box(fx * width, fy * height, radius)
        _draw(ImageDraw.Draw(image), shape, box, COLORS[color])
        image.save(folder / f"{index:05d}.png")
        tags = f"{color} {shape}, {'large' if large else 'small'}, {background} background, {position}"
        (folder / f"{index:05d}.txt").write_text(tags + "\n", encoding="utf-8")
    return folder


def _shape_box(x: float, y: float, radius: float) -> tuple[float, float, float, float]:
    return x - radius, y - radius, x + radius, y + radius


def _draw(draw, shape: str, box: tuple[float, float, float, float], fill: tuple[int, int, int]) -> None:
    left, top, right, bottom = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([((left + right) / 2, top), (right, bottom), (left, bottom)], fill=fill)
