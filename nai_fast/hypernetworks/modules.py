"""NovelAI / web UI hypernetworks: the modules (``nn.Module``), in the web UI's layout.

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

The file formats are :mod:`.files`' (:meth:`Hypernetwork.load` and :meth:`Hypernetwork.save`
call it); the activation names are :mod:`nai_fast.kernels.activations`' one table.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..kernels.activations import ACTIVATIONS, NO_ACTIVATION
from . import files
from .files import HypernetworkFileError

__all__ = [
    "ACTIVATIONS",
    "WEIGHT_INITS",
    "AffineMap",
    "Architecture",
    "Hypernetwork",
    "HypernetworkFileError",
    "HypernetworkModule",
    "compose_affine",
    "fold_into",
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
DEFAULT_LAYER_STRUCTURE = (1, 2, 1)
_ROLES = ("k", "v")


class AffineMap(NamedTuple):
    """``net(x) = x @ matrix.T + bias``."""

    matrix: Tensor
    bias: Tensor


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


# Folding: affine modules composed, then folded into a projection


def compose_affine(steps: Sequence[tuple[HypernetworkModule, float]], dtype: torch.dtype) -> AffineMap:
    """``(D, c)`` with ``h_n(...h_1(x)) = x + x @ D.T + c``, for affine modules applied in
    order, each ``h(x) = x + s net(x)`` with its strength ``s``; computed in ``dtype``.

    Applying ``h(x) = x + s (x A^T + b)`` after ``x + x D^T + c`` gives
    ``D <- D + s A (I + D)`` and ``c <- c + s (A c + b)``.
    """
    width = steps[0][0].width
    delta = torch.zeros(width, width, dtype=dtype, device=steps[0][0].net[0].weight.device)
    shift = delta.new_zeros(width)
    for module, strength in steps:
        matrix, bias = module.affine_map(dtype)
        delta = delta + strength * (matrix + matrix @ delta)
        shift = shift + strength * (matrix @ shift + bias)
    return AffineMap(delta, shift)


def fold_into(linear: nn.Linear, composed: AffineMap) -> tuple[Tensor, Tensor]:
    """Weight and bias of ``x -> linear(x + x @ D.T + c)``, in ``linear``'s dtype."""
    weight = linear.weight
    dtype = torch.promote_types(weight.dtype, composed.matrix.dtype)
    projection = weight.to(dtype)
    # W + W D rather than W (I + D): the small term is rounded on its own scale.
    folded_weight = projection + projection @ composed.matrix.to(dtype)
    folded_bias = projection @ composed.bias.to(dtype)
    if linear.bias is not None:
        folded_bias = folded_bias + linear.bias.to(dtype)
    return folded_weight.to(weight.dtype), folded_bias.to(weight.dtype)


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

    # Files (:mod:`.files`)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Hypernetwork:
        """Load a web UI ``.pt``, NovelAI ``.pt`` or ``.safetensors`` hypernetwork.

        Raises:
            HypernetworkFileError: the file is malformed, unreadable, or would
                need arbitrary code execution to unpickle (refused, not run).
        """
        return files.load(cls, path)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Save as ``.pt`` (the web UI's format, which it loads) or ``.safetensors``, by suffix."""
        files.save(self, path)
