"""The attention layers of a Stable Diffusion U-Net, as the shapes the kernels see.

Derived from a diffusers ``UNet2DConditionModel`` config (the shipped SD 1.x one by
default), so benchmarks, the cost report and ``nai-fast info --kernels`` agree on what
"SD 1.x at 512x768" means: per resolution level, how many transformer blocks run, with how
many image tokens, channels and heads. Every block has one self-attention (``attn1``: its
k/v input is the image tokens, where ``hyper_kv`` applies) and one cross-attention
(``attn2``: queries are the image tokens, keys the prompt's ``77 * chunks`` tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["AttentionLevel", "attention_levels"]

_CHUNK_TOKENS = 77


@dataclass(frozen=True)
class AttentionLevel:
    """The transformer blocks of one resolution level of the U-Net."""

    name: str  # e.g. "down 1", "mid", "up 3"
    blocks: int  # transformer blocks at this level (each: one attn1 and one attn2)
    batch: int  # images times 2 with classifier-free guidance
    tokens: int  # image tokens: latent height x width at this level
    channels: int  # width of the image tokens, and of attn1's k/v input
    heads: int
    context_tokens: int  # attn2's keys: 77 per prompt chunk
    context_width: int  # the text encoder's width

    @property
    def head_dim(self) -> int:
        return self.channels // self.heads


def attention_levels(
    width: int = 512,
    height: int = 512,
    *,
    images: int = 1,
    guidance: bool = True,
    chunks: int = 1,
    config: dict[str, Any] | None = None,
    vae_scale_factor: int = 8,
) -> list[AttentionLevel]:
    """The attention levels of a U-Net generating ``images`` images of ``width x height``
    pixels with prompts of ``chunks`` 77-token chunks, down blocks first."""
    if config is None:
        from ..models.configs import load_config

        config = load_config("sd1", "unet")
    if width % vae_scale_factor or height % vae_scale_factor:
        raise ValueError(f"{width}x{height} is not a multiple of {vae_scale_factor} pixels")
    channels = config["block_out_channels"]
    per_block = config.get("layers_per_block", 2)
    heads_config = config.get("attention_head_dim", 8)  # diffusers' SD 1.x name for the head count
    common = dict(
        batch=images * (2 if guidance else 1),
        context_tokens=_CHUNK_TOKENS * chunks,
        context_width=config["cross_attention_dim"],
    )

    def level(name: str, depth: int, blocks: int) -> AttentionLevel:
        heads = heads_config[depth] if isinstance(heads_config, (list, tuple)) else heads_config
        tokens = (height // vae_scale_factor >> depth) * (width // vae_scale_factor >> depth)
        return AttentionLevel(name, blocks, tokens=tokens, channels=channels[depth], heads=heads, **common)

    deepest = len(channels) - 1
    levels = [
        level(f"down {depth}", depth, per_block)
        for depth, kind in enumerate(config["down_block_types"])
        if kind.startswith("CrossAttn")
    ]
    levels.append(level("mid", deepest, 1))
    levels += [
        level(f"up {index}", deepest - index, per_block + 1)
        for index, kind in enumerate(config["up_block_types"])
        if kind.startswith("CrossAttn")
    ]
    return levels
