"""Cross-attention of many queries against a short key set, fused (flash-attention style).

In Stable Diffusion's cross-attention, image tokens (up to 16k queries a head) attend to the
prompt's tokens: 77 to 308 keys (1 to 4 chunks of 77), head dims 40, 64, 80 or 160. This op
computes, per (batch, head),

    out = softmax(q k^T * scale) v          scale defaults to 1 / sqrt(head_dim)

without materialising the Lq x Lk scores in memory, and keeps each query row's log-sum-exp
of the scaled scores (float32, natural log) for the backward pass.

Kernels. Tensors are contiguous ``(batch, heads, length, head_dim)``; a program works on one
(batch * head) and loads rows of HEAD_DIM values padded to BLOCK_HEAD, a power of two.
- ``_forward_kernel``: one program per (query block, head). K and V of a head are short, so
  the program streams them by key blocks from L2 through an online softmax (base-2
  exponentials, the scale folded with log2(e)) and writes its outputs and log-sum-exps once.
- ``_backward_query_kernel``: one program per (query block, head); stores delta = rowsum(dO * O)
  and recomputes the probabilities from the log-sum-exp to accumulate dQ.
- ``_backward_key_kernel`` (after it): one program per (key block, head) loops over every
  query block of its head and accumulates dK and dV in registers: deterministic, no atomics.

Head dims that are not powers of two (40, 80, 160) are padded to the next one in registers
only: masked loads and stores move exactly HEAD_DIM values a row (a constexpr, so rows of 40
half-precision values still load as 16-byte vectors). The padding costs tensor-core work, not
HBM traffic: a query row costs 4 Lk d FLOPs for 4 d bytes of Q and O in half precision, an
intensity of Lk FLOPs a byte (Lk x 64 / 40 with 40 padded to 64) against ridges of about 156
on A100 and 295 on H100, so at one or two prompt chunks the op stays memory-bound. A main
tile plus a tail tile (32 + 16 for 40, 128 + 32 for 160) would save that work where it
matters, at 4 chunks.

Matrix products run on tensor cores in float16 and bfloat16, accumulating in float32; float32
inputs use exact (IEEE) float32 products on CUDA cores, not TF32, to stay as accurate as eager
float32, and smaller tiles (see :class:`LaunchConfig`); their head dim is limited to 128.
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
    "not_supported_reasons",
]

MAX_HEAD_DIM = 256  # a query row and the accumulator of its output stay in registers
MAX_FLOAT32_HEAD_DIM = 128  # float32 dots run on CUDA cores; 256-wide rows spill in dQ
_LOG2_E = tl.constexpr(math.log2(math.e))
_LN_2 = tl.constexpr(math.log(2.0))

# Lengths vary per call; specialising on their divisibility by 16 would only add variants.
_UNSPECIALIZED = ["query_length", "key_length"]


# -- Triton ---------------------------------------------------------------------------------


@triton.jit
def _load_rows(matrix_ptr, rows, row_mask, cols, HEAD_DIM: tl.constexpr):
    """Rows of a (length, HEAD_DIM) matrix, padded with zeros to the width of ``cols``."""
    mask = row_mask[:, None] & (cols < HEAD_DIM)[None, :]
    return tl.load(matrix_ptr + rows[:, None] * HEAD_DIM + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _store_rows(matrix_ptr, rows, row_mask, cols, values, HEAD_DIM: tl.constexpr):
    mask = row_mask[:, None] & (cols < HEAD_DIM)[None, :]
    tl.store(matrix_ptr + rows[:, None] * HEAD_DIM + cols[None, :], values.to(matrix_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dot(a, b, DOT_PRECISION: tl.constexpr, UPCAST_DOTS: tl.constexpr):
    """a @ b accumulated in float32; with UPCAST_DOTS, of float32 copies (see LaunchConfig)."""
    if UPCAST_DOTS:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=DOT_PRECISION)


@triton.jit(do_not_specialize=_UNSPECIALIZED)
def _forward_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    lse_ptr,
    query_length,
    key_length,
    scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_HEAD: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOTS: tl.constexpr,
):
    """out and log-sum-exp of BLOCK_Q query rows of one head."""
    head = tl.program_id(1).to(tl.int64)
    q_ptr += head * query_length * HEAD_DIM
    out_ptr += head * query_length * HEAD_DIM
    k_ptr += head * key_length * HEAD_DIM
    v_ptr += head * key_length * HEAD_DIM
    queries = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    query_mask = queries < query_length
    cols = tl.arange(0, BLOCK_HEAD)
    q = _load_rows(q_ptr, queries, query_mask, cols, HEAD_DIM)

    scale_log2 = scale * _LOG2_E
    row_max = tl.full([BLOCK_Q], float("-inf"), tl.float32)  # base-2 scaled scores
    row_sum = tl.zeros([BLOCK_Q], tl.float32)
    acc = tl.zeros([BLOCK_Q, BLOCK_HEAD], tl.float32)
    for key_start in range(0, key_length, BLOCK_K):
        keys = key_start + tl.arange(0, BLOCK_K)
        key_mask = keys < key_length
        k = _load_rows(k_ptr, keys, key_mask, cols, HEAD_DIM)
        v = _load_rows(v_ptr, keys, key_mask, cols, HEAD_DIM)
        scores = _dot(q, tl.trans(k), DOT_PRECISION, UPCAST_DOTS) * scale_log2
        scores = tl.where(key_mask[None, :], scores, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, axis=1))  # finite: every block has a key
        correction = tl.exp2(row_max - new_max)
        probs = tl.exp2(scores - new_max[:, None])
        row_sum = row_sum * correction + tl.sum(probs, axis=1)
        acc = acc * correction[:, None] + _dot(probs.to(v.dtype), v, DOT_PRECISION, UPCAST_DOTS)
        row_max = new_max

    _store_rows(out_ptr, queries, query_mask, cols, acc / row_sum[:, None], HEAD_DIM)
    tl.store(lse_ptr + head * query_length + queries, (row_max + tl.log2(row_sum)) * _LN_2, mask=query_mask)


@triton.jit(do_not_specialize=_UNSPECIALIZED)
def _backward_query_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    grad_out_ptr,
    lse_ptr,
    delta_ptr,
    grad_q_ptr,
    query_length,
    key_length,
    scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_HEAD: tl.constexpr,
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
    cols = tl.arange(0, BLOCK_HEAD)
    q = _load_rows(q_ptr + query_offset, queries, query_mask, cols, HEAD_DIM)
    grad_out = _load_rows(grad_out_ptr + query_offset, queries, query_mask, cols, HEAD_DIM)
    out = _load_rows(out_ptr + query_offset, queries, query_mask, cols, HEAD_DIM)
    delta = tl.sum(grad_out.to(tl.float32) * out.to(tl.float32), axis=1)
    tl.store(delta_ptr + head * query_length + queries, delta, mask=query_mask)
    lse_log2 = tl.load(lse_ptr + head * query_length + queries, mask=query_mask, other=0.0) * _LOG2_E

    scale_log2 = scale * _LOG2_E
    grad_q = tl.zeros([BLOCK_Q, BLOCK_HEAD], tl.float32)
    for key_start in range(0, key_length, BLOCK_K):
        keys = key_start + tl.arange(0, BLOCK_K)
        key_mask = keys < key_length
        k = _load_rows(k_ptr, keys, key_mask, cols, HEAD_DIM)
        v = _load_rows(v_ptr, keys, key_mask, cols, HEAD_DIM)
        scores = _dot(q, tl.trans(k), DOT_PRECISION, UPCAST_DOTS) * scale_log2
        # Padding keys score 0, whose exp2(0 - lse) may overflow: zero them explicitly.
        probs = tl.where(key_mask[None, :], tl.exp2(scores - lse_log2[:, None]), 0.0)
        grad_probs = _dot(grad_out, tl.trans(v), DOT_PRECISION, UPCAST_DOTS)
        grad_scores = probs * (grad_probs - delta[:, None])
        grad_q += _dot(grad_scores.to(k.dtype), k, DOT_PRECISION, UPCAST_DOTS)

    _store_rows(grad_q_ptr + query_offset, queries, query_mask, cols, grad_q * scale, HEAD_DIM)


@triton.jit(do_not_specialize=_UNSPECIALIZED)
def _backward_key_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    grad_out_ptr,
    lse_ptr,
    delta_ptr,
    grad_k_ptr,
    grad_v_ptr,
    query_length,
    key_length,
    scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_HEAD: tl.constexpr,
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
    key_mask = keys < key_length
    cols = tl.arange(0, BLOCK_HEAD)
    k = _load_rows(k_ptr + key_offset, keys, key_mask, cols, HEAD_DIM)
    v = _load_rows(v_ptr + key_offset, keys, key_mask, cols, HEAD_DIM)

    scale_log2 = scale * _LOG2_E
    grad_k = tl.zeros([BLOCK_K, BLOCK_HEAD], tl.float32)
    grad_v = tl.zeros([BLOCK_K, BLOCK_HEAD], tl.float32)
    for query_start in range(0, query_length, BLOCK_Q):
        queries = query_start + tl.arange(0, BLOCK_Q)
        query_mask = queries < query_length
        q = _load_rows(q_ptr, queries, query_mask, cols, HEAD_DIM)
        grad_out = _load_rows(grad_out_ptr, queries, query_mask, cols, HEAD_DIM)
        # Padding queries load as zeros (q, dO, lse, delta): probabilities of 1 times zeros.
        lse_log2 = tl.load(lse_ptr + queries, mask=query_mask, other=0.0) * _LOG2_E
        delta = tl.load(delta_ptr + queries, mask=query_mask, other=0.0)
        scores_t = _dot(k, tl.trans(q), DOT_PRECISION, UPCAST_DOTS) * scale_log2  # [keys, queries]
        probs_t = tl.exp2(scores_t - lse_log2[None, :])
        grad_v += _dot(probs_t.to(grad_out.dtype), grad_out, DOT_PRECISION, UPCAST_DOTS)
        grad_probs_t = _dot(v, tl.trans(grad_out), DOT_PRECISION, UPCAST_DOTS)
        grad_scores_t = probs_t * (grad_probs_t - delta[None, :])
        grad_k += _dot(grad_scores_t.to(q.dtype), q, DOT_PRECISION, UPCAST_DOTS)

    _store_rows(grad_k_ptr + key_offset, keys, key_mask, cols, grad_k * scale, HEAD_DIM)
    _store_rows(grad_v_ptr + key_offset, keys, key_mask, cols, grad_v, HEAD_DIM)


# -- launching --------------------------------------------------------------------------------


class LaunchConfig(NamedTuple):
    """How the kernels tile a head of a given head dim and dtype."""

    head_dim: int
    block_head: int
    block_q: int
    block_k: int
    num_warps: int
    num_stages: int
    dot_precision: str
    upcast_dots: bool

    @staticmethod
    def for_head(head_dim: int, dtype: torch.dtype, interpreted: bool = False) -> LaunchConfig:
        """Rows padded to a power of two (16 at least, tl.dot's minimum).

        Half precision: 64 queries by 32 keys (32-key blocks waste few padding keys at
        Lk = 77 n: 96 for 77), 8 warps for 256-wide rows, which spill with 4; two pipeline
        stages, as the keys come from L2 and three overflow A100's shared memory at 256.
        float32 dots run on CUDA cores (exact products, not TF32), whose operands need more
        registers: 16 by 16 tiles and 8 warps keep them from spilling up to 128-wide rows.

        Under the interpreter dots run on float32 copies of their operands: Triton 3.9's
        interpreter multiplies bfloat16 operands as their raw uint16 storage. The products of
        half-precision values are exact in float32, as on tensor cores.
        """
        block_head = max(16, 1 << (head_dim - 1).bit_length())
        if dtype == torch.float32:
            return LaunchConfig(head_dim, block_head, 16, 16, 8, 1, "ieee", upcast_dots=interpreted)
        num_warps = 4 if block_head <= 128 else 8
        dot_precision = "ieee" if interpreted else "tf32"  # half-precision dots ignore it
        return LaunchConfig(head_dim, block_head, 64, 32, num_warps, 2, dot_precision, upcast_dots=interpreted)

    def grid(self, length: int, heads: int, block: int) -> tuple[int, int]:
        return -(-length // block), heads

    def options(self) -> dict:
        # maxnreg: as in chunk_concat, ptxas otherwise spills rather than use more registers.
        return dict(
            HEAD_DIM=self.head_dim, BLOCK_HEAD=self.block_head, BLOCK_Q=self.block_q, BLOCK_K=self.block_k,
            DOT_PRECISION=self.dot_precision, UPCAST_DOTS=self.upcast_dots, num_warps=self.num_warps,
            num_stages=self.num_stages, maxnreg=255,
        )  # fmt: skip


class _CrossAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale):
        batch, heads, query_length, head_dim = q.shape
        key_length = k.shape[2]
        config = LaunchConfig.for_head(head_dim, q.dtype, is_interpreted(_forward_kernel))
        out = torch.empty_like(q)
        lse = torch.empty((batch, heads, query_length), device=q.device, dtype=torch.float32)
        _forward_kernel[config.grid(query_length, batch * heads, config.block_q)](
            q, k, v, out, lse, query_length, key_length, scale, **config.options()
        )
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale
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
        _backward_query_kernel[config.grid(query_length, batch * heads, config.block_q)](
            q, k, v, out, grad_out, lse, delta, grad_q, query_length, key_length, ctx.scale, **config.options()
        )
        _backward_key_kernel[config.grid(key_length, batch * heads, config.block_k)](
            q, k, v, grad_out, lse, delta, grad_k, grad_v, query_length, key_length, ctx.scale, **config.options()
        )
        return grad_q, grad_k, grad_v, None


# -- the op -----------------------------------------------------------------------------------


def cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
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
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _CrossAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), scale)


def not_supported_reasons(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> list[str]:
    """Why :func:`cross_attention` cannot take these inputs here (empty: it can)."""
    reasons = platform_reasons(_forward_kernel, q.device) + dtype_reasons(q=q, k=k, v=v)
    if q.shape[-1] > MAX_HEAD_DIM:
        reasons.append(f"head dim {q.shape[-1]} exceeds the {MAX_HEAD_DIM} a block holds")
    elif q.dtype == torch.float32 and q.shape[-1] > MAX_FLOAT32_HEAD_DIM:
        reasons.append(f"float32 head dim {q.shape[-1]} exceeds {MAX_FLOAT32_HEAD_DIM} (registers would spill)")
    return reasons


def cross_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """Scaled dot-product attention without a mask; defines the op.

    Args:
        q: ``(batch, heads, Lq, head_dim)`` queries.
        k, v: ``(batch, heads, Lk, head_dim)`` keys and values.
        scale: multiplies the scores before the softmax; default ``1 / sqrt(head_dim)``.

    Returns:
        ``(batch, heads, Lq, head_dim)`` in the dtype of ``q``, computed in that dtype with the
        scores materialised (the eager path); differentiable in ``q``, ``k`` and ``v``.
    """
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale
    return scores.softmax(dim=-1) @ v
