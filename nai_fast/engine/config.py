"""What a training run depends on (:class:`TrainConfig`), and the names the engines and the command line share.

Imports nothing heavy (no torch, no NumPy), so ``nai-fast --help`` and ``nai-fast train
--help`` read these without loading the engines.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

__all__ = [
    "DEFAULT_TRAIN_OUTPUT",
    "HYPERNETWORK_FILES",
    "LR_SCHEDULES",
    "MIXED_PRECISION",
    "MODEL_PRESETS",
    "MODES",
    "TRAINED_HYPERNETWORK_FILE",
    "TrainConfig",
]

# nai_fast.models.presets.PRESETS, spelled out here because that module imports torch
# (tests/test_generate.py checks the two agree).
MODEL_PRESETS = ("sd15", "tiny")

DEFAULT_TRAIN_OUTPUT = "nai-fast-output"  # `nai-fast train`'s default output folder; `generate --preset tiny` looks there
TRAINED_HYPERNETWORK_FILE = "hypernetwork.safetensors"  # a trained hypernetwork, as `nai-fast generate` finds it
HYPERNETWORK_FILES = (TRAINED_HYPERNETWORK_FILE, "hypernetwork.pt")  # what training writes: ours, the web UI's format

MODES = ("hypernetwork", "finetune")
LR_SCHEDULES = ("constant", "cosine", "linear")
MIXED_PRECISION = ("no", "fp16", "bf16")


@dataclass
class TrainConfig:
    """Everything a training run depends on. ``nai-fast train --help`` describes each option."""

    model: str = "tiny"  # a preset name (nai_fast.models.presets.PRESETS) or a model path
    data: str | None = None  # image folder with .txt tags; None: a demo dataset (tiny preset only)
    output_dir: str = DEFAULT_TRAIN_OUTPUT  # where `nai-fast generate --preset tiny` looks
    mode: str = "hypernetwork"
    max_steps: int = 1000  # optimizer steps in the whole run, resumed ones included
    batch_size: int = 4  # per rank
    grad_accum: int = 1
    lr: float = 1e-5
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.01
    resolution: int | None = None  # side of the base bucket; None: the model's (512 for SD 1.x, 128 for tiny)
    max_aspect_error: float | None = 0.5  # prune images this far (log units) from every bucket
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    max_grad_norm: float | None = 1.0  # None or 0: no clipping
    penalty_weight: float = 1.0  # hypernetwork shallow-layer penalty
    ema: bool = False  # fine-tuning only
    ema_decay: float = 0.9999
    caption_dropout: float = 0.0
    keep_tokens: int = 0
    shuffle_tags: bool = True
    min_caption_tokens: int = 50
    max_chunks: int = 3  # 75-token chunks per caption
    clip_skip: int = 2
    hypernetwork_structure: tuple[float, ...] = (1.0, 2.0, 1.0)
    activation: str = "linear"
    layer_norm: bool = False
    hypernetwork_dropout: float = 0.0  # after each hidden Linear
    cache_latents: bool = False
    save_every: int = 500  # 0: only at the end
    sample_every: int = 0  # 0: no samples
    sample_prompts: tuple[str, ...] = ()  # default: the first image's tags
    sample_steps: int = 20
    seed: int = 0
    workers: int = 0  # DataLoader worker processes
    device: str | None = None  # None: cuda (this rank's GPU) if available, else cpu
    resume: bool = False  # continue the run whose checkpoint is in output_dir
    overwrite: bool = False  # start over in an output_dir that holds a run (else refused, see RunExists)
    max_consecutive_skips: int = 10
    fixed_noise: bool = False  # the same noise and timesteps at every step (overfitting checks)
    record_items: bool = False  # list the files each step trained on in TrainResult.trained_items
    progress: bool = True
    tensorboard: bool = True  # when torch.utils.tensorboard imports

    def __post_init__(self) -> None:
        self.hypernetwork_structure = tuple(float(m) for m in self.hypernetwork_structure)
        self.sample_prompts = tuple(self.sample_prompts)
        for name, choices in (("mode", MODES), ("lr_schedule", LR_SCHEDULES), ("mixed_precision", MIXED_PRECISION)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")
        for name in (
            "max_steps",
            "batch_size",
            "grad_accum",
            "max_chunks",
            "clip_skip",
            "sample_steps",
            "max_consecutive_skips",
        ):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "save_every", "sample_every", "workers", "keep_tokens", "seed"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.resume and self.overwrite:
            raise ValueError("resume continues the run in output_dir and overwrite replaces it: set one, not both")
        if self.ema and self.mode != "finetune":
            raise ValueError("ema applies to mode 'finetune' only")
        if not 0.0 <= self.hypernetwork_dropout < 1.0:
            raise ValueError(f"hypernetwork_dropout must lie in [0, 1), got {self.hypernetwork_dropout}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
