"""Long-prompt chunk concatenation, fused: final LayerNorm, emphasis, mean restore, concat.

The CLIP text encoder returns the pre-final-LayerNorm hidden states of C chunks of L tokens
(L = 77; every chunk of every prompt and negative prompt in one batch). Per chunk this op
computes

    y = LayerNorm(x)            affine, per row of width D
    z = y * w[r]                the emphasis multiplier of each token
    z = z * mean(y) / mean(z)   with ``restore_mean``: the web UI's "original" emphasis
                                normalisation, means over the whole chunk (L x D values);
                                skipped (z kept) where |mean(z)| < MIN_RESTORED_MEAN, where
                                the web UI divides by ~0 (a fresh final LayerNorm, bias 0)

and writes row r of chunk c to output row ``destination[c, r]``, or drops it where that is
-1. A destination listing every row concatenates whole chunks (77 rows each); one keeping
the first BOS, the inner tokens and the last EOS of a prompt gives one long sequence.

Precondition: every output row is written by exactly one (c, r). The Triton op allocates
its output with ``torch.empty`` and does not check (that would synchronise with the GPU); it
never writes outside the output, dropping rows whose destination is out of range, where the
reference raises.

Kernels. A program handles BLOCK_ROWS rows of one chunk, with D padded to BLOCK_WIDTH (a
power of two, one LaunchConfig each, 8 values of a tensor per thread).
- ``_row_sums_kernel`` (forward pass 1, only with ``restore_mean``) stores sum_d y per row.
  That is all the mean restore needs: with S = sum(y) and T = sum(z) = sum_r w_r rowsum_r(y),
  the factor is f = S / T.
- ``_forward_kernel`` (pass 2) recomputes y, totals its chunk's row sums into f and writes
  y * w * f to the destination rows.
- Backward: ``_row_sums_kernel`` again, for sum_d g * y (g: a row's output gradient, 0 where
  dropped), then ``_backward_kernel``, whose programs loop over 32 rows: dL/dy = f w g +
  G (1 - f w) / T with G = sum(g w y) (f depends on every y of the chunk), the LayerNorm
  backward, and per-program partial sums of dweight and dbias that torch adds up:
  deterministic, no atomics.
Recomputing the normalisation instead of storing it costs one more read of the hidden states
per pass, mostly from L2 (a chunk is 77 x 768 values); per-row sums are the only intermediates.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ._triton import SUPPORTED_DTYPES, dtype_reasons, platform_reasons, tl, triton

__all__ = [
    "MAX_WIDTH",
    "MIN_RESTORED_MEAN",
    "SUPPORTED_DTYPES",
    "LaunchConfig",
    "chunk_concat",
    "chunk_concat_reference",
    "not_supported_reasons",
]

MAX_WIDTH = 2048  # a row must fit one block; CLIP text encoders are 768 to 1280 wide
# A chunk whose weighted mean is smaller keeps its emphasis unrestored: LayerNorm outputs are
# O(1), so such a mean is rounding noise (a zero-mean LayerNorm gives ~1e-7 in float32, ~1e-5
# in bfloat16) and dividing by it gives inf or NaN, as the web UI does with a fresh encoder.
MIN_RESTORED_MEAN = 1e-4
_MIN_RESTORED_MEAN = tl.constexpr(MIN_RESTORED_MEAN)
_TILE_ELEMENTS = 2048  # values of a tensor a program holds, 8 a thread: 16 make the backward spill
_MAX_BLOCK_ROWS = 16
_TOTALS_BLOCK = tl.constexpr(128)  # per-row values a step adds when totalling a chunk
# Rows a backward program handles (a multiple of every BLOCK_ROWS): fewer programs, so fewer
# partial sums of grad_weight and grad_bias to write and add up.
_BACKWARD_ROWS = tl.constexpr(32)

# Integers whose divisibility would multiply compiled variants without speeding anything up.
_UNSPECIALIZED = ["chunk_length", "num_rows"]

_logger = logging.getLogger(__name__)


# -- Triton ---------------------------------------------------------------------------------


@triton.jit
def _chunk_rows(chunk, first_row, chunk_length, BLOCK_ROWS: tl.constexpr):
    """Flat indices (int64) of BLOCK_ROWS rows of a chunk from ``first_row``, and which exist."""
    row_in_chunk = first_row + tl.arange(0, BLOCK_ROWS)
    return chunk.to(tl.int64) * chunk_length + row_in_chunk, row_in_chunk < chunk_length


@triton.jit
def _layer_norm_rows(hidden_ptr, weight_ptr, bias_ptr, rows, row_mask, cols, col_mask, width, eps):
    """LayerNorm of a block of rows in float32: (x_hat, y, rstd), zero outside the masks."""
    mask = row_mask[:, None] & col_mask[None, :]
    x = tl.load(hidden_ptr + rows[:, None] * width + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / width
    centered = tl.where(mask, x - mean[:, None], 0.0)
    rstd = tl.rsqrt(tl.sum(centered * centered, axis=1) / width + eps)
    x_hat = centered * rstd[:, None]
    gamma = tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    beta = tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    y = tl.where(mask, x_hat * gamma[None, :] + beta[None, :], 0.0)
    return x_hat, y, rstd


@triton.jit
def _destinations(destination_ptr, rows, row_mask, num_rows):
    """Output row of each row, and whether it is kept (in range; -1 drops a row)."""
    destination = tl.load(destination_ptr + rows, mask=row_mask, other=-1)
    return destination, (destination >= 0) & (destination < num_rows)


@triton.jit
def _output_gradient(grad_output_ptr, destination_ptr, rows, row_mask, cols, col_mask, width, num_rows):
    """Each row's output gradient in float32; 0 for rows the layout drops."""
    destination, kept = _destinations(destination_ptr, rows, row_mask, num_rows)
    offsets = destination[:, None] * width + cols[None, :]
    return tl.load(grad_output_ptr + offsets, mask=kept[:, None] & col_mask[None, :], other=0.0).to(tl.float32)


@triton.jit
def _chunk_totals(row_values_ptr, multipliers_ptr, chunk, chunk_length):
    """(sum_r v_r, sum_r w_r v_r) over one chunk's per-row values v and multipliers w."""
    first = chunk.to(tl.int64) * chunk_length
    total = tl.zeros([_TOTALS_BLOCK], tl.float32)
    weighted_total = tl.zeros([_TOTALS_BLOCK], tl.float32)
    for start in range(0, chunk_length, _TOTALS_BLOCK):
        offsets = start + tl.arange(0, _TOTALS_BLOCK)
        mask = offsets < chunk_length
        values = tl.load(row_values_ptr + first + offsets, mask=mask, other=0.0)
        total += values
        weighted_total += values * tl.load(multipliers_ptr + first + offsets, mask=mask, other=0.0)
    return tl.sum(total, axis=0), tl.sum(weighted_total, axis=0)


@triton.jit
def _restore_factor(total, weighted_total, chunk_length, width):
    """(f, whether it applies): S / T where the weighted mean T / (L D) is not ~0, else 1."""
    restorable = tl.abs(weighted_total) >= _MIN_RESTORED_MEAN * chunk_length * width
    return tl.where(restorable, total / weighted_total, 1.0), restorable


@triton.jit(do_not_specialize=_UNSPECIALIZED)
def _row_sums_kernel(
    hidden_ptr,
    weight_ptr,
    bias_ptr,
    grad_output_ptr,
    destination_ptr,
    row_sums_ptr,
    chunk_length,
    width,
    num_rows,
    eps,
    WITH_GRAD: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_WIDTH: tl.constexpr,
):
    """row_sums[row] = sum_d y[row, d]; with WITH_GRAD, sum_d g[row, d] * y[row, d]."""
    rows, row_mask = _chunk_rows(tl.program_id(1), tl.program_id(0) * BLOCK_ROWS, chunk_length, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_WIDTH)
    col_mask = cols < width
    _, y, _ = _layer_norm_rows(hidden_ptr, weight_ptr, bias_ptr, rows, row_mask, cols, col_mask, width, eps)
    if WITH_GRAD:
        y *= _output_gradient(grad_output_ptr, destination_ptr, rows, row_mask, cols, col_mask, width, num_rows)
    tl.store(row_sums_ptr + rows, tl.sum(y, axis=1), mask=row_mask)


@triton.jit(do_not_specialize=_UNSPECIALIZED)
def _forward_kernel(
    hidden_ptr,
    weight_ptr,
    bias_ptr,
    multipliers_ptr,
    destination_ptr,
    row_sums_ptr,
    output_ptr,
    chunk_length,
    width,
    num_rows,
    eps,
    RESTORE_MEAN: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_WIDTH: tl.constexpr,
):
    """output[destination[row]] = y[row] * w[row] (* f of the row's chunk)."""
    chunk = tl.program_id(1)
    rows, row_mask = _chunk_rows(chunk, tl.program_id(0) * BLOCK_ROWS, chunk_length, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_WIDTH)
    col_mask = cols < width
    _, y, _ = _layer_norm_rows(hidden_ptr, weight_ptr, bias_ptr, rows, row_mask, cols, col_mask, width, eps)
    scale = tl.load(multipliers_ptr + rows, mask=row_mask, other=0.0)
    if RESTORE_MEAN:
        total, weighted_total = _chunk_totals(row_sums_ptr, multipliers_ptr, chunk, chunk_length)
        scale *= _restore_factor(total, weighted_total, chunk_length, width)[0]
    destination, kept = _destinations(destination_ptr, rows, row_mask, num_rows)
    z = (y * scale[:, None]).to(output_ptr.dtype.element_ty)
    offsets = destination[:, None] * width + cols[None, :]
    tl.store(output_ptr + offsets, z, mask=kept[:, None] & col_mask[None, :])


@triton.jit(do_not_specialize=_UNSPECIALIZED)
def _backward_kernel(
    hidden_ptr,
    weight_ptr,
    bias_ptr,
    multipliers_ptr,
    destination_ptr,
    row_sums_ptr,
    row_grad_sums_ptr,
    grad_output_ptr,
    grad_hidden_ptr,
    grad_weight_partial_ptr,
    grad_bias_partial_ptr,
    chunk_length,
    width,
    num_rows,
    eps,
    RESTORE_MEAN: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_WIDTH: tl.constexpr,
):
    """grad_hidden of _BACKWARD_ROWS rows of a chunk, and their sums for grad_weight, grad_bias."""
    chunk = tl.program_id(1)
    first_row = tl.program_id(0) * _BACKWARD_ROWS
    cols = tl.arange(0, BLOCK_WIDTH)
    col_mask = cols < width
    gamma = tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    factor = 1.0
    if RESTORE_MEAN:
        total, weighted_total = _chunk_totals(row_sums_ptr, multipliers_ptr, chunk, chunk_length)
        grad_total = _chunk_totals(row_grad_sums_ptr, multipliers_ptr, chunk, chunk_length)[1]  # G
        factor, restorable = _restore_factor(total, weighted_total, chunk_length, width)
        grad_total = tl.where(restorable, grad_total, 0.0)  # an unrestored chunk has no f to move
    grad_weight = tl.zeros([BLOCK_WIDTH], tl.float32)
    grad_bias = tl.zeros([BLOCK_WIDTH], tl.float32)
    for block_start in range(first_row, tl.minimum(first_row + _BACKWARD_ROWS, chunk_length), BLOCK_ROWS):
        rows, row_mask = _chunk_rows(chunk, block_start, chunk_length, BLOCK_ROWS)
        mask = row_mask[:, None] & col_mask[None, :]
        x_hat, _, rstd = _layer_norm_rows(hidden_ptr, weight_ptr, bias_ptr, rows, row_mask, cols, col_mask, width, eps)
        grad_output = _output_gradient(
            grad_output_ptr, destination_ptr, rows, row_mask, cols, col_mask, width, num_rows
        )
        scale = tl.load(multipliers_ptr + rows, mask=row_mask, other=0.0) * factor
        grad_y = scale[:, None] * grad_output
        if RESTORE_MEAN:
            # f = S / T moves with every y of the chunk: df / dy_r = (1 - f w_r) / T.
            grad_y += tl.where(mask, (grad_total * (1.0 - scale) / weighted_total)[:, None], 0.0)
        grad_weight += tl.sum(grad_y * x_hat, axis=0)
        grad_bias += tl.sum(grad_y, axis=0)

        grad_x_hat = grad_y * gamma[None, :]
        mean_grad = tl.sum(grad_x_hat, axis=1) / width
        mean_grad_dot_x_hat = tl.sum(grad_x_hat * x_hat, axis=1) / width
        grad_x = (grad_x_hat - mean_grad[:, None] - x_hat * mean_grad_dot_x_hat[:, None]) * rstd[:, None]
        offsets = rows[:, None] * width + cols[None, :]
        tl.store(grad_hidden_ptr + offsets, grad_x.to(grad_hidden_ptr.dtype.element_ty), mask=mask)

    program = chunk.to(tl.int64) * tl.num_programs(0) + tl.program_id(0)
    tl.store(grad_weight_partial_ptr + program * width + cols, grad_weight, mask=col_mask)
    tl.store(grad_bias_partial_ptr + program * width + cols, grad_bias, mask=col_mask)


# -- launching --------------------------------------------------------------------------------


class LaunchConfig(NamedTuple):
    """How the kernels tile rows of a given width (one configuration per power of two)."""

    block_rows: int
    block_width: int
    num_warps: int

    @staticmethod
    def for_width(width: int) -> LaunchConfig:
        """Rows padded to a power of two; as many of them a tile as keep it near _TILE_ELEMENTS."""
        block_width = max(64, 1 << (width - 1).bit_length())
        block_rows = max(1, min(_MAX_BLOCK_ROWS, _TILE_ELEMENTS // block_width))
        num_warps = max(1, min(8, block_rows * block_width // 256))
        return LaunchConfig(block_rows, block_width, num_warps)

    def grids(self, chunks: int, chunk_length: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """Grids of the row-block kernels and of the backward kernel."""
        return (-(-chunk_length // self.block_rows), chunks), (-(-chunk_length // _BACKWARD_ROWS.value), chunks)

    def options(self) -> dict[str, int]:
        # maxnreg: without a bound, ptxas 13 under Triton 3.9's flags spills a few bytes at 64
        # registers rather than use more; with 8 warps at most, 255 still fits an SM.
        return dict(BLOCK_ROWS=self.block_rows, BLOCK_WIDTH=self.block_width, num_warps=self.num_warps, maxnreg=255)


class _ChunkConcat(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, eps, multipliers, destination, num_rows, restore_mean):
        chunks, chunk_length, width = hidden.shape
        config = LaunchConfig.for_width(width)
        grid, _ = config.grids(chunks, chunk_length)
        sizes = (chunk_length, width, num_rows, eps)
        row_sums = None
        if restore_mean:
            row_sums = torch.empty(chunks * chunk_length, device=hidden.device, dtype=torch.float32)
            _row_sums_kernel[grid](
                hidden, weight, bias, None, destination, row_sums, *sizes, WITH_GRAD=False, **config.options()
            )
        output = torch.empty((num_rows, width), device=hidden.device, dtype=hidden.dtype)
        _forward_kernel[grid](
            hidden, weight, bias, multipliers, destination, row_sums, output, *sizes,
            RESTORE_MEAN=restore_mean, **config.options(),
        )  # fmt: skip
        if restore_mean:
            weighted_totals = (row_sums.view(chunks, chunk_length) * multipliers).sum(dim=1)
            _report_unrestored(weighted_totals.abs() >= MIN_RESTORED_MEAN * chunk_length * width)
        ctx.save_for_backward(hidden, weight, bias, multipliers, destination, row_sums)
        ctx.sizes, ctx.restore_mean = sizes, restore_mean
        return output

    @staticmethod
    def backward(ctx, grad_output):
        hidden, weight, bias, multipliers, destination, row_sums = ctx.saved_tensors
        chunks, chunk_length, width = hidden.shape
        config = LaunchConfig.for_width(width)
        grid, backward_grid = config.grids(chunks, chunk_length)
        grad_output = grad_output.contiguous()
        row_grad_sums = None
        if ctx.restore_mean:
            row_grad_sums = torch.empty_like(row_sums)
            _row_sums_kernel[grid](
                hidden, weight, bias, grad_output, destination, row_grad_sums, *ctx.sizes,
                WITH_GRAD=True, **config.options(),
            )  # fmt: skip
        grad_hidden = torch.empty_like(hidden)
        partial_shape = (backward_grid[0] * backward_grid[1], width)
        grad_weight_partial = torch.empty(partial_shape, device=hidden.device, dtype=torch.float32)
        grad_bias_partial = torch.empty_like(grad_weight_partial)
        _backward_kernel[backward_grid](
            hidden, weight, bias, multipliers, destination, row_sums, row_grad_sums, grad_output,
            grad_hidden, grad_weight_partial, grad_bias_partial, *ctx.sizes,
            RESTORE_MEAN=ctx.restore_mean, **config.options(),
        )  # fmt: skip
        grad_weight = grad_weight_partial.sum(dim=0).to(weight.dtype)
        grad_bias = grad_bias_partial.sum(dim=0).to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None


# -- the op -----------------------------------------------------------------------------------


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
    """The Triton op; :func:`chunk_concat_reference` defines it and documents the arguments.

    Runs on CUDA tensors, or on CPU tensors when ``TRITON_INTERPRET=1`` was set before Triton
    was first imported. Differentiable in ``hidden``, ``weight`` and ``bias``.
    """
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [chunks, length, width], got shape {tuple(hidden.shape)}")
    chunks, chunk_length, width = hidden.shape
    if weight.shape != (width,) or bias.shape != (width,):
        raise ValueError(f"weight and bias must have shape ({width},), got {tuple(weight.shape)}, {tuple(bias.shape)}")
    if multipliers.shape != (chunks, chunk_length) or destination.shape != (chunks, chunk_length):
        raise ValueError(
            f"multipliers and destination must have shape ({chunks}, {chunk_length}), "
            f"got {tuple(multipliers.shape)}, {tuple(destination.shape)}"
        )
    return _ChunkConcat.apply(
        hidden.contiguous(),
        weight.contiguous(),
        bias.contiguous(),
        float(eps),
        multipliers.to(torch.float32).contiguous(),
        destination.to(torch.int64).contiguous(),
        int(num_rows),
        bool(restore_mean),
    )


def not_supported_reasons(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> list[str]:
    """Why :func:`chunk_concat` cannot take these inputs here (empty: it can)."""
    reasons = platform_reasons(_forward_kernel, hidden.device) + dtype_reasons(hidden=hidden, weight=weight, bias=bias)
    if hidden.shape[-1] > MAX_WIDTH:
        reasons.append(f"rows of {hidden.shape[-1]} values exceed the {MAX_WIDTH} one block holds")
    return reasons


def chunk_concat_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    multipliers: torch.Tensor,
    destination: torch.Tensor,
    num_rows: int,
    restore_mean: bool = True,
) -> torch.Tensor:
    """Normalise, weight, mean-restore and concatenate encoded chunks; defines the op.

    Args:
        hidden: ``[C, L, D]`` encoder hidden states before the final LayerNorm.
        weight, bias, eps: the final LayerNorm's parameters, ``[D]`` each.
        multipliers: ``[C, L]`` emphasis multiplier of every token.
        destination: ``[C, L]`` integers, the output row of every token, or -1 to drop it.
            Every output row must receive exactly one token.
        num_rows: rows of the output.
        restore_mean: scale each chunk so that its mean is that of the unweighted LayerNorm
            output (the web UI's "original" emphasis normalisation).

    Returns:
        ``[num_rows, D]`` in the dtype of ``hidden``, computed in that dtype; differentiable
        in ``hidden``, ``weight`` and ``bias`` (not in the multipliers).
    """
    normalized = F.layer_norm(hidden, hidden.shape[-1:], weight, bias, eps)
    weighted = normalized * multipliers.detach().to(normalized.dtype).unsqueeze(-1)
    if restore_mean:
        chunk_dims = (1, 2)
        weighted_mean = weighted.mean(chunk_dims, keepdim=True)
        restorable = weighted_mean.abs() >= MIN_RESTORED_MEAN
        _report_unrestored(restorable)
        # The divisor is 1 where unused, so its gradient stays finite there too.
        factor = normalized.mean(chunk_dims, keepdim=True) / torch.where(restorable, weighted_mean, 1.0)
        weighted = weighted * torch.where(restorable, factor, 1.0)
    kept = destination >= 0
    output = weighted.new_zeros(num_rows, hidden.shape[-1])
    return output.index_copy(0, destination[kept], weighted[kept])


_reported_unrestored = False


def _report_unrestored(restorable: torch.Tensor) -> None:
    """Warn, once a process, where chunks keep their emphasis unrestored (reads ``restorable``,
    the same ops every call: the eager cost model counts them)."""
    global _reported_unrestored
    unrestored = restorable.numel() - int(restorable.sum())
    if unrestored and not _reported_unrestored:
        _reported_unrestored = True
        _logger.warning(
            "emphasis 'original' not restored for %d of %d chunks: their weighted mean is ~0 (a text encoder "
            "whose final layer norm has bias 0?); those chunks keep their plain emphasis",
            unrestored,
            restorable.numel(),
        )
