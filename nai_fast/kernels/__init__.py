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
from .chunk_concat import chunk_concat_reference
from .cross_attention import cross_attention_reference

__all__ = [
    "ENV_VAR",
    "MODES",
    "chunk_concat",
    "chunk_concat_reference",
    "cross_attention",
    "cross_attention_reference",
    "kernel_mode",
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


def _implementation(module: ModuleType, op_name: str, *inputs: torch.Tensor) -> Callable[..., torch.Tensor]:
    """``module``'s Triton op or its ``<op>_reference``, as ``NAI_FAST_KERNELS`` and the
    inputs (the first one's device, ``module.not_supported_reasons(*inputs)``) decide."""
    reference = getattr(module, f"{op_name}_reference")
    mode = kernel_mode()
    if mode == "reference" or (mode == "auto" and not inputs[0].is_cuda):
        return reference
    reasons = "; ".join(module.not_supported_reasons(*inputs))
    if not reasons:
        return getattr(module, op_name)
    if mode == "triton":
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
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """Attention of many queries to a short key set (the prompt), SDPA's layout, no mask.

    Dispatches to the Triton op or :func:`cross_attention_reference`, which defines it and
    documents the arguments.
    """
    return _implementation(_cross_attention_module, "cross_attention", q, k, v)(q, k, v, scale)
