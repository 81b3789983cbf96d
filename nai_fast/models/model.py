"""Stable Diffusion 1.x components, built offline.

:func:`load_model` gives a :class:`StableDiffusion`: the U-Net, VAE, CLIP text encoder,
tokenizer and training noise schedule, from

- a preset, which needs no file: ``"sd15"`` (the real SD 1.x architecture with random
  weights, for benchmarks) or ``"tiny"`` (a small U-Net, VAE and text encoder for demos and
  tests; the tokenizer is always the real CLIP one);
- a diffusers folder (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``...);
- a single ``.safetensors`` / ``.ckpt`` checkpoint in the original (CompVis / web UI) layout.

:func:`save_single_file` writes the original layout. The file formats live in
``_checkpoints.py``; every unloadable path raises :class:`ModelFileError`.

The configs come from the package (``nai_fast/configs``), never from the network.
diffusers and transformers are imported when a model is built, not with this module.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch

from .configs import load_config

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, PreTrainedTokenizerBase

__all__ = [
    "PREDICTION_TYPES",
    "PRESETS",
    "ModelFileError",
    "StableDiffusion",
    "build_preset",
    "load_model",
    "save_single_file",
]

# preset name -> the shipped config family it is built from
PRESETS = {"tiny": "tiny", "sd15": "sd1"}
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


def load_model(
    source: str | os.PathLike[str],
    *,
    vae: str | os.PathLike[str] | None = None,
    seed: int = 0,
    prediction_type: str | None = None,
) -> StableDiffusion:
    """The model a preset name or a path names (see the module doc).

    ``vae``: a separate VAE file (``.vae.pt``, ``.safetensors``) replacing the model's own.
    ``seed`` draws a preset's random weights.
    ``prediction_type``: ``"epsilon"`` or ``"v_prediction"``, overriding the source's. SD 1.x
    weights do not tell which they predict, so a single file means ``"epsilon"`` unless told.

    Raises:
        ModelFileError: a path that cannot be loaded (the message says why).
    """
    _check_prediction_type(prediction_type)
    if str(source) in PRESETS:
        model = build_preset(str(source), seed=seed)
        if prediction_type is not None:
            schedule = type(model.scheduler).from_config(model.scheduler.config, prediction_type=prediction_type)
            model = model.with_scheduler(schedule)
    else:
        from .checkpoints import load_from_path  # the file formats, kept apart

        model = load_from_path(source, prediction_type=prediction_type)
    if vae is not None:
        from .checkpoints import load_vae_file

        model = replace(model, vae=load_vae_file(vae, model.vae.config))
    return model


def save_single_file(model: StableDiffusion, path: str | os.PathLike[str]) -> None:
    """Write ``model`` as one ``.safetensors`` or ``.ckpt`` checkpoint in the original
    (CompVis / web UI) layout, which ``load_model`` and the web UI read. Written atomically."""
    from .checkpoints import save_single_file as save

    save(model, path)


def build_preset(name: str, *, seed: int = 0) -> StableDiffusion:
    """A model with random weights drawn from ``seed``, on the CPU in float32, in eval mode."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    family = PRESETS[name]
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ..text.tokenizer import load_tokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config(_model_config(family, "unet"))
        vae = AutoencoderKL.from_config(_model_config(family, "vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig(**load_config(family, "text_encoder")))
        _like_a_trained_final_norm(text_encoder)
    return StableDiffusion(
        unet=unet.eval(),
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=load_tokenizer(),
        scheduler=DDPMScheduler.from_config(_model_config(family, "scheduler")),
        source=f"preset {name}",
    )


def _check_prediction_type(prediction_type: str | None) -> None:
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def _model_config(family: str, component: str) -> dict[str, Any]:
    config = load_config(family, component)
    config.pop("_class_name", None)
    return config


@torch.no_grad()
def _like_a_trained_final_norm(text_encoder: CLIPTextModel) -> None:
    # A fresh final LayerNorm (weight 1, bias 0) centres every token's vector on zero, so the
    # mean that "original" emphasis restores would be about 0/0; trained encoders' are not.
    norm = getattr(text_encoder, "text_model", text_encoder).final_layer_norm  # transformers 4 nests it
    norm.weight.normal_(1.0, 0.2)
    norm.bias.normal_(0.0, 0.5)
