"""Model configurations shipped with the package, so models build and
checkpoints load offline. ``sd1/`` holds Stable Diffusion 1.x's components."""

from __future__ import annotations

import json
from importlib import resources
from typing import Any


def load_config(family: str, component: str) -> dict[str, Any]:
    """The config of ``component`` (e.g. ``"text_encoder"``) of a model ``family`` (e.g. ``"sd1"``)."""
    path = resources.files(__package__) / family / f"{component}.json"
    if not path.is_file():
        raise ValueError(f"no shipped config for {family}/{component}")
    return json.loads(path.read_text(encoding="utf-8"))
