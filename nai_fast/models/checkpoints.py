"""Model files: diffusers folders and single-file checkpoints in the original layout.

Long because the original single-file layout needs its inverse key mapping, family detection
from shapes and strict loading; the one concept is a model's file formats.

The file formats of models (:func:`nai_fast.models.load.load_model` reads through them). Formats:

* **diffusers folder**: ``model_index.json`` with ``unet/``, ``vae/``, ``text_encoder/``,
  ``tokenizer/`` and ``scheduler/``, loaded with ``from_pretrained(local_files_only=True)``.
* **single file** (``.safetensors``, ``.ckpt``, ``.pt``) in the original CompVis / web UI
  layout: ``model.diffusion_model.*`` (U-Net), ``first_stage_model.*`` (VAE) and
  ``cond_stage_model.transformer.*`` (CLIP text encoder), optionally wrapped in
  ``{"state_dict": ...}``. Other keys (EMA copies, the noise schedule's buffers, step
  counters) are not part of the three networks and are skipped. The architecture is told from
  the tensors' shapes, compared against every shipped config family; diffusers' own
  converters (``diffusers.loaders.single_file_utils``) rename the keys; configs, tokenizer and
  noise schedule come from the package, so nothing is fetched.
* **separate VAE** (``.vae.pt``, ``.ckpt``, ``.safetensors``): the autoencoder alone, in the
  original layout (with or without ``first_stage_model.``) or in diffusers' layout.

:func:`save_single_file` writes the original layout: the inverse of diffusers' converters,
spelled out below from the two layouts' naming rules.

Safety and strictness: the format is told from the file's first bytes (the suffix may lie);
pickles go through ``torch.load(weights_only=True)``, so a file that needs code to unpickle is
refused, never run; every tensor a network needs must be present with its shape, and any other
tensor under a network's prefix is an error; the architecture is checked from the file's
metadata before any tensor is read. Every problem is a :class:`~nai_fast.models.stable_diffusion.ModelFileError`
naming the path and the reason.

Memory: the file is memory-mapped; each tensor is copied once, to float32, and the copy is
assigned to a network built on the ``meta`` device (``load_state_dict(assign=True)``). A load
holds one copy of the weights: 4.4 GB of process memory for a 4.3 GB SD 1.5 file, either format.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor

from ..files import atomic_write
from .stable_diffusion import ModelFileError, StableDiffusion, check_prediction_type, model_config
from ..safe_load import error_reason, load_weights_only

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

__all__ = ["load_from_path", "load_vae_file", "save_single_file"]

logger = logging.getLogger(__name__)

# Shipped config families a single file may match, and how errors name them.
FAMILIES = {"sd1": "SD 1.x", "tiny": "the tiny test model"}
DIFFUSERS_SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt")

# The three networks' key prefixes in the original layout.
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."
NETWORK_PREFIXES = (UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX)
# transformers 4 nests CLIPTextModel's modules under `text_model`; original files do too.
TEXT_MODEL = "text_model."
# A buffer (arange(77)) that many files carry and merges often corrupt; rebuilt, never read.
POSITION_IDS = "embeddings.position_ids"
# Files made with early transformers versions lack `text_model.` (the web UI renames them the same way).
UNNESTED_TEXT_PARTS = ("embeddings.", "encoder.", "final_layer_norm.")
# The autoencoder's training loss (discriminator, LPIPS) is not part of the VAE.
VAE_LOSS = "loss."
# Keys of a VAE file that are not the autoencoder: its training loss and EMA bookkeeping. The
# web UI skips the same.
VAE_FILE_EXTRAS = (VAE_LOSS, "model_ema.")
SHOWN_KEYS = 5  # keys quoted per kind of mismatch in an error


# Public


def load_from_path(path: str | os.PathLike[str], *, prediction_type: str | None = None) -> StableDiffusion:
    """The model in a diffusers folder or a single-file checkpoint, in float32 on the CPU.

    ``prediction_type``: ``"epsilon"`` or ``"v_prediction"``; ``None`` keeps a diffusers
    folder's own and means ``"epsilon"`` for a single file (SD 1.x weights do not tell).
    """
    check_prediction_type(prediction_type)
    path = Path(path)
    with _file_errors(path):
        if path.is_dir():
            return _load_diffusers_folder(path, prediction_type)
        return _load_single_file(path, prediction_type or "epsilon")


def load_vae_file(path: str | os.PathLike[str], vae_config: Mapping[str, Any]) -> AutoencoderKL:
    """The autoencoder in a separate VAE file (or a diffusers ``vae`` folder), built from
    ``vae_config`` (the replaced VAE's config), in float32 on the CPU."""
    path = Path(path)
    with _file_errors(path):
        if path.is_dir():
            return _load_diffusers_vae(path)
        return _load_vae_checkpoint(_open_checkpoint(path, _is_vae_file_key), vae_config)


def save_single_file(model: StableDiffusion, path: str | os.PathLike[str]) -> None:
    """Write ``model`` as one checkpoint in the original layout, in its own dtype.

    ``.safetensors``, or ``.ckpt`` / ``.pt``: ``torch.save({"state_dict": tensors})``, the
    CompVis layout (its scripts read ``["state_dict"]``; the web UI reads either). The file is
    written beside ``path`` under a temporary name and renamed into place
    (:func:`nai_fast.files.atomic_write`), so ``path`` never holds half a checkpoint.
    """
    path = Path(path)
    if path.suffix not in SINGLE_FILE_SUFFIXES:
        raise ValueError(f"cannot save a checkpoint as {path.name!r}: use one of {', '.join(SINGLE_FILE_SUFFIXES)}")
    tensors = {key: tensor.detach().cpu() for key, tensor in _original_state_dict(model).items()}
    # Original files carry the position ids; loaders written for them may expect the key.
    positions = model.text_encoder.config.max_position_embeddings
    tensors[TEXT_PREFIX + TEXT_MODEL + POSITION_IDS] = torch.arange(positions)[None]

    if path.suffix == ".safetensors":
        import safetensors.torch

        def write(temporary: Path) -> None:
            safetensors.torch.save_file(tensors, temporary, metadata={"format": "pt"})
    else:

        def write(temporary: Path) -> None:
            torch.save({"state_dict": tensors}, temporary)

    atomic_write(path, write)


# Errors


@contextmanager
def _file_errors(path: Path) -> Iterator[None]:
    """Turns a ValueError or OSError raised while reading ``path`` into a ModelFileError naming
    it (diffusers and transformers report bad files with both)."""
    try:
        yield
    except ModelFileError:
        raise
    except (ValueError, OSError) as error:
        raise ModelFileError(f"{path}: {error_reason(error)}") from error


# Diffusers folders


def _load_diffusers_folder(path: Path, prediction_type: str | None) -> StableDiffusion:
    if not (path / "model_index.json").is_file():
        raise ValueError("a directory without model_index.json is not a diffusers model folder")
    missing = [name for name in DIFFUSERS_SUBFOLDERS if not (path / name).is_dir()]
    if missing:
        raise ValueError(f"the diffusers folder lacks the subfolders {missing}")
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    from ..text.tokenizer import load_tokenizer

    # The training schedule: the folder's betas and prediction type in a DDPM scheduler,
    # whatever sampler the folder names.
    schedule = DDPMScheduler.load_config(path, subfolder="scheduler", local_files_only=True)
    overrides = {"prediction_type": prediction_type} if prediction_type else {}
    return StableDiffusion(
        unet=_from_pretrained(UNet2DConditionModel, path, "unet"),
        vae=_from_pretrained(AutoencoderKL, path, "vae"),
        text_encoder=_from_pretrained(CLIPTextModel, path, "text_encoder"),
        tokenizer=load_tokenizer(path),
        scheduler=DDPMScheduler.from_config(schedule, **overrides),
        source=str(path),
    )


def _load_diffusers_vae(path: Path) -> AutoencoderKL:
    from diffusers import AutoencoderKL

    if (path / "vae").is_dir():
        return _from_pretrained(AutoencoderKL, path, "vae")
    if not (path / "config.json").is_file():
        raise ValueError("a directory that is neither a diffusers VAE folder (config.json) nor holds one (vae/)")
    return _from_pretrained(AutoencoderKL, path.parent, path.name)


def _from_pretrained(cls: Any, folder: Path, subfolder: str) -> Any:
    """``cls.from_pretrained`` offline, refusing weights that leave parameters missing, unused
    or of the wrong shape (both libraries would only warn)."""
    options: dict[str, Any] = {"local_files_only": True, "output_loading_info": True}
    if cls.__module__.startswith("diffusers"):
        # Without accelerate diffusers falls back to a full load anyway, after a warning.
        options["low_cpu_mem_usage"] = importlib.util.find_spec("accelerate") is not None
    try:
        model, info = cls.from_pretrained(folder / subfolder, **options)
    except (OSError, ValueError, RuntimeError) as error:
        raise ValueError(f"{subfolder}/: {error_reason(error)}") from error
    problems = {
        kind: sorted(map(str, info.get(kind) or ())) for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")
    }
    if any(problems.values()):
        listed = "; ".join(f"{kind.replace('_', ' ')} {_shown(keys)}" for kind, keys in problems.items() if keys)
        raise ValueError(f"{subfolder}/: the weights do not match its config: {listed}")
    return model.to(torch.float32).eval()


# Single files: reading


def _load_single_file(path: Path, prediction_type: str) -> StableDiffusion:
    from diffusers import DDPMScheduler

    from ..text.tokenizer import load_tokenizer

    checkpoint = _open_checkpoint(path, _is_network_key)
    skipped = len(checkpoint.keys) - len(checkpoint.shapes)
    if skipped:
        logger.info(
            "%s: skipped %d entries outside the three networks (EMA copies, schedule buffers...)", path, skipped
        )
    family = _identify_family(_nested_text_keys(checkpoint.shapes), checkpoint.keys)
    state = _nested_text_keys(checkpoint.read(checkpoint.shapes))
    del checkpoint  # a legacy .ckpt's tensors: freed one by one as float32 copies replace them
    unet, vae, text_encoder = _load_networks(family, state)
    return StableDiffusion(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=load_tokenizer(),
        scheduler=DDPMScheduler.from_config(model_config(family, "scheduler"), prediction_type=prediction_type),
        source=str(path),
    )


class _Checkpoint(NamedTuple):
    """A single file's entries: all names, and the shapes and tensors of those a loader wants.
    Shapes come from metadata, so a file can be refused before its tensors are read."""

    keys: list[str]
    shapes: dict[str, tuple[int, ...]]
    read: Callable[[Iterable[str]], dict[str, Tensor]]  # the tensors of the keys given


def _open_checkpoint(path: Path, wanted: Callable[[str], bool]) -> _Checkpoint:
    """The entries of a single file, those for which ``wanted(key)`` is true to be read,
    unwrapped from ``{"state_dict": ...}``; the format is told from the first bytes."""
    if not path.is_file():
        raise ValueError("no such file" if not path.exists() else "not a regular file")
    with path.open("rb") as file:
        head = file.read(9)
    if not head:
        raise ValueError("the file is empty")
    # safetensors: a little-endian u64 header length, then the JSON header.
    if len(head) == 9 and head[8:9] == b"{":
        return _open_safetensors(path, wanted)
    # torch's zip format is memory-mapped (tensors are read when used), the legacy one cannot be.
    checkpoint = load_weights_only(path, mmap=zipfile.is_zipfile(path))
    if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get("state_dict"), Mapping):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"expected a dict of tensors (a state dict), got a {type(checkpoint).__name__}")
    tensors = {key: value for key, value in checkpoint.items() if isinstance(key, str) and wanted(key)}
    for key, value in tensors.items():
        if not isinstance(value, Tensor):
            raise ValueError(f"{key} is a {type(value).__name__}, not a tensor")
    shapes = {key: tuple(tensor.shape) for key, tensor in tensors.items()}
    return _Checkpoint([str(key) for key in checkpoint], shapes, lambda keys: {key: tensors[key] for key in keys})


def _open_safetensors(path: Path, wanted: Callable[[str], bool]) -> _Checkpoint:
    import safetensors

    def read(wanted_keys: Iterable[str]) -> dict[str, Tensor]:
        # Only what is asked for is read: a full-EMA checkpoint's EMA half never enters memory.
        with _safetensors_errors(), safetensors.safe_open(path, framework="pt") as file:
            return {key: file.get_tensor(key) for key in wanted_keys}

    with _safetensors_errors(), safetensors.safe_open(path, framework="pt") as file:
        keys = list(file.keys())
        shapes = {key: tuple(file.get_slice(key).get_shape()) for key in keys if wanted(key)}
    return _Checkpoint(keys, shapes, read)


@contextmanager
def _safetensors_errors() -> Iterator[None]:
    import safetensors

    try:
        yield
    except (safetensors.SafetensorError, OSError) as error:
        raise ValueError(f"truncated or corrupt safetensors file: {error}") from error


def _is_network_key(key: str) -> bool:
    return key.startswith(NETWORK_PREFIXES) and not key.startswith(VAE_PREFIX + VAE_LOSS)


def _is_vae_file_key(key: str) -> bool:
    return not key.startswith(VAE_FILE_EXTRAS)


def _nested_text_keys(state: Mapping[str, Any]) -> dict[str, Any]:
    """``state`` with old files' ``cond_stage_model.transformer.embeddings.*`` (and
    ``encoder.``, ``final_layer_norm.``) renamed to the ``text_model.`` names of other files."""
    unnested = tuple(TEXT_PREFIX + part for part in UNNESTED_TEXT_PARTS)
    return {
        TEXT_PREFIX + TEXT_MODEL + key.removeprefix(TEXT_PREFIX) if key.startswith(unnested) else key: value
        for key, value in state.items()
    }


# Single files: telling the architecture


def _identify_family(shapes: Mapping[str, tuple[int, ...]], all_keys: list[str]) -> str:
    """The shipped config family whose networks have exactly the file's tensors (names and
    shapes), or a ValueError saying what the file looks like instead."""
    shapes = {key: shape for key, shape in shapes.items() if not key.endswith(POSITION_IDS)}
    other = _other_architecture(all_keys, shapes)
    if other:
        raise ValueError(f"this looks like {other}; only Stable Diffusion 1.x models are supported")
    mismatches = {family: _mismatches(_expected_shapes(family), shapes) for family in FAMILIES}
    for family, (count, _) in mismatches.items():
        if count == 0:
            return family
    closest = min(mismatches, key=lambda family: mismatches[family][0])
    raise ValueError(f"the weights do not match {FAMILIES[closest]} ({closest} config): {mismatches[closest][1]}")


def _other_architecture(keys: Iterable[str], shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """What a file that is not an SD 1.x checkpoint looks like, if it is recognisable."""
    keys = list(keys)

    def any_key(test: Callable[[str], bool]) -> bool:
        return any(test(key) for key in keys)

    if any_key(lambda key: key.startswith("conditioner.embedders.")):
        return "an SDXL-family checkpoint (conditioner.embedders.* keys)"
    if any_key(lambda key: key.startswith("cond_stage_model.model.")):
        return "an SD 2.x checkpoint (OpenCLIP text encoder: cond_stage_model.model.* keys)"
    if any_key(lambda key: ".joint_blocks." in key):
        return "an SD 3 checkpoint (MMDiT joint_blocks)"
    if any_key(lambda key: "double_blocks." in key):
        return "a Flux checkpoint (double_blocks)"
    context_widths = {
        shape[1] for key, shape in shapes.items() if key.endswith("attn2.to_k.weight") and len(shape) == 2
    }
    if 1024 in context_widths:
        return "an SD 2.x checkpoint (cross-attention context width 1024, not 768)"
    if 2048 in context_widths:
        return "an SDXL checkpoint (cross-attention context width 2048, not 768)"
    conv_in = shapes.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is not None and len(conv_in) == 4 and conv_in[1] != 4:
        return (
            f"a U-Net with {conv_in[1]} input channels (inpainting models have 9, instruct-pix2pix 8); "
            "only text-to-image models (4) load"
        )
    if not any_key(lambda key: key.startswith(UNET_PREFIX)):
        if any_key(lambda key: "lora" in key.lower()):
            return "a LoRA, not a model (no model.diffusion_model.* keys)"
        if any_key(lambda key: key.startswith(("encoder.down.", "first_stage_model."))):
            return "a VAE alone (load it as a separate VAE: vae=...)"
        if any_key(lambda key: key.startswith(("down_blocks.", "up_blocks.", "mid_block."))):
            return "diffusers-layout weights (load the diffusers folder they belong to)"
        return "no Stable Diffusion checkpoint: it has no U-Net weights (model.diffusion_model.* keys)"
    return None


@functools.lru_cache(maxsize=None)
def _expected_shapes(family: str) -> dict[str, tuple[int, ...]]:
    """Every tensor a ``family`` checkpoint holds in the original layout, with its shape."""
    unet, vae, text_encoder = _empty_networks(family)
    state = _original_state_dict_of(unet, vae, text_encoder)
    return {key: tuple(tensor.shape) for key, tensor in state.items()}


def _mismatches(expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]]) -> tuple[int, str]:
    """How many tensors differ (missing, unexpected, of another shape) and a description."""
    missing = [key for key in expected if key not in found]
    unexpected = [key for key in found if key not in expected]
    reshaped = [
        f"{key} {list(found[key])} (needs {list(shape)})"
        for key, shape in expected.items()
        if key in found and found[key] != shape
    ]
    parts = [
        f"{label} {_shown(keys)}"
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", reshaped))
        if keys
    ]
    return len(missing) + len(unexpected) + len(reshaped), "; ".join(parts)


def _shown(keys: list[str]) -> str:
    shown = ", ".join(keys[:SHOWN_KEYS])
    return f"{len(keys)} tensors: {shown}" + (", ..." if len(keys) > SHOWN_KEYS else "")


# Single files: converting and loading


def _empty_networks(family: str) -> tuple[UNet2DConditionModel, AutoencoderKL, CLIPTextModel]:
    """A family's networks on the meta device: structure without memory, for weights to be
    assigned from a file."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from .configs import load_config

    with torch.device("meta"):
        return (
            UNet2DConditionModel.from_config(model_config(family, "unet")),
            AutoencoderKL.from_config(model_config(family, "vae")),
            CLIPTextModel(CLIPTextConfig(**load_config(family, "text_encoder"))),
        )


def _load_networks(family: str, state: dict[str, Any]) -> tuple[UNet2DConditionModel, AutoencoderKL, CLIPTextModel]:
    """The three networks of a checked ``family`` checkpoint, renamed by diffusers' converters."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )

    _to_float32(state)
    unet, vae, text_encoder = _empty_networks(family)
    unet_state = convert_ldm_unet_checkpoint(state, dict(unet.config))
    vae_state = convert_ldm_vae_checkpoint(state, dict(vae.config))
    text_state = _text_keys_for(text_encoder, convert_ldm_clip_checkpoint(state))
    state.clear()  # the converted dicts hold the tensors now: no second reference
    for name, network, network_state in (
        ("U-Net", unet, unet_state),
        ("VAE", vae, vae_state),
        ("text encoder", text_encoder, text_state),
    ):
        _assign(network, network_state, name)
    _restore_position_ids(text_encoder)
    return unet.eval(), vae.eval(), text_encoder.eval()


def _to_float32(state: dict[str, Tensor]) -> None:
    """Replaces ``state``'s tensors with float32 copies of their own, one at a time (each
    original is released before the next copy is made). Copies, because the file's tensors map
    the file (torch's mmap and safetensors alike), so the model would keep needing it and would
    fault if it were truncated; and safetensors' are not 64-byte aligned, which changed the
    U-Net's results in the last bits."""
    for key, tensor in state.items():
        if key.endswith(POSITION_IDS):
            continue
        if not tensor.is_floating_point():
            raise ValueError(f"{key} holds {tensor.dtype} values, not floating-point weights")
        state[key] = tensor.to(torch.float32, copy=True)


def _text_keys_for(text_encoder: CLIPTextModel, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``state``'s keys as this transformers version names them (nested under ``text_model.``
    in version 4, flat in 5), whichever way the file had them; position ids dropped."""
    nested = hasattr(text_encoder, "text_model")
    renamed = {}
    for key, tensor in state.items():
        flat = key.removeprefix(TEXT_MODEL)
        if flat != POSITION_IDS:
            renamed[TEXT_MODEL + flat if nested else flat] = tensor
    return renamed


def _assign(network: torch.nn.Module, state: Mapping[str, Tensor], name: str) -> None:
    """Makes ``state``'s tensors ``network``'s parameters, requiring exactly its keys."""
    try:
        network.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as error:  # already checked against the config; a converter changed?
        raise ValueError(f"the {name} weights do not fit after conversion: {error_reason(error)}") from error


def _restore_position_ids(text_encoder: CLIPTextModel) -> None:
    # A non-persistent buffer: built on the meta device with the rest and in no file.
    embeddings = getattr(text_encoder, "text_model", text_encoder).embeddings
    positions = torch.arange(embeddings.position_embedding.num_embeddings).expand((1, -1))
    embeddings.register_buffer("position_ids", positions, persistent=False)


def _load_vae_checkpoint(checkpoint: _Checkpoint, vae_config: Mapping[str, Any]) -> AutoencoderKL:
    """An autoencoder from a VAE file, in either layout, checked before its tensors are read."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    config = {key: value for key, value in vae_config.items() if not key.startswith("_")}
    # A VAE named as inside a full checkpoint (or a full checkpoint): only those keys are the VAE.
    prefixed = any(key.startswith(VAE_PREFIX) for key in checkpoint.shapes)
    found = {
        key.removeprefix(VAE_PREFIX): shape
        for key, shape in checkpoint.shapes.items()
        if key.startswith(VAE_PREFIX) or not prefixed
    }
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(config)
    in_diffusers_layout = any(key.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for key in found)
    expected = _shapes(vae.state_dict() if in_diffusers_layout else _vae_to_original(vae.state_dict(), vae.config))
    count, mismatch = _mismatches(expected, found)
    if count:
        layout = "diffusers" if in_diffusers_layout else "original"
        raise ValueError(f"the VAE weights ({layout} layout) do not match the model's VAE config: {mismatch}")
    state = checkpoint.read(VAE_PREFIX + key if prefixed else key for key in found)
    state = {key.removeprefix(VAE_PREFIX): tensor for key, tensor in state.items()}
    _to_float32(state)
    converted = state if in_diffusers_layout else convert_ldm_vae_checkpoint(state, config)
    _assign(vae, converted, "VAE")
    return vae.eval()


def _shapes(state: Mapping[str, Tensor]) -> dict[str, tuple[int, ...]]:
    return {key: tuple(tensor.shape) for key, tensor in state.items()}


# The original layout (the inverse of diffusers' converters)
#
# A diffusers key is renamed by the longest diffusers prefix in a table built from the config,
# then, inside a ResNet or attention block, by the first-part renames of that block kind.

_UNET_RESNET_PARTS = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_VAE_RESNET_PARTS = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION_PARTS = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_NO_PARTS: dict[str, str] = {}


def _original_state_dict(model: StableDiffusion) -> dict[str, Tensor]:
    return _original_state_dict_of(model.unet, model.vae, model.text_encoder)


def _original_state_dict_of(unet: Any, vae: Any, text_encoder: Any) -> dict[str, Tensor]:
    """The three networks' tensors under their original-layout names (no position ids)."""
    state = {UNET_PREFIX + key: tensor for key, tensor in _unet_to_original(unet.state_dict(), unet.config).items()}
    state.update((VAE_PREFIX + key, tensor) for key, tensor in _vae_to_original(vae.state_dict(), vae.config).items())
    for key, tensor in text_encoder.state_dict().items():
        flat = key.removeprefix(TEXT_MODEL)
        if flat != POSITION_IDS:
            state[TEXT_PREFIX + TEXT_MODEL + flat] = tensor
    return state


def _unet_to_original(state: Mapping[str, Tensor], config: Mapping[str, Any]) -> dict[str, Tensor]:
    """A diffusers U-Net state dict under the CompVis names (``input_blocks``, ``middle_block``,
    ``output_blocks``): each down block takes ``layers + 1`` input blocks (its layers, then its
    downsampler), each up block ``layers + 1`` output blocks (the upsampler sits in the last)."""
    layers = config["layers_per_block"]
    last = len(config["block_out_channels"]) - 1
    table: list[tuple[str, str, Mapping[str, str]]] = [
        ("time_embedding.linear_1.", "time_embed.0.", _NO_PARTS),
        ("time_embedding.linear_2.", "time_embed.2.", _NO_PARTS),
        ("conv_in.", "input_blocks.0.0.", _NO_PARTS),
        ("conv_norm_out.", "out.0.", _NO_PARTS),
        ("conv_out.", "out.2.", _NO_PARTS),
        ("mid_block.resnets.0.", "middle_block.0.", _UNET_RESNET_PARTS),
        ("mid_block.attentions.0.", "middle_block.1.", _NO_PARTS),
        ("mid_block.resnets.1.", "middle_block.2.", _UNET_RESNET_PARTS),
    ]
    for block in range(last + 1):
        for layer in range(layers):
            index = (layers + 1) * block + layer + 1
            table.append((f"down_blocks.{block}.resnets.{layer}.", f"input_blocks.{index}.0.", _UNET_RESNET_PARTS))
            table.append((f"down_blocks.{block}.attentions.{layer}.", f"input_blocks.{index}.1.", _NO_PARTS))
        if block < last:
            index = (layers + 1) * (block + 1)
            table.append((f"down_blocks.{block}.downsamplers.0.conv.", f"input_blocks.{index}.0.op.", _NO_PARTS))
    for block, block_type in enumerate(config["up_block_types"]):
        for layer in range(layers + 1):
            index = (layers + 1) * block + layer
            table.append((f"up_blocks.{block}.resnets.{layer}.", f"output_blocks.{index}.0.", _UNET_RESNET_PARTS))
            table.append((f"up_blocks.{block}.attentions.{layer}.", f"output_blocks.{index}.1.", _NO_PARTS))
        if block < last:
            # After the last layer's ResNet (position 0) and attention (1), if the block has one.
            position = 2 if "CrossAttn" in block_type else 1
            index = (layers + 1) * block + layers
            table.append((f"up_blocks.{block}.upsamplers.0.", f"output_blocks.{index}.{position}.", _NO_PARTS))
    return {_renamed(key, table, "U-Net"): tensor for key, tensor in state.items()}


def _vae_to_original(state: Mapping[str, Tensor], config: Mapping[str, Any]) -> dict[str, Tensor]:
    """A diffusers autoencoder state dict under the CompVis names. The decoder's up blocks are
    numbered in reverse (``up_blocks.0`` is ``up.{n-1}``), and the mid-block attention's
    projections are 1x1 convolutions there, linear layers here."""
    blocks = len(config["block_out_channels"])
    layers = config["layers_per_block"] + 1  # the decoder's up blocks have one more than the encoder's
    table: list[tuple[str, str, Mapping[str, str]]] = []
    for side in ("encoder", "decoder"):
        table += [
            (f"{side}.conv_in.", f"{side}.conv_in.", _NO_PARTS),
            (f"{side}.conv_out.", f"{side}.conv_out.", _NO_PARTS),
            (f"{side}.conv_norm_out.", f"{side}.norm_out.", _NO_PARTS),
            (f"{side}.mid_block.attentions.0.", f"{side}.mid.attn_1.", _VAE_ATTENTION_PARTS),
        ]
        table += [(f"{side}.mid_block.resnets.{i}.", f"{side}.mid.block_{i + 1}.", _VAE_RESNET_PARTS) for i in range(2)]
    for block in range(blocks):
        reverse = blocks - 1 - block
        for layer in range(layers):
            table.append(
                (
                    f"encoder.down_blocks.{block}.resnets.{layer}.",
                    f"encoder.down.{block}.block.{layer}.",
                    _VAE_RESNET_PARTS,
                )
            )
            table.append(
                (
                    f"decoder.up_blocks.{block}.resnets.{layer}.",
                    f"decoder.up.{reverse}.block.{layer}.",
                    _VAE_RESNET_PARTS,
                )
            )
        table.append((f"encoder.down_blocks.{block}.downsamplers.0.", f"encoder.down.{block}.downsample.", _NO_PARTS))
        table.append((f"decoder.up_blocks.{block}.upsamplers.0.", f"decoder.up.{reverse}.upsample.", _NO_PARTS))
    table += [("quant_conv.", "quant_conv.", _NO_PARTS), ("post_quant_conv.", "post_quant_conv.", _NO_PARTS)]
    renamed = {}
    for key, tensor in state.items():
        original = _renamed(key, table, "VAE")
        if ".mid.attn_1." in original and original.endswith(".weight") and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]
        renamed[original] = tensor
    return renamed


def _renamed(key: str, table: list[tuple[str, str, Mapping[str, str]]], network: str) -> str:
    """``key`` renamed by the longest matching diffusers prefix of ``table``, then the block
    part that follows it (``norm1.weight`` -> ``in_layers.0.weight``) by that entry's parts."""
    matches = [entry for entry in table if key.startswith(entry[0])]
    if not matches:
        raise ValueError(f"no original-layout name for the {network} tensor {key}")
    prefix, original, parts = max(matches, key=lambda entry: len(entry[0]))
    rest = key[len(prefix) :]
    for part, original_part in parts.items():
        if rest.startswith(part + "."):
            return original + original_part + rest[len(part) :]
    return original + rest
