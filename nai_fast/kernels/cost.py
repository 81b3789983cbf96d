"""Roofline cost of fused kernels against the eager PyTorch they replace.

A :class:`Cost` counts what a computation asks of a GPU: HBM bytes, FLOPs on CUDA cores and
on tensor cores, and kernel launches. Its :meth:`Cost.time_floor` on a :class:`Device` is the
slowest of the three at peak rate, so a fused kernel's speed-up over the eager sequence can
be predicted before a GPU measures it. Launch latency (a few microseconds each) is left out
of the floor but counted: ops as small as a prompt's conditioning are bound by it.

The eager side is counted the way DESIGN.md states it, every op reads its inputs and writes
its outputs; :func:`measure_eager` counts it on a real run of the eager code, which the tests
use to check the hand-written models below.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .chunk_concat import LaunchConfig
from .cross_attention import LaunchConfig as CrossAttentionLaunchConfig

__all__ = [
    "A100",
    "DEVICES",
    "H100_SXM",
    "Comparison",
    "Cost",
    "Device",
    "chunk_concat_cost",
    "cross_attention_cost",
    "measure_eager",
]


@dataclass(frozen=True)
class Device:
    """Peak rates of a GPU."""

    name: str
    bandwidth: float  # HBM bytes per second
    tensor_flops: float  # dense fp16/bf16 matrix FLOPs per second, on tensor cores
    vector_flops: float  # fp32 FLOPs per second on CUDA cores (elementwise work, reductions)


A100 = Device("A100", bandwidth=2.0e12, tensor_flops=312e12, vector_flops=19.5e12)
H100_SXM = Device("H100 SXM", bandwidth=3.35e12, tensor_flops=989e12, vector_flops=67e12)
DEVICES = (A100, H100_SXM)


@dataclass(frozen=True)
class Cost:
    """What a computation asks of a GPU."""

    bytes: float = 0.0  # HBM traffic, reads plus writes
    flops: float = 0.0  # on CUDA cores
    tensor_flops: float = 0.0  # in matrix multiplies, on tensor cores
    launches: int = 0

    def __add__(self, other: Cost) -> Cost:
        return Cost(*(getattr(self, field.name) + getattr(other, field.name) for field in fields(Cost)))

    def time_floor(self, device: Device) -> float:
        """Seconds at peak rates: the slowest of memory, CUDA cores and tensor cores."""
        return max(
            self.bytes / device.bandwidth,
            self.flops / device.vector_flops,
            self.tensor_flops / device.tensor_flops,
        )


@dataclass(frozen=True)
class Comparison:
    """One op three ways."""

    minimal: Cost  # fused, at its floor: every tensor read or written once
    implemented: Cost  # fused, as the kernels do it
    eager: Cost  # the eager reference

    def byte_ratio(self) -> float:
        """How many times the fused kernels' traffic the eager sequence moves."""
        return self.eager.bytes / self.implemented.bytes

    def predicted_speedup(self, device: Device) -> float:
        """Eager over fused time floor on ``device`` (launch latency left out)."""
        return self.eager.time_floor(device) / self.implemented.time_floor(device)


def _op(reads: float = 0.0, writes: float = 0.0, flops: float = 0.0) -> Cost:
    """One kernel launch."""
    return Cost(bytes=reads + writes, flops=flops, launches=1)


# FLOPs per hidden value. LayerNorm: a sum for the mean, a subtraction, a multiply-add for
# the variance, a multiply by rstd, the affine multiply-add.
_LAYER_NORM_FLOPS = 7


@dataclass(frozen=True)
class _ChunkConcatShape:
    """Sizes of chunk_concat's tensors, in values and in bytes of one pass over each."""

    chunks: int
    length: int
    width: int
    num_rows: int
    dtype_bytes: int
    weight_bytes: int

    @property
    def rows(self) -> int:
        return self.chunks * self.length

    @property
    def elements(self) -> int:
        return self.rows * self.width

    @property
    def hidden(self) -> int:  # also y, z, grad_hidden: every [C, L, D] tensor
        return self.elements * self.dtype_bytes

    @property
    def output(self) -> int:  # also grad_output
        return self.num_rows * self.width * self.dtype_bytes

    @property
    def parameters(self) -> int:  # LayerNorm weight and bias, or their gradients
        return 2 * self.width * self.weight_bytes

    @property
    def multipliers(self) -> int:  # float32
        return 4 * self.rows

    @property
    def destinations(self) -> int:  # int64
        return 8 * self.rows

    @property
    def row_values(self) -> int:  # a float32 per row: row sums, LayerNorm's mean or rstd
        return 4 * self.rows

    @property
    def chunk_scalars(self) -> int:  # a value per chunk: the eager means
        return self.chunks * self.dtype_bytes


def chunk_concat_cost(
    chunks: int,
    length: int,
    width: int,
    num_rows: int,
    *,
    dtype_bytes: int = 2,
    weight_bytes: int | None = None,
    restore_mean: bool = True,
    backward: bool = False,
) -> Comparison:
    """Cost of :func:`nai_fast.kernels.chunk_concat.chunk_concat`'s forward (or backward) pass.

    ``chunks`` x ``length`` rows of ``width`` values in ``dtype_bytes``-byte floats (LayerNorm
    parameters in ``weight_bytes``, default the same); ``num_rows`` output rows. Multipliers
    are float32, destinations int64. The eager count follows the reference op by op, per-chunk
    scalars included (the tests check it against :func:`measure_eager`).
    """
    weight_bytes = dtype_bytes if weight_bytes is None else weight_bytes
    shape = _ChunkConcatShape(chunks, length, width, num_rows, dtype_bytes, weight_bytes)
    return (_chunk_concat_backward if backward else _chunk_concat_forward)(shape, restore_mean)


def _chunk_concat_forward(s: _ChunkConcatShape, restore_mean: bool) -> Comparison:
    # At the floor one program per chunk keeps the chunk on chip between its sums and its
    # writes; the kernels instead read the hidden states twice (the second time mostly from L2).
    inputs = s.hidden + s.parameters + s.multipliers + s.destinations
    minimal = _op(inputs, s.output, (_LAYER_NORM_FLOPS + (2 if restore_mean else 1)) * s.elements)
    implemented = _op(inputs + (s.row_values if restore_mean else 0), s.output, (_LAYER_NORM_FLOPS + 1) * s.elements)
    if restore_mean:
        implemented += _op(s.hidden + s.parameters, s.row_values, (_LAYER_NORM_FLOPS + 1) * s.elements)

    # Eager, op by op as chunk_concat_reference runs.
    kept_mask, multipliers_cast = s.rows, s.rows * s.dtype_bytes  # bool; multipliers in the dtype
    eager = _op(s.hidden + s.parameters, s.hidden + 2 * s.row_values, _LAYER_NORM_FLOPS * s.elements)
    if s.dtype_bytes != 4:
        eager += _op(s.multipliers, multipliers_cast)
    eager += _op(s.hidden + multipliers_cast, s.hidden, s.elements)
    if restore_mean:
        eager += _op(s.hidden, s.chunk_scalars, s.elements) + _op(s.hidden, s.chunk_scalars, s.elements)  # means
        eager += _op(2 * s.chunk_scalars, s.chunk_scalars)  # their ratio
        eager += _op(s.hidden + s.chunk_scalars, s.hidden, s.elements)
    eager += _op(s.destinations, kept_mask)
    eager += _op(writes=s.output)  # the zeros to copy into
    eager += _op(s.destinations + kept_mask, 8 * s.num_rows)  # destinations of the kept rows
    eager += _op(s.hidden + kept_mask, s.output)  # the kept rows
    eager += _op(2 * s.output + 8 * s.num_rows, s.output)  # index_copy
    return Comparison(minimal, implemented, eager)


def _chunk_concat_backward(s: _ChunkConcatShape, restore_mean: bool) -> Comparison:
    # FLOPs per hidden value: LayerNorm again, grad_y (f w g, plus the mean-restore term), the
    # sums for grad_weight and grad_bias, grad_x_hat, two row means, grad_x.
    backward_flops = _LAYER_NORM_FLOPS + (2 if restore_mean else 1) + 3 + 1 + 3 + 4
    row_dot_flops = _LAYER_NORM_FLOPS + 2  # sum_d g * y, for the mean restore
    inputs = s.hidden + s.output + s.parameters + s.multipliers + s.destinations
    minimal = _op(inputs, s.hidden + s.parameters, (backward_flops + (2 if restore_mean else 0)) * s.elements)

    _, backward_grid = LaunchConfig.for_width(s.width).grids(s.chunks, s.length)
    partials = math.prod(backward_grid) * s.width * 4  # float32, for grad_weight and again for grad_bias
    row_sums = 2 * s.row_values if restore_mean else 0  # those of y and of g * y
    implemented = _op(inputs + row_sums, s.hidden + 2 * partials, backward_flops * s.elements)
    implemented += _op(partials, 4 * s.width, partials / 4) + _op(partials, 4 * s.width, partials / 4)  # sums
    if s.weight_bytes != 4:
        implemented += _op(4 * s.width, s.parameters / 2) + _op(4 * s.width, s.parameters / 2)  # casts
    if restore_mean:
        implemented += _op(
            s.hidden + s.output + s.parameters + s.destinations, s.row_values, row_dot_flops * s.elements
        )

    # Eager: autograd through chunk_concat_reference, op by op.
    kept_mask, scalars = s.rows, s.chunk_scalars
    eager = _op(s.output + 8 * s.num_rows, s.output)  # index_copy's gradient: index_select
    eager += _op(writes=s.hidden) + _op(s.hidden + kept_mask + s.output, s.hidden)  # indexing's: zeros, index_put
    if restore_mean:
        eager += _op(2 * s.hidden, s.hidden, s.elements)  # g * weighted, for the ratio's gradient
        eager += _op(s.hidden + scalars, s.hidden, s.elements)  # g * ratio
        eager += _op(s.hidden, scalars, s.elements)  # the sum of g * weighted
        # The ratio's gradient to the two means: three divisions, a negation, a product.
        for reads in (2 * scalars, 2 * scalars, scalars, 2 * scalars, 2 * scalars):
            eager += _op(reads, scalars)
        eager += _op(scalars, s.hidden, s.elements)  # the mean of weighted, spread back
        eager += _op(2 * s.hidden, s.hidden, s.elements)  # added to g * ratio
        eager += _op(scalars, s.hidden, s.elements)  # the mean of normalized, spread back
    eager += _op(s.hidden + s.rows * s.dtype_bytes, s.hidden, s.elements)  # times the multipliers
    if restore_mean:
        eager += _op(2 * s.hidden, s.hidden, s.elements)  # plus the mean's path
    layer_norm_reads = 2 * s.hidden + 2 * s.row_values + s.parameters  # grad, input, mean, rstd, weight, bias
    eager += _op(layer_norm_reads, s.hidden + s.parameters, 11 * s.elements)
    return Comparison(minimal, implemented, eager)


# CUDA-core FLOPs per attention score: the scale, the running max, the subtraction, the
# exponential, the sum.
_SOFTMAX_FLOPS = 5


def cross_attention_cost(
    batch: int, heads: int, query_length: int, key_length: int, head_dim: int, *, dtype_bytes: int = 2
) -> Comparison:
    """Cost of :func:`nai_fast.kernels.cross_attention.cross_attention`'s forward pass.

    Matrix products count 2 FLOPs a multiply-add: 4 B H Lq Lk d for the two. The fused op
    reads Q, K and V once (a head's K and V stay in L2 across its query blocks) and writes
    the output and, as implemented, a float32 log-sum-exp per query row; its tensor-core work
    covers the padded tiles. Eager materialises the Lq x Lk scores: Q K^T, the scale, the
    softmax and the product with V each read and write them.
    """
    heads_total = batch * heads
    queries = heads_total * query_length * head_dim * dtype_bytes  # also the output
    keys = heads_total * key_length * head_dim * dtype_bytes  # also the values
    scores = heads_total * query_length * key_length
    matmul_flops = 4 * scores * head_dim
    minimal = Cost(2 * queries + 2 * keys, _SOFTMAX_FLOPS * scores, matmul_flops, launches=1)

    config = CrossAttentionLaunchConfig.for_head(head_dim, {2: torch.float16, 4: torch.float32}[dtype_bytes])
    padded_queries = -(-query_length // config.block_q) * config.block_q
    padded_keys = -(-key_length // config.block_k) * config.block_k
    padded_scores = heads_total * padded_queries * padded_keys
    padded_matmul_flops = 4 * padded_scores * config.block_head
    on_tensor_cores = dtype_bytes != 4  # float32 products run on CUDA cores
    implemented = Cost(
        bytes=2 * queries + 2 * keys + 4 * heads_total * query_length,
        flops=_SOFTMAX_FLOPS * padded_scores + (0 if on_tensor_cores else padded_matmul_flops),
        tensor_flops=padded_matmul_flops if on_tensor_cores else 0,
        launches=1,
    )

    score_bytes = scores * dtype_bytes
    eager = Cost(tensor_flops=matmul_flops)
    eager += _op(queries + keys, score_bytes)  # Q K^T
    eager += _op(score_bytes, score_bytes, scores)  # the scale
    eager += _op(score_bytes, score_bytes, (_SOFTMAX_FLOPS - 1) * scores)  # the softmax
    eager += _op(score_bytes + keys, queries)  # times V
    return Comparison(minimal, implemented, eager)


def measure_eager(fn: Callable[[], Any]) -> Cost:
    """Bytes and launches of every aten op ``fn`` runs, forward and backward alike.

    Each op that is not a view reads its tensor inputs and writes its outputs (the template
    of a ``new_*`` or ``*_like`` factory is not read); a broadcast input counts its distinct
    values once. FLOPs are not measured.
    """
    counter = _TrafficCounter()
    with counter:
        fn()
    return Cost(bytes=counter.bytes, launches=counter.launches)


class _TrafficCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.bytes, self.launches = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if not func.is_view:
            name = func.overloadpacket.__name__
            reads_inputs = not (name.startswith("new_") or name.endswith("_like"))
            inputs = tree_leaves((args, kwargs)) if reads_inputs else []
            self.bytes += sum(_distinct_bytes(leaf) for leaf in [*inputs, *tree_leaves(result)])
            self.launches += 1
        return result


def _distinct_bytes(value: Any) -> int:
    if not isinstance(value, torch.Tensor):
        return 0
    return math.prod(size for size, stride in zip(value.shape, value.stride()) if stride != 0) * value.element_size()
