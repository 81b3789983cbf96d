"""kernels/shapes.py describes the attention layers a real diffusers U-Net runs."""

from collections import Counter

import pytest
import torch

from nai_fast.models.configs import load_config
from nai_fast.kernels.shapes import attention_levels


def observed_attention(config, width, height, batch, context_tokens):
    """(kind, batch, tokens, channels, heads, context tokens) -> calls, from forward hooks on a U-Net."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_config(config)
    calls = Counter()

    def record(module, args, kwargs, output, name):
        hidden = args[0]
        context = kwargs.get("encoder_hidden_states")
        kind = "attn2" if name.endswith("attn2") else "attn1"
        keys = context.shape[1] if context is not None else hidden.shape[1]
        calls[kind, hidden.shape[0], hidden.shape[1], hidden.shape[2], module.heads, keys] += 1

    for name, module in unet.named_modules():
        if name.endswith(("attn1", "attn2")):
            module.register_forward_hook(lambda m, a, k, o, name=name: record(m, a, k, o, name), with_kwargs=True)
    latents = torch.zeros(batch, config["in_channels"], height // 8, width // 8)
    context = torch.zeros(batch, context_tokens, config["cross_attention_dim"])
    with torch.no_grad():
        unet(latents, 10, context)
    return calls


def expected_attention(levels):
    calls = Counter()
    for level in levels:
        calls["attn1", level.batch, level.tokens, level.channels, level.heads, level.tokens] += level.blocks
        calls["attn2", level.batch, level.tokens, level.channels, level.heads, level.context_tokens] += level.blocks
    return calls


@pytest.mark.parametrize("width, height, chunks", [(64, 96, 1), (128, 64, 2)])
def test_levels_match_the_tiny_unet(width, height, chunks):
    config = load_config("tiny", "unet")
    levels = attention_levels(width, height, chunks=chunks, config=config)
    assert observed_attention(config, width, height, 2, 77 * chunks) == expected_attention(levels)


def test_sd1_at_512x768():
    levels = attention_levels(512, 768, chunks=3)
    assert sum(level.blocks for level in levels) == 16  # 16 attn1 and 16 attn2, as diffusers builds it
    assert [(level.tokens, level.head_dim) for level in levels] == [
        (6144, 40), (1536, 80), (384, 160), (96, 160), (384, 160), (1536, 80), (6144, 40)
    ]  # fmt: skip
    assert {level.context_tokens for level in levels} == {231} and {level.batch for level in levels} == {2}


def test_size_must_fit_the_latents():
    with pytest.raises(ValueError, match="multiple of 8"):
        attention_levels(500, 512)
