"""NovelAI / web UI hypernetworks: the modules, and loading and saving every real file format.

A hypernetwork holds, for each feature width of the U-Net's cross-attention
contexts (320, 640, 768, 1024, 1280), a pair of small residual networks: one
rewrites the input of ``to_k``, the other the input of ``to_v``. Each computes
``x + strength * net(x)``, where ``net`` is a stack of Linears whose widths
follow ``layer_structure`` (multipliers of the width, starting and ending at 1),
each optionally followed by an activation, a LayerNorm and a Dropout.

``net`` is laid out exactly as the AUTOMATIC1111 web UI lays out its
``torch.nn.Sequential`` (``modules/hypernetworks/hypernetwork.py``), because
files store tensors under Sequential indices. After Linear ``i`` of ``n - 1``:

* the activation, unless it is ``"linear"`` or Linear ``i`` is the last one
  and ``activate_output`` is off;
* a LayerNorm over the Linear's output, when ``layer_norm`` is on (after the
  last Linear too);
* a Dropout, when ``dropout_structure[i + 1] > 0`` (``dropout_structure[0]``
  is never used: no layer comes before the first Linear).

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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import safetensors
import safetensors.torch
import torch
from torch import Tensor, nn

from ..kernels.activations import ACTIVATIONS, NO_ACTIVATION
from ..models.safe_load import load_weights_only

__all__ = [
    "ACTIVATIONS",
    "WEIGHT_INITS",
    "AffineMap",
    "Architecture",
    "Hypernetwork",
    "HypernetworkFileError",
    "HypernetworkModule",
    "dropout_structure_from_flags",
]


_WeightInit = Callable[[Tensor, str], object]
WEIGHT_INITS: dict[str, _WeightInit] = {
    "Normal": lambda weight, nonlinearity: nn.init.normal_(weight, mean=0.0, std=0.01),
    "XavierUniform": lambda weight, nonlinearity: nn.init.xavier_uniform_(weight),
    "XavierNormal": lambda weight, nonlinearity: nn.init.xavier_normal_(weight),
    "KaimingUniform": lambda weight, nonlinearity: nn.init.kaiming_uniform_(weight, nonlinearity=nonlinearity),
    "KaimingNormal": lambda weight, nonlinearity: nn.init.kaiming_normal_(weight, nonlinearity=nonlinearity),
}

DEFAULT_WIDTHS = (320, 640, 768, 1280)  # Stable Diffusion 1.x; 2.x adds 1024
DEFAULT_LAYER_STRUCTURE = (1, 2, 1)  # also what files without the key use
_WEB_UI_DROPOUT = 0.3  # the probability old web UI files mean by use_dropout
_ROLES = ("k", "v")
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


class AffineMap(NamedTuple):
    """``net(x) = x @ matrix.T + bias``."""

    matrix: Tensor
    bias: Tensor


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


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class Architecture:
    """The layout every module of a hypernetwork shares, whatever its width.

    Attributes:
        layer_structure: widths of the Linears' inputs and outputs, as multiples
            of the module's width; starts and ends with 1.
        activation: ``"linear"`` (none) or a key of :data:`ACTIVATIONS`.
        layer_norm: a LayerNorm after every Linear.
        dropout_structure: per entry of ``layer_structure``, the dropout
            probability after the Linear producing it (0: no Dropout layer).
        activate_output: the activation follows the last Linear too.
    """

    layer_structure: tuple[float, ...] = DEFAULT_LAYER_STRUCTURE
    activation: str = NO_ACTIVATION
    layer_norm: bool = False
    dropout_structure: tuple[float, ...] = (0.0,) * len(DEFAULT_LAYER_STRUCTURE)
    activate_output: bool = False

    def __post_init__(self) -> None:
        structure = self.layer_structure
        if len(structure) < 2 or not all(_is_number(m) and m > 0 for m in structure):
            raise ValueError(f"layer_structure must be at least two positive numbers, got {list(structure)}")
        if structure[0] != 1 or structure[-1] != 1:
            raise ValueError(f"layer_structure must start and end with 1, got {list(structure)}")
        if self.activation != NO_ACTIVATION and self.activation not in ACTIVATIONS:
            raise ValueError(
                f"unknown activation {self.activation!r}; expected {NO_ACTIVATION!r} or one of {sorted(ACTIVATIONS)}"
            )
        if not isinstance(self.layer_norm, bool) or not isinstance(self.activate_output, bool):
            raise ValueError("layer_norm and activate_output must be booleans")
        dropout = self.dropout_structure
        if len(dropout) != len(structure) or not all(_is_number(p) and 0 <= p < 1 for p in dropout):
            raise ValueError(
                f"dropout_structure must be {len(structure)} probabilities in [0, 1), one per entry of "
                f"layer_structure, got {list(dropout)}"
            )

    def build_layers(self, width: int) -> list[nn.Module]:
        """The layers of one module's ``net`` at ``width``, in the web UI's order."""
        features = [int(width * multiplier) for multiplier in self.layer_structure]
        if min(features) < 1:
            raise ValueError(f"layer_structure {list(self.layer_structure)} leaves no features at width {width}")
        last = len(features) - 2
        layers: list[nn.Module] = []
        for i, (in_features, out_features) in enumerate(zip(features, features[1:])):
            layers.append(nn.Linear(in_features, out_features))
            if self.activation != NO_ACTIVATION and (i < last or self.activate_output):
                layers.append(ACTIVATIONS[self.activation]())
            if self.layer_norm:
                layers.append(nn.LayerNorm(out_features))
            if self.dropout_structure[i + 1] > 0:
                layers.append(nn.Dropout(p=self.dropout_structure[i + 1]))
        return layers


class HypernetworkModule(nn.Module):
    """One residual network: ``x + strength * net(x)`` over the last dimension, ``width``."""

    def __init__(self, width: int, architecture: Architecture) -> None:
        super().__init__()
        self.width = width
        self.architecture = architecture
        self.net = nn.Sequential(*architecture.build_layers(width))

    def forward(self, x: Tensor, strength: float = 1.0) -> Tensor:
        return x + strength * self.net(x)

    def extra_repr(self) -> str:
        return f"width={self.width}"

    @torch.no_grad()
    def reset_parameters(self, weight_init: str = "Normal") -> None:
        """Initialise the weights as the web UI does for a new network.

        Linear weights follow ``weight_init`` (one of :data:`WEIGHT_INITS`), their
        biases start at zero. LayerNorms always get N(0, 0.01) weights and zero
        biases, as in the web UI, whatever ``weight_init`` is.
        """
        if weight_init not in WEIGHT_INITS:
            raise ValueError(f"unknown weight_init {weight_init!r}; expected one of {list(WEIGHT_INITS)}")
        nonlinearity = "leaky_relu" if self.architecture.activation == "leakyrelu" else "relu"
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                WEIGHT_INITS[weight_init](layer.weight, nonlinearity)
                nn.init.zeros_(layer.bias)
            elif isinstance(layer, nn.LayerNorm):
                nn.init.normal_(layer.weight, mean=0.0, std=0.01)
                nn.init.zeros_(layer.bias)

    @property
    def is_affine(self) -> bool:
        """Whether ``net`` is an affine map: only Linears, and Dropouts while not training."""
        return not self._non_affine_layers()

    def _non_affine_layers(self) -> list[str]:
        return [
            f"{type(layer).__name__}{' in training mode' if isinstance(layer, nn.Dropout) else ''}"
            for layer in self.net
            if not (isinstance(layer, nn.Linear) or (isinstance(layer, nn.Dropout) and not layer.training))
        ]

    @torch.no_grad()
    def affine_map(self, dtype: torch.dtype = torch.float64) -> AffineMap:
        """``(A, b)`` with ``net(x) = x @ A.T + b``, computed in ``dtype``.

        Folding the module into a projection ``W`` (``to_k``/``to_v``, no bias)
        then gives ``W (x + s net(x)) = x @ (W (I + s A)).T + s W b``.
        Raises ValueError unless :attr:`is_affine`.
        """
        non_affine = self._non_affine_layers()
        if non_affine:
            raise ValueError(f"module is not an affine map: it has {', '.join(non_affine)}")
        linears = [layer for layer in self.net if isinstance(layer, nn.Linear)]
        matrix, bias = linears[0].weight.to(dtype, copy=True), linears[0].bias.to(dtype, copy=True)
        for linear in linears[1:]:
            weight = linear.weight.to(dtype)
            matrix, bias = weight @ matrix, weight @ bias + linear.bias.to(dtype)
        return AffineMap(matrix, bias)


@dataclass
class _FileContents:
    """What any format holds: web UI metadata keys, and per width the k and v state dicts
    keyed like :class:`HypernetworkModule` (``net.{index}.{param}``)."""

    metadata: dict[str, object]
    pairs: dict[int, tuple[dict[str, object], dict[str, object]]]


class Hypernetwork(nn.Module):
    """A NovelAI / web UI hypernetwork: a (k, v) pair of modules per feature width.

    Args:
        widths: the context widths it applies to.
        layer_structure, activation, layer_norm, dropout_structure,
            activate_output: see :class:`Architecture`; ``activation=None`` is
            ``"linear"``, ``dropout_structure=None`` is no dropout.
        weight_init: initialisation of the new weights, one of
            :data:`WEIGHT_INITS` (see :meth:`HypernetworkModule.reset_parameters`).

    Like the web UI's, a new or loaded hypernetwork starts in eval mode, where
    Dropout is off; call ``train()`` to train it. Besides the modules it keeps
    the web UI's bookkeeping: ``name``, ``step`` (training steps done),
    ``weight_init``, ``sd_checkpoint``, ``sd_checkpoint_name`` and
    ``optional_info``, all saved and loaded with it; and ``path``, the file
    :meth:`load` read it from (None for one made in memory), for messages.
    """

    def __init__(
        self,
        widths: Sequence[int] = DEFAULT_WIDTHS,
        layer_structure: Sequence[float] = DEFAULT_LAYER_STRUCTURE,
        activation: str | None = NO_ACTIVATION,
        layer_norm: bool = False,
        dropout_structure: Sequence[float] | None = None,
        weight_init: str = "Normal",
        activate_output: bool = False,
    ) -> None:
        super().__init__()
        if not widths or not all(isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in widths):
            raise ValueError(f"widths must be one or more positive integers, got {list(widths)}")
        self.architecture = Architecture(
            layer_structure=tuple(layer_structure),
            activation=NO_ACTIVATION if activation is None else activation,
            layer_norm=layer_norm,
            dropout_structure=(0.0,) * len(layer_structure) if dropout_structure is None else tuple(dropout_structure),
            activate_output=activate_output,
        )
        self.weight_init = weight_init
        self.name: str | None = None
        self.step = 0
        self.sd_checkpoint: object = None
        self.sd_checkpoint_name: object = None
        self.optional_info: object = None
        self.path: Path | None = None
        self.pairs = nn.ModuleDict(
            {
                str(width): nn.ModuleDict({role: HypernetworkModule(width, self.architecture) for role in _ROLES})
                for width in sorted(set(widths))
            }
        )
        for _, _, module in self._named_modules_by_width():
            module.reset_parameters(weight_init)
        self.eval()

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(int(width) for width in self.pairs)

    def modules_for(self, width: int) -> tuple[HypernetworkModule, HypernetworkModule] | None:
        """The (k, v) modules for contexts of ``width`` features, or None if it has none."""
        key = str(width)
        if key not in self.pairs:
            return None
        pair = self.pairs[key]
        return pair["k"], pair["v"]

    def forward(self, context: Tensor, strength: float = 1.0) -> tuple[Tensor, Tensor]:
        """The inputs of ``to_k`` and ``to_v`` for ``context``; unchanged for a width it lacks."""
        pair = self.modules_for(context.shape[-1])
        if pair is None:
            return context, context
        k_module, v_module = pair
        return k_module(context, strength), v_module(context, strength)

    @property
    def is_affine(self) -> bool:
        """Whether every module is an affine map (see :attr:`HypernetworkModule.is_affine`)."""
        return all(module.is_affine for _, _, module in self._named_modules_by_width())

    def affine_maps(self, dtype: torch.dtype = torch.float64) -> dict[int, tuple[AffineMap, AffineMap]]:
        """Per width, the (k, v) modules' :meth:`~HypernetworkModule.affine_map`."""
        return {width: (pair[0].affine_map(dtype), pair[1].affine_map(dtype)) for width, pair in self._pairs_by_width()}

    def _pairs_by_width(self) -> list[tuple[int, tuple[HypernetworkModule, HypernetworkModule]]]:
        return [(width, self.modules_for(width)) for width in self.widths]

    def _named_modules_by_width(self) -> list[tuple[int, str, HypernetworkModule]]:
        return [(width, role, module) for width, pair in self._pairs_by_width() for role, module in zip(_ROLES, pair)]

    # Files

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Hypernetwork:
        """Load a web UI ``.pt``, NovelAI ``.pt`` or ``.safetensors`` hypernetwork.

        Raises:
            HypernetworkFileError: the file is malformed, unreadable, or would
                need arbitrary code execution to unpickle (refused, not run).
        """
        path = Path(path)
        try:
            hypernetwork = cls._from_contents(_read_file(path), default_name=path.stem)
        except ValueError as error:
            raise HypernetworkFileError(f"{path}: {error}") from error
        hypernetwork.path = path
        return hypernetwork

    def save(self, path: str | os.PathLike[str]) -> None:
        """Save as ``.pt`` (the web UI's format, which it loads) or ``.safetensors``, by suffix."""
        path = Path(path)
        metadata = self._metadata(default_name=path.stem)
        if path.suffix == ".pt":
            checkpoint: dict[object, object] = {
                width: tuple(_to_web_ui_keys(module) for module in pair) for width, pair in self._pairs_by_width()
            }
            checkpoint.update(metadata)
            torch.save(checkpoint, path)
        elif path.suffix == ".safetensors":
            tensors = {
                f"{width}.{role}.{key}": _plain(tensor)
                for width, role, module in self._named_modules_by_width()
                for key, tensor in module.state_dict().items()
            }
            header = {key: json.dumps(value) for key, value in metadata.items()}
            safetensors.torch.save_file(tensors, path, metadata=header)
        else:
            raise ValueError(f"cannot save a hypernetwork as {path.name!r}: use a .pt or .safetensors suffix")

    def _metadata(self, default_name: str) -> dict[str, object]:
        """The metadata the web UI writes, under its key names; both formats carry it."""
        architecture = self.architecture
        return {
            "name": self.name or default_name,
            "step": self.step,
            "layer_structure": list(architecture.layer_structure),
            "activation_func": architecture.activation,
            "is_layer_norm": architecture.layer_norm,
            "weight_initialization": self.weight_init,
            "use_dropout": any(p > 0 for p in architecture.dropout_structure),
            "dropout_structure": list(architecture.dropout_structure),
            "last_layer_dropout": architecture.dropout_structure[-2] > 0,
            "activate_output": architecture.activate_output,
            "sd_checkpoint": self.sd_checkpoint,
            "sd_checkpoint_name": self.sd_checkpoint_name,
            "optional_info": self.optional_info,
        }

    @classmethod
    def _from_contents(cls, contents: _FileContents, default_name: str) -> Hypernetwork:
        metadata = contents.metadata
        # Built on the meta device: every weight comes from the file, so none is allocated or initialised.
        with torch.device("meta"):
            hypernetwork = cls(widths=sorted(contents.pairs), **_architecture_arguments(metadata))
        for width, role, module in hypernetwork._named_modules_by_width():
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


def _to_web_ui_keys(module: HypernetworkModule) -> dict[str, Tensor]:
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
    layer_structure = _typed(metadata, "layer_structure", (list, tuple), DEFAULT_LAYER_STRUCTURE)
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


def _checked_state_dict(module: HypernetworkModule, state: Mapping[str, object], where: str) -> dict[str, Tensor]:
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
