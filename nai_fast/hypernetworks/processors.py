"""Hypernetworks on a diffusers U-Net, as attention processors, doing each piece of work once.

Long because the processor and apply/remove share the installed state, and its module doc
explains every cache and fold; caches, folding arithmetic and file formats live beside it.

:func:`apply_hypernetworks` installs a :class:`HypernetworkAttnProcessor` on every
attention layer of a ``UNet2DConditionModel``. The processor is diffusers'
``AttnProcessor2_0`` (spatial and group norm, masks, residual connection and
``rescale_output_factor`` kept as they are) except for the inputs of ``to_k`` and
``to_v``: with ``x`` the layer's k/v input (the text context in cross-attention,
the layer's own hidden states in self-attention),

    key = to_k(h_k(x)),  value = to_v(h_v(x)),  h(x) = x + strength * net(x),

where ``(h_k, h_v)`` is the module pair for ``x``'s width (a width a hypernetwork
lacks leaves the layer alone, as in the web UI). A hypernetwork none of whose widths
is the k/v width of any attention layer would change nothing (one made for another
model): :func:`apply_hypernetworks` refuses it (:class:`HypernetworkMismatchError`),
and logs a warning naming the widths a partly matching one leaves unused. Several hypernetworks compose in
order, each with its own strength, as the web UI's ``apply_hypernetworks`` does:
``h_k = h2_k o h1_k`` and ``h_v = h2_v o h1_v``. Queries are never touched.

Strength per call: pass ``cross_attention_kwargs={"hypernetwork_strength": s}``
(:data:`STRENGTH_KWARG`) to the U-Net or the pipeline; ``s`` is one number for
every hypernetwork or a sequence with one per hypernetwork. Without it, the
strengths given to :func:`apply_hypernetworks` apply. It is parsed once per U-Net
forward, not in every layer. A strength of 0 skips the module, so the layer computes
exactly what stock diffusers computes.

Work done once, where the web UI redoes it in every layer at every step:

1. **One module call per context per forward.** All cross-attention layers of a
   U-Net forward get the same context tensor; one module output is shared by all
   of them (autograd included) through a table keyed by the tensor's identity
   (:mod:`.cache`). A forward pre-hook on the U-Net clears the table, so nothing
   is shared across forwards. With gradients enabled the hook also computes the
   shared outputs, before any block runs, so that a gradient-checkpointed block
   recomputes exactly the operations it first ran.
2. **Cross-attention K and V once per generation** (inference only). Each
   cross-attention layer keeps its K and V for the last two contexts, recognised
   by value, recomputed when the context's values, a strength, a hypernetwork's
   weights or ``to_k``/``to_v``'s weights change (:mod:`.cache`).
3. **Folding** (inference only). In self-attention the k/v input is new at every
   layer and step, so a module cannot be shared; but an affine module (only
   Linears and inactive Dropouts) folds into the projection:
   ``to_k(x + s (x A^T + b)) = x (W (I + s A))^T + (s W b + bias)``, several
   hypernetworks first composing into one affine map (the arithmetic:
   :func:`~.modules.compose_affine`, :func:`~.modules.fold_into`). The composed map is built
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
training, several hypernetworks at one width). Which op runs where is
:mod:`nai_fast.kernels.policy`'s choice: under ``auto`` only where the GPU class's measurements,
or for a class never measured the cost model, say it is faster; ``triton`` forces them, which
is how ``tests/test_kernel_unet.py`` checks a training step against the eager processors
under Triton's interpreter. The shallow-layer penalty of a fused layer is
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
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import kernels
from .cache import ContextEntry, ContextTracker, KeyValueCache, Pair, Recipe
from .modules import AffineMap, Hypernetwork, HypernetworkModule, compose_affine, fold_into
from ..kernels import MLP, kernels_requested
from ..kernels.hyper_kv import structure_not_supported_reasons
from ..kernels.policy import takes_cross_attention, takes_hyper_kv
from ..text.tags import network_strengths

if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import Attention

__all__ = [
    "DEFAULT_PENALTY_WEIGHTS",
    "STRENGTH_KWARG",
    "HypernetworkAttnProcessor",
    "HypernetworkMismatchError",
    "attention_widths",
    "apply_hypernetworks",
    "hypernetwork_penalty",
    "installed_hypernetworks",
    "remove_hypernetworks",
]

STRENGTH_KWARG = "hypernetwork_strength"
DEFAULT_PENALTY_WEIGHTS: Mapping[int, float] = MappingProxyType({320: 1.0})
Strengths = float | Sequence[float]

_INSTALLED = "_nai_fast_hypernetworks"  # the U-Net attribute holding what apply_hypernetworks installed

logger = logging.getLogger(__name__)


class HypernetworkMismatchError(ValueError):
    """A hypernetwork with modules for none of a U-Net's attention k/v widths: it would
    change nothing. The message names its widths, the U-Net's, and the hypernetwork."""


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

    Raises:
        HypernetworkMismatchError: a hypernetwork has modules for none of the k/v widths
            of ``unet``'s attention layers (:func:`attention_widths`). One that matches
            some of them applies where it matches, with a logged warning naming the rest.
    """
    remove_hypernetworks(unet)
    hypernetworks = (hypernetworks,) if isinstance(hypernetworks, Hypernetwork) else tuple(hypernetworks)
    if not all(isinstance(hypernetwork, Hypernetwork) for hypernetwork in hypernetworks):
        raise TypeError("hypernetworks must be a Hypernetwork or a sequence of them")
    _check_widths(hypernetworks, attention_widths(unet))
    if not all(math.isfinite(weight) and weight >= 0 for weight in penalty_weights.values()):
        raise ValueError(f"penalty weights must be finite and non-negative, got {dict(penalty_weights)}")
    installed = _Installed(
        hypernetworks=hypernetworks,
        strengths=network_strengths(strengths, len(hypernetworks), "hypernetworks"),
        penalty_weights=dict(penalty_weights),
        original_processors=unet.attn_processors,
        layers_see_the_context=getattr(unet, "encoder_hid_proj", None) is None
        and not any(getattr(module, "norm_cross", None) for module in unet.modules()),
    )
    installed.hook = unet.register_forward_pre_hook(installed.start_forward, with_kwargs=True)
    unet.set_attn_processor({name: HypernetworkAttnProcessor(installed) for name in installed.original_processors})
    setattr(unet, _INSTALLED, installed)


def attention_widths(unet: nn.Module) -> tuple[int, ...]:
    """The widths of the k/v inputs of ``unet``'s attention layers (the features of ``to_k``'s
    input), sorted: the widths a hypernetwork needs modules for. SD 1.x: 320, 640, 768, 1280."""
    widths = set()
    for module in unet.modules():
        to_k = getattr(module, "to_k", None) if hasattr(module, "set_processor") else None
        width = getattr(to_k, "in_features", None)
        if isinstance(width, int):
            widths.add(width)
    return tuple(sorted(widths))


def _check_widths(hypernetworks: Sequence[Hypernetwork], model_widths: Sequence[int]) -> None:
    """Refuse a hypernetwork that matches no attention layer; warn about widths left unused."""
    for index, hypernetwork in enumerate(hypernetworks, start=1):
        used = [width for width in hypernetwork.widths if width in model_widths]
        unused = [width for width in hypernetwork.widths if width not in model_widths]
        if not unused:
            continue
        label = _describe(hypernetwork, index, len(hypernetworks))
        if not used:
            raise HypernetworkMismatchError(
                f"{label} has modules for k/v widths {_widths(unused)}, but this model's attention layers take "
                f"k/v inputs of widths {_widths(model_widths)}: it would change nothing (made for another model?)"
            )
        logger.warning(
            "%s: no attention layer of this model takes k/v inputs of width %s (the model's: %s); those modules "
            "are unused, the ones for %s apply",
            label,
            _widths(unused),
            _widths(model_widths),
            _widths(used),
        )


def _describe(hypernetwork: Hypernetwork, index: int, count: int) -> str:
    """``hypernetwork 'anime' (runs/anime.pt)``, as much of it as is known."""
    name = f" {hypernetwork.name!r}" if hypernetwork.name else (f" {index} of {count}" if count > 1 else "")
    path = f" ({hypernetwork.path})" if getattr(hypernetwork, "path", None) is not None else ""
    return f"hypernetwork{name}{path}"


def _widths(widths: Sequence[int]) -> str:
    return ", ".join(str(width) for width in widths) or "none"


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
    return [] if installed is None else list(zip(installed.hypernetworks, installed.strengths))


def hypernetwork_penalty(unet: UNet2DConditionModel) -> Tensor:
    """The shallow-layer penalty of ``unet``'s last forward: a differentiable scalar, to add
    to the loss (zero when no penalised module ran with gradients enabled)."""
    installed = getattr(unet, _INSTALLED, None)
    if installed is None:
        raise ValueError("no hypernetworks are applied to this U-Net")
    return installed.penalty if installed.penalty is not None else torch.zeros((), device=unet.device)


def _is_bare_linear(module: nn.Module) -> bool:
    """A plain ``nn.Linear`` whose call computes only ``F.linear(x, weight, bias)``."""
    return (
        type(module) is nn.Linear
        and not module._forward_hooks
        and not module._forward_pre_hooks
        and "forward" not in vars(module)
    )


def _hyper_kv_reasons(attn: Attention, x: Tensor, pairs: Sequence[Pair]) -> list[str]:
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
    strengths: tuple[float, ...]  # as applied; a call's hypernetwork_strength overrides them
    penalty_weights: dict[int, float]
    original_processors: dict[str, Any]
    layers_see_the_context: bool  # the U-Net hands encoder_hidden_states to its layers unchanged
    hook: torch.utils.hooks.RemovableHandle | None = None
    contexts: ContextTracker = field(default_factory=ContextTracker)
    penalty: Tensor | None = None
    # this forward's hypernetwork_strength and its parse, shared by every layer
    _call_strengths: tuple[object, tuple[float, ...]] | None = None
    # width -> the composed k and v maps for folding, and their recipe
    _composed: dict[int, tuple[Recipe, tuple[AffineMap, AffineMap]]] = field(default_factory=dict)

    def start_forward(self, unet: nn.Module, args: tuple[object, ...], kwargs: dict[str, Any]) -> None:
        """The U-Net's forward pre-hook: a new forward shares nothing with the last one.

        With gradients enabled, the context's module outputs are computed here, outside
        the U-Net's blocks: a gradient-checkpointed block must recompute the very operations
        it ran the first time, which it would not if its first run had computed them for
        the blocks after it.
        """
        self.contexts.start_forward()
        self.penalty = None
        self._call_strengths = None
        if not (torch.is_grad_enabled() and self.layers_see_the_context):
            return
        arguments = inspect.signature(unet.forward).bind_partial(*args, **kwargs).arguments
        context = arguments.get("encoder_hidden_states")
        if context is None:
            return
        hypernetwork_strength = (arguments.get("cross_attention_kwargs") or {}).get(STRENGTH_KWARG)
        pairs = self.active_pairs(context.shape[-1], self.strengths_of_call(hypernetwork_strength))
        if pairs:
            self.run_shared(self.contexts.entry(context, by_value=False), context, pairs)

    def strengths_of_call(self, hypernetwork_strength: Strengths | None) -> tuple[float, ...]:
        """The strengths a call applies: the applied ones, or its ``hypernetwork_strength``
        (:data:`STRENGTH_KWARG`) parsed once per forward: the first layer (or the pre-hook)
        parses it, the others get the same value object and reuse the parse."""
        if hypernetwork_strength is None:
            return self.strengths
        if self._call_strengths is None or self._call_strengths[0] is not hypernetwork_strength:
            parsed = network_strengths(hypernetwork_strength, len(self.hypernetworks), "hypernetworks")
            self._call_strengths = (hypernetwork_strength, parsed)
        return self._call_strengths[1]

    def active_pairs(self, width: int, strengths: tuple[float, ...]) -> list[Pair]:
        """The module pairs to apply, in order, to a k/v input of ``width`` features."""
        pairs = []
        for hypernetwork, strength in zip(self.hypernetworks, strengths):
            modules = hypernetwork.modules_for(width)
            if modules is not None and strength != 0:
                pairs.append(Pair(*modules, strength))
        return pairs

    @staticmethod
    def reuse_allowed(pairs: Sequence[Pair]) -> bool:
        """Whether results may outlive the forward: no gradients, no active Dropout."""
        return not torch.is_grad_enabled() and not any(pair.k.training or pair.v.training for pair in pairs)

    def run(self, x: Tensor, pairs: Sequence[Pair]) -> tuple[Tensor, Tensor]:
        """The inputs of ``to_k`` and ``to_v``: each pair's modules applied to ``x`` in turn."""
        k_input = v_input = x
        for pair in pairs:
            k_input = self._apply_module(pair.k, k_input, pair.strength)
            v_input = self._apply_module(pair.v, v_input, pair.strength)
        return k_input, v_input

    def run_shared(self, entry: ContextEntry, x: Tensor, pairs: Sequence[Pair]) -> tuple[Tensor, Tensor]:
        """:meth:`run`, computed once per forward for the context ``entry`` describes."""
        # Outputs computed without gradients never serve a pass that needs them.
        grad_enabled = torch.is_grad_enabled()
        for recipe, computed_with_grad, outputs in entry.module_outputs:
            if computed_with_grad == grad_enabled and recipe.matches(pairs):
                return outputs
        outputs = self.run(x, pairs)
        entry.module_outputs.append((Recipe.of(pairs), grad_enabled, outputs))
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

    def composed(self, width: int, pairs: Sequence[Pair]) -> tuple[AffineMap, AffineMap]:
        """The affine pairs' composed maps for k and v, built once per width, weights and strengths."""
        cached = self._composed.get(width)
        if cached is None or not cached[0].matches(pairs):
            dtype = torch.promote_types(pairs[0].k.net[0].weight.dtype, torch.float32)
            maps = tuple(
                compose_affine([(getattr(pair, role), pair.strength) for pair in pairs], dtype) for role in "kv"
            )
            cached = self._composed[width] = (Recipe.of(pairs), maps)
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
        self._key_values = KeyValueCache()
        self._folded: tuple[Recipe, tuple[Tensor, Tensor], tuple[Tensor, Tensor]] | None = None

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

        strengths = self._installed.strengths_of_call(hypernetwork_strength)
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

        if attn.is_cross_attention and takes_cross_attention(query, key, attention_mask):
            hidden_states = kernels.cross_attention(query, key, value)
        else:
            hidden_states = F.scaled_dot_product_attention(
                query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
            )
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        return hidden_states.to(query.dtype)

    def _fused_key_value(self, attn: Attention, x: Tensor, pairs: list[Pair]) -> tuple[Tensor, Tensor] | None:
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
        hidden_width, activation = pair.k.net[0].out_features, pair.k.architecture.activation
        if not takes_hyper_kv(x, hidden_width, attn.to_k.out_features, dtype, activation):
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
        self, attn: Attention, context: Tensor, pairs: list[Pair], reusable: bool
    ) -> tuple[Tensor, Tensor]:
        installed = self._installed
        entry = installed.contexts.entry(context, by_value=reusable)
        if not reusable:
            k_input, v_input = installed.run_shared(entry, context, pairs)
            return attn.to_k(k_input), attn.to_v(v_input)
        cached = self._key_values.get(entry.token, pairs, attn)
        if cached is not None:
            return cached
        k_input, v_input = installed.run_shared(entry, context, pairs)
        key, value = attn.to_k(k_input), attn.to_v(v_input)
        self._key_values.put(entry.token, pairs, attn, key, value)
        return key, value

    def _folded_projections(
        self, attn: Attention, width: int, pairs: list[Pair]
    ) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
        """``(weight, bias)`` of ``to_k`` and ``to_v`` with the affine pairs folded in, refolded
        whenever the pairs or the projections change."""
        if self._folded is None or not self._folded[0].matches(pairs, attn):
            k_map, v_map = self._installed.composed(width, pairs)
            self._folded = (Recipe.of(pairs, attn), fold_into(attn.to_k, k_map), fold_into(attn.to_v, v_map))
        return self._folded[1], self._folded[2]
