"""Where the attention processors take a fused kernel under ``NAI_FAST_KERNELS=auto``.

A kernel runs where the cost model (:mod:`.cost`) predicts it at least as fast as the path
it replaces, at the peak rates of the GPU's class: A100 figures for compute capability 8.x,
H100 figures for 9.x and later. These are predictions from roofline floors, not
measurements; ``benchmarks/`` measures both paths where a GPU is present.
``NAI_FAST_KERNELS=triton`` skips the policy and takes the kernels everywhere.

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

from .cost import A100, H100_SXM, Device, cross_attention_cost, hyper_kv_cost

__all__ = ["cross_attention_pays", "gpu_class", "hyper_kv_pays"]


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
