"""Models with random weights built from the shipped configs, no file needed: ``"sd15"`` (the
real SD 1.x architecture, for benchmarks) and ``"tiny"`` (a small U-Net, VAE and text encoder for
demos and tests). The tokenizer is always the real CLIP one.
"""

from __future__ import annotations

import torch

from .configs import load_config
from .stable_diffusion import StableDiffusion, model_config

__all__ = ["PRESETS", "build_preset"]

# preset name -> the shipped config family it is built from
PRESETS = {"tiny": "tiny", "sd15": "sd1"}


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
        unet = UNet2DConditionModel.from_config(model_config(family, "unet"))
        vae = AutoencoderKL.from_config(model_config(family, "vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig(**load_config(family, "text_encoder")))
        _like_a_trained_final_norm(text_encoder)
    return StableDiffusion(
        unet=unet.eval(),
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=load_tokenizer(),
        scheduler=DDPMScheduler.from_config(model_config(family, "scheduler")),
        source=f"preset {name}",
    )


@torch.no_grad()
def _like_a_trained_final_norm(text_encoder: torch.nn.Module) -> None:
    # A fresh final LayerNorm (weight 1, bias 0) centres every token's vector on zero, so the
    # mean that "original" emphasis restores would be about 0/0; trained encoders' are not.
    norm = getattr(text_encoder, "text_model", text_encoder).final_layer_norm  # transformers 4 nests it
    norm.weight.normal_(1.0, 0.2)
    norm.bias.normal_(0.0, 0.5)
