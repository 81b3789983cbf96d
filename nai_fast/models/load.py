"""Load a model by name or path (:func:`load_model`): a preset, a diffusers folder, or a single
``.safetensors`` / ``.ckpt`` checkpoint in the original (CompVis / web UI) layout, offline, with
the configs the package ships. diffusers and transformers are imported when a model is built.
"""

from __future__ import annotations

import os
from dataclasses import replace

from .checkpoints import load_from_path, load_vae_file
from .presets import PRESETS, build_preset
from .stable_diffusion import StableDiffusion, check_prediction_type

__all__ = ["load_model"]


def load_model(
    source: str | os.PathLike[str],
    *,
    vae: str | os.PathLike[str] | None = None,
    seed: int | None = None,
    prediction_type: str | None = None,
) -> StableDiffusion:
    """The model a preset name or a path names (see the module doc).

    ``vae``: a separate VAE file (``.vae.pt``, ``.safetensors``) replacing the model's own.
    ``seed`` draws a random preset's weights (an error for a trained one: ``tiny``).
    ``prediction_type``: ``"epsilon"`` or ``"v_prediction"``, overriding the source's. SD 1.x
    weights do not tell which they predict, so a single file means ``"epsilon"`` unless told.

    Raises:
        ModelFileError: a path that cannot be loaded (the message says why).
    """
    check_prediction_type(prediction_type)
    if str(source) in PRESETS:
        model = build_preset(str(source), seed=seed)
        if prediction_type is not None:
            schedule = type(model.scheduler).from_config(model.scheduler.config, prediction_type=prediction_type)
            model = model.with_scheduler(schedule)
    else:
        model = load_from_path(source, prediction_type=prediction_type)
    if vae is not None:
        model = replace(model, vae=load_vae_file(vae, model.vae.config))
    return model
