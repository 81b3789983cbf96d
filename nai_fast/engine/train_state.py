"""Training files written atomically (a kill mid-write never destroys the last one), and the
random-number state a resume needs.

Every file goes through :func:`nai_fast.files.atomic_write` (re-exported here): a temporary
file in the destination's own folder, fsynced, moved over the destination with
``os.replace``, and the folder fsynced. A crash, a kill or an exception at any moment
leaves either the old file or the new one, never a partial file under the real name.

A training state is a plain dict of tensors, numbers, strings, lists and dicts, so
it is written with ``torch.save`` and read back with ``torch.load(weights_only=True)``:
loading a state never runs code from the file.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..files import atomic_write

__all__ = ["atomic_write", "load_state", "restore_rng_states", "rng_states", "save_state", "saved_step"]


def save_state(state: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write a training state atomically with ``torch.save``."""
    return atomic_write(path, lambda temporary: torch.save(state, temporary))


def load_state(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a state written by :func:`save_state`; tensors land on the CPU; no code is run."""
    return torch.load(path, map_location="cpu", weights_only=True)


def saved_step(path: str | os.PathLike[str]) -> int:
    """The ``step`` of a state written by :func:`save_state`, without reading its tensors (they are
    memory-mapped and never touched), so asking costs little even for a fine-tuning run's state."""
    return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["step"])


def rng_states() -> dict[str, Any]:
    """This process's torch (CPU and CUDA), NumPy and Python random states, in types that
    ``torch.load(weights_only=True)`` accepts (NumPy's key array becomes a tensor)."""
    numpy_state = np.random.get_state(legacy=False)
    python_version, python_internal, python_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "bit_generator": numpy_state["bit_generator"],
            "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
            "pos": int(numpy_state["state"]["pos"]),
            "has_gauss": int(numpy_state["has_gauss"]),
            "gauss": float(numpy_state["gauss"]),
        },
        "python": [python_version, list(python_internal), python_gauss],
    }


def restore_rng_states(states: dict[str, Any]) -> None:
    """Undo :func:`rng_states`: set every generator it saved."""
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    numpy_state = states["numpy"]
    np.random.set_state(
        {
            "bit_generator": numpy_state["bit_generator"],
            "state": {"key": numpy_state["key"].numpy().astype(np.uint32), "pos": numpy_state["pos"]},
            "has_gauss": numpy_state["has_gauss"],
            "gauss": numpy_state["gauss"],
        }
    )
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
