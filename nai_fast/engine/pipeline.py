"""Drop-ins for diffusers' Stable Diffusion pipelines.

:func:`patch_pipeline` replaces a pipeline's ``encode_prompt`` (the method
``StableDiffusionPipeline`` and its img2img and inpaint siblings call) with a
:class:`~nai_fast.text.encoder.LongPromptEncoder`, so prompt and negative prompt may
be long and weighted and clip skip applies to both.

:func:`upgrade_pipeline` brings in all of NovelAI's inference changes in one
call: that encoder (clip skip 2 by default), hypernetworks on the U-Net
(:func:`nai_fast.hypernetworks.processors.apply_hypernetworks`) and a sampler built from the
pipeline's noise schedule (:func:`nai_fast.engine.generate.make_sampler`, Euler
ancestral by default). With generators from
:func:`nai_fast.engine.generate.seeded_generators` an upgraded pipeline makes the
images :func:`nai_fast.engine.generate.txt2img` makes, pixel for pixel, for a guidance
scale above 1 (diffusers leaves out guidance at scales up to 1; txt2img only
at exactly 1).

:func:`unpatch_pipeline` undoes either: the pipeline's own ``encode_prompt``,
scheduler and attention processors come back.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..hypernetworks.processors import apply_hypernetworks, remove_hypernetworks
from ..hypernetworks.modules import Hypernetwork
from ..text.encoder import LongPromptEncoder

_PATCH = "_nai_fast_encoder"
_UPGRADE = "_nai_fast_upgrade"  # (the pipeline's own scheduler, whether we applied hypernetworks)


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


def upgrade_pipeline(
    pipe: Any,
    hypernetworks: Hypernetwork | Sequence[Hypernetwork] = (),
    strengths: float | Sequence[float] | None = None,
    *,
    sampler: str = "euler_a",
    clip_skip: int = 2,
    **encoder_options: Any,
) -> LongPromptEncoder:
    """Make ``pipe`` generate the NovelAI way; returns its :class:`LongPromptEncoder`.

    Args:
        pipe: a diffusers ``StableDiffusionPipeline`` (or a sibling with ``encode_prompt``,
            ``unet`` and ``scheduler``).
        hypernetworks, strengths: applied to ``pipe.unet`` (on its device already), as
            :func:`~nai_fast.hypernetworks.processors.apply_hypernetworks` does; none by default.
        sampler: a :data:`nai_fast.engine.generate.SAMPLERS` name, built from the pipeline's
            scheduler config (its noise schedule and ``prediction_type`` kept).
        clip_skip, encoder_options: the encoder's (see :func:`patch_pipeline`).

    Upgrading again replaces the previous upgrade; :func:`unpatch_pipeline` undoes it.
    """
    from .generate import make_sampler  # generate's heavier imports only when upgrading

    unpatch_pipeline(pipe)
    scheduler = make_sampler(sampler, pipe.scheduler.config)  # fails before anything is changed
    encoder = patch_pipeline(pipe, clip_skip=clip_skip, **encoder_options)
    applied = isinstance(hypernetworks, Hypernetwork) or len(hypernetworks) > 0
    if applied:
        try:
            apply_hypernetworks(pipe.unet, hypernetworks, strengths)
        except (TypeError, ValueError):
            unpatch_pipeline(pipe)
            raise
    setattr(pipe, _UPGRADE, (pipe.scheduler, applied))
    pipe.scheduler = scheduler
    return encoder


def unpatch_pipeline(pipe: Any) -> None:
    """Restore the pipeline's own ``encode_prompt``, and after :func:`upgrade_pipeline` its
    scheduler and attention processors (no-op if not patched)."""
    upgrade = getattr(pipe, _UPGRADE, None)
    if upgrade is not None:
        scheduler, applied_hypernetworks = upgrade
        pipe.scheduler = scheduler
        if applied_hypernetworks:
            remove_hypernetworks(pipe.unet)
        delattr(pipe, _UPGRADE)
    if getattr(pipe, _PATCH, None) is not None:
        del pipe.encode_prompt  # the instance attribute hid the class's method
        delattr(pipe, _PATCH)
