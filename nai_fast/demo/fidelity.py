"""How well a model draws what a tag prompt of the demo vocabulary says, judged by a simple detector.

:func:`detect` reads a picture the way the demo's scenes are made (one shape on a plain
background) with nothing learned:

- **background**: the nearest palette colour (``COLORS``) most common among the border pixels;
- **shape colour**: the nearest palette colour most common among the pixels whose nearest
  colour is not the background's (the most common, not the mean: blurred edges mix colours);
- **position**: the centroid of those pixels, nearest of ``POSITIONS``.

:func:`evaluate` generates one image per prompt and size with :func:`~nai_fast.engine.generate.txt2img`
(seed ``i`` for prompt ``i``, Euler a, 20 steps, the default guidance) and scores the detections
against the prompts' scenes; with ``shuffled`` the same scenes' tags come in a random order.
The :class:`FidelityReport` also counts the demo's style, the hue shift (``HUE_SHIFT``): a
background drawn in the shifted colour of the one asked for. Images drawn in that style are
judged against the scenes as the style draws them (``styled``). ``nai-fast eval`` prints it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ..engine.demo_data import COLORS, POSITIONS, Scene

if TYPE_CHECKING:
    from PIL import Image

    from ..models.stable_diffusion import StableDiffusion

__all__ = [
    "ATTRIBUTES",
    "STYLE",
    "Detection",
    "FidelityReport",
    "detect",
    "evaluate",
    "hue_shift_visible",
    "random_scenes",
    "standard_sizes",
]

ATTRIBUTES = ("background", "color", "position")
STYLE = "hue_shift"  # the report's name for the demo style's presence
_NAMES = list(COLORS)
_PALETTE = np.array([COLORS[name] for name in _NAMES], dtype=np.float32)
# A shape is found when at least this fraction of the pixels differ from the background.
_MIN_SHAPE_FRACTION = 0.002


@dataclass(frozen=True)
class Detection:
    """What :func:`detect` sees; ``color`` and ``position`` are None when no shape is found."""

    background: str
    color: str | None
    position: str | None

    def matches(self, scene: Scene) -> dict[str, bool]:
        return {attribute: getattr(self, attribute) == getattr(scene, attribute) for attribute in ATTRIBUTES}


def detect(image: Image.Image | np.ndarray) -> Detection:
    """Read one picture (see the module doc)."""
    pixels = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, dtype=np.float32)
    height, width = pixels.shape[:2]
    nearest = ((pixels[:, :, None, :] - _PALETTE) ** 2).sum(-1).argmin(-1)  # (h, w) palette indices
    border = np.concatenate([nearest[0], nearest[-1], nearest[1:-1, 0], nearest[1:-1, -1]])
    background = _most_common(border)
    shape = nearest != background
    if shape.sum() < _MIN_SHAPE_FRACTION * height * width:
        return Detection(_NAMES[background], None, None)
    ys, xs = np.nonzero(shape)
    centre = np.array([(xs.mean() + 0.5) / width, (ys.mean() + 0.5) / height])
    position = min(POSITIONS, key=lambda name: float(((np.array(POSITIONS[name]) - centre) ** 2).sum()))
    return Detection(_NAMES[background], _NAMES[_most_common(nearest[shape])], position)


def _most_common(values: np.ndarray) -> int:
    return int(np.bincount(values.ravel(), minlength=len(_NAMES)).argmax())


def standard_sizes(model: StableDiffusion) -> list[tuple[int, int]]:
    """The model's square, portrait and landscape buckets (width, height): 128x128, 128x192 and
    192x128 for tiny, as 512x512, 512x768 and 768x512 for SD 1.x."""
    side = model.resolution
    return [(side, side), (side, side * 3 // 2), (side * 3 // 2, side)]


def hue_shift_visible(scene: Scene) -> bool:
    """Whether the hue shift changes the scene's background: white and black have no hue to turn."""
    return scene.hue_shifted().background != scene.background


def random_scenes(count: int, seed: int = 0) -> list[Scene]:
    """``count`` scenes with every attribute drawn at random (as the demo set draws them)."""
    rng = np.random.default_rng(seed)
    return [Scene.draw_random(rng) for _ in range(count)]


@dataclass
class FidelityReport:
    """Per image: the scene asked for, its size and what was detected; rates as fractions.

    ``styled``: the images were drawn in the hue-shift style, so each is judged against its scene
    as the style draws it. The style's own rate (``STYLE``) is the share of backgrounds drawn in
    the shifted colour, counted where the shift changes the background.
    """

    rows: list[tuple[Scene, tuple[int, int], Detection]] = field(default_factory=list)
    styled: bool = False

    def rate(self, attribute: str, size: tuple[int, int] | None = None) -> float:
        rows = [row for row in self.rows if size is None or row[1] == size]
        if attribute == STYLE:
            seen = [d.background == scene.hue_shifted().background for scene, _, d in rows if hue_shift_visible(scene)]
            return float(np.mean(seen)) if seen else float("nan")
        wanted = [scene.hue_shifted() if self.styled else scene for scene, _, _ in rows]
        return float(np.mean([d.matches(scene)[attribute] for scene, (_, _, d) in zip(wanted, rows)]))

    def sizes(self) -> list[tuple[int, int]]:
        return list(dict.fromkeys(size for _, size, _ in self.rows))

    def as_dict(self) -> dict[str, object]:
        every = (*ATTRIBUTES, STYLE)
        return {
            "images": len(self.rows),
            "styled": self.styled,
            **{attribute: self.rate(attribute) for attribute in every},
            "by_size": {f"{w}x{h}": {attribute: self.rate(attribute, (w, h)) for attribute in every} for w, h in self.sizes()},
        }

    def table(self) -> str:
        every = (*ATTRIBUTES, STYLE)
        lines = [f"{'size':>9}  " + "  ".join(f"{attribute.replace('_', ' '):>10}" for attribute in every)]
        for size in [*self.sizes(), None]:
            label = "all" if size is None else f"{size[0]}x{size[1]}"
            lines.append(f"{label:>9}  " + "  ".join(f"{100 * self.rate(a, size):9.1f}%" for a in every))
        return "\n".join(lines)


def evaluate(
    model: StableDiffusion,
    scenes: Sequence[Scene],
    sizes: Sequence[tuple[int, int]],
    *,
    shuffled: bool = False,
    styled: bool = False,
    steps: int = 20,
    sampler: str = "euler_a",
    guidance_scale: float | None = None,
    guidance_rescale: float = 0.0,
    progress: bool = True,
    on_image=None,
) -> FidelityReport:
    """Generate scene ``i`` with seed ``i`` at every size and detect what was drawn.

    ``shuffled``: each prompt's tags in an order drawn from the scene's index. ``styled``: judge
    the images as drawn in the hue-shift style (see :class:`FidelityReport`).
    ``guidance_scale``: None is txt2img's default; ``guidance_rescale``: txt2img's.
    ``on_image(index, size, generated)``, when given, sees every image (to save it, say).
    """
    import inspect

    from tqdm.auto import tqdm

    from ..engine.generate import txt2img

    if guidance_scale is None:
        guidance_scale = inspect.signature(txt2img).parameters["guidance_scale"].default
    report = FidelityReport(styled=styled)
    jobs = [(index, scene, size) for index, scene in enumerate(scenes) for size in sizes]
    for index, scene, (width, height) in tqdm(jobs, desc="eval", disable=not progress):
        tags = scene.tags
        if shuffled:
            np.random.default_rng([index, 1]).shuffle(tags)
        generated = txt2img(
            model,
            ", ".join(tags),
            width=width,
            height=height,
            steps=steps,
            sampler=sampler,
            guidance_scale=guidance_scale,
            guidance_rescale=guidance_rescale,
            seed=index,
            progress=False,
        )[0]
        if on_image is not None:
            on_image(index, (width, height), generated)
        report.rows.append((scene, (width, height), detect(generated.image)))
    return report
