"""Where the attention processors take a fused kernel: :func:`takes_hyper_kv` and
:func:`takes_cross_attention`, as ``NAI_FAST_KERNELS`` and, under ``auto``, the cost model decide.

A kernel runs where the cost model (:mod:`.cost`) predicts it at least as fast as the path
it replaces, at the peak rates of the GPU's class: A100 figures for compute capability 8.x,
H100 figures for 9.x and later. These are predictions from roofline floors, not
measurements; ``benchmarks/`` measures both paths where a GPU is present.
``NAI_FAST_KERNELS=triton`` skips the cost model and takes the kernels everywhere they can
run; ``reference`` never takes them (the processors' own eager path runs).

- ``hyper_kv``: by the model, its two-kernel design wins at width 320 (the first U-Net
  level, the most tokens) on both classes, and loses at 1280, where folding the second
  Linear into the projection costs as much as the op; 640 wins on H100 only.
- ``cross_attention``: the forward always runs fused (it is built for these shapes; the
  alternative, PyTorch's SDPA, has no cost model here), the backward only where the model
  does not predict it slower than eager: its key-block kernel re-reads queries per block
  of keys, which at head dim 160 loses.
"""

from __future__ import annotations

from functools import cache

import torch

from . import kernel_mode, kernels_requested
from .cost import A100, H100_SXM, Device, cross_attention_cost, hyper_kv_cost

__all__ = [
    "FUSED_ATTENTION_MAX_KEYS",
    "cross_attention_pays",
    "gpu_class",
    "hyper_kv_pays",
    "takes_cross_attention",
    "takes_hyper_kv",
]

# Prompts of 1 to 4 chunks: the key sets the fused cross_attention op is built for (its K and
# V stay on chip); longer contexts go to PyTorch's SDPA.
FUSED_ATTENTION_MAX_KEYS = 4 * 77


def takes_hyper_kv(x: torch.Tensor, hidden_width: int, out_width: int, dtype: torch.dtype, activation: str) -> bool:
    """Whether a processor whose ``NAI_FAST_KERNELS`` asks for kernels (``kernels_requested``)
    computes this self-attention layer's K and V with ``hyper_kv``: always under ``triton``,
    under ``auto`` where the cost model predicts it faster on this GPU (:func:`hyper_kv_pays`).

    ``x`` is the k/v input, ``hidden_width`` the net's hidden units, ``out_width`` the
    projection's outputs, ``dtype`` the one the op would run in (autocast's, if on).
    """
    if kernel_mode() == "triton":
        return True
    tokens, width = x.numel() // x.shape[-1], x.shape[-1]
    backward = torch.is_grad_enabled()
    return hyper_kv_pays(
        tokens, width, hidden_width, out_width, dtype.itemsize, activation, backward, gpu_class(x.device)
    )


def takes_cross_attention(query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None) -> bool:
    """Whether a cross-attention layer attends with the fused ``cross_attention`` op rather than
    SDPA: no mask, at most :data:`FUSED_ATTENTION_MAX_KEYS` keys, kernels requested
    (``NAI_FAST_KERNELS``), and under ``auto`` the cost model's consent
    (:func:`cross_attention_pays`).

    ``query`` and ``key`` are ``(batch, heads, tokens, head_dim)``.
    """
    if attention_mask is not None or key.shape[2] > FUSED_ATTENTION_MAX_KEYS:
        return False
    if not kernels_requested(query.device):
        return False
    if kernel_mode() == "triton":
        return True
    batch, heads, query_length, head_dim = query.shape
    backward = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad)
    return cross_attention_pays(
        batch, heads, query_length, key.shape[2], head_dim, query.dtype.itemsize, backward, gpu_class(query.device)
    )


def gpu_class(device: torch.device) -> Device:
    """The peak rates the policy assumes for ``device`` (a CUDA device)."""
    major, _ = torch.cuda.get_device_capability(device)
    return H100_SXM if major >= 9 else A100


@cache
def hyper_kv_pays(
    tokens: int, width: int, hidden_width: int, out_width: int, dtype_bytes: int, activation: str, backward: bool, gpu: Device
) -> bool:
    """Whether ``hyper_kv`` (forward, plus backward when gradients flow) is predicted at least
    as fast as the eager modules and projections on ``gpu``."""
    passes = [hyper_kv_cost(tokens, width, hidden_width, out_width, dtype_bytes=dtype_bytes, activation=activation)]
    if backward:
        passes.append(
            hyper_kv_cost(tokens, width, hidden_width, out_width, dtype_bytes=dtype_bytes, activation=activation, backward=True)
        )
    return _fused_time(passes, gpu) <= _eager_time(passes, gpu)


@cache
def cross_attention_pays(
    batch: int, heads: int, query_length: int, key_length: int, head_dim: int, dtype_bytes: int, backward: bool, gpu: Device
) -> bool:
    """Whether ``cross_attention`` should run here: always without gradients; with them, where
    its backward is not predicted slower than eager's on ``gpu``."""
    if not backward:
        return True
    cost = cross_attention_cost(batch, heads, query_length, key_length, head_dim, dtype_bytes=dtype_bytes, backward=True)
    return cost.predicted_speedup(gpu) >= 1


def _fused_time(passes, gpu: Device) -> float:
    return sum(comparison.implemented.time_floor(gpu) for comparison in passes)


def _eager_time(passes, gpu: Device) -> float:
    return sum(comparison.eager.time_floor(gpu) for comparison in passes)
