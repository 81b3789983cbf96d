"""What the hypernetwork processors reuse: tensors recognised by identity, contexts by value, and
each cross-attention layer's K/V cache.

- :class:`Identity`: a tensor as it was when seen. Only the same object, not moved or modified
  in place since, matches: a weak reference (a freed tensor whose id and memory are reused
  never matches), the data pointer, autograd's version counter, shape, dtype and device.
- :class:`ContextTracker`: the table of one U-Net forward's contexts, keyed by identity, each
  with the module outputs computed from it (one module call per context per forward). At
  inference a context is also recognised across forwards by its *values*: the first sight of
  a tensor in a forward is compared with ``torch.equal`` against a private copy of each
  remembered context (same object, unmodified: no comparison needed). Samplers that
  ``torch.cat`` the negative and positive contexts at every step make a new tensor with the
  same values each step, which identity alone would miss; a hash would cost the same full
  read and could collide, and ``torch.equal`` reads the context (2 x 231 x 768 values for
  SD 1.x with CFG) once per forward, next to a U-Net that reads a thousand times more.
- :class:`Recipe`: what a cached result was computed from: the strengths, and every tensor
  read, as identities. A weight is "changed" when its tensor is replaced or moved, or
  modified in place as autograd's version counter sees it: optimizer steps and
  ``load_state_dict`` are; ``param.data.add_()`` is not, nor anything done to tensors
  created under ``torch.inference_mode``.
- :class:`KeyValueCache`: one cross-attention layer's K and V for the last
  :data:`CONTEXTS_REMEMBERED` contexts (46 MB a context for SD 1.x in float32, CFG batch,
  231 tokens).

When reuse is allowed at all is the processors' decision (:mod:`.processors`).
"""

from __future__ import annotations

import itertools
import weakref
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from .modules import HypernetworkModule

if TYPE_CHECKING:
    from diffusers.models.attention_processor import Attention

__all__ = ["CONTEXTS_REMEMBERED", "ContextEntry", "ContextTracker", "Identity", "KeyValueCache", "Pair", "Recipe"]

# Contexts recognised across forwards, and K/V pairs each cross-attention layer keeps: 2 covers
# samplers that run the negative and positive prompts as separate batches.
CONTEXTS_REMEMBERED = 2


def _version(tensor: Tensor) -> int | None:
    """Autograd's count of in-place changes; None for inference tensors, which keep none."""
    return None if tensor.is_inference() else tensor._version


class Identity(NamedTuple):
    """A tensor as it was when seen: only the same object, not moved or modified in place since,
    matches (a weak reference, so a freed tensor whose id and memory are reused never does)."""

    ref: weakref.ReferenceType[Tensor]
    data_ptr: int
    version: int | None
    shape: torch.Size
    dtype: torch.dtype
    device: torch.device

    @classmethod
    def of(cls, tensor: Tensor) -> Identity:
        return cls(weakref.ref(tensor), tensor.data_ptr(), _version(tensor), tensor.shape, tensor.dtype, tensor.device)

    def matches(self, tensor: Tensor) -> bool:
        return (
            self.ref() is tensor
            and self.data_ptr == tensor.data_ptr()
            and self.version == _version(tensor)
            and (self.shape, self.dtype, self.device) == (tensor.shape, tensor.dtype, tensor.device)
        )


@dataclass
class ContextEntry:
    """What one forward knows about one context: a token shared by every context with the same
    values (at inference), and the module outputs computed from it, with how they were computed."""

    token: int
    module_outputs: list[tuple[Recipe, bool, tuple[Tensor, Tensor]]] = field(default_factory=list)


class _RememberedContext(NamedTuple):
    identity: Identity
    values: Tensor  # a private copy: the caller may change or free the original
    token: int

    def has_values_of(self, tensor: Tensor) -> bool:
        values = self.values
        return (values.shape, values.dtype, values.device) == (tensor.shape, tensor.dtype, tensor.device) and bool(
            torch.equal(values, tensor)
        )


class ContextTracker:
    """Tells the contexts of a forward apart, and recognises known values across forwards."""

    def __init__(self) -> None:
        self._tokens = itertools.count()
        self._this_forward: deque[tuple[Identity, ContextEntry]] = deque(maxlen=CONTEXTS_REMEMBERED)
        self._remembered: deque[_RememberedContext] = deque(maxlen=CONTEXTS_REMEMBERED)

    def start_forward(self) -> None:
        self._this_forward.clear()

    def entry(self, context: Tensor, by_value: bool) -> ContextEntry:
        """``context``'s entry in this forward. With ``by_value``, its token is that of a
        remembered context with the same values, if any; otherwise the token is new."""
        for identity, entry in self._this_forward:
            if identity.matches(context):
                return entry
        entry = ContextEntry(self._token_by_value(context) if by_value else next(self._tokens))
        self._this_forward.append((Identity.of(context), entry))
        return entry

    def _token_by_value(self, context: Tensor) -> int:
        for remembered in self._remembered:
            if remembered.identity.matches(context) or remembered.has_values_of(context):
                return remembered.token
        token = next(self._tokens)
        self._remembered.append(_RememberedContext(Identity.of(context), context.detach().clone(), token))
        return token


class Pair(NamedTuple):
    """The modules one hypernetwork applies at one width, and its strength in this call."""

    k: HypernetworkModule
    v: HypernetworkModule
    strength: float


class Recipe(NamedTuple):
    """What a cached result was computed from: the strengths, and every tensor it read (the
    modules' parameters, and those of ``to_k``/``to_v`` when given) as it was then."""

    strengths: tuple[float, ...]
    tensors: tuple[Identity, ...]

    @classmethod
    def of(cls, pairs: Sequence[Pair], attn: Attention | None = None) -> Recipe:
        return cls(tuple(pair.strength for pair in pairs), tuple(map(Identity.of, _tensors_read(pairs, attn))))

    def matches(self, pairs: Sequence[Pair], attn: Attention | None = None) -> bool:
        tensors = _tensors_read(pairs, attn)
        return (
            self.strengths == tuple(pair.strength for pair in pairs)
            and len(self.tensors) == len(tensors)
            and all(identity.matches(tensor) for identity, tensor in zip(self.tensors, tensors))
        )


def _tensors_read(pairs: Sequence[Pair], attn: Attention | None) -> list[Tensor]:
    tensors = [tensor for pair in pairs for module in (pair.k, pair.v) for tensor in module.parameters()]
    if attn is not None:
        projections = (attn.to_k.weight, attn.to_k.bias, attn.to_v.weight, attn.to_v.bias)
        tensors += [tensor for tensor in projections if tensor is not None]
    return tensors


class KeyValueCache:
    """One cross-attention layer's K and V for the last :data:`CONTEXTS_REMEMBERED` contexts,
    by context token (:attr:`ContextEntry.token`), each with the recipe it was computed from."""

    def __init__(self) -> None:
        # context token -> (recipe, key, value), the most recent last
        self._entries: OrderedDict[int, tuple[Recipe, Tensor, Tensor]] = OrderedDict()

    def __len__(self) -> int:
        """Contexts whose K and V are kept."""
        return len(self._entries)

    def get(self, token: int, pairs: Sequence[Pair], attn: Attention) -> tuple[Tensor, Tensor] | None:
        """The K and V kept for ``token``, if computed from ``pairs`` and ``attn``'s projections as they are now."""
        cached = self._entries.get(token)
        if cached is not None and cached[0].matches(pairs, attn):
            return cached[1], cached[2]
        return None

    def put(self, token: int, pairs: Sequence[Pair], attn: Attention, key: Tensor, value: Tensor) -> None:
        """Keep ``key`` and ``value`` for ``token``, forgetting the oldest context beyond the limit."""
        self._entries[token] = (Recipe.of(pairs, attn), key, value)
        self._entries.move_to_end(token)
        if len(self._entries) > CONTEXTS_REMEMBERED:
            self._entries.popitem(last=False)
