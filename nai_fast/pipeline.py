"""Drop-in long-prompt encoding for diffusers' Stable Diffusion pipelines.

:func:`patch_pipeline` replaces a pipeline's ``encode_prompt`` (the method
``StableDiffusionPipeline`` and its img2img and inpaint siblings call) with a
:class:`~nai_fast.text.LongPromptEncoder`, so prompt and negative prompt may
be long and weighted and clip skip applies to both; :func:`unpatch_pipeline`
restores the pipeline's own method.
"""

from __future__ import annotations

from typing import Any

import torch

from .text import LongPromptEncoder

_PATCH = "_nai_fast_encoder"


def patch_pipeline(pipe: Any, **encoder_options: Any) -> LongPromptEncoder:
    """Make ``pipe`` encode prompts with a :class:`LongPromptEncoder` built from
    its tokenizer and text encoder; returns that encoder.

    ``encoder_options`` are the encoder's (``clip_skip=2``, ``max_chunks=3``,
    ``syntax="a1111"``, ...). A ``clip_skip`` passed to the pipeline call
    counts the diffusers way (layers skipped) and overrides ours for that
    call. Precomputed ``prompt_embeds`` still go to the pipeline's own method.
    """
    unpatch_pipeline(pipe)
    encoder = LongPromptEncoder(pipe.tokenizer, pipe.text_encoder, **encoder_options)
    original = pipe.encode_prompt

    def encode_prompt(
        prompt: Any,
        device: torch.device,
        num_images_per_prompt: int,
        do_classifier_free_guidance: bool,
        negative_prompt: Any = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        lora_scale: float | None = None,
        clip_skip: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if prompt_embeds is not None or negative_prompt_embeds is not None:
            return original(
                prompt, device, num_images_per_prompt, do_classifier_free_guidance, negative_prompt,
                prompt_embeds, negative_prompt_embeds, lora_scale, clip_skip,
            )  # fmt: skip
        # diffusers counts the layers skipped, we count from the last layer.
        cond, uncond = encoder.encode(prompt, negative_prompt, clip_skip=None if clip_skip is None else clip_skip + 1)
        cond = cond.to(device).repeat_interleave(num_images_per_prompt, dim=0)
        uncond = uncond.to(device).repeat_interleave(num_images_per_prompt, dim=0)
        return cond, uncond if do_classifier_free_guidance else None

    pipe.encode_prompt = encode_prompt
    setattr(pipe, _PATCH, encoder)
    return encoder


def unpatch_pipeline(pipe: Any) -> None:
    """Restore the pipeline's own ``encode_prompt`` (no-op if not patched)."""
    if getattr(pipe, _PATCH, None) is not None:
        del pipe.encode_prompt  # the instance attribute hid the class's method
        delattr(pipe, _PATCH)
