"""LoRA files for SD 1.x (U-Net and text encoder), merged into working copies of the weights.

Long because three file layouts (kohya/web UI, diffusers, PEFT) with their key mappings and
refusals, and the merge/restore of working copies, are one concept: a LoRA on a model.

:func:`load_lora` reads a file in any of the layouts in use:

- **kohya / the web UI** (``.safetensors``, or ``.pt``): ``lora_unet_<path>`` and ``lora_te_<path>``
  with ``.lora_down.weight``, ``.lora_up.weight`` and an optional ``.alpha`` (scale ``alpha / rank``;
  none: 1). ``<path>`` is the diffusers (U-Net) or transformers (text encoder) module path with dots
  turned into underscores; diffusers' own converter
  (``_convert_non_diffusers_lora_to_diffusers``, then its PEFT key mapping) turns it back into the
  module path. Older files written against the original LDM U-Net (``lora_unet_input_blocks_4_1_...``)
  are renamed through the inverse mapping of :mod:`nai_fast.models.checkpoints` when applied
  (diffusers' ``_maybe_map_sgm_blocks_to_diffusers`` is built for SDXL's 9 input blocks and fails on
  SD 1.x's ``input_blocks_10``/``11``).
- **diffusers** (``save_lora_weights``: ``unet.<path>.lora_A.weight`` / ``lora_B.weight`` and
  ``text_encoder.<path>...``, alphas in the ``lora_adapter_metadata`` safetensors metadata; the older
  ``<path>.processor.to_k_lora.down.weight`` attention-processor keys) and **PEFT**
  (``base_model.model.<path>.lora_A.weight``, alphas in an ``adapter_config.json`` beside the file),
  through diffusers' ``convert_unet_state_dict_to_peft`` / ``convert_state_dict_to_peft``.

LoHa, LoKr, DoRA, LyCORIS "full" and Tucker (``lora_mid``) files are refused by key, as is a file for
SDXL (``lora_te1_``/``lora_te2_``: two text encoders). peft itself is not needed: merging is a
matrix product, and peft's layers would wrap ``to_k``/``to_v``, which turns off the hypernetwork
processors' K/V cache, folding and fused kernels.

:func:`apply_loras` ``(model, loras, strengths)`` merges them: for every targeted ``nn.Linear`` or
``nn.Conv2d`` (conv LoRAs: down ``[r, in, kh, kw]``, up ``[out, r, 1, 1]``)

    W' = W + sum_i strength_i * (up_i @ down_i) * alpha_i / rank_i

computed in float32 on the weight's device and cast to the weight's dtype, written into a NEW
parameter that replaces the module's own (a working copy of only the affected layers). The original
parameter objects are kept, untouched, and :func:`remove_loras` puts them back: removal is exact in
every dtype and costs nothing. Because the parameter object changes, anything caching results of a
weight by identity (the hypernetwork processors' cross-attention K/V cache and folded projections)
sees the change; the modules stay bare ``nn.Linear``, so the cache, folding and the fused kernels keep
working with LoRAs applied. A LoRA at strength 0 is skipped; with every strength 0 no weight is
touched, so the model computes exactly what it computed without them. Applying again replaces the
previous set. Apply after moving the model (``model.to(...)``): a move converts the merged working
copies, not the originals kept for removal (:func:`remove_loras` then converts those it restores).

``model`` is anything with ``unet`` and ``text_encoder`` attributes (a
:class:`~nai_fast.models.stable_diffusion.StableDiffusion`, a diffusers pipeline) or a mapping
``{"unet": ..., "text_encoder": ...}``. A LoRA naming a module the model lacks, or whose widths do
not fit it (made for another architecture), is refused by name (:class:`LoraMismatchError`) before
any weight changes. A prompt-tag parser (``<lora:NAME:STRENGTH>``) calls
``apply_loras(model, [load_lora(path) for path, _ in pairs], [s for _, s in pairs])``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..safe_load import error_reason, load_weights_only
from ..text.tags import network_strengths

__all__ = [
    "COMPONENTS",
    "Lora",
    "LoraError",
    "LoraLayer",
    "LoraMismatchError",
    "apply_loras",
    "installed_loras",
    "load_lora",
    "lora_hash",
    "loras_applied",
    "remove_loras",
]

COMPONENTS = ("unet", "text_encoder")
_APPLIED = "_nai_fast_loras"  # the attribute each network carries while LoRAs are merged into it
_KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder"}
_SDXL_PREFIXES = ("lora_te1_", "lora_te2_")
_LDM_BLOCKS = ("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_", "lora_unet_out_")
_TEXT_MODEL = "text_model."  # transformers 4 nests CLIP's parts under it; transformers 5 does not
# Key fragments of LoRA-like formats this module does not merge, and what they are.
_UNSUPPORTED = {
    "hada_w": "LoHa (hada_w1_a...)",
    "lokr_w": "LoKr (lokr_w1...)",
    "dora_scale": "DoRA (dora_scale)",
    "lora_magnitude_vector": "DoRA (lora_magnitude_vector)",
    "lora_mid": "LoCon with a Tucker core (lora_mid)",
    "lora_embedding_": "a LoRA on embeddings (lora_embedding_A)",
}
_LYCORIS_FULL = re.compile(r"\.(diff|diff_b)$")
SHOWN = 3  # names quoted in an error


class LoraError(ValueError):
    """A LoRA file that cannot be used: unreadable, of an unsupported kind, or malformed. The
    message names the file and the keys at fault."""


class LoraMismatchError(LoraError):
    """A LoRA made for another model: it names modules this model lacks, or its widths do not fit.
    The message names the file, the modules and the shapes."""


@dataclass(frozen=True)
class LoraLayer:
    """One module's low-rank update: ``up @ down * alpha / rank``.

    ``component``: ``"unet"``, ``"text_encoder"`` or None (a PEFT file of one network, which one
    found when applied). ``module``: its path in diffusers' U-Net or transformers' CLIP text model
    (``text_model.`` prefixed or not, either way), or None for an original-layout (LDM) name,
    resolved when applied. ``key``: the file's own name for it, for messages.
    """

    component: str | None
    module: str | None
    down: Tensor = field(repr=False)
    up: Tensor = field(repr=False)
    alpha: float | None
    key: str

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        """``alpha / rank``; 1 without an alpha (kohya's and diffusers' convention)."""
        return 1.0 if self.alpha is None else float(self.alpha) / self.rank

    def delta(self, weight: Tensor) -> Tensor:
        """``up @ down * scale`` in float32 on ``weight``'s device, shaped like ``weight``."""
        # Fresh copies: tensors read from a file may sit at addresses a BLAS kernel treats
        # differently (another summation order); copies make the product reproducible.
        up = self.up.to(weight.device, torch.float32, copy=True)
        down = self.down.to(weight.device, torch.float32, copy=True)
        return (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)).reshape(weight.shape) * self.scale

    def shape_errors(self, weight: Tensor) -> str | None:
        """Why this update does not fit ``weight`` (None: it does)."""
        down, up = self.down, self.up
        fits = (
            down.ndim in (2, 4)
            and up.ndim in (2, 4)
            and (up.ndim == 2 or up.shape[2:] == (1, 1))
            and up.shape[1] == down.shape[0]
            and up.shape[0] == weight.shape[0]
            and down[0].numel() == weight[0].numel()
            and (down.ndim == 2 or weight.ndim == 2 or down.shape[2:] == weight.shape[2:])
        )
        if fits:
            return None
        return f"down {tuple(down.shape)} and up {tuple(up.shape)} do not fit the weight {tuple(weight.shape)}"


@dataclass(frozen=True, eq=False)
class Lora:
    """A LoRA file's updates. ``name``: the file's stem (the web UI's name for it); ``hash``: the
    web UI's short hash (:func:`lora_hash`); ``layout``: ``"kohya"``, ``"diffusers"`` or ``"peft"``."""

    layers: tuple[LoraLayer, ...] = field(repr=False)
    name: str = "lora"
    path: Path | None = None
    hash: str | None = None
    layout: str = "kohya"
    metadata: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Lora:
        return load_lora(path)

    @classmethod
    def from_state_dict(
        cls,
        state: Mapping[str, Tensor],
        *,
        name: str = "lora",
        metadata: Mapping[str, str] | None = None,
        adapter_config: Mapping[str, Any] | None = None,
    ) -> Lora:
        """The updates in ``state`` (any layout :func:`load_lora` reads). ``metadata``: the
        safetensors metadata (diffusers keeps alphas there); ``adapter_config``: PEFT's
        ``adapter_config.json``."""
        metadata = dict(metadata or {})
        state = dict(state)
        _refuse_unsupported(state, name)
        if not state:
            raise LoraError(f"LoRA {name!r}: the file holds no tensors")
        if all(key.startswith(("lora_unet_", "lora_te")) for key in state):
            return cls(tuple(_kohya_layers(state, name)), name=name, layout="kohya", metadata=metadata)
        layout = "peft" if any(key.startswith("base_model.model.") for key in state) else "diffusers"
        alphas = _adapter_alphas(metadata, adapter_config)
        return cls(tuple(_diffusers_layers(state, alphas, name)), name=name, layout=layout, metadata=metadata)

    @property
    def components(self) -> set[str | None]:
        return {layer.component for layer in self.layers}

    def __repr__(self) -> str:
        return f"Lora({self.name!r}, {len(self.layers)} layers, {self.layout})"


# Loading


def load_lora(path: str | os.PathLike[str]) -> Lora:
    """Read a LoRA file: ``.safetensors``, or ``.pt``/``.ckpt``/``.bin`` through torch's
    weights-only unpickler (:mod:`nai_fast.safe_load`). PEFT's ``adapter_config.json`` beside
    the file supplies its alphas.

    Raises:
        FileNotFoundError: no such file.
        LoraError: unreadable, unsafe, empty, of an unsupported kind (LoHa, LoKr, DoRA, ...) or
            with keys of no known layout; :class:`LoraMismatchError` for an SDXL file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA {path}: no such file")
    name = path.stem
    data = path.read_bytes()
    metadata: dict[str, str] = {}
    if path.suffix.lower() == ".safetensors":
        import safetensors.torch

        try:
            state = safetensors.torch.load(data)
            metadata = _safetensors_metadata(data)
        except Exception as error:
            raise LoraError(f"LoRA {path}: not a readable .safetensors file: {error_reason(error)}") from error
        digest = _addnet_hash(data)
    else:
        try:
            state = load_weights_only(path)
        except ValueError as error:
            raise LoraError(f"LoRA {path}: {error}") from error
        if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
            state = state["state_dict"]
        if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
            raise LoraError(f"LoRA {path}: not a LoRA (expected a flat mapping of names to tensors)")
        digest = hashlib.sha256(data).hexdigest()
    config_file = path.with_name("adapter_config.json")
    adapter_config = json.loads(config_file.read_text()) if config_file.is_file() else None
    try:
        lora = Lora.from_state_dict(state, name=name, metadata=metadata, adapter_config=adapter_config)
    except LoraError as error:
        raise type(error)(f"{error} [{path}]") from None
    return Lora(lora.layers, name=name, path=path, hash=digest[:12], layout=lora.layout, metadata=metadata)


def lora_hash(path: str | os.PathLike[str]) -> str:
    """The web UI's short hash of a LoRA file (its ``Lora hashes`` field): the first 12 hex digits of
    the SHA-256 of a ``.safetensors`` file's tensor data (after the header, "addnet hash"), or of the
    whole file otherwise."""
    data = Path(path).read_bytes()
    return (_addnet_hash(data) if str(path).lower().endswith(".safetensors") else hashlib.sha256(data).hexdigest())[:12]


def _addnet_hash(data: bytes) -> str:
    header = int.from_bytes(data[:8], "little")
    return hashlib.sha256(data[8 + header :]).hexdigest()


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    header = int.from_bytes(data[:8], "little")
    return dict(json.loads(data[8 : 8 + header]).get("__metadata__") or {})


def _refuse_unsupported(state: Mapping[str, Tensor], name: str) -> None:
    for key in state:
        for fragment, kind in _UNSUPPORTED.items():
            if fragment in key:
                raise LoraError(f"LoRA {name!r} is {kind}, which is not supported (key {key!r}); plain LoRA only")
        if _LYCORIS_FULL.search(key):
            raise LoraError(f"LoRA {name!r} holds full weight differences (LyCORIS 'full', key {key!r}): not supported")
    sdxl = [key for key in state if key.startswith(_SDXL_PREFIXES)]
    if sdxl:
        raise LoraMismatchError(
            f"LoRA {name!r} is for SDXL, not SD 1.x: it has layers for two text encoders ({_shown(sdxl)})"
        )


def _kohya_layers(state: dict[str, Tensor], name: str) -> Iterator[LoraLayer]:
    """kohya / web UI keys: module names via diffusers' converter (LDM names left to apply time)."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers

    groups: dict[str, dict[str, Tensor]] = {}
    for key, tensor in state.items():
        module, _, part = key.partition(".")
        groups.setdefault(module, {})[part] = tensor
    for module_key, parts in groups.items():
        unknown = sorted(set(parts) - {"lora_down.weight", "lora_up.weight", "alpha"})
        if unknown:
            raise LoraError(f"LoRA {name!r}: {module_key!r} has unexpected parts {_shown(unknown)}")
        if "lora_down.weight" not in parts or "lora_up.weight" not in parts:
            raise LoraError(f"LoRA {name!r}: {module_key!r} needs both lora_down.weight and lora_up.weight")
        component = next((c for prefix, c in _KOHYA_PREFIXES.items() if module_key.startswith(prefix)), None)
        if component is None:
            raise LoraError(f"LoRA {name!r}: unknown key prefix in {module_key!r} (expected lora_unet_ or lora_te_)")
        alpha = parts.get("alpha")
        alpha = None if alpha is None else float(alpha.float().reshape(-1)[0])
        down, up = parts["lora_down.weight"], parts["lora_up.weight"]
        if module_key.startswith(_LDM_BLOCKS):
            yield LoraLayer(component, None, down, up, alpha, module_key)
            continue
        probe = {f"{module_key}.lora_down.weight": down, f"{module_key}.lora_up.weight": up}
        try:
            converted, _ = _convert_non_diffusers_lora_to_diffusers(probe)
        except Exception as error:  # diffusers names what it could not rename
            raise LoraError(f"LoRA {name!r}: diffusers cannot rename {module_key!r}: {error_reason(error)}") from error
        (module,) = {_module_path(key) for key in _to_peft(converted)}
        yield LoraLayer(component, module.partition(".")[2], down, up, alpha, module_key)


def _to_peft(state: Mapping[str, Any]) -> dict[str, Any]:
    """diffusers' key mappings, old attention-processor and ``lora_linear_layer`` keys included,
    to PEFT's ``<module>.lora_A.weight`` / ``lora_B.weight``: the text encoder's (``to_k_lora`` is
    ``k_proj`` there) and the U-Net's (``to_k``) each by their own table."""
    from diffusers.utils.state_dict_utils import (
        StateDictType,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )

    text = {key: value for key, value in state.items() if key.startswith("text_encoder.")}
    rest = {key: value for key, value in state.items() if key not in text}
    if any(fragment in key for key in text for fragment in ("_lora.", "lora_linear_layer")):
        text = convert_state_dict_to_peft(text, original_type=StateDictType.DIFFUSERS_OLD)
    return {**convert_unet_state_dict_to_peft(rest), **text}


_PEFT_KEY = re.compile(r"^(?P<module>.+?)\.(?P<part>lora_A|lora_B)(?:\.[A-Za-z_]\w*)?\.weight$")


def _module_path(key: str) -> str:
    match = _PEFT_KEY.match(key)
    return match["module"] if match else key


def _diffusers_layers(state: dict[str, Tensor], alphas: _Alphas, name: str) -> Iterator[LoraLayer]:
    """diffusers / PEFT keys: ``[unet.|text_encoder.|base_model.model.]<module>.lora_A/B.weight``."""
    state_alphas = {key[: -len(".alpha")]: value for key, value in state.items() if key.endswith(".alpha")}
    converted = _to_peft({key: value for key, value in state.items() if not key.endswith(".alpha")})
    modules: dict[str, dict[str, Tensor]] = {}
    for key, tensor in converted.items():
        match = _PEFT_KEY.match(key)
        if match is None:
            raise LoraError(f"LoRA {name!r}: key {key!r} is in no LoRA layout this reads (kohya, diffusers, PEFT)")
        modules.setdefault(match["module"], {})[match["part"]] = tensor
    for full_name, parts in modules.items():
        if set(parts) != {"lora_A", "lora_B"}:
            raise LoraError(f"LoRA {name!r}: {full_name!r} needs both lora_A and lora_B weights")
        component, module = None, full_name
        for prefix in ("base_model.model.", *(f"{c}." for c in COMPONENTS)):
            if full_name.startswith(prefix):
                module = full_name[len(prefix) :]
                component = prefix[:-1] if prefix[:-1] in COMPONENTS else None
                break
        else:
            component = "unet"  # diffusers' attention-processor files hold the U-Net alone, unprefixed
        alpha = state_alphas.get(full_name)
        alpha = float(alpha.float().reshape(-1)[0]) if alpha is not None else alphas.of(component, module)
        yield LoraLayer(component, module, parts["lora_A"], parts["lora_B"], alpha, full_name)


@dataclass
class _Alphas:
    """``lora_alpha`` and ``alpha_pattern`` per component (None: every component)."""

    configs: dict[str | None, Mapping[str, Any]]

    def of(self, component: str | None, module: str) -> float | None:
        config = self.configs.get(component) or self.configs.get(None)
        if not config:
            return None
        for pattern, alpha in (config.get("alpha_pattern") or {}).items():
            if re.fullmatch(rf"(.*\.)?{pattern}", module):
                return float(alpha)
        alpha = config.get("lora_alpha")
        return None if alpha is None else float(alpha)


def _adapter_alphas(metadata: Mapping[str, str], adapter_config: Mapping[str, Any] | None) -> _Alphas:
    configs: dict[str | None, Mapping[str, Any]] = {}
    if adapter_config:
        configs[None] = adapter_config
    packed = metadata.get("lora_adapter_metadata")
    if packed:
        values = json.loads(packed)
        for component in COMPONENTS:
            prefix = f"{component}."
            own = {key[len(prefix) :]: value for key, value in values.items() if key.startswith(prefix)}
            if own:
                configs[component] = own
        if not configs and values:
            configs[None] = values
    return _Alphas(configs)


# Applying


@dataclass
class _Applied:
    """What apply_loras did to one network: the LoRAs, and the parameters it replaced."""

    loras: tuple[Lora, ...]
    strengths: tuple[float, ...]
    originals: list[tuple[nn.Module, Tensor]]  # (module, its own weight parameter)


def apply_loras(
    model: Any, loras: Lora | Sequence[Lora], strengths: float | Sequence[float] | None = None
) -> None:
    """Merge ``loras`` into working copies of ``model``'s affected weights (see the module doc).

    Args:
        model: an object with ``unet`` and ``text_encoder`` attributes, or a mapping of them.
        loras: one LoRA or several; their updates add up.
        strengths: one for all or one per LoRA (1.0); 0 leaves a LoRA out.

    Raises:
        LoraMismatchError: a LoRA names a module ``model`` lacks (or a network it was not given),
            or its shapes do not fit: nothing is changed then.
    """
    networks = _networks(model)
    remove_loras(model)
    loras = (loras,) if isinstance(loras, Lora) else tuple(loras)
    if not all(isinstance(lora, Lora) for lora in loras):
        raise TypeError("loras must be a Lora or a sequence of them (see load_lora)")
    values = network_strengths(strengths, len(loras), "LoRAs")
    # Resolve and check everything first: a refused LoRA changes nothing.
    updates: dict[str, dict[nn.Module, list[tuple[LoraLayer, float]]]] = {c: {} for c in networks}
    for lora, strength in zip(loras, values):
        for component, module, layer in _resolve(lora, networks):
            if strength != 0:
                updates[component].setdefault(module, []).append((layer, strength))
    for component, network in networks.items():
        originals = []
        with torch.no_grad():
            for module, layers in updates[component].items():
                weight = module.weight
                delta = None
                for layer, strength in layers:
                    term = layer.delta(weight) * strength if strength != 1 else layer.delta(weight)
                    delta = term if delta is None else delta + term
                merged = (weight.to(torch.float32) + delta).to(weight.dtype)
                module.weight = nn.Parameter(merged, requires_grad=weight.requires_grad)
                originals.append((module, weight))
        setattr(network, _APPLIED, _Applied(loras, values, originals))


def remove_loras(model: Any) -> None:
    """Put back the exact weights ``model`` had before :func:`apply_loras` (no-op if none). A
    network moved or converted since gets its originals moved or converted the same way."""
    for network in _networks(model).values():
        applied = getattr(network, _APPLIED, None)
        if applied is None:
            continue
        for module, original in applied.originals:
            current = module.weight
            if (original.device, original.dtype) != (current.device, current.dtype):
                original = nn.Parameter(original.to(current.device, current.dtype), original.requires_grad)
            module.weight = original
        delattr(network, _APPLIED)


def installed_loras(model: Any) -> list[tuple[Lora, float]]:
    """The LoRAs :func:`apply_loras` merged into ``model``, each with its strength (empty if none)."""
    for network in _networks(model).values():
        applied = getattr(network, _APPLIED, None)
        if applied is not None:
            return list(zip(applied.loras, applied.strengths))
    return []


@contextmanager
def loras_applied(
    model: Any, loras: Lora | Sequence[Lora], strengths: float | Sequence[float] | None = None
) -> Iterator[None]:
    """:func:`apply_loras` for the duration of a ``with`` block, then :func:`remove_loras`."""
    apply_loras(model, loras, strengths)
    try:
        yield
    finally:
        remove_loras(model)


def _networks(model: Any) -> dict[str, nn.Module]:
    if isinstance(model, Mapping):
        found = {component: model.get(component) for component in COMPONENTS}
    else:
        found = {component: getattr(model, component, None) for component in COMPONENTS}
    networks = {component: network for component, network in found.items() if isinstance(network, nn.Module)}
    if not networks:
        raise TypeError(
            "model must have a unet and/or text_encoder (a StableDiffusion, a diffusers pipeline, or a mapping)"
        )
    return networks


def _resolve(lora: Lora, networks: Mapping[str, nn.Module]) -> list[tuple[str, nn.Module, LoraLayer]]:
    """Each layer's network and module; LoraMismatchError naming every layer that has none or
    does not fit."""
    resolved, missing, misfits, absent = [], [], [], set()
    ldm_names: dict[str, str] | None = None
    for layer in lora.layers:
        candidates = [layer.component] if layer.component else list(COMPONENTS)
        if not any(c in networks for c in candidates):
            absent.add(layer.component)
            continue
        module = None
        for component in candidates:
            network = networks.get(component)
            if network is None:
                continue
            path = layer.module
            if path is None:  # an original-layout (LDM) U-Net name
                if ldm_names is None:
                    ldm_names = _ldm_names(network)
                path = ldm_names.get(layer.key)
            module = None if path is None else _submodule(network, path, component)
            if module is not None:
                break
        if module is None:
            missing.append(layer.key)
            continue
        problem = layer.shape_errors(module.weight)
        if problem:
            misfits.append(f"{layer.key}: {problem}")
            continue
        resolved.append((component, module, layer))
    if absent:
        raise LoraMismatchError(f"LoRA {lora.name!r} has layers for {_shown(sorted(map(str, absent)))}, not given")
    if missing or misfits:
        parts = []
        if missing:
            parts.append(f"{len(missing)} of its {len(lora.layers)} layers name modules this model lacks ({_shown(missing)})")
        if misfits:
            parts.append(f"{len(misfits)} do not fit this model's widths ({_shown(misfits)})")
        raise LoraMismatchError(f"LoRA {lora.name!r} is not for this model (made for another architecture?): "
                                + "; ".join(parts))  # fmt: skip
    return resolved


def _submodule(network: nn.Module, path: str, component: str) -> nn.Module | None:
    if component == "text_encoder":
        nested = hasattr(network, "text_model")
        if path.startswith(_TEXT_MODEL) and not nested:
            path = path[len(_TEXT_MODEL) :]
        elif nested and not path.startswith(_TEXT_MODEL):
            path = _TEXT_MODEL + path
    try:
        module = network.get_submodule(path)
    except AttributeError:
        return None
    if not isinstance(module, (nn.Linear, nn.Conv2d)) or not isinstance(module.weight, Tensor):
        return None
    return module


def _ldm_names(unet: nn.Module) -> dict[str, str]:
    """kohya names in the original LDM layout (``lora_unet_input_blocks_1_1_...``) -> diffusers
    module paths, through the inverse mapping :func:`~nai_fast.models.checkpoints.save_single_file`
    writes with."""
    from .checkpoints import _unet_to_original

    paths = [name for name, module in unet.named_modules() if isinstance(module, (nn.Linear, nn.Conv2d))]
    try:
        originals = _unet_to_original({f"{path}.weight": None for path in paths}, unet.config)
    except Exception:  # not an SD-like U-Net: no original names
        return {}
    return {
        "lora_unet_" + original.removesuffix(".weight").replace(".", "_"): path
        for path, original in zip(paths, originals)
    }


def _shown(names: Sequence[str]) -> str:
    names = list(names)
    more = f" and {len(names) - SHOWN} more" if len(names) > SHOWN else ""
    return ", ".join(names[:SHOWN]) + more
