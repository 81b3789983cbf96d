"""A built-in sample of image sizes, so ``nai-fast buckets`` runs with no data.

The table below is modelled on the resolutions common in tagged illustration
and photo sets (portrait-heavy, with screen, print, phone and camera formats,
squares, a few strips and slivers); it is a plausible mixture for
demonstrations and benchmarks, not a measurement of any one dataset.
"""

from __future__ import annotations

import numpy as np

# (width, height, share of images)
_FORMATS = np.array(
    [
        (850, 1200, 14), (1000, 1414, 6), (2480, 3508, 3),  # ISO paper, portrait
        (768, 1024, 8), (1200, 1600, 8), (3000, 4000, 3),  # 3:4
        (1080, 1920, 5), (1170, 2532, 3), (1440, 3200, 2),  # phone screens
        (1920, 1080, 10), (1280, 720, 4), (2560, 1440, 2),  # 16:9
        (1600, 1200, 5), (6000, 4000, 3), (4000, 6000, 2),  # 4:3, 3:2 cameras
        (1024, 1024, 7), (512, 512, 3), (2048, 2048, 2),  # squares
        (1200, 900, 3), (1414, 1000, 2),  # landscape prints
        (3000, 1000, 1), (800, 2800, 1),  # panoramas, tall strips
        (600, 6000, 0.4), (5000, 400, 0.3),  # slivers that bucketing should prune
        (320, 240, 1), (240, 320, 1),  # small images
    ],
    dtype=np.float64,
)  # fmt: skip


def sample_sizes(n: int = 20_000, seed: int = 0) -> np.ndarray:
    """``n`` image sizes ``(width, height)`` drawn from the built-in mixture.

    Most sizes are exact formats; a third are cropped or rescaled by up to
    10% on each side independently, as real collections are.
    """
    rng = np.random.default_rng(seed)
    shares = _FORMATS[:, 2] / _FORMATS[:, 2].sum()
    sizes = _FORMATS[rng.choice(len(_FORMATS), size=n, p=shares), :2]
    edited = rng.random(n) < 1 / 3
    sizes[edited] *= rng.uniform(0.9, 1.1, size=(int(edited.sum()), 2))
    return np.maximum(np.rint(sizes), 1).astype(np.int64)
