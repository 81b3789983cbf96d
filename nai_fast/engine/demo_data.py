"""A small procedural tagged image set, so training runs with no data to download.

Each image is one coloured shape on a plain background, at one of several aspect ratios,
with a ``.txt`` file of tags in the style of tag-trained models:
``red circle, large, blue background, top left``. The set is a pure function of its seed.

Two styles the base model never sees draw the same scenes with the same tags:

- ``hue_shift=True``: every hue drawn as the next one around the colour wheel (``HUE_SHIFT``), as
  a hue-rotation filter turns them; white and black stay. The demo's hypernetwork learns it;
- ``outline=True``: a thick black outline around every shape (the VAE also learns this set).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "COLORS",
    "HUE_SHIFT",
    "OUTLINE_COLOR",
    "OUTLINE_WIDTH",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "Scene",
    "make_demo_dataset",
]

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 180),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
# The hue-shift style: each of the palette's hues, in their order around the colour wheel, drawn as
# the next one (purple back to red); white and black have no hue to turn.
HUE_SHIFT = {
    "red": "yellow",
    "yellow": "green",
    "green": "blue",
    "blue": "purple",
    "purple": "red",
    "white": "white",
    "black": "black",
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
# The outline style: its colour is the palette's black, its width this fraction of the image's shorter side
OUTLINE_COLOR = COLORS["black"]
OUTLINE_WIDTH = 0.07  # 9 px at 128: wider than one latent cell (8 px), so the VAE keeps it


@dataclass(frozen=True)
class Scene:
    """One picture of the set: what it shows, and its tags."""

    color: str  # a key of COLORS
    shape: str  # one of SHAPES
    large: bool
    background: str  # a key of COLORS, not ``color``
    position: str  # a key of POSITIONS

    @property
    def tags(self) -> list[str]:
        return [
            f"{self.color} {self.shape}",
            "large" if self.large else "small",
            f"{self.background} background",
            self.position,
        ]

    @property
    def caption(self) -> str:
        return ", ".join(self.tags)

    def hue_shifted(self) -> Scene:
        """The scene as the hue-shift style draws it (what its tags ask for, in the shifted colours)."""
        return replace(self, color=HUE_SHIFT[self.color], background=HUE_SHIFT[self.background])

    @classmethod
    def draw_random(cls, rng: np.random.Generator) -> Scene:
        shape = SHAPES[rng.integers(len(SHAPES))]
        color, background = rng.choice(list(COLORS), size=2, replace=False)
        position = list(POSITIONS)[rng.integers(len(POSITIONS))]
        return cls(str(color), shape, bool(rng.integers(2)), str(background), position)

    def render(self, width: int, height: int, *, outline: bool = False) -> Image.Image:
        """The scene drawn on a ``width`` x ``height`` canvas (``outline``: in the outline style)."""
        from PIL import Image, ImageDraw  # lazily: the CLI imports this module only to train

        image = Image.new("RGB", (width, height), COLORS[self.background])
        radius = (0.22 if self.large else 0.12) * min(width, height)
        fx, fy = POSITIONS[self.position]
        box = _shape_box(fx * width, fy * height, radius)
        border = round(OUTLINE_WIDTH * min(width, height)) if outline else 0
        _draw(ImageDraw.Draw(image), self.shape, box, COLORS[self.color], border)
        return image


def make_demo_dataset(
    folder: str | os.PathLike[str],
    count: int = 64,
    seed: int = 0,
    *,
    outline: bool = False,
    hue_shift: bool = False,
) -> Path:
    """Write ``count`` images (``00000.png``...) and their tags (``00000.txt``) into ``folder``.

    The same seed draws the same scenes, and writes the same tags, in every style. Files already
    there with the same names are overwritten; returns the folder.
    """
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(count):
        width, height = SIZES[rng.integers(len(SIZES))]
        scene = Scene.draw_random(rng)
        drawn = scene.hue_shifted() if hue_shift else scene
        drawn.render(width, height, outline=outline).save(folder / f"{index:05d}.png")
        (folder / f"{index:05d}.txt").write_text(scene.caption + "\n", encoding="utf-8")
    return folder


def _shape_box(x: float, y: float, radius: float) -> tuple[float, float, float, float]:
    return x - radius, y - radius, x + radius, y + radius


def _draw(draw, shape: str, box: tuple[float, float, float, float], fill: tuple[int, int, int], border: int) -> None:
    left, top, right, bottom = box
    if shape == "triangle":
        corners = [((left + right) / 2, top), (right, bottom), (left, bottom)]
        if border:  # a line twice as wide on every side, half of it then covered: `border` wide all round
            draw.line([*corners, corners[0], corners[1]], fill=OUTLINE_COLOR, width=2 * border, joint="curve")
        draw.polygon(corners, fill=fill)
        return
    paint = draw.ellipse if shape == "circle" else draw.rectangle
    if border:  # the outline lies outside the shape, so the shape keeps its size and colour
        paint((left - border, top - border, right + border, bottom + border), fill=OUTLINE_COLOR)
    paint(box, fill=fill)
