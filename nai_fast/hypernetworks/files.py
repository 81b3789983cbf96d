"""Hypernetwork files: the web UI's ``.pt``, NovelAI's ``linear1/linear2`` ``.pt`` and ``.safetensors``.

As :mod:`nai_fast.models.checkpoints` holds the model formats, this module holds the
hypernetwork formats: reading and writing them, and rebuilding the web UI's ``nn.Sequential``
index layout (:class:`~.modules.Architecture`) from a file's metadata. It imports nothing
from :mod:`.modules`: :meth:`Hypernetwork.load <.modules.Hypernetwork.load>` and
:meth:`~.modules.Hypernetwork.save` call :func:`load` and :func:`save` with the class or the
instance.

Files :meth:`Hypernetwork.load` reads (the format is told from the content):

* the web UI's ``.pt``: a dict of ``int width -> (k, v)`` state dicts (a tuple
  or a list) with keys ``linear.{index}.{weight|bias}``, plus metadata keys
  (``layer_structure``, ``activation_func``, ``is_layer_norm``,
  ``dropout_structure``, ``use_dropout``, ``last_layer_dropout``,
  ``activate_output``, ``name``, ``step``, ...). Older files lack some keys;
  the web UI's defaults apply.
* NovelAI's original ``.pt``: the same dict of pairs, no metadata, keys
  ``linear1.*`` and ``linear2.*`` (``width -> 2 width -> width``, no
  activation), renamed ``linear.0.*`` and ``linear.1.*`` as the web UI does.
* ``.safetensors``: tensors ``{width}.{k|v}.net.{index}.{weight|bias}``, the
  web UI's metadata keys in the header, each value a JSON string.

Every ``.pt`` goes through ``torch.load(weights_only=True)``: a file that
needs arbitrary code to unpickle is refused, never executed. Malformed files
raise :class:`HypernetworkFileError` naming the file and the problem.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import Tensor, nn

from ..kernels.activations import NO_ACTIVATION
from ..safe_load import load_weights_only

__all__ = ["HypernetworkFileError", "dropout_structure_from_flags", "load", "save"]

# What web UI files without a layer_structure key mean: the web UI's default.
_OLD_FILES_LAYER_STRUCTURE = (1, 2, 1)
_WEB_UI_DROPOUT = 0.3  # the probability old web UI files mean by use_dropout
_ROLES = ("k", "v")  # the order of a width's pair in every format
# Module keys: ours name the Sequential "net", the web UI's "linear".
_NET_PREFIX = "net."
_WEB_UI_PREFIX = "linear."
# NovelAI's original modules had two named Linears; the web UI renames them the same way.
_NOVELAI_KEYS = {
    "linear1.weight": "linear.0.weight",
    "linear1.bias": "linear.0.bias",
    "linear2.weight": "linear.1.weight",
    "linear2.bias": "linear.1.bias",
}
_SAFETENSORS_NAME = re.compile(r"(?P<width>\d+)\.(?P<role>[kv])\.(?P<key>net\..+)")


class HypernetworkFileError(ValueError):
    """A hypernetwork file that is malformed, unreadable or unsafe to load."""


def dropout_structure_from_flags(depth: int, use_dropout: bool, last_layer_dropout: bool) -> tuple[float, ...]:
    """The dropout structure that web UI files without one mean by their flags.

    ``depth`` is ``len(layer_structure)``. With ``use_dropout``, every Linear but
    the last two is followed by Dropout(0.3), and the second to last one too
    with ``last_layer_dropout``; the last Linear never is (for ``depth`` 2, the
    web UI's rule puts ``last_layer_dropout``'s dropout after the only Linear).
    """
    if not use_dropout:
        return (0.0,) * depth
    structure = (0.0, *[_WEB_UI_DROPOUT] * (depth - 3), _WEB_UI_DROPOUT if last_layer_dropout else 0.0, 0.0)
    return structure[:depth]


@dataclass
class _FileContents:
    """What any format holds: web UI metadata keys, and per width the k and v state dicts
    keyed like :class:`HypernetworkModule` (``net.{index}.{param}``)."""

    metadata: dict[str, object]
    pairs: dict[int, tuple[dict[str, object], dict[str, object]]]


def load(cls: type[Any], path: str | os.PathLike[str]) -> Any:
    """A ``cls`` (:class:`~.modules.Hypernetwork`) read from a web UI ``.pt``, NovelAI ``.pt``
    or ``.safetensors`` file, its format told from the content.

    Raises:
        HypernetworkFileError: the file is malformed, unreadable, or would
            need arbitrary code execution to unpickle (refused, not run).
    """
    path = Path(path)
    try:
        hypernetwork = _from_contents(cls, _read_file(path), default_name=path.stem)
    except ValueError as error:
        raise HypernetworkFileError(f"{path}: {error}") from error
    hypernetwork.path = path
    return hypernetwork


def save(hypernetwork: Any, path: str | os.PathLike[str]) -> None:
    """Save ``hypernetwork`` as ``.pt`` (the web UI's format, which it loads) or ``.safetensors``, by suffix."""
    path = Path(path)
    metadata = _metadata(hypernetwork, default_name=path.stem)
    if path.suffix == ".pt":
        checkpoint: dict[object, object] = {
            width: tuple(_to_web_ui_keys(module) for module in hypernetwork.modules_for(width))
            for width in hypernetwork.widths
        }
        checkpoint.update(metadata)
        torch.save(checkpoint, path)
    elif path.suffix == ".safetensors":
        tensors = {
            f"{width}.{role}.{key}": _plain(tensor)
            for width, role, module in _named_modules(hypernetwork)
            for key, tensor in module.state_dict().items()
        }
        header = {key: json.dumps(value) for key, value in metadata.items()}
        safetensors.torch.save_file(tensors, path, metadata=header)
    else:
        raise ValueError(f"cannot save a hypernetwork as {path.name!r}: use a .pt or .safetensors suffix")


def _named_modules(hypernetwork: Any) -> list[tuple[int, str, nn.Module]]:
    """``(width, role, module)`` for every module, by width, k before v."""
    return [
        (width, role, module)
        for width in hypernetwork.widths
        for role, module in zip(_ROLES, hypernetwork.modules_for(width))
    ]


def _metadata(hypernetwork: Any, default_name: str) -> dict[str, object]:
    """The metadata the web UI writes, under its key names; both formats carry it."""
    architecture = hypernetwork.architecture
    return {
        "name": hypernetwork.name or default_name,
        "step": hypernetwork.step,
        "layer_structure": list(architecture.layer_structure),
        "activation_func": architecture.activation,
        "is_layer_norm": architecture.layer_norm,
        "weight_initialization": hypernetwork.weight_init,
        "use_dropout": any(p > 0 for p in architecture.dropout_structure),
        "dropout_structure": list(architecture.dropout_structure),
        "last_layer_dropout": architecture.dropout_structure[-2] > 0,
        "activate_output": architecture.activate_output,
        "sd_checkpoint": hypernetwork.sd_checkpoint,
        "sd_checkpoint_name": hypernetwork.sd_checkpoint_name,
        "optional_info": hypernetwork.optional_info,
    }


def _from_contents(cls: type[Any], contents: _FileContents, default_name: str) -> Any:
    metadata = contents.metadata
    # Built on the meta device: every weight comes from the file, so none is allocated or initialised.
    with torch.device("meta"):
        hypernetwork = cls(widths=sorted(contents.pairs), **_architecture_arguments(metadata))
    for width, role, module in _named_modules(hypernetwork):
        state = contents.pairs[width][_ROLES.index(role)]
        module.load_state_dict(_checked_state_dict(module, state, f"width {width} {role} module"), assign=True)
    # Recorded only (the weights come from the file), so any value the web UI wrote is kept.
    hypernetwork.weight_init = metadata.get("weight_initialization", "Normal")
    hypernetwork.name = _typed(metadata, "name", str, default_name)
    hypernetwork.step = _typed(metadata, "step", int, 0)
    hypernetwork.sd_checkpoint = metadata.get("sd_checkpoint")
    hypernetwork.sd_checkpoint_name = metadata.get("sd_checkpoint_name")
    hypernetwork.optional_info = metadata.get("optional_info")
    return hypernetwork


def _to_web_ui_keys(module: nn.Module) -> dict[str, Tensor]:
    """``module``'s state dict as the web UI names it (``linear.{index}.{param}``), ready to save."""
    state = module.state_dict()
    return {_WEB_UI_PREFIX + key.removeprefix(_NET_PREFIX): _plain(tensor) for key, tensor in state.items()}


def _plain(tensor: Tensor) -> Tensor:
    """A standalone CPU copy to write: no autograd, no storage shared with other tensors."""
    return tensor.detach().to("cpu", copy=True).contiguous()


def _typed(metadata: Mapping[str, object], key: str, kinds: type | tuple[type, ...], default: object) -> object:
    """``metadata[key]``, or ``default`` when missing or None, checked to be one of ``kinds``
    (a bool is not taken for an int)."""
    value = metadata.get(key)
    if value is None:
        return default
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise ValueError(f"metadata {key!r} must be {' or '.join(kind.__name__ for kind in kinds)}, got {value!r}")
    return value


def _architecture_arguments(metadata: Mapping[str, object]) -> dict[str, object]:
    """:class:`Hypernetwork` arguments for the architecture a file declares, with the web UI's
    defaults for older files that lack keys (notably ``activate_output``: True)."""
    layer_structure = _typed(metadata, "layer_structure", (list, tuple), _OLD_FILES_LAYER_STRUCTURE)
    dropout_structure = _typed(metadata, "dropout_structure", (list, tuple), None)
    if dropout_structure is None:
        dropout_structure = dropout_structure_from_flags(
            len(layer_structure),
            use_dropout=_typed(metadata, "use_dropout", bool, False),
            last_layer_dropout=_typed(metadata, "last_layer_dropout", bool, False),
        )
    return {
        "layer_structure": layer_structure,
        "activation": _typed(metadata, "activation_func", str, NO_ACTIVATION),
        "layer_norm": _typed(metadata, "is_layer_norm", bool, False),
        "dropout_structure": dropout_structure,
        "activate_output": _typed(metadata, "activate_output", bool, True),
    }


def _checked_state_dict(module: nn.Module, state: Mapping[str, object], where: str) -> dict[str, Tensor]:
    """``state`` as float32 tensors, once it has exactly the tensors ``module`` needs, of the right
    shapes and finite; otherwise a ValueError naming the first problem."""
    expected = {key: tuple(tensor.shape) for key, tensor in module.state_dict().items()}
    architecture = f"layer_structure {list(module.architecture.layer_structure)} at width {module.width}"
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    if missing or unexpected:
        listed = [f"{label} {keys}" for label, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
        raise ValueError(
            f"{where}: tensors do not match the declared architecture ({architecture}, activation "
            f"{module.architecture.activation!r}, layer_norm {module.architecture.layer_norm}): {', '.join(listed)}"
        )
    checked = {}
    for key, shape in expected.items():
        tensor = state[key]
        if not isinstance(tensor, Tensor) or not tensor.is_floating_point():
            raise ValueError(f"{where}: {key} is not a floating-point tensor")
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{where}: {key} has shape {list(tensor.shape)}, but {architecture} needs {list(shape)}")
        if not torch.isfinite(tensor).all():
            raise ValueError(f"{where}: {key} contains NaN or infinite values")
        checked[key] = tensor.to(torch.float32, copy=True).contiguous()
    return checked


# Reading files


def _read_file(path: Path) -> _FileContents:
    """Any supported file's contents, its format told from its first bytes (the suffix may lie)."""
    with path.open("rb") as file:
        head = file.read(9)
    if not head:
        raise ValueError("the file is empty")
    # safetensors: a little-endian u64 header length, then the JSON header.
    if len(head) == 9 and head[8:9] == b"{":
        return _read_safetensors(path)
    return _read_checkpoint(load_weights_only(path))


def _read_checkpoint(checkpoint: object) -> _FileContents:
    """Web UI and NovelAI ``.pt`` contents: int width keys hold (k, v) pairs, str keys metadata."""
    if not isinstance(checkpoint, dict):
        raise ValueError(f"expected a dict of width -> (k, v) state dicts, got a {type(checkpoint).__name__}")
    pairs = {}
    for width, pair in checkpoint.items():
        if not isinstance(width, int) or isinstance(width, bool):
            continue
        if not isinstance(pair, (tuple, list)) or len(pair) != 2 or not all(isinstance(sd, Mapping) for sd in pair):
            raise ValueError(f"width {width} must hold a pair (k, v) of state dicts, got {_describe(pair)}")
        pairs[width] = tuple(_from_web_ui_keys(state) for state in pair)
    if not pairs:
        raise ValueError("no hypernetwork layers: no integer width key holding a (k, v) pair of state dicts")
    metadata = {key: value for key, value in checkpoint.items() if isinstance(key, str)}
    return _FileContents(metadata, pairs)


def _describe(value: object) -> str:
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)}: {[type(item).__name__ for item in value]}"
    return f"a {type(value).__name__}"


def _from_web_ui_keys(state: Mapping[str, object]) -> dict[str, object]:
    """Rename a web UI (or NovelAI) module's keys to :class:`HypernetworkModule`'s.

    Keys outside the web UI's naming are kept, so the check reports them as unexpected."""
    renamed = {}
    for key, tensor in state.items():
        key = _NOVELAI_KEYS.get(key, key)
        if isinstance(key, str) and key.startswith(_WEB_UI_PREFIX):
            key = _NET_PREFIX + key.removeprefix(_WEB_UI_PREFIX)
        renamed[key] = tensor
    return renamed


def _read_safetensors(path: Path) -> _FileContents:
    try:
        with safetensors.safe_open(path, framework="pt") as file:
            header = file.metadata() or {}
            tensors = {name: file.get_tensor(name) for name in file.keys()}
    except safetensors.SafetensorError as error:
        raise ValueError(f"truncated or corrupt safetensors file: {error}") from error
    try:
        metadata = {key: json.loads(value) for key, value in header.items()}
    except json.JSONDecodeError as error:
        raise ValueError(f"safetensors metadata is not JSON: {error}") from error
    states: dict[int, dict[str, dict[str, object]]] = {}
    for name, tensor in tensors.items():
        match = _SAFETENSORS_NAME.fullmatch(name)
        if match is None:
            raise ValueError(f"tensor {name!r} is not named {{width}}.{{k|v}}.net.{{index}}.{{weight|bias}}")
        states.setdefault(int(match["width"]), {}).setdefault(match["role"], {})[match["key"]] = tensor
    if not states:
        raise ValueError("no hypernetwork layers: the file holds no tensors")
    for width, roles in states.items():
        if set(roles) != set(_ROLES):
            raise ValueError(f"width {width} lacks its pair: it has a {'/'.join(sorted(roles))} module only")
    pairs = {width: (roles["k"], roles["v"]) for width, roles in states.items()}
    return _FileContents(metadata, pairs)
