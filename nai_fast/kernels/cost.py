"""Roofline cost of fused kernels against the eager PyTorch they replace.

Long because it models every op's fused, minimal and eager traffic side by side, op by op, so
the tests can check the eager counts against what autograd runs.

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
from .hyper_kv import LaunchConfig as HyperKVLaunchConfig

__all__ = [
    "A100",
    "DEVICES",
    "H100_SXM",
    "Comparison",
    "Cost",
    "Device",
    "chunk_concat_cost",
    "cross_attention_cost",
    "hyper_kv_cost",
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
        eager += _restore_guard(s, backward=False)
        eager += _op(s.hidden + s.chunk_scalars, s.hidden, s.elements)
    eager += _op(s.destinations, kept_mask)
    eager += _op(writes=s.output)  # the zeros to copy into
    eager += _op(s.destinations + kept_mask, 8 * s.num_rows)  # destinations of the kept rows
    eager += _op(s.hidden + kept_mask, s.output)  # the kept rows
    eager += _op(2 * s.output + 8 * s.num_rows, s.output)  # index_copy
    return Comparison(minimal, implemented, eager)


def _restore_guard(s: _ChunkConcatShape, backward: bool) -> Cost:
    """The reference's per-chunk ops that skip the restore where a chunk's mean is ~0: forward,
    |mean| >= bound (an abs, a comparison), the count of skipped chunks read by the host (a sum
    and the read), and two selects of 1.0 (each a scalar tensor and a where); backward, the
    gradients of the two selects."""
    flags, one = s.chunks, s.dtype_bytes  # bool per chunk; the scalar 1.0 in the dtype
    select = _op(writes=one) + _op(flags + s.chunk_scalars + one, s.chunk_scalars)
    if backward:
        return select + select
    count = _op(s.chunk_scalars, s.chunk_scalars) + _op(s.chunk_scalars, flags) + _op(flags, 8) + _op(8)
    return count + select + select


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
        eager += _restore_guard(s, backward=True)
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
# exponential, the sum. Backward, recomputing P and forming dS = P (dP - delta): the scale, the
# subtraction of the log-sum-exp, the exponential, the subtraction of delta, the product.
_SOFTMAX_FLOPS = 5
_SOFTMAX_BACKWARD_FLOPS = 5


def cross_attention_cost(
    batch: int,
    heads: int,
    query_length: int,
    key_length: int,
    head_dim: int,
    *,
    dtype_bytes: int = 2,
    backward: bool = False,
) -> Comparison:
    """Cost of :func:`nai_fast.kernels.cross_attention.cross_attention`'s forward (or backward)
    pass, without a key padding mask.

    Matrix products count 2 FLOPs a multiply-add, 2 B H Lq Lk d each: two forward; backward,
    dV = P^T dO, dP = dO V^T, dQ = dS K and dK = dS^T Q with the recomputation of S (five). A
    head's K and V stay in L2 across the programs that read them, so they count once. Tiles as
    implemented: queries and keys padded to the blocks, each row to main + tail columns
    (:class:`~nai_fast.kernels.cross_attention.LaunchConfig`). Eager materialises the Lq x Lk
    scores and every op reads and writes them (the tests check the count against
    :func:`measure_eager`).
    """
    dtype = {2: torch.float16, 4: torch.float32}[dtype_bytes]
    shape = _AttentionShape(batch * heads, query_length, key_length, head_dim, dtype_bytes)
    config = CrossAttentionLaunchConfig.for_head(head_dim, dtype)
    return (_cross_attention_backward if backward else _cross_attention_forward)(shape, config)


@dataclass(frozen=True)
class _AttentionShape:
    """Sizes of cross_attention's tensors, in values and in bytes of one pass over each."""

    heads: int  # batch x heads
    query_length: int
    key_length: int
    head_dim: int
    dtype_bytes: int

    @property
    def queries(self) -> int:  # also the output, their gradients
        return self.heads * self.query_length * self.head_dim * self.dtype_bytes

    @property
    def keys(self) -> int:  # also the values, their gradients
        return self.heads * self.key_length * self.head_dim * self.dtype_bytes

    @property
    def row_values(self) -> int:  # a float32 per query row: the log-sum-exp, delta
        return 4 * self.heads * self.query_length

    @property
    def scores(self) -> int:
        return self.heads * self.query_length * self.key_length

    def padded_scores(self, block_q: int, block_k: int) -> int:
        """Scores the kernels compute with queries and keys padded to their blocks."""
        return self.heads * -(-self.query_length // block_q) * block_q * -(-self.key_length // block_k) * block_k


def _implemented(matmul_flops: float, vector_flops: float, dtype_bytes: int, **cost) -> Cost:
    """A kernel launch whose matrix products run on tensor cores, except in float32."""
    on_tensor_cores = dtype_bytes != 4  # float32 products run on CUDA cores
    return Cost(
        flops=vector_flops + (0 if on_tensor_cores else matmul_flops),
        tensor_flops=matmul_flops if on_tensor_cores else 0,
        launches=1,
        **cost,
    )


def _cross_attention_forward(s: _AttentionShape, config) -> Comparison:
    matmul_flops = 4 * s.scores * s.head_dim
    minimal = Cost(2 * s.queries + 2 * s.keys, _SOFTMAX_FLOPS * s.scores, matmul_flops, launches=1)

    padded = s.padded_scores(config.block_q, config.block_k)
    implemented = _implemented(
        4 * padded * config.tile_dim, _SOFTMAX_FLOPS * padded, s.dtype_bytes,
        bytes=2 * s.queries + 2 * s.keys + s.row_values,
    )  # fmt: skip

    score_bytes = s.scores * s.dtype_bytes
    eager = Cost(tensor_flops=matmul_flops)
    eager += _op(s.queries + s.keys, score_bytes)  # Q K^T
    eager += _op(score_bytes, score_bytes, s.scores)  # the scale
    eager += _op(score_bytes, score_bytes, (_SOFTMAX_FLOPS - 1) * s.scores)  # the softmax
    eager += _op(score_bytes + s.keys, s.queries)  # times V
    return Comparison(minimal, implemented, eager)


def _cross_attention_backward(s: _AttentionShape, config) -> Comparison:
    matmul_flops = 2 * s.scores * s.head_dim  # one product
    delta_flops = 2 * s.queries / s.dtype_bytes  # rowsum(dO * O)
    # At the floor one kernel reads Q, K, V, O, dO and the log-sum-exp once and writes the
    # gradients, recomputing P once (FlashAttention-2's backward, with dQ accumulated on chip).
    minimal = Cost(
        bytes=4 * s.queries + 4 * s.keys + s.row_values,
        flops=_SOFTMAX_BACKWARD_FLOPS * s.scores + delta_flops,
        tensor_flops=5 * matmul_flops,
        launches=1,
    )

    # dQ: per query block, Q, dO, O and the log-sum-exp in, delta and dQ out; S and dP recomputed.
    padded = s.padded_scores(config.block_q, config.block_k)
    implemented = _implemented(
        3 * 2 * padded * config.tile_dim, _SOFTMAX_BACKWARD_FLOPS * padded + delta_flops, s.dtype_bytes,
        bytes=3 * s.queries + s.row_values + 2 * s.keys + s.row_values + s.queries,
    )  # fmt: skip
    # dK/dV: each key block reads all of its head's Q, dO, log-sum-exp and delta (adjacent
    # programs share a head, so part of it comes from L2: an upper bound), recomputes S and dP.
    key_blocks = -(-s.key_length // config.block_k)
    padded = s.padded_scores(config.key_block_q, config.block_k)
    implemented += _implemented(
        4 * 2 * padded * config.tile_dim, _SOFTMAX_BACKWARD_FLOPS * padded, s.dtype_bytes,
        bytes=key_blocks * (2 * s.queries + 2 * s.row_values) + 2 * s.keys + 2 * s.keys,
    )  # fmt: skip

    # Eager: autograd through cross_attention_reference, op by op.
    score_bytes = s.scores * s.dtype_bytes
    eager = Cost(tensor_flops=4 * matmul_flops)
    eager += _op(score_bytes + s.queries, s.keys)  # dV = P^T dO
    eager += _op(s.queries + s.keys, score_bytes)  # dP = dO V^T
    eager += _op(2 * score_bytes, score_bytes, (_SOFTMAX_BACKWARD_FLOPS - 1) * s.scores)  # softmax's
    eager += _op(score_bytes, score_bytes, s.scores)  # the scale's
    eager += _op(score_bytes + s.queries, s.keys)  # dK^T = dS^T Q, as a (d, Lk) matrix
    eager += _op(score_bytes + s.keys, s.queries)  # dQ = dS K
    # dK^T laid out as K: an allocation and a copy, counted as measure_eager counts them.
    eager += _op(writes=s.keys) + _op(2 * s.keys, s.keys)
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


# -- hyper_kv -----------------------------------------------------------------------------------

# CUDA-core FLOPs per hidden value: the first Linear's bias and the activation (counted as one,
# whatever it is: the tensor work dwarfs it); per residual value, the strength and the sum.
_HIDDEN_EPILOGUE_FLOPS = 2
_RESIDUAL_FLOPS = 2


@dataclass(frozen=True)
class _HyperKVShape:
    """Sizes of hyper_kv's tensors for one of its two nets, in bytes of one pass over each."""

    tokens: int
    width: int
    hidden_width: int
    out_width: int
    dtype_bytes: int

    @property
    def x(self) -> int:  # also net(x), s net(x), the residual sum and their gradients
        return self.tokens * self.width * self.dtype_bytes

    @property
    def hidden(self) -> int:  # pre-activations, h, and their gradients
        return self.tokens * self.hidden_width * self.dtype_bytes

    @property
    def out(self) -> int:  # K or V, and its gradient
        return self.tokens * self.out_width * self.dtype_bytes

    @property
    def projection(self) -> int:  # Wk or Wv
        return self.out_width * self.width * self.dtype_bytes

    @property
    def linear(self) -> int:  # W1 or W2 (and dW1, dW2)
        return self.hidden_width * self.width * self.dtype_bytes

    @property
    def folded(self) -> int:  # G = s Wk W2
        return self.out_width * self.hidden_width * self.dtype_bytes

    @property
    def net_flops(self) -> int:  # tensor FLOPs of the two Linears and the projection
        return 2 * self.tokens * (2 * self.width * self.hidden_width + self.width * self.out_width)


def hyper_kv_cost(
    tokens: int,
    width: int,
    hidden_width: int | None = None,
    out_width: int | None = None,
    *,
    dtype_bytes: int = 2,
    activation: str = "relu",
    backward: bool = False,
    input_grad: bool = True,
) -> Comparison:
    """Cost of :func:`nai_fast.kernels.hyper_kv.hyper_kv`'s forward (or backward) pass.

    ``tokens`` rows of ``width`` values feed two nets of ``hidden_width`` (default ``2 *
    width``) hidden units and two projections to ``out_width`` (default ``width``), without
    projection biases; ``dtype_bytes``-byte floats throughout. The backward pass gives every
    hypernetwork parameter its gradient, and ``x`` its own with ``input_grad`` (it has one in
    self-attention, where x is the U-Net's hidden states), never the projections (frozen in
    hypernetwork training). Eager: the reference op by op (the tests check it against
    :func:`measure_eager`); ``activation="linear"`` launches no activation.

    The floor reads x and the parameters once and writes K and V; no hidden value reaches
    memory. As implemented, h is written and read once a pass (dpre once backward), the fold
    (G = s Wk W2, c = s Wk b2) costs its products every call, and tensor FLOPs cover the
    padded tiles.
    """
    shape = _HyperKVShape(tokens, width, hidden_width or 2 * width, out_width or width, dtype_bytes)
    dtype = {2: torch.float16, 4: torch.float32}[dtype_bytes]
    on_tensor_cores = dtype_bytes != 4  # float32 products run on CUDA cores in the kernels
    model = _hyper_kv_backward if backward else _hyper_kv_forward
    minimal, implemented, eager = model(shape, dtype, activation != "linear", input_grad)
    if not on_tensor_cores:
        implemented = Cost(implemented.bytes, implemented.flops + implemented.tensor_flops, 0, implemented.launches)
    return Comparison(minimal, implemented, eager)


def _padded_tensor_flops(config, rows: int, cols: int, *depths: int) -> int:
    """2 x rows x cols x depth as a kernel's tiles compute it: whole tiles and depth steps."""

    def padded(size: int, block: int) -> int:
        return -(-size // block) * block

    depth = sum(padded(size, config.block_depth) for size in depths)
    return 2 * padded(rows, config.block_rows) * padded(cols, config.block_cols) * depth


def _hyper_kv_forward(s: _HyperKVShape, dtype: torch.dtype, activates: bool, _) -> tuple[Cost, Cost, Cost]:
    parameters = s.projection + 2 * s.linear + (s.hidden_width + s.width) * s.dtype_bytes  # Wk, W1, W2, b1, b2
    hidden_flops = _HIDDEN_EPILOGUE_FLOPS * s.tokens * s.hidden_width
    minimal = Cost(s.x + 2 * (parameters + s.out), 2 * hidden_flops, 2 * s.net_flops, launches=1)

    config = HyperKVLaunchConfig.for_dtype(dtype)
    folded_bias = s.out_width * s.dtype_bytes
    implemented = Cost()
    for _net in range(2):
        fold = _op(writes=s.dtype_bytes)  # the zero the fold adds where there is no projection bias
        fold += _op(s.projection + s.linear, s.folded) + _op(s.projection + s.width * s.dtype_bytes, folded_bias)
        fold += Cost(flops=2 * s.out_width * s.width, tensor_flops=2 * s.out_width * s.width * s.hidden_width)
        hidden = _op(s.x + s.linear + s.hidden_width * s.dtype_bytes, s.hidden, hidden_flops)
        hidden += Cost(tensor_flops=_padded_tensor_flops(config, s.tokens, s.hidden_width, s.width))
        projection = _op(s.x + s.hidden + s.projection + s.folded + folded_bias, s.out)
        projection += Cost(tensor_flops=_padded_tensor_flops(config, s.tokens, s.out_width, s.width, s.hidden_width))
        implemented += fold + hidden + projection

    # Eager, per net: Linear, activation, Linear, times s, plus x, projection.
    eager = Cost()
    for _net in range(2):
        eager += _op(s.x + s.linear + s.hidden_width * s.dtype_bytes, s.hidden)
        if activates:
            eager += _op(s.hidden, s.hidden, s.tokens * s.hidden_width)
        eager += _op(s.hidden + s.linear + s.width * s.dtype_bytes, s.x)
        eager += _op(s.x, s.x, s.tokens * s.width) + _op(2 * s.x, s.x, s.tokens * s.width)
        eager += _op(s.x + s.projection, s.out) + Cost(tensor_flops=s.net_flops)
    return minimal, implemented, eager


def _hyper_kv_backward(s: _HyperKVShape, dtype: torch.dtype, activates: bool, input_grad: bool) -> tuple[Cost, Cost, Cost]:
    # Per net: the gradient of h, and of pre (the activation's slope), and of every parameter:
    # tensor work of the forward's three products (dh; dW1, dW2; dx through both paths), less
    # the projection's own weight gradient.
    biases = (s.hidden_width + s.width) * s.dtype_bytes  # b1, b2 or their gradients
    parameters = s.projection + 2 * s.linear + biases
    backward_tensor_flops = 2 * s.tokens * (
        s.out_width * s.width  # dr = dK Wk
        + 2 * s.width * s.hidden_width  # dh = s dr W2, and dW2 (as dG = dK^T h, folded back)
        + s.width * s.hidden_width  # dW1
        + (s.width * s.hidden_width if input_grad else 0)  # dx's path through W1
    )
    hidden_flops = 2 * _HIDDEN_EPILOGUE_FLOPS * s.tokens * s.hidden_width  # the activation and its slope
    grad_x = s.x if input_grad else 0
    minimal = Cost(
        s.x + 2 * (s.out + parameters + 2 * s.linear + biases) + grad_x,
        2 * hidden_flops,
        2 * backward_tensor_flops + 2 * 2 * s.tokens * s.width * s.hidden_width,  # the pre-activations again
        launches=1,
    )

    config = HyperKVLaunchConfig.for_dtype(dtype, backward=True)
    net_tensor_flops = 2 * s.tokens * s.width * s.hidden_width  # one product of x's or h's size
    implemented = Cost()
    for _net in range(2):
        implemented += _op(s.out + s.projection, s.x) + Cost(tensor_flops=2 * s.tokens * s.out_width * s.width)  # dr
        implemented += _op(s.x + s.hidden, s.linear) + _op(s.linear, s.linear, s.width * s.hidden_width)  # dW2
        implemented += _op(s.x, s.width * s.dtype_bytes, s.tokens * s.width) + _op(  # db2
            s.width * s.dtype_bytes, s.width * s.dtype_bytes, s.width
        )
        implemented += _op(2 * s.x + 2 * s.linear + s.hidden_width * s.dtype_bytes, s.hidden, hidden_flops)
        implemented += Cost(tensor_flops=_padded_tensor_flops(config, s.tokens, s.hidden_width, s.width, s.width))
        implemented += _op(s.hidden + s.x, s.linear)  # dW1
        implemented += _op(s.hidden, s.hidden_width * s.dtype_bytes, s.tokens * s.hidden_width)  # db1
        implemented += Cost(tensor_flops=(3 if input_grad else 2) * net_tensor_flops)  # dW2, dW1 (dx)
        if input_grad:  # dx = dr + dpre W1, in place
            implemented += _op(s.x + s.hidden + s.linear, s.x)
    if input_grad:
        implemented += _op(2 * s.x, s.x, s.tokens * s.width)  # dx of K's net plus dx of V's

    # Eager: autograd through hyper_kv_reference, op by op.
    eager = Cost()
    for _net in range(2):
        eager += _op(s.out + s.projection, s.x) + Cost(tensor_flops=2 * s.tokens * s.out_width * s.width)  # dr
        eager += _op(s.x, s.x, s.tokens * s.width)  # times s
        eager += _op(s.x + s.linear, s.hidden) + _op(s.x + s.hidden, s.linear) + _op(s.x, s.width * s.dtype_bytes)
        eager += Cost(tensor_flops=2 * 2 * s.tokens * s.width * s.hidden_width, flops=s.tokens * s.width)
        if activates:
            eager += _op(2 * s.hidden, s.hidden, s.tokens * s.hidden_width)
        if input_grad:
            eager += _op(s.hidden + s.linear, s.x) + Cost(tensor_flops=2 * s.tokens * s.width * s.hidden_width)
        eager += _op(s.hidden + s.x, s.linear) + _op(s.hidden, s.hidden_width * s.dtype_bytes)
        eager += Cost(tensor_flops=2 * s.tokens * s.width * s.hidden_width, flops=s.tokens * s.hidden_width)
    if input_grad:  # x feeds four ops: three sums of its gradients
        for _sum in range(3):
            eager += _op(2 * s.x, s.x, s.tokens * s.width)
    return minimal, implemented, eager
