"""The components of a Stable Diffusion 1.x model (:class:`StableDiffusion`), the one error
every unloadable model path raises, and the shipped configs as diffusers takes them. The leaf
of ``models/``: presets, file formats and loading build on it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch

from .configs import load_config

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, PreTrainedTokenizerBase

__all__ = ["PREDICTION_TYPES", "ModelFileError", "StableDiffusion", "check_prediction_type", "model_config"]

# What an SD 1.x U-Net may be trained to predict (the scheduler's prediction_type).
PREDICTION_TYPES = ("epsilon", "v_prediction")


class ModelFileError(ValueError):
    """A model or VAE path that cannot be loaded: missing, malformed, unsafe to unpickle, or
    holding another architecture or other weights than its config needs. The message names
    the path and the reason."""


@dataclass(frozen=True)
class StableDiffusion:
    """The components of an SD 1.x model, and where they came from."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: PreTrainedTokenizerBase
    scheduler: DDPMScheduler  # the training noise schedule; samplers are built from its config
    source: str

    @property
    def prediction_type(self) -> str:
        """What the U-Net predicts: ``"epsilon"`` or ``"v_prediction"``."""
        return self.scheduler.config.prediction_type

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent along a side (8 for SD 1.x)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def resolution(self) -> int:
        """The side of the square images the model was built for (512 for SD 1.x, 128 for tiny)."""
        return self.unet.config.sample_size * self.vae_scale_factor

    @property
    def size_unit(self) -> int:
        """Pixels one latent cell of the U-Net's deepest level covers: image sides must be
        multiples of it (64 for SD 1.x)."""
        return self.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> StableDiffusion:
        """Moves the networks (in place, as ``nn.Module.to`` does) and returns ``self``."""
        # Only what is asked: diffusers warns about any dtype argument, even None.
        arguments = {name: value for name, value in (("device", device), ("dtype", dtype)) if value is not None}
        for module in (self.unet, self.vae, self.text_encoder):
            module.to(**arguments)
        return self

    def pipeline_components(self) -> dict[str, Any]:
        """Keyword arguments for diffusers' ``StableDiffusionPipeline(**...)``."""
        return dict(
            unet=self.unet,
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            scheduler=self.scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )

    def with_scheduler(self, scheduler: Any) -> StableDiffusion:
        return replace(self, scheduler=scheduler)


def check_prediction_type(prediction_type: str | None) -> None:
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def model_config(family: str, component: str) -> dict[str, Any]:
    config = load_config(family, component)
    config.pop("_class_name", None)
    return config
