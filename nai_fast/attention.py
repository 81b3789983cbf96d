"""Hypernetworks on a diffusers U-Net, as attention processors, doing each piece of work once.

:func:`apply_hypernetworks` installs a :class:`HypernetworkAttnProcessor` on every
attention layer of a ``UNet2DConditionModel``. The processor is diffusers'
``AttnProcessor2_0`` (spatial and group norm, masks, residual connection and
``rescale_output_factor`` kept as they are) except for the inputs of ``to_k`` and
``to_v``: with ``x`` the layer's k/v input (the text context in cross-attention,
the layer's own hidden states in self-attention),

    key = to_k(h_k(x)),  value = to_v(h_v(x)),  h(x) = x + strength * net(x),

where ``(h_k, h_v)`` is the module pair for ``x``'s width (a width a hypernetwork
lacks leaves the layer alone, as in the web UI). Several hypernetworks compose in
order, each with its own strength, as the web UI's ``apply_hypernetworks`` does:
``h_k = h2_k o h1_k`` and ``h_v = h2_v o h1_v``. Queries are never touched.

Strength per call: pass ``cross_attention_kwargs={"hypernetwork_strength": s}``
(:data:`STRENGTH_KWARG`) to the U-Net or the pipeline; ``s`` is one number for
every hypernetwork or a sequence with one per hypernetwork. Without it, the
strengths given to :func:`apply_hypernetworks` apply. A strength of 0 skips the
module, so the layer computes exactly what stock diffusers computes.

Work done once, where the web UI redoes it in every layer at every step:

1. **One module call per context per forward.** All cross-attention layers of a
   U-Net forward get the same context tensor; one module output is shared by all
   of them (autograd included) through a table keyed by the tensor's identity (a
   weak reference, so a freed tensor never matches), version counter, data
   pointer, shape, dtype and device. A forward pre-hook on the U-Net clears the
   table, so nothing is shared across forwards. With gradients enabled the hook
   also computes the shared outputs, before any block runs, so that a
   gradient-checkpointed block recomputes exactly the operations it first ran.
2. **Cross-attention K and V once per generation** (inference only). Each
   cross-attention layer keeps its K and V for the last two contexts (46 MB a
   context for SD 1.x in float32, CFG batch, 231 tokens). A context
   is recognised across forwards by its *values*: the first sight of a tensor in
   a forward is compared with ``torch.equal`` against a private copy of each
   remembered context (same object, unmodified: no comparison needed). Samplers
   that ``torch.cat`` the negative and positive contexts at every step make a
   new tensor with the same values each step, which identity alone would miss;
   a hash would cost the same full read and could collide, and ``torch.equal``
   reads the context (2 x 231 x 768 values for SD 1.x with CFG) once per
   forward, next to a U-Net that reads a thousand times more. K and V are
   recomputed when the context's values, a strength, a hypernetwork's weights
   or ``to_k``/``to_v``'s weights change (a weight is "changed" when its tensor
   is replaced or moved, or modified in place as autograd's version counter
   sees it: optimizer steps and ``load_state_dict`` are; ``param.data.add_()``
   is not, nor anything done to tensors created under ``torch.inference_mode``).
3. **Folding** (inference only). In self-attention the k/v input is new at every
   layer and step, so a module cannot be shared; but an affine module (only
   Linears and inactive Dropouts) folds into the projection:
   ``to_k(x + s (x A^T + b)) = x (W (I + s A))^T + (s W b + bias)``, several
   hypernetworks first composing into one affine map. The composed map is built
   once per width and strength set, the folded weights once per layer; they
   live in the processor (100 MB for SD 1.x in float32), so ``to_k``/``to_v``'s own
   parameters are never written: a saved or trained U-Net never sees folded
   weights, and removal has nothing to restore. Cross-attention layers are not
   folded: computing ``h(context)`` once is cheaper than folding it into 16
   projections, and their K and V are cached anyway.

Reuse across forwards (2 and 3) happens only when gradients are disabled, every
module in use is in eval mode (``Hypernetwork.eval()``, so Dropout is off) and
``to_k``/``to_v`` are bare ``nn.Linear`` (no LoRA wrapper, hook or patched
``forward``, whose effect the cache could not see). Otherwise every forward
recomputes; within a forward, sharing (1) always holds, also while training:
all cross-attention layers then see one Dropout sample of each module, as if
the hypernetwork had rewritten the context once.

Fused kernels (:mod:`nai_fast.kernels`), where ``NAI_FAST_KERNELS`` asks for them (on CUDA
tensors by default): a self-attention layer whose k/v input one two-Linear hypernetwork
rewrites computes its K and V with ``hyper_kv`` (module and projection in two GEMM kernels),
and a cross-attention layer over a prompt of up to 4 chunks attends with
``cross_attention``; elsewhere the eager path above runs (modules, ``to_k``/``to_v``, SDPA),
with a logged reason where a structure cannot fuse (LayerNorm, deeper nets, Dropout while
training, several hypernetworks at one width). Under ``auto`` each op runs only where the
GPU class's measurements, or for a class never measured the cost model, say it is faster
(:mod:`nai_fast.kernels.policy`); ``triton``
forces them, which is how ``tests/test_kernel_unet.py`` checks a training step against the
eager processors under Triton's interpreter. The shallow-layer penalty of a fused layer is
measured with one extra module call on the detached input, as it is wherever that input
carries a graph.

Training: the processors call the modules, so gradients reach the hypernetwork
(freeze the U-Net yourself). NovelAI penalised the shallow layers when training
hypernetworks and published no code; our interpretation is a regulariser on the
residual each module adds, weighted per width: every module call in a forward
run with gradients enabled adds ``penalty_weights[width] *
mean((strength * net(x.detach())) ** 2)``: the mean over elements of the squared
norm, so a weight does not depend on batch, resolution or token count; a shared
cross-attention call counts once. ``x`` is detached so the penalty's gradient
reaches only the penalised modules, not the modules upstream that shaped their
input; where ``x`` carries a graph this costs one more module forward.
:func:`hypernetwork_penalty` returns the sum after the forward; by default only
width 320, the shallowest blocks of SD 1.x, is penalised
(:data:`DEFAULT_PENALTY_WEIGHTS`).
"""

from __future__ import annotations

import inspect
import itertools
import logging
import math
import weakref
from collections import OrderedDict, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from numbers import Real
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import kernels
from .hypernetwork import AffineMap, Hypernetwork, HypernetworkModule
from .kernels import MLP, kernel_mode, kernels_requested
from .kernels.hyper_kv import structure_not_supported_reasons
from .kernels.policy import use_cross_attention, use_hyper_kv

if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import Attention

__all__ = [
    "DEFAULT_PENALTY_WEIGHTS",
    "STRENGTH_KWARG",
    "HypernetworkAttnProcessor",
    "apply_hypernetworks",
    "hypernetwork_penalty",
    "installed_hypernetworks",
    "remove_hypernetworks",
]

STRENGTH_KWARG = "hypernetwork_strength"
DEFAULT_PENALTY_WEIGHTS: Mapping[int, float] = MappingProxyType({320: 1.0})
Strengths = float | Sequence[float]

_INSTALLED = "_nai_fast_hypernetworks"  # the U-Net attribute holding what apply_hypernetworks installed
# Contexts recognised across forwards, and K/V pairs each cross-attention layer keeps: 2 covers
# samplers that run the negative and positive prompts as separate batches.
_CONTEXTS_REMEMBERED = 2
# Prompts of 1 to 4 chunks: the key sets the fused cross_attention op is built for (its K and
# V stay on chip); longer contexts go to PyTorch's SDPA.
FUSED_ATTENTION_MAX_KEYS = 4 * 77

logger = logging.getLogger(__name__)


def apply_hypernetworks(
    unet: UNet2DConditionModel,
    hypernetworks: Hypernetwork | Sequence[Hypernetwork],
    strengths: Strengths | None = None,
    penalty_weights: Mapping[int, float] = DEFAULT_PENALTY_WEIGHTS,
) -> None:
    """Install processors applying ``hypernetworks`` on every attention layer of ``unet``.

    Args:
        unet: a diffusers ``UNet2DConditionModel``; its current processors are kept
            and come back with :func:`remove_hypernetworks`.
        hypernetworks: one, or several applied in order (``h2(h1(x))``). They must sit
            on the U-Net's device; they may keep float32 weights under a half-precision
            U-Net (the modules run in their own dtype).
        strengths: the default strength, one for all or one per hypernetwork (1.0).
        penalty_weights: width -> weight of the training penalty (see the module doc).

    Applying again replaces the previous set.
    """
    remove_hypernetworks(unet)
    hypernetworks = (hypernetworks,) if isinstance(hypernetworks, Hypernetwork) else tuple(hypernetworks)
    if not all(isinstance(hypernetwork, Hypernetwork) for hypernetwork in hypernetworks):
        raise TypeError("hypernetworks must be a Hypernetwork or a sequence of them")
    if not all(math.isfinite(weight) and weight >= 0 for weight in penalty_weights.values()):
        raise ValueError(f"penalty weights must be finite and non-negative, got {dict(penalty_weights)}")
    installed = _Installed(
        hypernetworks=hypernetworks,
        default_strengths=_parse_strengths(1.0 if strengths is None else strengths, len(hypernetworks)),
        penalty_weights=dict(penalty_weights),
        original_processors=unet.attn_processors,
        layers_see_the_context=getattr(unet, "encoder_hid_proj", None) is None
        and not any(getattr(module, "norm_cross", None) for module in unet.modules()),
    )
    installed.hook = unet.register_forward_pre_hook(installed.start_forward, with_kwargs=True)
    unet.set_attn_processor({name: HypernetworkAttnProcessor(installed) for name in installed.original_processors})
    setattr(unet, _INSTALLED, installed)


def remove_hypernetworks(unet: UNet2DConditionModel) -> None:
    """Put back the processors ``unet`` had before :func:`apply_hypernetworks` (no-op if none)."""
    installed = getattr(unet, _INSTALLED, None)
    if installed is None:
        return
    unet.set_attn_processor(installed.original_processors)
    installed.hook.remove()
    delattr(unet, _INSTALLED)


def installed_hypernetworks(unet: UNet2DConditionModel) -> list[tuple[Hypernetwork, float]]:
    """The hypernetworks :func:`apply_hypernetworks` put on ``unet``, in order, each with its
    default strength (empty if none)."""
    installed = getattr(unet, _INSTALLED, None)
    return [] if installed is None else list(zip(installed.hypernetworks, installed.default_strengths))


def hypernetwork_penalty(unet: UNet2DConditionModel) -> Tensor:
    """The shallow-layer penalty of ``unet``'s last forward: a differentiable scalar, to add
    to the loss (zero when no penalised module ran with gradients enabled)."""
    installed = getattr(unet, _INSTALLED, None)
    if installed is None:
        raise ValueError("no hypernetworks are applied to this U-Net")
    return installed.penalty if installed.penalty is not None else torch.zeros((), device=unet.device)


def _parse_strengths(strengths: Strengths, count: int) -> tuple[float, ...]:
    """One finite strength per hypernetwork, from one number or a sequence of ``count``."""
    if isinstance(strengths, Real):
        values = (float(strengths),) * count
    else:
        values = tuple(float(strength) for strength in strengths)
        if len(values) != count:
            raise ValueError(f"{len(values)} strengths given for {count} hypernetworks")
    if not all(math.isfinite(value) for value in values):
        raise ValueError(f"strengths must be finite, got {list(values)}")
    return values


# Recognising tensors


def _version(tensor: Tensor) -> int | None:
    """Autograd's count of in-place changes; None for inference tensors, which keep none."""
    return None if tensor.is_inference() else tensor._version


class _Identity(NamedTuple):
    """A tensor as it was when seen: only the same object, not moved or modified in place since,
    matches (a weak reference, so a freed tensor whose id and memory are reused never does)."""

    ref: weakref.ReferenceType[Tensor]
    data_ptr: int
    version: int | None
    shape: torch.Size
    dtype: torch.dtype
    device: torch.device

    @classmethod
    def of(cls, tensor: Tensor) -> _Identity:
        return cls(weakref.ref(tensor), tensor.data_ptr(), _version(tensor), tensor.shape, tensor.dtype, tensor.device)

    def matches(self, tensor: Tensor) -> bool:
        return (
            self.ref() is tensor
            and self.data_ptr == tensor.data_ptr()
            and self.version == _version(tensor)
            and (self.shape, self.dtype, self.device) == (tensor.shape, tensor.dtype, tensor.device)
        )


@dataclass
class _ContextEntry:
    """What one forward knows about one context: a token shared by every context with the same
    values (at inference), and the module outputs computed from it, with how they were computed."""

    token: int
    module_outputs: list[tuple[_Recipe, bool, tuple[Tensor, Tensor]]] = field(default_factory=list)


class _RememberedContext(NamedTuple):
    identity: _Identity
    values: Tensor  # a private copy: the caller may change or free the original
    token: int

    def has_values_of(self, tensor: Tensor) -> bool:
        values = self.values
        return (values.shape, values.dtype, values.device) == (tensor.shape, tensor.dtype, tensor.device) and bool(
            torch.equal(values, tensor)
        )


class _ContextTracker:
    """Tells the contexts of a forward apart, and recognises known values across forwards."""

    def __init__(self) -> None:
        self._tokens = itertools.count()
        self._this_forward: deque[tuple[_Identity, _ContextEntry]] = deque(maxlen=_CONTEXTS_REMEMBERED)
        self._remembered: deque[_RememberedContext] = deque(maxlen=_CONTEXTS_REMEMBERED)

    def start_forward(self) -> None:
        self._this_forward.clear()

    def entry(self, context: Tensor, by_value: bool) -> _ContextEntry:
        """``context``'s entry in this forward. With ``by_value``, its token is that of a
        remembered context with the same values, if any; otherwise the token is new."""
        for identity, entry in self._this_forward:
            if identity.matches(context):
                return entry
        entry = _ContextEntry(self._token_by_value(context) if by_value else next(self._tokens))
        self._this_forward.append((_Identity.of(context), entry))
        return entry

    def _token_by_value(self, context: Tensor) -> int:
        for remembered in self._remembered:
            if remembered.identity.matches(context) or remembered.has_values_of(context):
                return remembered.token
        token = next(self._tokens)
        self._remembered.append(_RememberedContext(_Identity.of(context), context.detach().clone(), token))
        return token


# What apply_hypernetworks installs


class _Pair(NamedTuple):
    """The modules one hypernetwork applies at one width, and its strength in this call."""

    k: HypernetworkModule
    v: HypernetworkModule
    strength: float


class _Recipe(NamedTuple):
    """What a cached result was computed from: the strengths, and every tensor it read (the
    modules' parameters, and those of ``to_k``/``to_v`` when given) as it was then."""

    strengths: tuple[float, ...]
    tensors: tuple[_Identity, ...]

    @classmethod
    def of(cls, pairs: Sequence[_Pair], attn: Attention | None = None) -> _Recipe:
        return cls(tuple(pair.strength for pair in pairs), tuple(map(_Identity.of, _tensors_read(pairs, attn))))

    def matches(self, pairs: Sequence[_Pair], attn: Attention | None = None) -> bool:
        tensors = _tensors_read(pairs, attn)
        return (
            self.strengths == tuple(pair.strength for pair in pairs)
            and len(self.tensors) == len(tensors)
            and all(identity.matches(tensor) for identity, tensor in zip(self.tensors, tensors))
        )


def _tensors_read(pairs: Sequence[_Pair], attn: Attention | None) -> list[Tensor]:
    tensors = [tensor for pair in pairs for module in (pair.k, pair.v) for tensor in module.parameters()]
    if attn is not None:
        projections = (attn.to_k.weight, attn.to_k.bias, attn.to_v.weight, attn.to_v.bias)
        tensors += [tensor for tensor in projections if tensor is not None]
    return tensors


def _compose_affine(pairs: Sequence[_Pair], dtype: torch.dtype) -> tuple[AffineMap, AffineMap]:
    """For k and v, ``(D, c)`` with ``h_n(...h_1(x)) = x + x @ D.T + c``, all modules affine.

    Applying ``h(x) = x + s (x A^T + b)`` after ``x + x D^T + c`` gives
    ``D <- D + s A (I + D)`` and ``c <- c + s (A c + b)``.
    """
    composed = []
    for role in ("k", "v"):
        width = getattr(pairs[0], role).width
        delta = torch.zeros(width, width, dtype=dtype, device=pairs[0].k.net[0].weight.device)
        shift = delta.new_zeros(width)
        for pair in pairs:
            matrix, bias = getattr(pair, role).affine_map(dtype)
            delta = delta + pair.strength * (matrix + matrix @ delta)
            shift = shift + pair.strength * (matrix @ shift + bias)
        composed.append(AffineMap(delta, shift))
    return composed[0], composed[1]


def _fold(linear: nn.Linear, composed: AffineMap) -> tuple[Tensor, Tensor]:
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


def _is_bare_linear(module: nn.Module) -> bool:
    """A plain ``nn.Linear`` whose call computes only ``F.linear(x, weight, bias)``."""
    return (
        type(module) is nn.Linear
        and not module._forward_hooks
        and not module._forward_pre_hooks
        and "forward" not in vars(module)
    )


def _hyper_kv_reasons(attn: Attention, x: Tensor, pairs: Sequence[_Pair]) -> list[str]:
    """Why the fused ``hyper_kv`` op cannot compute this layer's keys and values (empty: it can)."""
    if len(pairs) != 1:
        return [f"{len(pairs)} hypernetworks compose at width {x.shape[-1]}; the op fuses one"]
    if not (_is_bare_linear(attn.to_k) and _is_bare_linear(attn.to_v)):
        return ["to_k or to_v is not a bare nn.Linear (a LoRA wrapper or hook would be skipped)"]
    module = pairs[0].k
    architecture = module.architecture
    reasons = structure_not_supported_reasons(
        architecture.activation,
        len(architecture.layer_structure) - 1,
        layer_norm=architecture.layer_norm,
        dropout_active=module.training and any(p > 0 for p in architecture.dropout_structure),
        activate_output=architecture.activate_output,
    )
    module_dtype = module.net[0].weight.dtype
    if module_dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
        reasons.append(f"the hypernetwork is {module_dtype} and the layer {x.dtype} (eager runs each in its own)")
    return reasons


def _hyper_kv_pays(attn: Attention, x: Tensor, pair: _Pair, dtype: torch.dtype) -> bool:
    """Whether the fused op should compute this layer's K and V: always when forced, else where
    this GPU class's measurements, or for a class never measured the cost model, say it is
    faster (:mod:`nai_fast.kernels.policy`)."""
    if kernel_mode() == "triton":
        return True
    tokens, width = x.numel() // x.shape[-1], x.shape[-1]
    hidden_width = pair.k.net[0].out_features
    backward = torch.is_grad_enabled()
    return use_hyper_kv(
        tokens, width, hidden_width, attn.to_k.out_features, dtype.itemsize, pair.k.architecture.activation,
        backward, x.device,
    )  # fmt: skip


def _cross_attention_pays(query: Tensor, key: Tensor) -> bool:
    """Whether the fused op should run this cross-attention (see :func:`_hyper_kv_pays`)."""
    if kernel_mode() == "triton":
        return True
    batch, heads, query_length, head_dim = query.shape
    backward = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad)
    return use_cross_attention(
        batch, heads, query_length, key.shape[2], head_dim, query.dtype.itemsize, backward, query.device
    )


@cache
def _log_eager_key_value(reasons: str) -> None:
    logger.warning("hypernetwork k/v run eagerly, not through the fused hyper_kv op: %s", reasons)


def _mlp(module: HypernetworkModule, dtype: torch.dtype) -> MLP:
    first, second = (layer for layer in module.net if isinstance(layer, nn.Linear))
    return MLP(first.weight.to(dtype), first.bias.to(dtype), second.weight.to(dtype), second.bias.to(dtype))


def _cast(tensor: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if tensor is None else tensor.to(dtype)


@dataclass
class _Installed:
    """The hypernetworks on one U-Net and the state its processors share."""

    hypernetworks: tuple[Hypernetwork, ...]
    default_strengths: tuple[float, ...]
    penalty_weights: dict[int, float]
    original_processors: dict[str, Any]
    layers_see_the_context: bool  # the U-Net hands encoder_hidden_states to its layers unchanged
    hook: torch.utils.hooks.RemovableHandle | None = None
    contexts: _ContextTracker = field(default_factory=_ContextTracker)
    penalty: Tensor | None = None
    # width -> the composed k and v maps for folding, and their recipe
    _composed: dict[int, tuple[_Recipe, tuple[AffineMap, AffineMap]]] = field(default_factory=dict)

    def start_forward(self, unet: nn.Module, args: tuple[object, ...], kwargs: dict[str, Any]) -> None:
        """The U-Net's forward pre-hook: a new forward shares nothing with the last one.

        With gradients enabled, the context's module outputs are computed here, outside
        the U-Net's blocks: a gradient-checkpointed block must recompute the very operations
        it ran the first time, which it would not if its first run had computed them for
        the blocks after it.
        """
        self.contexts.start_forward()
        self.penalty = None
        if not (torch.is_grad_enabled() and self.layers_see_the_context):
            return
        arguments = inspect.signature(unet.forward).bind_partial(*args, **kwargs).arguments
        context = arguments.get("encoder_hidden_states")
        if context is None:
            return
        requested = (arguments.get("cross_attention_kwargs") or {}).get(STRENGTH_KWARG)
        pairs = self.active_pairs(context.shape[-1], self.strengths(requested))
        if pairs:
            self.run_shared(self.contexts.entry(context, by_value=False), context, pairs)

    def strengths(self, requested: Strengths | None) -> tuple[float, ...]:
        if requested is None:
            return self.default_strengths
        return _parse_strengths(requested, len(self.hypernetworks))

    def active_pairs(self, width: int, strengths: tuple[float, ...]) -> list[_Pair]:
        """The module pairs to apply, in order, to a k/v input of ``width`` features."""
        pairs = []
        for hypernetwork, strength in zip(self.hypernetworks, strengths):
            modules = hypernetwork.modules_for(width)
            if modules is not None and strength != 0:
                pairs.append(_Pair(*modules, strength))
        return pairs

    @staticmethod
    def reuse_allowed(pairs: Sequence[_Pair]) -> bool:
        """Whether results may outlive the forward: no gradients, no active Dropout."""
        return not torch.is_grad_enabled() and not any(pair.k.training or pair.v.training for pair in pairs)

    def run(self, x: Tensor, pairs: Sequence[_Pair]) -> tuple[Tensor, Tensor]:
        """The inputs of ``to_k`` and ``to_v``: each pair's modules applied to ``x`` in turn."""
        k_input = v_input = x
        for pair in pairs:
            k_input = self._apply_module(pair.k, k_input, pair.strength)
            v_input = self._apply_module(pair.v, v_input, pair.strength)
        return k_input, v_input

    def run_shared(self, entry: _ContextEntry, x: Tensor, pairs: Sequence[_Pair]) -> tuple[Tensor, Tensor]:
        """:meth:`run`, computed once per forward for the context ``entry`` describes."""
        # Outputs computed without gradients never serve a pass that needs them.
        grad_enabled = torch.is_grad_enabled()
        for recipe, computed_with_grad, outputs in entry.module_outputs:
            if computed_with_grad == grad_enabled and recipe.matches(pairs):
                return outputs
        outputs = self.run(x, pairs)
        entry.module_outputs.append((_Recipe.of(pairs), grad_enabled, outputs))
        return outputs

    def _apply_module(self, module: HypernetworkModule, x: Tensor, strength: float) -> Tensor:
        # module.forward, in the module's own dtype, adding to the penalty where it applies.
        residual = strength * module.net(x.to(module.net[0].weight.dtype))
        self.add_penalty(module, x, strength, residual=None if x.requires_grad else residual)
        return x + residual.to(x.dtype)

    def add_penalty(self, module: HypernetworkModule, x: Tensor, strength: float, residual: Tensor | None = None) -> None:
        """Add ``module``'s penalty term for its input ``x``, where one applies.

        The penalty is the module's own: its gradient must not reach the modules upstream
        that made ``x``, so it is measured on a detached ``x``. ``residual``, the module's
        ``strength * net(x)`` where ``x`` has no graph, saves recomputing it.
        """
        penalty_weight = self.penalty_weights.get(module.width, 0.0)
        if not (penalty_weight and torch.is_grad_enabled()):
            return
        if residual is None:
            residual = strength * module.net(x.detach().to(module.net[0].weight.dtype))
        term = penalty_weight * residual.float().square().mean()
        self.penalty = term if self.penalty is None else self.penalty + term

    def composed(self, width: int, pairs: Sequence[_Pair]) -> tuple[AffineMap, AffineMap]:
        """The affine pairs' composed maps for k and v, built once per width, weights and strengths."""
        cached = self._composed.get(width)
        if cached is None or not cached[0].matches(pairs):
            dtype = torch.promote_types(pairs[0].k.net[0].weight.dtype, torch.float32)
            cached = self._composed[width] = (_Recipe.of(pairs), _compose_affine(pairs, dtype))
        return cached[1]


# The processor


class HypernetworkAttnProcessor:
    """diffusers' ``AttnProcessor2_0`` with hypernetworks on the k/v inputs (see the module doc).

    Installed by :func:`apply_hypernetworks`, one per attention layer, sharing one
    U-Net's state. The k/v step (:meth:`key_value`) and the attention step
    (:meth:`attention`) are separate methods so fused kernels can replace either.
    """

    def __init__(self, installed: _Installed) -> None:
        self._installed = installed
        # context token -> (recipe, key, value), the most recent last
        self._cached_key_values: OrderedDict[int, tuple[_Recipe, Tensor, Tensor]] = OrderedDict()
        self._folded: tuple[_Recipe, tuple[Tensor, Tensor], tuple[Tensor, Tensor]] | None = None

    def __call__(
        self,
        attn: Attention,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
        hypernetwork_strength: Strengths | None = None,
    ) -> Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        is_cross_attention = encoder_hidden_states is not None
        batch_size, sequence_length, _ = (encoder_hidden_states if is_cross_attention else hidden_states).shape

        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            # scaled_dot_product_attention expects (batch, heads, source_length, target_length)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)

        if not is_cross_attention:
            key_value_input = hidden_states
        elif attn.norm_cross:
            key_value_input = attn.norm_encoder_hidden_states(encoder_hidden_states)
        else:
            key_value_input = encoder_hidden_states

        strengths = self._installed.strengths(hypernetwork_strength)
        key, value = self.key_value(attn, key_value_input, is_cross_attention, strengths)
        hidden_states = self.attention(attn, query, key, value, attention_mask)

        hidden_states = attn.to_out[0](hidden_states)  # linear projection
        hidden_states = attn.to_out[1](hidden_states)  # dropout

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def key_value(
        self, attn: Attention, x: Tensor, is_cross_attention: bool, strengths: tuple[float, ...]
    ) -> tuple[Tensor, Tensor]:
        """``to_k(h_k(x))`` and ``to_v(h_v(x))`` for the layer's k/v input ``x``, reusing what
        may be reused."""
        installed = self._installed
        pairs = installed.active_pairs(x.shape[-1], strengths)
        reusable = (
            installed.reuse_allowed(pairs) and _is_bare_linear(attn.to_k) and _is_bare_linear(attn.to_v)
        )
        if is_cross_attention:
            return self._cross_attention_key_value(attn, x, pairs, reusable)
        if not pairs:
            return attn.to_k(x), attn.to_v(x)
        if reusable and all(pair.k.is_affine and pair.v.is_affine for pair in pairs):
            (k_weight, k_bias), (v_weight, v_bias) = self._folded_projections(attn, x.shape[-1], pairs)
            return F.linear(x, k_weight, k_bias), F.linear(x, v_weight, v_bias)
        if kernels_requested(x.device):
            fused = self._fused_key_value(attn, x, pairs)
            if fused is not None:
                return fused
        k_input, v_input = installed.run(x, pairs)
        return attn.to_k(k_input), attn.to_v(v_input)

    def attention(
        self, attn: Attention, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None
    ) -> Tensor:
        """Multi-head scaled dot-product attention, heads merged back: ``[batch, tokens, inner]``."""
        batch_size = query.shape[0]
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if (
            attn.is_cross_attention
            and attention_mask is None
            and key.shape[2] <= FUSED_ATTENTION_MAX_KEYS
            and kernels_requested(query.device)
            and _cross_attention_pays(query, key)
        ):
            hidden_states = kernels.cross_attention(query, key, value)
        else:
            hidden_states = F.scaled_dot_product_attention(
                query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
            )
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        return hidden_states.to(query.dtype)

    def _fused_key_value(self, attn: Attention, x: Tensor, pairs: list[_Pair]) -> tuple[Tensor, Tensor] | None:
        """Self-attention's keys and values through the fused ``hyper_kv`` op; None (the reason
        logged once) where it cannot take this layer's modules."""
        reasons = _hyper_kv_reasons(attn, x, pairs)
        if reasons:
            _log_eager_key_value("; ".join(reasons))
            return None
        (pair,) = pairs
        # Under autocast the op runs in autocast's dtype, as the Linears it replaces would.
        device_type = x.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
        if not _hyper_kv_pays(attn, x, pair, dtype):
            return None
        key, value = kernels.hyper_kv(
            x.to(dtype), attn.to_k.weight.to(dtype), attn.to_v.weight.to(dtype), _mlp(pair.k, dtype),
            _mlp(pair.v, dtype), pair.k.architecture.activation, pair.strength, _cast(attn.to_k.bias, dtype),
            _cast(attn.to_v.bias, dtype),
        )  # fmt: skip
        for module in pair[:2]:
            self._installed.add_penalty(module, x, pair.strength)
        return key, value

    def _cross_attention_key_value(
        self, attn: Attention, context: Tensor, pairs: list[_Pair], reusable: bool
    ) -> tuple[Tensor, Tensor]:
        installed = self._installed
        entry = installed.contexts.entry(context, by_value=reusable)
        if not reusable:
            k_input, v_input = installed.run_shared(entry, context, pairs)
            return attn.to_k(k_input), attn.to_v(v_input)
        cached = self._cached_key_values.get(entry.token)
        if cached is not None and cached[0].matches(pairs, attn):
            return cached[1], cached[2]
        k_input, v_input = installed.run_shared(entry, context, pairs)
        key, value = attn.to_k(k_input), attn.to_v(v_input)
        self._cached_key_values[entry.token] = (_Recipe.of(pairs, attn), key, value)
        self._cached_key_values.move_to_end(entry.token)
        if len(self._cached_key_values) > _CONTEXTS_REMEMBERED:
            self._cached_key_values.popitem(last=False)
        return key, value

    def _folded_projections(
        self, attn: Attention, width: int, pairs: list[_Pair]
    ) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
        """``(weight, bias)`` of ``to_k`` and ``to_v`` with the affine pairs folded in, refolded
        whenever the pairs or the projections change."""
        if self._folded is None or not self._folded[0].matches(pairs, attn):
            k_map, v_map = self._installed.composed(width, pairs)
            self._folded = (_Recipe.of(pairs, attn), _fold(attn.to_k, k_map), _fold(attn.to_v, v_map))
        return self._folded[1], self._folded[2]
