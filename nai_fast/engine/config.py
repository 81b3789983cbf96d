"""What a training run depends on, and the names the engines and the command line share.

Imports nothing heavy (no torch, no NumPy), so ``nai-fast --help`` and ``nai-fast train
--help`` read these without loading the engines.
"""

from __future__ import annotations

__all__ = ["DEFAULT_TRAIN_OUTPUT", "HYPERNETWORK_FILES", "MODEL_PRESETS", "TRAINED_HYPERNETWORK_FILE"]

# nai_fast.models.presets.PRESETS, spelled out here because that module imports torch
# (tests/test_generate.py checks the two agree).
MODEL_PRESETS = ("sd15", "tiny")

DEFAULT_TRAIN_OUTPUT = "nai-fast-output"  # `nai-fast train`'s default output folder; `generate --preset tiny` looks there
TRAINED_HYPERNETWORK_FILE = "hypernetwork.safetensors"  # a trained hypernetwork, as `nai-fast generate` finds it
HYPERNETWORK_FILES = (TRAINED_HYPERNETWORK_FILE, "hypernetwork.pt")  # what training writes: ours, the web UI's format
