"""Models built from the shipped configs, no download needed: ``"tiny"`` (a small U-Net, VAE
and text encoder trained on the demo's coloured shapes, weights shipped in the package),
``"tiny-random"`` (the same networks with random weights, for tests that need only shapes) and
``"sd15"`` (the real SD 1.x architecture with random weights, for benchmarks). The tokenizer is
always the real CLIP one.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .configs import load_config
from .stable_diffusion import ModelFileError, StableDiffusion, model_config

__all__ = ["PRESETS", "PRETRAINED_WEIGHTS", "build_preset", "pretrained_weights_path"]

# preset name -> the shipped config family it is built from
PRESETS = {"tiny": "tiny", "tiny-random": "tiny", "sd15": "sd1"}
# preset name -> its weights file in nai_fast/models/weights (`python -m nai_fast.demo.pretrain` writes it)
PRETRAINED_WEIGHTS = {"tiny": "tiny.safetensors"}
# The weights file's metadata keys: the VAE's latent scaling factor, measured when it was trained,
# and what the U-Net learned to predict (files without it predict epsilon)
SCALING_FACTOR_KEY = "vae_scaling_factor"
PREDICTION_TYPE_KEY = "prediction_type"
# The networks' key prefixes in a weights file
COMPONENTS = ("unet", "vae", "text_encoder")


def pretrained_weights_path(name: str) -> Path:
    return Path(__file__).with_name("weights") / PRETRAINED_WEIGHTS[name]


def build_preset(name: str, *, seed: int | None = None) -> StableDiffusion:
    """A preset on the CPU in float32, in eval mode: trained weights where the preset ships
    them, else random weights drawn from ``seed`` (None: 0)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    if name in PRETRAINED_WEIGHTS and seed is not None:
        raise ValueError(f"the {name} preset's weights are trained, not drawn: a seed applies to {_random_presets()}")
    family = PRESETS[name]
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ..text.tokenizer import load_tokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed or 0)
        unet = UNet2DConditionModel.from_config(model_config(family, "unet"))
        vae = AutoencoderKL.from_config(model_config(family, "vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig(**load_config(family, "text_encoder")))
        _like_a_trained_final_norm(text_encoder)
    source = f"preset {name}"
    schedule = {}
    if name in PRETRAINED_WEIGHTS:
        metadata = load_pretrained_weights(pretrained_weights_path(name), unet=unet, vae=vae, text_encoder=text_encoder)
        schedule["prediction_type"] = metadata.get(PREDICTION_TYPE_KEY, "epsilon")
    return StableDiffusion(
        unet=unet.eval(),
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=load_tokenizer(),
        scheduler=DDPMScheduler.from_config(model_config(family, "scheduler"), **schedule),
        source=source,
    )


def _random_presets() -> str:
    return " and ".join(name for name in PRESETS if name not in PRETRAINED_WEIGHTS)


def save_pretrained_weights(
    path: Path, metadata: dict[str, str], *, prediction_type: str = "epsilon", **networks: torch.nn.Module
) -> None:
    """Write ``networks`` (keyword names from ``COMPONENTS``) to one safetensors file, floats as
    float16, with the VAE's scaling factor, the U-Net's ``prediction_type`` and ``metadata`` (how
    the weights were made)."""
    import safetensors.torch

    from ..files import atomic_write

    tensors = {}
    for prefix, network in networks.items():
        for key, tensor in network.state_dict().items():
            tensor = tensor.detach().cpu()
            tensors[f"{prefix}.{key}"] = (tensor.half() if tensor.is_floating_point() else tensor).contiguous()
    metadata = {
        **metadata,
        SCALING_FACTOR_KEY: repr(float(networks["vae"].config.scaling_factor)),
        PREDICTION_TYPE_KEY: prediction_type,
    }
    atomic_write(path, lambda temporary: safetensors.torch.save_file(tensors, temporary, metadata=metadata))


def load_pretrained_weights(path: Path, **networks: torch.nn.Module) -> dict[str, str]:
    """Load a :func:`save_pretrained_weights` file into ``networks`` (in float32), every key
    matched; returns the file's metadata."""
    import safetensors
    import safetensors.torch

    if not path.is_file():
        raise ModelFileError(
            f"{path}: the pretrained weights are missing from this install; make them with "
            "`python -m nai_fast.demo.pretrain`, or use the preset 'tiny-random'"
        )
    with safetensors.safe_open(str(path), framework="pt") as file:
        metadata = file.metadata() or {}
    state = safetensors.torch.load_file(str(path))
    for prefix, network in networks.items():
        own = network.state_dict()
        weights = {key[len(prefix) + 1 :]: value for key, value in state.items() if key.startswith(prefix + ".")}
        missing, unexpected = sorted(own.keys() - weights.keys()), sorted(weights.keys() - own.keys())
        if missing or unexpected:
            raise ModelFileError(f"{path}: {prefix} weights do not match its config (missing {missing[:3]}, unexpected {unexpected[:3]})")
        network.load_state_dict({key: value.to(own[key].dtype) for key, value in weights.items()})
    if "vae" in networks:
        networks["vae"].register_to_config(scaling_factor=float(metadata[SCALING_FACTOR_KEY]))
    return metadata


@torch.no_grad()
def _like_a_trained_final_norm(text_encoder: torch.nn.Module) -> None:
    # A fresh final LayerNorm (weight 1, bias 0) centres every token's vector on zero, so the
    # mean that "original" emphasis restores would be about 0/0; trained encoders' are not.
    norm = getattr(text_encoder, "text_model", text_encoder).final_layer_norm  # transformers 4 nests it
    norm.weight.normal_(1.0, 0.2)
    norm.bias.normal_(0.0, 0.5)
