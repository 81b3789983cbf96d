"""Cross-attention of many queries against a short key set, fused (flash-attention style).

Long because a kernel file holds its Triton kernels (forward and two backward), autograd
Function, op and eager reference together (DESIGN.md).

In Stable Diffusion's cross-attention, image tokens (up to 16k queries a head) attend to the
prompt's tokens: 77 to 308 keys (1 to 4 chunks of 77), head dims 40, 64, 80 or 160. This op
computes, per (batch, head),

    out = softmax(q k^T * scale) v          scale defaults to 1 / sqrt(head_dim)

without materialising the Lq x Lk scores in memory, and keeps each query row's log-sum-exp
of the scaled scores (float32, in base 2, as the kernels use it: a round trip through the
natural log would add two roundings of a value near 10, which the backward's exponentials
turn into a relative error of ~1e-6 in every recomputed probability) for the backward pass.

With a key padding mask (bool ``(batch, Lk)``, True where a key takes part) masked keys score
-inf; a query whose batch item has no valid key outputs zeros, stores a log-sum-exp of -inf
and passes no gradient (as the reference defines, and as SDPA gives).

Kernels. Tensors are contiguous ``(batch, heads, length, head_dim)``; a program works on one
(batch * head).
- ``_forward_kernel``: one program per (query block, head). K and V of a head are short, so
  the program streams them by key blocks from L2 through an online softmax (base-2
  exponentials, the scale folded with log2(e)) and writes its outputs and log-sum-exps once.
- ``_backward_query_kernel``: one program per (query block, head); stores delta = rowsum(dO * O)
  and recomputes the probabilities from the log-sum-exp to accumulate dQ.
- ``_backward_key_kernel`` (after it): one program per (key block, head) loops over every
  query block of its head and accumulates dK and dV in registers: deterministic, no atomics.
  A block of keys that all take no part skips the loop.

Head dims. A row of HEAD_DIM values is held as two tiles of powers of two, a main tile and a
tail (:func:`head_tiles`): 40 = 32 + 16 (8 of them padding), 80 = 64 + 16, 160 = 128 + 32,
64 a main tile alone. Every product over the head dim is the sum of a main and a tail dot, and
every product into it a dot per tile, so tensor cores work on 48, 80 and 160 columns instead
of the 64, 128 and 256 of a row padded to the next power of two. Loads and stores are masked
to exactly HEAD_DIM values a row (a constexpr, so rows of 40 half-precision values still load
as 16-byte vectors). A query row costs 4 Lk d FLOPs for 4 d bytes of Q and O in half
precision, Lk FLOPs a byte against ridges of about 156 on A100 and 295 on H100: the op is
memory-bound at 1 to 3 prompt chunks, and the tail keeps 4 chunks near the ridge.

Matrix products run on tensor cores in float16 and bfloat16, accumulating in float32; float32
inputs use exact (IEEE) float32 products on CUDA cores, not TF32, to stay as accurate as eager
float32, and smaller tiles (see :class:`LaunchConfig`); their head dim is limited to 160.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ._triton import SUPPORTED_DTYPES, dtype_reasons, is_interpreted, platform_reasons, tl, triton

__all__ = [
    "MAX_FLOAT32_HEAD_DIM",
    "MAX_HEAD_DIM",
    "SUPPORTED_DTYPES",
    "LaunchConfig",
    "cross_attention",
    "cross_attention_reference",
    "head_tiles",
    "not_supported_reasons",
]

MAX_HEAD_DIM = 256  # a query row and the accumulator of its output stay in registers
MAX_FLOAT32_HEAD_DIM = 160  # float32 dots run on CUDA cores; wider tiles spill (see LaunchConfig)
_LOG2_E = tl.constexpr(math.log2(math.e))

# Lengths vary per call; specialising on their divisibility by 16 would only add variants.
_UNSPECIALIZED = ["query_length", "key_length"]


# -- Triton ---------------------------------------------------------------------------------


@triton.jit
def _load_tile(matrix_ptr, rows, row_mask, FIRST_COL: tl.constexpr, WIDTH: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Columns FIRST_COL.. FIRST_COL + WIDTH of rows of a (length, HEAD_DIM) matrix, zeros past HEAD_DIM."""
    cols = FIRST_COL + tl.arange(0, WIDTH)
    mask = row_mask[:, None] & (cols < HEAD_DIM)[None, :]
    return tl.load(matrix_ptr + rows[:, None] * HEAD_DIM + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _load_tiles(matrix_ptr, rows, row_mask, HEAD_DIM: tl.constexpr, MAIN_DIM: tl.constexpr, TAIL_DIM: tl.constexpr):
    """Rows as a main tile (their first MAIN_DIM columns) and a tail tile (the next TAIL_DIM);
    without a tail (TAIL_DIM 0) the second is a placeholder the kernels never use."""
    main = _load_tile(matrix_ptr, rows, row_mask, 0, MAIN_DIM, HEAD_DIM)
    tail = 0.0
    if TAIL_DIM > 0:
        tail = _load_tile(matrix_ptr, rows, row_mask, MAIN_DIM, TAIL_DIM, HEAD_DIM)
    return main, tail


@triton.jit
def _store_tiles(
    matrix_ptr, rows, row_mask, main, tail, HEAD_DIM: tl.constexpr, MAIN_DIM: tl.constexpr, TAIL_DIM: tl.constexpr
):
    """Inverse of :func:`_load_tiles`: writes exactly HEAD_DIM values a row, in the matrix's dtype."""
    dtype = matrix_ptr.dtype.element_ty
    cols = tl.arange(0, MAIN_DIM)
    mask = row_mask[:, None] & (cols < HEAD_DIM)[None, :]  # a head dim under 16 is all main tile
    tl.store(matrix_ptr + rows[:, None] * HEAD_DIM + cols[None, :], main.to(dtype), mask=mask)
    if TAIL_DIM > 0:
        cols = MAIN_DIM + tl.arange(0, TAIL_DIM)
        mask = row_mask[:, None] & (cols < HEAD_DIM)[None, :]
        tl.store(matrix_ptr + rows[:, None] * HEAD_DIM + cols[None, :], tail.to(dtype), mask=mask)


@triton.jit
def _dot(a, b, DOT_PRECISION: tl.constexpr, UPCAST_DOTS: tl.constexpr):
    """a @ b accumulated in float32; with UPCAST_DOTS, of float32 copies (see LaunchConfig)."""
    if UPCAST_DOTS:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=DOT_PRECISION)


@triton.jit
def _dot_over_head(a_main, a_tail, b_main, b_tail, TAIL_DIM: tl.constexpr, DOT_PRECISION, UPCAST_DOTS):
    """a @ b^T for row tiles of a and b: the products of their rows, summed over the head dim."""
    result = _dot(a_main, tl.trans(b_main), DOT_PRECISION, UPCAST_DOTS)
    if TAIL_DIM > 0:
        result += _dot(a_tail, tl.trans(b_tail), DOT_PRECISION, UPCAST_DOTS)
    return result


@triton.jit
def _dot_tiles(weights, b_main, b_tail, TAIL_DIM: tl.constexpr, DOT_PRECISION, UPCAST_DOTS):
    """weights @ b, tile by tile (weights cast to b's dtype, as eager multiplies them)."""
    main = _dot(weights.to(b_main.dtype), b_main, DOT_PRECISION, UPCAST_DOTS)
    tail = 0.0
    if TAIL_DIM > 0:
        tail = _dot(weights.to(b_tail.dtype), b_tail, DOT_PRECISION, UPCAST_DOTS)
    return main, tail


@triton.jit
def _zero_tiles(ROWS: tl.constexpr, MAIN_DIM: tl.constexpr, TAIL_DIM: tl.constexpr):
    """float32 accumulators for ROWS rows, in the tiles of :func:`_load_tiles`."""
    main = tl.zeros([ROWS, MAIN_DIM], tl.float32)
    tail = 0.0
    if TAIL_DIM > 0:
        tail = tl.zeros([ROWS, TAIL_DIM], tl.float32)
    return main, tail


@triton.jit
def _taking_part(key_valid_ptr, keys, key_length, batch_index):
    """Which of ``keys`` exist and, with a key padding mask, are marked valid for the batch item."""
    exists = keys < key_length
    if key_valid_ptr is not None:
        exists &= tl.load(key_valid_ptr + batch_index * key_length + keys, mask=exists, other=False)
    return exists


@triton.jit(do_not_specialize=_UNSPECIALIZED)
def _forward_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    key_valid_ptr,
    out_ptr,
    lse_ptr,
    query_length,
    key_length,
    heads,
    scale,
    HEAD_DIM: tl.constexpr,
    MAIN_DIM: tl.constexpr,
    TAIL_DIM: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOTS: tl.constexpr,
):
    """out and log-sum-exp of BLOCK_Q query rows of one head."""
    head = tl.program_id(1).to(tl.int64)  # of batch * heads
    q_ptr += head * query_length * HEAD_DIM
    out_ptr += head * query_length * HEAD_DIM
    k_ptr += head * key_length * HEAD_DIM
    v_ptr += head * key_length * HEAD_DIM
    queries = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    query_mask = queries < query_length
    q_main, q_tail = _load_tiles(q_ptr, queries, query_mask, HEAD_DIM, MAIN_DIM, TAIL_DIM)

    scale_log2 = scale * _LOG2_E
    row_max = tl.full([BLOCK_Q], float("-inf"), tl.float32)  # base-2 scaled scores
    row_sum = tl.zeros([BLOCK_Q], tl.float32)
    acc_main, acc_tail = _zero_tiles(BLOCK_Q, MAIN_DIM, TAIL_DIM)
    for key_start in range(0, key_length, BLOCK_K):
        keys = key_start + tl.arange(0, BLOCK_K)
        key_mask = _taking_part(key_valid_ptr, keys, key_length, head // heads)
        k_main, k_tail = _load_tiles(k_ptr, keys, key_mask, HEAD_DIM, MAIN_DIM, TAIL_DIM)
        v_main, v_tail = _load_tiles(v_ptr, keys, key_mask, HEAD_DIM, MAIN_DIM, TAIL_DIM)
        scores = _dot_over_head(q_main, q_tail, k_main, k_tail, TAIL_DIM, DOT_PRECISION, UPCAST_DOTS) * scale_log2
        scores = tl.where(key_mask[None, :], scores, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, axis=1))
        # The max stays -inf until a key takes part (a masked block, a row with no valid key):
        # shift by 0 then, so that exp2 gives 0 for those keys, not NaN from -inf - -inf.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        correction = tl.exp2(row_max - shift)
        probs = tl.exp2(scores - shift[:, None])
        row_sum = row_sum * correction + tl.sum(probs, axis=1)
        pv_main, pv_tail = _dot_tiles(probs, v_main, v_tail, TAIL_DIM, DOT_PRECISION, UPCAST_DOTS)
        acc_main = acc_main * correction[:, None] + pv_main
        if TAIL_DIM > 0:
            acc_tail = acc_tail * correction[:, None] + pv_tail
        row_max = new_max

    # A row with no valid key has a zero sum and accumulator: its output is 0, its lse -inf.
    denominator = tl.where(row_sum > 0, row_sum, 1.0)[:, None]
    _store_tiles(out_ptr, queries, query_mask, acc_main / denominator, acc_tail / denominator, HEAD_DIM, MAIN_DIM, TAIL_DIM)
    tl.store(lse_ptr + head * query_length + queries, row_max + tl.log2(row_sum), mask=query_mask)


@triton.jit(do_not_specialize=_UNSPECIALIZED)
def _backward_query_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    key_valid_ptr,
    out_ptr,
    grad_out_ptr,
    lse_ptr,
    delta_ptr,
    grad_q_ptr,
    query_length,
    key_length,
    heads,
    scale,
    HEAD_DIM: tl.constexpr,
    MAIN_DIM: tl.constexpr,
    TAIL_DIM: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOTS: tl.constexpr,
):
    """dQ of BLOCK_Q query rows of one head; stores their delta = rowsum(dO * O) on the way."""
    head = tl.program_id(1).to(tl.int64)
    query_offset = head * query_length * HEAD_DIM
    k_ptr += head * key_length * HEAD_DIM
    v_ptr += head * key_length * HEAD_DIM
    queries = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    query_mask = queries < query_length
    q_main, q_tail = _load_tiles(q_ptr + query_offset, queries, query_mask, HEAD_DIM, MAIN_DIM, TAIL_DIM)
    do_main, do_tail = _load_tiles(grad_out_ptr + query_offset, queries, query_mask, HEAD_DIM, MAIN_DIM, TAIL_DIM)
    out_main, out_tail = _load_tiles(out_ptr + query_offset, queries, query_mask, HEAD_DIM, MAIN_DIM, TAIL_DIM)
    delta = tl.sum(do_main.to(tl.float32) * out_main.to(tl.float32), axis=1)
    if TAIL_DIM > 0:
        delta += tl.sum(do_tail.to(tl.float32) * out_tail.to(tl.float32), axis=1)
    tl.store(delta_ptr + head * query_length + queries, delta, mask=query_mask)
    lse_log2 = tl.load(lse_ptr + head * query_length + queries, mask=query_mask, other=0.0)

    scale_log2 = scale * _LOG2_E
    dq_main, dq_tail = _zero_tiles(BLOCK_Q, MAIN_DIM, TAIL_DIM)
    for key_start in range(0, key_length, BLOCK_K):
        keys = key_start + tl.arange(0, BLOCK_K)
        key_mask = _taking_part(key_valid_ptr, keys, key_length, head // heads)
        k_main, k_tail = _load_tiles(k_ptr, keys, key_mask, HEAD_DIM, MAIN_DIM, TAIL_DIM)
        v_main, v_tail = _load_tiles(v_ptr, keys, key_mask, HEAD_DIM, MAIN_DIM, TAIL_DIM)
        scores = _dot_over_head(q_main, q_tail, k_main, k_tail, TAIL_DIM, DOT_PRECISION, UPCAST_DOTS) * scale_log2
        # Keys that do not take part load as zeros and score 0, whose exp2(0 - lse) may
        # overflow (and is inf where lse is -inf, a row with no valid key): zero them explicitly.
        probs = tl.where(key_mask[None, :], tl.exp2(scores - lse_log2[:, None]), 0.0)
        grad_probs = _dot_over_head(do_main, do_tail, v_main, v_tail, TAIL_DIM, DOT_PRECISION, UPCAST_DOTS)
        grad_scores = probs * (grad_probs - delta[:, None])
        step_main, step_tail = _dot_tiles(grad_scores, k_main, k_tail, TAIL_DIM, DOT_PRECISION, UPCAST_DOTS)
        dq_main += step_main
        if TAIL_DIM > 0:
            dq_tail += step_tail

    _store_tiles(grad_q_ptr + query_offset, queries, query_mask, dq_main * scale, dq_tail * scale, HEAD_DIM, MAIN_DIM, TAIL_DIM)


@triton.jit(do_not_specialize=_UNSPECIALIZED)
def _backward_key_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    key_valid_ptr,
    grad_out_ptr,
    lse_ptr,
    delta_ptr,
    grad_k_ptr,
    grad_v_ptr,
    query_length,
    key_length,
    heads,
    scale,
    HEAD_DIM: tl.constexpr,
    MAIN_DIM: tl.constexpr,
    TAIL_DIM: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOTS: tl.constexpr,
):
    """dK and dV of BLOCK_K key rows of one head, summed over every query of the head."""
    head = tl.program_id(1).to(tl.int64)
    key_offset = head * key_length * HEAD_DIM
    q_ptr += head * query_length * HEAD_DIM
    grad_out_ptr += head * query_length * HEAD_DIM
    lse_ptr += head * query_length
    delta_ptr += head * query_length
    keys = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    key_exists = keys < key_length
    key_mask = _taking_part(key_valid_ptr, keys, key_length, head // heads)
    k_main, k_tail = _load_tiles(k_ptr + key_offset, keys, key_mask, HEAD_DIM, MAIN_DIM, TAIL_DIM)
    v_main, v_tail = _load_tiles(v_ptr + key_offset, keys, key_mask, HEAD_DIM, MAIN_DIM, TAIL_DIM)

    scale_log2 = scale * _LOG2_E
    dk_main, dk_tail = _zero_tiles(BLOCK_K, MAIN_DIM, TAIL_DIM)
    dv_main, dv_tail = _zero_tiles(BLOCK_K, MAIN_DIM, TAIL_DIM)
    # Keys that take no part get zero gradients: a block of only those skips the queries.
    query_end = tl.where(tl.max(key_mask.to(tl.int32)) > 0, query_length, 0)
    for query_start in range(0, query_end, BLOCK_Q):
        queries = query_start + tl.arange(0, BLOCK_Q)
        query_mask = queries < query_length
        q_main, q_tail = _load_tiles(q_ptr, queries, query_mask, HEAD_DIM, MAIN_DIM, TAIL_DIM)
        do_main, do_tail = _load_tiles(grad_out_ptr, queries, query_mask, HEAD_DIM, MAIN_DIM, TAIL_DIM)
        # Padding queries load as zeros (q, dO, lse, delta): probabilities of 1 times zeros.
        lse_log2 = tl.load(lse_ptr + queries, mask=query_mask, other=0.0)
        delta = tl.load(delta_ptr + queries, mask=query_mask, other=0.0)
        scores_t = _dot_over_head(k_main, k_tail, q_main, q_tail, TAIL_DIM, DOT_PRECISION, UPCAST_DOTS) * scale_log2
        probs_t = tl.exp2(scores_t - lse_log2[None, :])  # [keys, queries]
        if key_valid_ptr is not None:  # masked keys load as zeros, as in the query kernel
            probs_t = tl.where(key_mask[:, None], probs_t, 0.0)
        pdo_main, pdo_tail = _dot_tiles(probs_t, do_main, do_tail, TAIL_DIM, DOT_PRECISION, UPCAST_DOTS)
        grad_probs_t = _dot_over_head(v_main, v_tail, do_main, do_tail, TAIL_DIM, DOT_PRECISION, UPCAST_DOTS)
        grad_scores_t = probs_t * (grad_probs_t - delta[None, :])
        dsq_main, dsq_tail = _dot_tiles(grad_scores_t, q_main, q_tail, TAIL_DIM, DOT_PRECISION, UPCAST_DOTS)
        dv_main += pdo_main
        dk_main += dsq_main
        if TAIL_DIM > 0:
            dv_tail += pdo_tail
            dk_tail += dsq_tail

    _store_tiles(grad_k_ptr + key_offset, keys, key_exists, dk_main * scale, dk_tail * scale, HEAD_DIM, MAIN_DIM, TAIL_DIM)
    _store_tiles(grad_v_ptr + key_offset, keys, key_exists, dv_main, dv_tail, HEAD_DIM, MAIN_DIM, TAIL_DIM)


# -- launching --------------------------------------------------------------------------------


def head_tiles(head_dim: int) -> tuple[int, int]:
    """(main, tail) tile widths covering ``head_dim`` columns: powers of two, 16 at least
    (tl.dot's minimum), the tail 0 where the main tile covers the row (see the module doc)."""
    main = max(16, 1 << (head_dim.bit_length() - 1))
    rest = head_dim - main
    if rest <= 0:
        return main, 0
    tail = max(16, 1 << (rest - 1).bit_length())
    return (2 * main, 0) if tail == main else (main, tail)  # two equal tiles: one of twice the width


class LaunchConfig(NamedTuple):
    """How the kernels tile a head of a given head dim and dtype."""

    head_dim: int
    main_dim: int
    tail_dim: int
    block_q: int  # queries a program of the forward and dQ kernels takes
    block_k: int  # keys they take a step, and a program of the dK/dV kernel takes
    key_block_q: int  # queries the dK/dV kernel takes a step
    num_warps: int
    num_stages: int
    dot_precision: str
    upcast_dots: bool

    @property
    def tile_dim(self) -> int:
        """Columns a row's dots cover: head_dim rounded up to main + tail."""
        return self.main_dim + self.tail_dim

    @staticmethod
    def for_head(head_dim: int, dtype: torch.dtype, interpreted: bool = False) -> LaunchConfig:
        """Rows as a main and a tail tile (:func:`head_tiles`); blocks chosen so that no kernel
        spills registers on sm_80 or sm_90 (the tests read ptxas' numbers).

        Half precision: forward and dQ take 64 queries by steps of 32 keys (32-key blocks
        waste few padding keys at Lk = 77 n: 96 for 77), dK/dV 32 keys by steps of 32
        queries (it holds two accumulators and K and V of its keys: steps of 64 spill at head
        dim 80 with a mask). Rows wider than 128 take 8 warps and blocks of 16 keys (with 4
        warps or 32 keys, dK/dV spills, and dQ with a mask on sm_80). Two pipeline stages,
        as the keys come from L2.
        float32 dots run on CUDA cores (exact products, not TF32), whose operands need more
        registers: 16 by 16 tiles and 8 warps keep every kernel from spilling up to 160-wide
        rows (256 spill in dQ).

        Under the interpreter dots run on float32 copies of their operands: Triton 3.9's
        interpreter multiplies bfloat16 operands as their raw uint16 storage. The products of
        half-precision values are exact in float32, as on tensor cores.
        """
        main_dim, tail_dim = head_tiles(head_dim)
        tiles = (head_dim, main_dim, tail_dim)
        if dtype == torch.float32:
            return LaunchConfig(*tiles, 16, 16, 16, 8, 1, "ieee", upcast_dots=interpreted)
        wide = main_dim + tail_dim > 128
        dot_precision = "ieee" if interpreted else "tf32"  # half-precision dots ignore it
        return LaunchConfig(*tiles, 64, 16 if wide else 32, 32, 8 if wide else 4, 2, dot_precision, interpreted)

    def grid(self, length: int, heads: int, block: int) -> tuple[int, int]:
        return -(-length // block), heads

    def options(self, key_kernel: bool = False) -> dict:
        """Launch options of the forward and dQ kernels, or with ``key_kernel`` of dK/dV."""
        # maxnreg: as in chunk_concat, ptxas otherwise spills rather than use more registers.
        return dict(
            HEAD_DIM=self.head_dim, MAIN_DIM=self.main_dim, TAIL_DIM=self.tail_dim,
            BLOCK_Q=self.key_block_q if key_kernel else self.block_q, BLOCK_K=self.block_k, DOT_PRECISION=self.dot_precision, UPCAST_DOTS=self.upcast_dots,
            num_warps=self.num_warps, num_stages=self.num_stages, maxnreg=255,
        )  # fmt: skip


class _CrossAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, key_padding_mask):
        batch, heads, query_length, head_dim = q.shape
        key_length = k.shape[2]
        config = LaunchConfig.for_head(head_dim, q.dtype, is_interpreted(_forward_kernel))
        out = torch.empty_like(q)
        lse = torch.empty((batch, heads, query_length), device=q.device, dtype=torch.float32)
        _forward_kernel[config.grid(query_length, batch * heads, config.block_q)](
            q, k, v, key_padding_mask, out, lse, query_length, key_length, heads, scale, **config.options()
        )
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.key_padding_mask = scale, key_padding_mask
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        batch, heads, query_length, head_dim = q.shape
        key_length = k.shape[2]
        config = LaunchConfig.for_head(head_dim, q.dtype, is_interpreted(_forward_kernel))
        grad_out = grad_out.contiguous()
        delta = torch.empty_like(lse)
        grad_q, grad_k, grad_v = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        mask, sizes = ctx.key_padding_mask, (query_length, key_length, heads, ctx.scale)
        _backward_query_kernel[config.grid(query_length, batch * heads, config.block_q)](
            q, k, v, mask, out, grad_out, lse, delta, grad_q, *sizes, **config.options()
        )
        _backward_key_kernel[config.grid(key_length, batch * heads, config.block_k)](
            q, k, v, mask, grad_out, lse, delta, grad_k, grad_v, *sizes, **config.options(key_kernel=True)
        )
        return grad_q, grad_k, grad_v, None, None


# -- the op -----------------------------------------------------------------------------------


def cross_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    *,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The Triton op; :func:`cross_attention_reference` defines it and documents the arguments.

    Runs on CUDA tensors, or on CPU tensors when ``TRITON_INTERPRET=1`` was set before Triton
    was first imported. Differentiable in ``q``, ``k`` and ``v``.
    """
    if q.dim() != 4 or k.shape != v.shape or k.shape[:2] != q.shape[:2] or k.shape[3:] != q.shape[3:]:
        raise ValueError(
            "q, k and v must be (batch, heads, length, head_dim) with k and v of one shape, "
            f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape[2] == 0:
        raise ValueError("cross_attention needs at least one key")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if key_padding_mask is not None:
        _check_key_padding_mask(key_padding_mask, q.shape[0], k.shape[2], q.device)
        key_padding_mask = key_padding_mask.contiguous()
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _CrossAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), scale, key_padding_mask)


def _check_key_padding_mask(mask: torch.Tensor, batch: int, key_length: int, device: torch.device) -> None:
    if mask.dtype != torch.bool or mask.shape != (batch, key_length) or mask.device != device:
        raise ValueError(
            f"key_padding_mask must be a bool (batch, Lk) = ({batch}, {key_length}) tensor on {device}, "
            f"got {mask.dtype} {tuple(mask.shape)} on {mask.device}"
        )


def not_supported_reasons(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> list[str]:
    """Why :func:`cross_attention` cannot take these inputs here (empty: it can)."""
    reasons = platform_reasons(_forward_kernel, q.device) + dtype_reasons(q=q, k=k, v=v)
    if q.shape[-1] > MAX_HEAD_DIM:
        reasons.append(f"head dim {q.shape[-1]} exceeds the {MAX_HEAD_DIM} a block holds")
    elif q.dtype == torch.float32 and q.shape[-1] > MAX_FLOAT32_HEAD_DIM:
        reasons.append(f"float32 head dim {q.shape[-1]} exceeds {MAX_FLOAT32_HEAD_DIM} (registers would spill)")
    return reasons


def cross_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    *,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention, optionally with a key padding mask; defines the op.

    Args:
        q: ``(batch, heads, Lq, head_dim)`` queries.
        k, v: ``(batch, heads, Lk, head_dim)`` keys and values.
        scale: multiplies the scores before the softmax; default ``1 / sqrt(head_dim)``.
        key_padding_mask: optional bool ``(batch, Lk)``; True where the key takes part, as in
            SDPA's boolean ``attn_mask``. A query whose batch item has no valid key attends to
            nothing: its output is zeros (as SDPA gives) and it passes no gradient.

    Returns:
        ``(batch, heads, Lq, head_dim)`` in the dtype of ``q``, computed in that dtype with the
        scores materialised (the eager path); differentiable in ``q``, ``k`` and ``v``.
    """
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale
    if key_padding_mask is None:
        return scores.softmax(dim=-1) @ v
    if key_padding_mask.shape != (q.shape[0], k.shape[2]):
        raise ValueError(f"key_padding_mask must be (batch, Lk), got {tuple(key_padding_mask.shape)}")
    takes_part = key_padding_mask[:, None, None, :]
    probs = torch.where(takes_part, scores, float("-inf")).softmax(dim=-1)
    # Rows with no valid key softmax to NaN: zero them. Their gradient stays finite, since
    # where() passes the scores none of the NaN softmax gradient.
    probs = torch.where(takes_part.any(dim=-1, keepdim=True), probs, 0.0)
    return probs @ v
