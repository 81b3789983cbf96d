"""Triton if it is installed, else a stand-in, so that kernel files always import.

Kernel files decorate their functions at import time (``@triton.jit``, ``tl.constexpr``
annotations and constants). Without Triton the stand-in leaves those functions as plain
Python; the dispatcher never launches them (:data:`AVAILABLE` is false) and the eager
references living in the same files still work.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only platforms without a Triton wheel
    triton = tl = None

AVAILABLE = triton is not None

if not AVAILABLE:

    class _Constexpr:
        """Stands for ``tl.constexpr`` both as an annotation and as a constant wrapper."""

        def __init__(self, value: Any) -> None:
            self.value = value

    def _jit(fn=None, **_options):
        return fn if fn is not None else (lambda function: function)

    triton = SimpleNamespace(jit=_jit)
    tl = SimpleNamespace(constexpr=_Constexpr)


# What the Triton kernels compute in (float32 inside); float64 and others take the references.
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def dtype_reasons(**tensors: torch.Tensor) -> list[str]:
    """Why these named tensors' dtypes keep the Triton kernels out (empty: they don't)."""
    return [
        f"{name} is {tensor.dtype}, not float32, float16 or bfloat16"
        for name, tensor in tensors.items()
        if tensor.dtype not in SUPPORTED_DTYPES
    ]


def platform_reasons(kernel: Any, device: torch.device) -> list[str]:
    """Why ``kernel`` cannot run on tensors on ``device`` here (empty: it can)."""
    if not AVAILABLE:
        return ["Triton is not installed"]
    if device.type != "cuda" and not is_interpreted(kernel):
        return [f"{device.type} tensors need TRITON_INTERPRET=1 set before Triton is first imported"]
    return []


def is_interpreted(kernel: Any) -> bool:
    """Whether ``kernel`` was built for Triton's CPU interpreter.

    Triton decides at decoration time: ``@triton.jit`` gives an interpreted function when
    ``TRITON_INTERPRET=1`` is set, a compiled one otherwise. Its own helpers (``tl.sum``...)
    are decorated when ``triton.language`` is first imported, so the variable must be set
    before that: interpreted and compiled kernels cannot share a process.
    """
    if not AVAILABLE:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel, InterpretedFunction)
