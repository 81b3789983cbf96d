"""Where the attention processors take a fused kernel: :func:`takes_hyper_kv` and
:func:`takes_cross_attention`, as ``NAI_FAST_KERNELS`` and, under ``auto``, measurements or
the cost model decide.

Measurements first: on a GPU class (compute capability, ``"sm_90"``) that the GPU check has
measured (:mod:`.measured`), a kernel runs only where the measured table says it is at
least as fast as the path it replaces, at the nearest timed shape; a shape the table has
nothing near runs the replaced path. On a class never measured, the cost model
(:mod:`.cost`) decides: a kernel runs where it is predicted at least as fast, at the peak
rates of the class (A100 figures for compute capability 8.x, H100 figures for 9.x and
later). :func:`use_hyper_kv` and :func:`use_cross_attention` decide;
:func:`hyper_kv_choice` and :func:`cross_attention_choice` also say on what grounds.
``NAI_FAST_KERNELS=triton`` skips the policy and takes the kernels everywhere.

The predictions (:func:`hyper_kv_pays`, :func:`cross_attention_pays`):

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
from typing import NamedTuple

import torch

from . import kernel_mode, kernels_requested, measured
from .cost import A100, H100_SXM, Device, cross_attention_cost, hyper_kv_cost

__all__ = [
    "FUSED_ATTENTION_MAX_KEYS",
    "Choice",
    "cross_attention_choice",
    "cross_attention_pays",
    "gpu_class",
    "gpu_class_name",
    "hyper_kv_choice",
    "hyper_kv_pays",
    "takes_cross_attention",
    "takes_hyper_kv",
    "use_cross_attention",
    "use_hyper_kv",
]

# Prompts of 1 to 4 chunks: the key sets the fused cross_attention op is built for (its K and
# V stay on chip); longer contexts go to PyTorch's SDPA.
FUSED_ATTENTION_MAX_KEYS = 4 * 77


def takes_hyper_kv(x: torch.Tensor, hidden_width: int, out_width: int, dtype: torch.dtype, activation: str) -> bool:
    """Whether a processor whose ``NAI_FAST_KERNELS`` asks for kernels (``kernels_requested``)
    computes this self-attention layer's K and V with ``hyper_kv``: always under ``triton``,
    under ``auto`` where this GPU class's measurements, or the cost model for a class never
    measured, say it is faster (:func:`use_hyper_kv`).

    ``x`` is the k/v input, ``hidden_width`` the net's hidden units, ``out_width`` the
    projection's outputs, ``dtype`` the one the op would run in (autocast's, if on).
    """
    if kernel_mode() == "triton":
        return True
    tokens, width = x.numel() // x.shape[-1], x.shape[-1]
    backward = torch.is_grad_enabled()
    return use_hyper_kv(tokens, width, hidden_width, out_width, dtype.itemsize, activation, backward, x.device)


def takes_cross_attention(query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None) -> bool:
    """Whether a cross-attention layer attends with the fused ``cross_attention`` op rather than
    SDPA: no mask, at most :data:`FUSED_ATTENTION_MAX_KEYS` keys, kernels requested
    (``NAI_FAST_KERNELS``), and under ``auto`` the measurements' or the cost model's consent
    (:func:`use_cross_attention`).

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
    return use_cross_attention(
        batch, heads, query_length, key.shape[2], head_dim, query.dtype.itemsize, backward, query.device
    )


def gpu_class(device: torch.device) -> Device:
    """The peak rates the policy assumes for ``device`` (a CUDA device)."""
    major, _ = torch.cuda.get_device_capability(device)
    return H100_SXM if major >= 9 else A100


def gpu_class_name(device: torch.device) -> str:
    """The class a measured table files ``device`` under: ``"sm_90"`` for compute capability 9.0."""
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


def _rates_of_class(name: str) -> Device:
    return H100_SXM if int(name.removeprefix("sm_")[:-1] or 0) >= 9 else A100


class Choice(NamedTuple):
    """Whether ``auto`` takes the kernel, and on what grounds."""

    fused: bool
    grounds: str  # e.g. "measured on sm_90 (NVIDIA H200): 41.0 vs 55.2 us (sdpa)", "predicted (H100 SXM rates)"


def _measured_choice(table: measured.MeasuredTable, gpu_class: str, op: str, backward: bool, sizes: dict) -> Choice | None:
    """The table's verdict where ``gpu_class`` was measured; None where it never was."""
    if not table.measured(gpu_class):
        return None
    card = table.sources.get(gpu_class, {}).get("card", gpu_class)
    timing = table.nearest(gpu_class, op, backward, sizes)
    if timing is None:
        return Choice(False, f"not measured near this shape on {gpu_class} ({card}): the replaced path")
    return Choice(
        timing.fused_wins,
        f"measured on {gpu_class} ({card}): {timing.fused_ms * 1e3:.1f} vs {timing.baseline_ms * 1e3:.1f} us "
        f"({timing.baseline}) at {dict(timing.shape)}",
    )


def hyper_kv_choice(
    tokens: int, width: int, hidden_width: int, out_width: int, dtype_bytes: int, activation: str, backward: bool,
    gpu_class: str, table: measured.MeasuredTable | None = None,
) -> Choice:  # fmt: skip
    """Whether ``auto`` runs ``hyper_kv`` on ``gpu_class`` (``"sm_90"``), by ``table``'s
    measurements (default: :func:`measured.table`) or, for a class never measured, by the
    cost model. The activation does not enter the table's match: it costs little beside the GEMMs."""
    return _hyper_kv_choice(table or measured.table(), tokens, width, hidden_width, out_width, dtype_bytes,
                            activation, backward, gpu_class)  # fmt: skip


@cache
def _hyper_kv_choice(table, tokens, width, hidden_width, out_width, dtype_bytes, activation, backward, gpu_class) -> Choice:
    sizes = dict(tokens=tokens, width=width, hidden_width=hidden_width, out_width=out_width, dtype_bytes=dtype_bytes)
    found = _measured_choice(table, gpu_class, "hyper_kv", backward, sizes)
    if found is not None:
        return found
    rates = _rates_of_class(gpu_class)
    fused = hyper_kv_pays(tokens, width, hidden_width, out_width, dtype_bytes, activation, backward, rates)
    return Choice(fused, f"predicted ({rates.name} rates; {gpu_class} never measured)")


def cross_attention_choice(
    batch: int, heads: int, query_length: int, key_length: int, head_dim: int, dtype_bytes: int, backward: bool,
    gpu_class: str, table: measured.MeasuredTable | None = None,
) -> Choice:  # fmt: skip
    """Whether ``auto`` runs ``cross_attention`` on ``gpu_class`` (see :func:`hyper_kv_choice`);
    the table matches batch x queries as one size, the key count as another."""
    return _cross_attention_choice(table or measured.table(), batch, heads, query_length, key_length, head_dim,
                                   dtype_bytes, backward, gpu_class)  # fmt: skip


@cache
def _cross_attention_choice(table, batch, heads, query_length, key_length, head_dim, dtype_bytes, backward, gpu_class) -> Choice:
    sizes = dict(queries=batch * query_length, key_length=key_length, heads=heads, head_dim=head_dim, dtype_bytes=dtype_bytes)
    found = _measured_choice(table, gpu_class, "cross_attention", backward, sizes)
    if found is not None:
        return found
    rates = _rates_of_class(gpu_class)
    fused = cross_attention_pays(batch, heads, query_length, key_length, head_dim, dtype_bytes, backward, rates)
    return Choice(fused, f"predicted ({rates.name} rates; {gpu_class} never measured)")


def use_hyper_kv(
    tokens: int, width: int, hidden_width: int, out_width: int, dtype_bytes: int, activation: str, backward: bool,
    device: torch.device,
) -> bool:  # fmt: skip
    """Whether ``auto`` runs ``hyper_kv`` for this call on ``device`` (a CUDA device)."""
    return hyper_kv_choice(tokens, width, hidden_width, out_width, dtype_bytes, activation, backward,
                           gpu_class_name(device)).fused  # fmt: skip


def use_cross_attention(
    batch: int, heads: int, query_length: int, key_length: int, head_dim: int, dtype_bytes: int, backward: bool,
    device: torch.device,
) -> bool:  # fmt: skip
    """Whether ``auto`` runs ``cross_attention`` for this call on ``device`` (a CUDA device)."""
    return cross_attention_choice(batch, heads, query_length, key_length, head_dim, dtype_bytes, backward,
                                  gpu_class_name(device)).fused  # fmt: skip


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
