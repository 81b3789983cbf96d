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
from functools import cache, partial

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


def _use_triton(op_name: str, tensor: torch.Tensor, not_supported_reasons: Callable[[], list[str]]) -> bool:
    mode = kernel_mode()
    if mode == "reference" or (mode == "auto" and not tensor.is_cuda):
        return False
    reasons = "; ".join(not_supported_reasons())
    if not reasons:
        return True
    if mode == "triton":
        raise RuntimeError(f"{ENV_VAR}=triton, but Triton cannot run {op_name} here: {reasons}")
    _log_fallback(op_name, reasons)
    return False


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
    kernels = _chunk_concat_module
    reasons = partial(kernels.not_supported_reasons, hidden, weight, bias)
    op = kernels.chunk_concat if _use_triton("chunk_concat", hidden, reasons) else kernels.chunk_concat_reference
    return op(hidden, weight, bias, eps, multipliers, destination, num_rows, restore_mean)


def cross_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """Attention of many queries to a short key set (the prompt), SDPA's layout, no mask.

    Dispatches to the Triton op or :func:`cross_attention_reference`, which defines it and
    documents the arguments.
    """
    kernels = _cross_attention_module
    reasons = partial(kernels.not_supported_reasons, q, k, v)
    op = kernels.cross_attention if _use_triton("cross_attention", q, reasons) else kernels.cross_attention_reference
    return op(q, k, v, scale)
