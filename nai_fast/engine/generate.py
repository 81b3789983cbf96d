"""The inference engine: txt2img with classifier-free guidance, and PNGs that say how they were made.

Long because txt2img, its samplers and seeds, and the PNG parameters text (which both tools
must read and write field for field) belong together; the parameters text is the next cut.

:func:`txt2img` ``(model, prompt, *, negative_prompt="", width=None, height=None, steps=28,
guidance_scale=11.0, guidance_rescale=0.0, seed=0, sampler="euler_a", clip_skip=2,
batch_size=1, encoder=None, embeddings=None, progress=True) -> list[GeneratedImage]`` generates with a
:class:`~nai_fast.models.stable_diffusion.StableDiffusion` where it sits (device and dtype):

    prompt + negative -> LongPromptEncoder (both in one call, equal chunk counts)
      -> context [uncond; cond], built once, so the K/V cache of nai_fast.hypernetworks.processors
         recognises it at every step
      -> per step ONE U-Net call on the CFG batch, uncond + scale * (cond - uncond)
      -> the sampler's step -> VAE decode -> PIL images

- **Hypernetworks**: whatever processors are installed on ``model.unet``
  (:func:`nai_fast.hypernetworks.processors.apply_hypernetworks`) run; their names and strengths are
  recorded in the parameters.
- **LoRAs**: whatever :func:`nai_fast.models.lora.apply_loras` merged into the model's weights is what
  runs; their names, strengths and short hashes are recorded in the parameters.
- **Prompt tags**: ``<hypernet:NAME:STRENGTH>`` and ``<lora:NAME:STRENGTH>``
  (:mod:`nai_fast.text.tags`) are removed from the prompt before encoding and kept in the recorded
  prompt, as in the web UI. txt2img applies nothing itself: each tag must name a network applied at
  that strength (ValueError otherwise); ``nai-fast generate`` finds them by name in folders
  (:mod:`nai_fast.engine.assets`). Tags in the negative prompt are not applied (the web UI reads the
  positive prompt only) and stay text, with a warning.
- **Seeds**: image ``i`` of a call uses seed ``seed + i`` (as the web UI does), with
  its own CPU ``torch.Generator``: it draws the image's starting latents (float32, on
  the CPU, so CPU and GPU start from the same noise) and then the ancestral sampler's
  per-step noise. So any image can be made again alone, with its own seed and batch
  size 1 (:func:`seeded_generators` makes the same generators for a diffusers pipeline).
  Seeds are the web UI's: every image's lies in ``0 .. 2**32 - 1`` (:data:`MAX_SEED`;
  ValueError otherwise); ``nai-fast generate`` draws one where none (or -1) is given.
- **Samplers** (:data:`SAMPLERS`): diffusers schedulers built from the model's training
  noise schedule (its ``prediction_type`` kept) by :func:`make_sampler`: ``euler_a``
  (NovelAI's default), ``euler``, ``ddim``, ``dpmpp_2m_karras``.
- **Guidance**: a scale of exactly 1 is the conditional prediction alone, so the
  unconditional half is skipped (diffusers skips it for every scale <= 1; here any
  other scale, below 1 included, is guided). ``guidance_rescale`` (0 to 1; diffusers'
  argument, the web UI's "CFG Rescale", NovelAI's V3 uses it) pulls each guided prediction
  back toward the conditional one's standard deviation by that fraction
  (:func:`rescaled_guidance`): a high scale no longer overshoots a v-prediction model's
  colours into dark rims and shifted hues. Unguided (scale 1), it is an error.
- **Sizes**: width and height must be multiples of 64 (ValueError); either left out is the
  model's own resolution (:func:`default_side`: 512 for SD 1.x, 128 for the tiny preset).
  A size whose aspect ratio or area lies well outside the model's training buckets (the
  SD 1.x grid scaled to ``model.resolution``, :func:`nai_fast.data.buckets.scaled_buckets`)
  gets a warning logged (``nai_fast.engine.generate``), unless inside :func:`no_resolution_warning`.
- Runs under ``torch.inference_mode`` with the networks (and installed hypernetworks)
  in eval mode, giving each module back its own training flag afterwards, so a
  training loop can call it for sample images.

Files: :class:`GenerationParameters` writes and parses the web UI's "parameters"
text (``prompt <hypernet:name:0.8>``, ``Negative prompt: ...``, then ``Steps: 28, Sampler:
DPM++ 2M, Schedule type: Karras, CFG scale: 11, Seed: 1234, Size: 512x768, Model: name, Clip
skip: 2, CFG Rescale: 0.7, Lora hashes: "style: 0123456789ab"``: the web UI's keys, in its
order, a value quoted as JSON when it holds a comma, colon or newline; applied networks as tags
in the prompt). :func:`save_png` stores it as the PNG's ``parameters`` text chunk;
:func:`save_numbered` names files ``00000-1234.png`` (index-seed), never overwriting one.

:data:`DEFAULT_TRAIN_OUTPUT` (from :mod:`nai_fast.engine.config`) is the training CLI's
default output folder; a trained hypernetwork is written there as
:data:`TRAINED_HYPERNETWORK_FILE` and ``nai-fast generate`` points at it without loading it.
"""

from __future__ import annotations

import json
import logging
import math
import operator
import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..hypernetworks.processors import installed_hypernetworks
from ..models.lora import installed_loras
from ..text.tags import NETWORK_KINDS, NetworkTag, extract_network_tags, format_strength
from .config import DEFAULT_TRAIN_OUTPUT, TRAINED_HYPERNETWORK_FILE

if TYPE_CHECKING:
    from PIL import Image

    from ..models.stable_diffusion import StableDiffusion
    from ..text.encoder import LongPromptEncoder

__all__ = [
    "DEFAULT_TRAIN_OUTPUT",
    "MAX_SEED",
    "SAMPLERS",
    "SIZE_STEP",
    "TRAINED_HYPERNETWORK_FILE",
    "GeneratedImage",
    "GenerationParameters",
    "check_resolution",
    "check_seed",
    "check_size",
    "default_side",
    "make_sampler",
    "no_resolution_warning",
    "save_numbered",
    "save_png",
    "seeded_generators",
    "txt2img",
]


# sampler name -> (diffusers scheduler class, options over the model's noise schedule, web UI label)
_SAMPLER_RECIPES: dict[str, tuple[str, dict[str, Any], str]] = {
    "euler_a": ("EulerAncestralDiscreteScheduler", {}, "Euler a"),
    "euler": ("EulerDiscreteScheduler", {}, "Euler"),
    "ddim": ("DDIMScheduler", {}, "DDIM"),
    "dpmpp_2m_karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
        "DPM++ 2M Karras",
    ),
}
SAMPLERS: Mapping[str, str] = {name: recipe[2] for name, recipe in _SAMPLER_RECIPES.items()}  # name -> label
# Since v1.9 the web UI writes a Karras sampler as two fields: "Sampler: DPM++ 2M, Schedule type: Karras".
_SCHEDULED: Mapping[str, tuple[str, str]] = {"dpmpp_2m_karras": ("DPM++ 2M", "Karras")}
# "Schedule type: Automatic" is each sampler's own schedule: Karras for DPM++ 2M (the web UI's default).
_AUTOMATIC = {"DPM++ 2M": "dpmpp_2m_karras"}

SIZE_STEP = 64  # pixels; the SD 1.x U-Net halves the latent three times
MAX_SEED = 2**32 - 1  # the web UI's seeds: 0 .. 2**32 - 1
# A size is "far" from the training buckets beyond this factor on aspect ratio or area.
_FAR_FACTOR = 1.5

logger = logging.getLogger(__name__)
_resolution_warning = ContextVar("nai_fast_resolution_warning", default=True)


# Samplers and seeds


def make_sampler(name: str, noise_schedule: Mapping[str, Any]) -> Any:
    """A fresh diffusers scheduler for sampler ``name`` (see :data:`SAMPLERS`), built from
    a model's noise-schedule config (e.g. ``model.scheduler.config``)."""
    if name not in _SAMPLER_RECIPES:
        raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(_SAMPLER_RECIPES)}")
    import diffusers

    class_name, options, _ = _SAMPLER_RECIPES[name]
    return getattr(diffusers, class_name).from_config(noise_schedule, **options)


def seeded_generators(seed: int, count: int) -> list[torch.Generator]:
    """CPU generators seeded ``seed, seed + 1, ...``: image ``i``'s randomness. Pass them
    as ``generator=`` to a diffusers pipeline to reproduce :func:`txt2img`'s noise."""
    return [torch.Generator("cpu").manual_seed(seed + index) for index in range(count)]


def check_seed(seed: int, count: int = 1) -> int:
    """``seed`` as an int, if it and the ``count - 1`` seeds after it (images 1.. of a batch)
    all lie in ``0 .. MAX_SEED``; ValueError otherwise."""
    try:
        value = operator.index(seed)
    except TypeError:
        raise ValueError(f"seed must be an integer, got {seed!r}") from None
    if isinstance(seed, bool) or not 0 <= value <= MAX_SEED - max(count - 1, 0):
        last = f" (and the seeds after it, for {count} images)" if count > 1 else ""
        raise ValueError(f"seed must lie in 0..{MAX_SEED}{last}, got {seed!r}")
    return value


def check_size(width: int, height: int) -> None:
    """ValueError unless both sides are positive multiples of :data:`SIZE_STEP` (64)."""
    for name, side in (("width", width), ("height", height)):
        try:
            whole = operator.index(side)
        except TypeError:
            whole = 0
        if isinstance(side, bool) or whole <= 0 or whole % SIZE_STEP:
            raise ValueError(f"{name} must be a positive multiple of {SIZE_STEP}, got {side!r}")


def default_side(model: StableDiffusion) -> int:
    """The image side a model generates at by default: its own resolution (512 for SD 1.x,
    128 for the tiny preset), on the 64-pixel grid."""
    return max(SIZE_STEP, round(model.resolution / SIZE_STEP) * SIZE_STEP)


@contextmanager
def no_resolution_warning() -> Iterator[None]:
    """Within it, :func:`check_resolution` logs no warning: for callers that mean the size
    (training samples at a small bucket, benchmarks)."""
    token = _resolution_warning.set(False)
    try:
        yield
    finally:
        _resolution_warning.reset(token)


def check_resolution(width: int, height: int, resolution: int = 512) -> None:
    """ValueError unless both sides are positive multiples of 64 (:func:`check_size`); a
    warning logged when the aspect ratio or the area lies beyond the range of the training
    buckets of a model of ``resolution`` (512: SD 1.x's) by more than a factor of 1.5."""
    check_size(width, height)
    if not _resolution_warning.get():
        return
    from ..data.buckets import scaled_buckets

    buckets = scaled_buckets(resolution, SIZE_STEP)
    ratios = buckets[:, 0] / buckets[:, 1]
    areas = buckets[:, 0] * buckets[:, 1]
    ratio, area = width / height, width * height
    if not ratios.min() / _FAR_FACTOR <= ratio <= ratios.max() * _FAR_FACTOR:
        reason = f"aspect ratio {ratio:.3g} (trained: {ratios.min():.3g} to {ratios.max():.3g})"
    elif not areas.min() / _FAR_FACTOR <= area <= areas.max() * _FAR_FACTOR:
        reason = f"{area} pixels (trained: {areas.min()} to {areas.max()})"
    else:
        return
    logger.warning(
        "%dx%d is far from the model's training buckets: %s; expect repeated or cut-off subjects",
        width,
        height,
        reason,
    )


# Generation


@dataclass(frozen=True)
class GeneratedImage:
    """One image and how it was made."""

    image: Image.Image
    parameters: GenerationParameters

    @property
    def seed(self) -> int:
        return self.parameters.seed

    @property
    def text(self) -> str:
        """The web UI's parameters text (what :func:`save_png` stores)."""
        return self.parameters.to_text()


def rescaled_guidance(guided: torch.Tensor, cond: torch.Tensor, rescale: float) -> torch.Tensor:
    """The guided prediction brought back toward the conditional one's standard deviation, per
    image, by the fraction ``rescale`` (Lin et al. 2023, "Common Diffusion Noise Schedules and
    Sample Steps are Flawed", section 3.4; diffusers' ``rescale_noise_cfg``)."""
    dims = list(range(1, guided.ndim))
    matched = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return rescale * matched + (1 - rescale) * guided


def txt2img(
    model: StableDiffusion,
    prompt: str,
    *,
    negative_prompt: str = "",
    width: int | None = None,
    height: int | None = None,
    steps: int = 28,
    guidance_scale: float = 11.0,
    guidance_rescale: float = 0.0,
    seed: int = 0,
    sampler: str = "euler_a",
    clip_skip: int = 2,
    batch_size: int = 1,
    encoder: LongPromptEncoder | None = None,
    embeddings: Mapping[str, torch.Tensor] | None = None,
    progress: bool = True,
) -> list[GeneratedImage]:
    """Generate ``batch_size`` images of ``prompt`` (see the module doc).

    ``width``, ``height``: pixels, multiples of 64; None: the model's own resolution
    (:func:`default_side`). ``seed``: image ``i``'s is ``seed + i``, each in ``0 .. MAX_SEED``.
    ``encoder``: a :class:`~nai_fast.text.encoder.LongPromptEncoder` of the model's tokenizer and
    text encoder with the options wanted (max chunks, syntax, emphasis, embeddings); built with
    the defaults when None. ``clip_skip`` applies either way. ``embeddings``: textual-inversion
    embeddings (:func:`nai_fast.text.embeddings.load_embeddings`) for the encoder built here; pass
    them to your own encoder instead when you give one. ``progress`` shows a tqdm bar of the steps.
    """
    width = default_side(model) if width is None else width
    height = default_side(model) if height is None else height
    text, tags = extract_network_tags(prompt)  # encoded without its tags, as in the web UI
    check_resolution(width, height, model.resolution)
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be at least 1, got {steps} and {batch_size}")
    seed = check_seed(seed, batch_size)
    if not math.isfinite(guidance_scale):
        raise ValueError(f"guidance_scale must be finite, got {guidance_scale}")
    if not 0 <= guidance_rescale <= 1:
        raise ValueError(f"guidance_rescale must lie in 0..1, got {guidance_rescale}")
    if guidance_rescale and guidance_scale == 1:
        raise ValueError("guidance_rescale rescales guided predictions; at guidance_scale 1 there is no guidance")
    scheduler = make_sampler(sampler, model.scheduler.config)  # fresh: schedulers keep per-run state
    if encoder is None:
        from ..text.encoder import LongPromptEncoder

        encoder = LongPromptEncoder(model.tokenizer, model.text_encoder, clip_skip=clip_skip, embeddings=embeddings)
    elif embeddings:
        raise ValueError("embeddings go to the encoder passed in: LongPromptEncoder(..., embeddings=...)")
    unet, device, dtype = model.unet, model.unet.device, model.unet.dtype
    guided = guidance_scale != 1  # at exactly 1, uncond + 1 * (cond - uncond) is cond
    generators = seeded_generators(seed, batch_size)
    hypernetworks = installed_hypernetworks(unet)
    loras = installed_loras(model)
    applied = {
        "hypernet": [(net.name or "hypernetwork", strength) for net, strength in hypernetworks],
        "lora": [(lora.name, strength) for lora, strength in loras],
    }
    _check_tags_applied(tags, applied)
    if extract_network_tags(negative_prompt, strict=False)[1]:
        logger.warning("network tags in the negative prompt are not applied (as in the web UI): they are encoded as text")
    networks = (model.unet, model.vae, model.text_encoder, *(net for net, _ in hypernetworks))

    with torch.inference_mode(), _eval_mode(*networks):
        cond, uncond = encoder.encode(text, negative_prompt, clip_skip=clip_skip)
        # Made once: the same tensor at every step, so cached cross-attention K/V apply.
        context = (torch.cat([uncond, cond]) if guided else cond).to(device, dtype)
        context = context.repeat_interleave(batch_size, dim=0)
        latent_shape = (1, unet.config.in_channels, height // model.vae_scale_factor, width // model.vae_scale_factor)
        latents = torch.cat([torch.randn(latent_shape, generator=generator) for generator in generators])
        scheduler.set_timesteps(steps, device=device)  # first: init_noise_sigma depends on the timesteps
        latents = latents.to(device, dtype) * scheduler.init_noise_sigma

        from tqdm import tqdm

        for timestep in tqdm(scheduler.timesteps, desc="txt2img", disable=not progress, leave=False):
            model_input = scheduler.scale_model_input(torch.cat([latents] * 2) if guided else latents, timestep)
            prediction = unet(model_input, timestep, encoder_hidden_states=context, return_dict=False)[0]
            if guided:
                uncond_prediction, cond_prediction = prediction.chunk(2)
                prediction = uncond_prediction + guidance_scale * (cond_prediction - uncond_prediction)
                if guidance_rescale:
                    prediction = rescaled_guidance(prediction, cond_prediction, guidance_rescale)
            latents = scheduler.step(prediction, timestep, latents, generator=generators, return_dict=False)[0]
        images = _decode(model.vae, latents)

    common = dict(
        prompt=prompt,
        negative_prompt=negative_prompt,
        steps=steps,
        sampler=sampler,
        guidance_scale=guidance_scale,
        guidance_rescale=guidance_rescale,
        width=width,
        height=height,
        model=_model_name(model.source),
        clip_skip=clip_skip,
        hypernetworks=tuple(applied["hypernet"]),
        loras=tuple(applied["lora"]),
        lora_hashes=tuple((lora.name, lora.hash) for lora, _ in loras if lora.hash),
    )
    return [
        GeneratedImage(image, GenerationParameters(seed=seed + index, **common)) for index, image in enumerate(images)
    ]


def _check_tags_applied(tags: list[NetworkTag], applied: Mapping[str, list[tuple[str, float]]]) -> None:
    """ValueError unless every tag of the prompt names a network applied at that strength (each
    applied network answering one tag): txt2img applies nothing itself, so a tag with nothing
    behind it would silently do nothing. :mod:`nai_fast.engine.assets` finds tagged files by name."""
    left = {kind: list(pairs) for kind, pairs in applied.items()}
    for tag in tags:
        if (tag.name, tag.strength) in left[tag.kind]:
            left[tag.kind].remove((tag.name, tag.strength))
            continue
        what, apply = {"hypernet": ("hypernetwork", "apply_hypernetworks"), "lora": ("LoRA", "apply_loras")}[tag.kind]
        names = ", ".join(f"{name}:{format_strength(strength)}" for name, strength in applied[tag.kind]) or "none"
        raise ValueError(
            f"the prompt's {tag.text} names a {what} not applied at that strength (applied: {names}); apply it "
            f"first ({apply}), or let `nai-fast generate` find it by name"
        )


def _decode(vae: nn.Module, latents: torch.Tensor) -> list[Image.Image]:
    """Latents -> PIL images, rounding as diffusers' image processor does."""
    from PIL import Image

    decoded = vae.decode((latents / vae.config.scaling_factor).to(vae.dtype), return_dict=False)[0]
    pixels = (decoded / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()
    return [Image.fromarray(image) for image in (pixels * 255).round().astype("uint8")]


@contextmanager
def _eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Every submodule in eval mode, each given back its own training flag afterwards."""
    flags = [(module, module.training) for root in modules for module in root.modules()]
    for root in modules:
        root.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


def _model_name(source: str) -> str:
    """``"preset tiny"`` -> ``"tiny"``; a file or folder path -> its stem."""
    return Path(str(source).removeprefix("preset ").rstrip("/\\")).stem


# The parameters text


@dataclass(frozen=True)
class GenerationParameters:
    """What made an image, and the web UI's text for it (:meth:`to_text`, :meth:`from_text`).

    ``prompt`` is the prompt as written, network tags (``<lora:name:0.8>``) included.
    ``sampler`` is a :data:`SAMPLERS` name (a label from another tool is kept as it is; the web UI's
    ``Sampler: DPM++ 2M, Schedule type: Karras`` and older ``Sampler: DPM++ 2M Karras`` both read
    as ``dpmpp_2m_karras``). ``hypernetworks`` and ``loras``: ``(name, strength)`` pairs (names are
    file stems), in the order they apply: every one applied, whether by a tag in the prompt or not.
    The text carries them as the web UI's does, as tags in the prompt: :meth:`tagged_prompt` is
    ``prompt`` with a tag appended for each one it does not already carry, which is what
    :meth:`to_text` writes, so the prompt text alone says what to apply. Reading, the tags in the
    prompt give them, then the older fields: ``Hypernet: name, Hypernet strength: 0.8`` (the web
    UI before extra networks) and ``Lora weights: "name: 0.8"`` (nai_fast before tags).
    ``lora_hashes``: ``(name, short hash)``, the web UI's ``Lora hashes: "name: 0123456789ab"``.
    ``extra``: ``(key, value)`` fields of a parsed text this class has no attribute for, written
    back after the others.
    """

    prompt: str
    negative_prompt: str = ""
    steps: int = 28
    sampler: str = "euler_a"
    guidance_scale: float = 11.0
    guidance_rescale: float = 0.0
    seed: int = 0
    width: int = 512
    height: int = 512
    model: str | None = None
    model_hash: str | None = None
    clip_skip: int = 2
    hypernetworks: tuple[tuple[str, float], ...] = ()
    loras: tuple[tuple[str, float], ...] = ()
    lora_hashes: tuple[tuple[str, str], ...] = ()
    extra: tuple[tuple[str, str], ...] = ()

    def tagged_prompt(self) -> str:
        """``prompt`` with ``<hypernet:name:s>``/``<lora:name:s>`` appended for every network
        applied that the prompt's own tags do not account for (hypernetworks first, each kind in order)."""
        _, tags = extract_network_tags(self.prompt, strict=False)
        present = [(tag.kind, tag.name, tag.strength) for tag in tags]
        missing = []
        for kind, pairs in (("hypernet", self.hypernetworks), ("lora", self.loras)):
            for name, strength in pairs:
                if (kind, name, float(strength)) in present:
                    present.remove((kind, name, float(strength)))
                else:
                    missing.append(NetworkTag(kind, name, float(strength)).text)
        return " ".join([self.prompt, *missing]) if self.prompt and missing else self.prompt or " ".join(missing)

    def to_text(self) -> str:
        label, schedule = _SCHEDULED.get(self.sampler, (SAMPLERS.get(self.sampler, self.sampler), None))
        fields: dict[str, object] = {
            "Steps": self.steps,
            "Sampler": label,
            "Schedule type": schedule,
            "CFG scale": _number(self.guidance_scale),
            "Seed": self.seed,
            "Size": f"{self.width}x{self.height}",
            "Model hash": self.model_hash,
            "Model": self.model,
        }
        fields["Clip skip"] = None if self.clip_skip == 1 else self.clip_skip  # the web UI omits the last layer
        fields["CFG Rescale"] = _number(self.guidance_rescale) if self.guidance_rescale else None  # the extension's key
        fields["Lora hashes"] = ", ".join(f"{name}: {digest}" for name, digest in self.lora_hashes) or None
        fields.update(self.extra)
        line = ", ".join(f"{key}: {_quoted(str(value))}" for key, value in fields.items() if value is not None)
        negative = f"\nNegative prompt: {self.negative_prompt}" if self.negative_prompt else ""
        return f"{self.tagged_prompt()}{negative}\n{line}"

    @classmethod
    def from_text(cls, text: str) -> GenerationParameters:
        """Parse a parameters text (ours or the web UI's); a field it lacks takes the web UI's
        meaning of its absence (clip skip 1, strength 1) or this class's default."""
        *lines, last = text.split("\n")
        fields = _parse_fields(last)
        if "Steps" not in fields:  # no parameters line: it is all prompt
            lines, fields = [*lines, last], {}
        negative_at = next((i for i, line in enumerate(lines) if line.startswith(_NEGATIVE)), len(lines))
        negative = "\n".join(lines[negative_at:]).removeprefix(_NEGATIVE).removeprefix(" ")
        defaults = cls(prompt="")
        width, _, height = fields.pop("Size", f"{defaults.width}x{defaults.height}").partition("x")
        prompt = "\n".join(lines[:negative_at])
        _, tags = extract_network_tags(prompt, strict=False)  # another kind stays text: generate refuses it
        networks = {kind: [(tag.name, tag.strength) for tag in tags if tag.kind == kind] for kind in NETWORK_KINDS}
        hypernetworks = networks["hypernet"]
        for index in range(1, len(fields) + 1):
            key = "Hypernet" if index == 1 else f"Hypernet {index}"
            if key not in fields:
                break
            hypernetworks.append((fields.pop(key), float(fields.pop(f"{key} strength", 1))))
        sampler = _sampler_name(fields.pop("Sampler", None), fields.pop("Schedule type", None))
        loras = networks["lora"] + [(name, float(value)) for name, value in _named_values(fields.pop("Lora weights", ""))]
        return cls(
            prompt=prompt,
            negative_prompt=negative,
            steps=int(fields.pop("Steps", defaults.steps)),
            sampler=sampler or defaults.sampler,
            guidance_scale=float(fields.pop("CFG scale", defaults.guidance_scale)),
            guidance_rescale=float(fields.pop("CFG Rescale", defaults.guidance_rescale)),
            seed=int(fields.pop("Seed", defaults.seed)),
            width=int(width),
            height=int(height),
            model_hash=fields.pop("Model hash", None),
            model=fields.pop("Model", None),
            clip_skip=int(fields.pop("Clip skip", 1)),
            hypernetworks=tuple(hypernetworks),
            loras=tuple(loras),
            lora_hashes=tuple(_named_values(fields.pop("Lora hashes", ""))),
            extra=tuple(fields.items()),
        )


_NEGATIVE = "Negative prompt:"
# "Key: value" pairs, a value either JSON-quoted or running to the next comma.
_FIELD = re.compile(r'\s*([^:,"]+?):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def _sampler_name(label: str | None, schedule: str | None) -> str | None:
    """The :data:`SAMPLERS` name of the web UI's ``Sampler`` (+ ``Schedule type``) fields, or the
    label as it is (with a schedule other than the sampler's own) where there is none."""
    if label is None:
        return None
    labels = {label: name for name, label in SAMPLERS.items()}
    if schedule is None:  # before v1.9: "DPM++ 2M Karras" in one field
        return labels.get(label, label)
    if schedule == "Automatic":
        return _AUTOMATIC.get(label) or labels.get(label, label)
    combined = f"{label} {schedule}"
    return labels.get(combined, combined)


def _parse_fields(line: str) -> dict[str, str]:
    fields = {}
    for key, value in _FIELD.findall(line):
        fields[key] = json.loads(value) if value.startswith('"') else value.strip()
    return fields


def _named_values(text: str) -> list[tuple[str, str]]:
    """``"a: 1, b: 2"`` -> ``[("a", "1"), ("b", "2")]`` (a field such as ``Lora hashes``)."""
    pairs = (item.rpartition(": ") for item in text.split(", ") if item)
    return [(name, value) for name, _, value in pairs]


def _quoted(value: str) -> str:
    # The web UI's rule: a value that would break the "key: value, ..." line goes in as JSON.
    if any(mark in value for mark in ',:\n') or value.startswith('"'):
        return json.dumps(value, ensure_ascii=False)
    return value


def _number(value: float) -> int | float:
    """11.0 -> 11, 0.8 -> 0.8 (the shortest text that reads back the same)."""
    return int(value) if float(value).is_integer() else float(value)


# Files


def save_png(image: Image.Image, path: str | os.PathLike[str], parameters: str | GenerationParameters) -> Path:
    """Write ``image`` as a PNG whose ``parameters`` text chunk holds ``parameters``
    (a text, or :class:`GenerationParameters` written with :meth:`~GenerationParameters.to_text`)."""
    path = Path(path)
    with open(path, "wb") as file:
        _write_png(image, file, parameters)
    return path


def save_numbered(generated: GeneratedImage, directory: str | os.PathLike[str]) -> Path:
    """Save as ``{index:05d}-{seed}.png`` in ``directory`` (created if needed), the index one
    past the highest already there; never overwrites a file."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    numbers = (re.match(r"(\d+)-", entry.name) for entry in os.scandir(directory))
    index = max((int(number[1]) for number in numbers if number), default=-1) + 1
    while True:
        path = directory / f"{index:05d}-{generated.seed}.png"
        try:
            with open(path, "xb") as file:  # exclusive: another writer may have taken the name
                _write_png(generated.image, file, generated.parameters)
            return path
        except FileExistsError:
            index += 1


def _write_png(image: Image.Image, file: Any, parameters: str | GenerationParameters) -> None:
    from PIL import PngImagePlugin

    text = parameters.to_text() if isinstance(parameters, GenerationParameters) else parameters
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)  # tEXt, or iTXt where the text is not Latin-1
    image.save(file, format="PNG", pnginfo=info)
