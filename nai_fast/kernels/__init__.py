"""Fused Triton kernels, their eager PyTorch references, and the choice between them.

Each op lives in a module of its own name (``nai_fast.kernels.chunk_concat``) holding the
Triton op and ``<op>_reference``, the eager version that defines it. The package exports
a dispatching ``<op>`` which, per call, reads ``NAI_FAST_KERNELS``:

- ``auto`` (default): Triton on CUDA tensors it supports, the reference otherwise; a CUDA
  call that falls back logs why (once per reason).
- ``triton``: always Triton; inputs it cannot take are an error. CPU tensors run under
  Triton's interpreter, which needs ``TRITON_INTERPRET=1`` in the environment before Triton
  is first imported in the process.
- ``reference``: always the eager reference.

The dispatching function shadows its module as an attribute of this package; reach the
module with ``from nai_fast.kernels.chunk_concat import ...`` or ``importlib.import_module``.
Importing this package works without Triton installed (the references still run).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from functools import cache
from types import ModuleType

import torch

from . import chunk_concat as _chunk_concat_module
from . import cross_attention as _cross_attention_module
from . import hyper_kv as _hyper_kv_module
from .chunk_concat import chunk_concat_reference
from .cross_attention import cross_attention_reference
from ._triton import platform_reasons
from .hyper_kv import MLP, hyper_kv_reference

__all__ = [
    "ENV_VAR",
    "MLP",
    "MODES",
    "chunk_concat",
    "chunk_concat_reference",
    "cross_attention",
    "cross_attention_reference",
    "dispatch_summary",
    "hyper_kv",
    "hyper_kv_reference",
    "kernel_mode",
    "kernels_requested",
]

ENV_VAR = "NAI_FAST_KERNELS"
MODES = ("auto", "triton", "reference")

logger = logging.getLogger(__name__)


def kernel_mode() -> str:
    """The implementation ``NAI_FAST_KERNELS`` asks for now: one of :data:`MODES`."""
    value = os.environ.get(ENV_VAR, "auto")
    mode = value.strip().lower()
    if mode not in MODES:
        raise ValueError(f"{ENV_VAR}={value!r} is not one of {', '.join(MODES)}")
    return mode


# op name -> its module and one of its kernels (a process's kernels all interpret, or all compile)
_OPS = {
    "chunk_concat": (_chunk_concat_module, _chunk_concat_module._forward_kernel),
    "cross_attention": (_cross_attention_module, _cross_attention_module._forward_kernel),
    "hyper_kv": (_hyper_kv_module, _hyper_kv_module._hidden_kernel),
}


def dispatch_summary(device: torch.device) -> dict[str, str]:
    """What each op runs on tensors on ``device`` as ``NAI_FAST_KERNELS`` stands now:
    ``"Triton"``, or the eager reference and why. (An op's inputs may still send it to its
    reference, each op's ``not_supported_reasons`` says when.)"""
    summary = {}
    for name, (_, kernel) in _OPS.items():
        if not kernels_requested(device):
            mode = kernel_mode()
            why = f"{ENV_VAR}={mode}" if mode == "reference" else f"{device.type} tensors ({ENV_VAR}=auto takes Triton on CUDA)"
            summary[name] = f"eager reference: {why}"
        else:
            reasons = platform_reasons(kernel, device)
            summary[name] = "Triton" if not reasons else f"eager reference: {'; '.join(reasons)}"
    return summary


def kernels_requested(device: torch.device) -> bool:
    """Whether ``NAI_FAST_KERNELS`` asks for the Triton kernels on tensors on ``device``.

    Callers with a faster eager path of their own than an op's reference (PyTorch SDPA
    for attention) ask this first and take their own path where it is false.
    """
    mode = kernel_mode()
    return mode == "triton" or (mode == "auto" and device.type == "cuda")


def _implementation(module: ModuleType, op_name: str, *inputs: torch.Tensor) -> Callable[..., torch.Tensor]:
    """``module``'s Triton op or its ``<op>_reference``, as ``NAI_FAST_KERNELS`` and the
    inputs (the first one's device, ``module.not_supported_reasons(*inputs)``) decide."""
    reference = getattr(module, f"{op_name}_reference")
    if not kernels_requested(inputs[0].device):
        return reference
    reasons = "; ".join(module.not_supported_reasons(*inputs))
    if not reasons:
        return getattr(module, op_name)
    if kernel_mode() == "triton":
        raise RuntimeError(f"{ENV_VAR}=triton, but Triton cannot run {op_name} here: {reasons}")
    _log_fallback(op_name, reasons)
    return reference


@cache
def _log_fallback(op_name: str, reasons: str) -> None:
    logger.warning("%s falls back to its eager reference: %s", op_name, reasons)


def chunk_concat(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    multipliers: torch.Tensor,
    destination: torch.Tensor,
    num_rows: int,
    restore_mean: bool = True,
) -> torch.Tensor:
    """Final LayerNorm, emphasis, mean restore and concatenation of encoded prompt chunks.

    Dispatches to the Triton op or :func:`chunk_concat_reference`, which defines it and
    documents the arguments.
    """
    op = _implementation(_chunk_concat_module, "chunk_concat", hidden, weight, bias)
    return op(hidden, weight, bias, eps, multipliers, destination, num_rows, restore_mean)


def cross_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    *,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of many queries to a short key set (the prompt), SDPA's layout, with an
    optional bool ``(batch, Lk)`` key padding mask (True: the key takes part).

    Dispatches to the Triton op or :func:`cross_attention_reference`, which defines it and
    documents the arguments.
    """
    op = _implementation(_cross_attention_module, "cross_attention", q, k, v)
    return op(q, k, v, scale, key_padding_mask=key_padding_mask)


def hyper_kv(
    x: torch.Tensor,
    k_weight: torch.Tensor,
    v_weight: torch.Tensor,
    k_mlp: MLP,
    v_mlp: MLP,
    activation: str,
    strength: float = 1.0,
    k_bias: torch.Tensor | None = None,
    v_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of an attention layer whose k/v input a two-Linear hypernetwork rewrites.

    Dispatches to the Triton op or :func:`hyper_kv_reference`, which defines it and documents
    the arguments.
    """
    op = _implementation(_hyper_kv_module, "hyper_kv", x, k_weight, v_weight, k_mlp, v_mlp)
    return op(x, k_weight, v_weight, k_mlp, v_mlp, activation, strength, k_bias, v_bias)
