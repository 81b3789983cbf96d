"""The demo's last step: the tiny model draws the same prompts without and with the style
hypernetwork that ``nai-fast train --preset tiny`` learned from the hue-shifted shapes (every hue
drawn as the next around the colour wheel, ``HUE_SHIFT``), and the detector says how often the
style shows and whether the prompts are still followed.

:func:`showcase` writes one contact sheet (row one without the hypernetwork, row two with it;
a column per prompt, square, portrait and landscape in turn) and every single PNG with its
``parameters`` text, then measures on more prompts: the hue shift's presence without and with
the hypernetwork, and the fidelity of both (:mod:`nai_fast.demo.fidelity`): without it, to the
prompts; with it, to the prompts as the style draws them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .fidelity import STYLE, FidelityReport, evaluate, random_scenes, standard_sizes

__all__ = ["SHEET_FILE", "Showcase", "showcase"]

SHEET_FILE = "contact-sheet.png"
_SHEET_COLUMNS = 6
_SHEET_SEED = 1000  # the sheet's scenes and seeds: apart from the measured ones (seeds 0..N-1)


@dataclass
class Showcase:
    sheet: Path
    without: FidelityReport
    with_style: FidelityReport

    def summary(self) -> str:
        lines = [f"contact sheet: {self.sheet}", ""]
        lines.append(f"{'':>22}  {STYLE.replace('_', ' '):>9}  {'background':>10}  {'color':>6}  {'position':>8}")
        for label, report in (("without hypernetwork", self.without), ("with hypernetwork", self.with_style)):
            lines.append(
                f"{label:>22}  {100 * report.rate(STYLE):8.1f}%  {100 * report.rate('background'):9.1f}%  "
                f"{100 * report.rate('color'):5.1f}%  {100 * report.rate('position'):7.1f}%"
            )
        lines.append(
            f"({len(self.without.rows)} images each way; the hue shift counted where it can show, on a background "
            "with a hue (not white or black); the row with the hypernetwork judged against the prompts as the "
            "style draws them)"
        )
        return "\n".join(lines)


def showcase(
    hypernetwork: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    *,
    prompts: int = 12,
    steps: int = 20,
    progress: bool = True,
) -> Showcase:
    """Draw with the ``tiny`` preset without and with ``hypernetwork`` (see the module doc)."""
    from PIL import Image

    from ..engine.generate import save_png, txt2img
    from ..hypernetworks.modules import Hypernetwork
    from ..hypernetworks.processors import apply_hypernetworks, remove_hypernetworks
    from ..models.load import load_model

    output = Path(output_dir)
    for label in ("without", "with"):
        (output / label).mkdir(parents=True, exist_ok=True)
    model = load_model("tiny")
    network = Hypernetwork.load(hypernetwork)
    network.name = Path(hypernetwork).stem
    sizes = standard_sizes(model)
    sheet_scenes = random_scenes(_SHEET_COLUMNS, seed=_SHEET_SEED)
    measured = random_scenes(prompts)
    rows: list[list[Image.Image]] = []
    reports = []
    for label, styled in (("without", False), ("with", True)):
        if styled:
            apply_hypernetworks(model.unet, [network], [1.0])
        row = []
        for column, scene in enumerate(sheet_scenes):
            width, height = sizes[column % len(sizes)]
            generated = txt2img(
                model, scene.caption, width=width, height=height, steps=steps, seed=_SHEET_SEED + column, progress=False
            )[0]
            save_png(generated.image, output / label / f"{column:05d}-{generated.seed}.png", generated.parameters)
            row.append(generated.image)
        rows.append(row)
        reports.append(evaluate(model, measured, sizes, styled=styled, steps=steps, progress=progress))
        if styled:
            remove_hypernetworks(model.unet)
    sheet = output / SHEET_FILE
    _contact_sheet(rows).save(sheet)
    return Showcase(sheet, reports[0], reports[1])


def _contact_sheet(rows, gap: int = 6):
    """The rows' images, each centred in a square cell as large as the largest image."""
    from PIL import Image

    cell = max(max(image.size) for row in rows for image in row)
    sheet = Image.new("RGB", (gap + len(rows[0]) * (cell + gap), gap + len(rows) * (cell + gap)), (255, 255, 255))
    for y, row in enumerate(rows):
        for x, image in enumerate(row):
            left = gap + x * (cell + gap) + (cell - image.width) // 2
            top = gap + y * (cell + gap) + (cell - image.height) // 2
            sheet.paste(image, (left, top))
    return sheet
