"""Hypernetwork-rewritten key and value projections, fused: ``K = h_k(x) Wk^T``, ``V = h_v(x) Wv^T``.

Long because a kernel file holds its Triton kernels, autograd Function, op and eager
reference together (DESIGN.md), and this op has two kernels and a backward.

A hypernetwork module (web UI layout, ``layer_structure`` ``[1, m, 1]``) rewrites the k/v
input of an attention layer as ``x + s * net(x)`` with ``net(x) = act(x W1^T + b1) W2^T + b2``;
the layer then projects it. Per net this op computes, for x of width C, H = m C hidden units
and projections of N outputs,

    K = (x + s * (act(x W1^T + b1) W2^T + b2)) Wk^T (+ k_bias)

which equals, with the second Linear folded into the projection,

    K = x Wk^T + h G^T + c,    h = act(x W1^T + b1),  G = s Wk W2  (N x H),
                               c = s Wk b2 (+ k_bias)

Kernels (one program per tile of BLOCK_ROWS tokens by BLOCK_COLS columns, dots accumulated
in float32, operands streamed by BLOCK_DEPTH slices of the reduced dimension):
- ``_hidden_kernel`` writes h = act(x W1^T + b1) in the input dtype, a GEMM with the bias and
  the activation in its epilogue. With WITH_GRAD (backward) it recomputes the pre-activation,
  accumulates dh = s dr W2 (dr = dK Wk, the gradient of the residual sum) and writes
  dpre = dh * act'(pre) instead.
- ``_projection_kernel`` writes K = x Wk^T + h G^T + c: one GEMM over the concatenated
  reduction [x | h], the folded bias in its epilogue.
The autograd Function takes the unfolded parameters and folds them itself (two small
products a call); its backward is cuBLAS matmuls around the kernel: dr = dK Wk,
dW2 = s dr^T h, db2 = s sum dr, dW1 = dpre^T x, db1 = sum dpre, dx = dr + dpre W1, and dWk
only when the projection needs it. Folding outside the Function instead (autograd deriving
dW2 through G) would cost dG = dK^T h and two products and scalings per net besides, and
dh = dK G would carry G's rounding, the same for every token, into dW1 and db1, where
eager's errors average out. Deterministic: no atomics. Launches per net: 5 forward (the
fold's 3 included) against eager's 6, 9 backward against 10.

Why h goes through memory. The fully fused alternative keeps h in registers: a program per
(row tile, output-column tile) loops over hidden blocks, recomputing x W1^T for each of the
ceil(N / BLOCK_COLS) column tiles. Counted in MC^2 tensor FLOPs (H = 2C, N = C; 10 at the
floor), 128-wide tiles make that 19.2 at C = 320 and 26 at C = 640, which on A100 (and on
H100 at C >= 640) costs more time than the 4 MHb bytes of writing and reading h back:
at SD's self-attention shapes the two-kernel design is compute-bound at the floor's FLOPs.
Its only extra traffic over the minimum is h (and x read twice); eager moves pre, h, net,
s * net and the residual sum through memory besides (see ``cost.hyper_kv_cost``).

The fold costs 2 N C H FLOPs per call, against 2 M (C N + C H + H N) for the op: negligible
at M = 8192 tokens of width 320 (1.6 %), as large as the op at M = 512 of width 1280. Frozen
weights (inference) could cache G and c; this op recomputes them each call. With the fold's
traffic, the cost model predicts no gain at SD's deepest level (512 tokens of width 1280).

Precision: float16 and bfloat16 dots run on tensor cores; h, G and c are rounded to the
input dtype as eager rounds its own intermediates; float32 inputs use exact (IEEE) float32
products on CUDA cores, not TF32, as eager float32 does, their reduction steps summed with
compensation (see ``_accumulate_product``). Under Triton's interpreter the dots
run on float32 copies (see cross_attention.LaunchConfig: its bfloat16 dots are wrong).

Which structures fuse: exactly two Linears, an activation of :data:`FUSED_ACTIVATIONS`
(derived from the web UI's names in :mod:`.activations`) between them (or none), no LayerNorm, no active Dropout, no activation on the output; the
caller asks :func:`structure_not_supported_reasons` with the module's description.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from ._triton import SUPPORTED_DTYPES, dtype_reasons, is_interpreted, platform_reasons, tl, triton
from .activations import ACTIVATIONS, FUSED_ACTIVATIONS, NO_ACTIVATION
from .cross_attention import _dot

__all__ = [
    "ALIGNMENT",
    "FUSED_ACTIVATIONS",
    "MLP",
    "SUPPORTED_DTYPES",
    "LaunchConfig",
    "hyper_kv",
    "hyper_kv_reference",
    "not_supported_reasons",
    "structure_not_supported_reasons",
]

ALIGNMENT = 16  # widths the GPU kernels take: SD's 320, 640, 768, 1280 and their hidden widths
_LEAKY_SLOPE = tl.constexpr(0.01)  # nn.LeakyReLU's default, which the web UI uses
_SQRT_HALF = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)

# Token counts vary per call; specialising on their divisibility by 16 would only add variants.
_UNSPECIALIZED = ["num_rows"]


# -- Triton ---------------------------------------------------------------------------------


@triton.jit
def _accumulate_product(
    acc,
    a_ptr,
    rows,
    row_mask,
    a_row_stride,
    b_ptr,
    cols,
    col_mask,
    b_col_stride,
    b_depth_stride,
    depth,
    BLOCK_DEPTH: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOTS: tl.constexpr,
    COMPENSATED: tl.constexpr,
):
    """acc + A[rows, :depth] @ B[:depth, cols]; A row-major, B at the given strides.

    COMPENSATED: each step's product starts from zero and joins the running sum by Kahan's
    compensated addition. Triton folds ``acc += tl.dot(a, b)`` into the dot, and a float32
    dot on CUDA cores then chains every product of the reduction through one accumulator in
    depth order, whose rounding error grows with the depth: 8x cuBLAS's at depth 1920 on the
    H200 (2026-11-30; a CPU emulation of that chain gave the same error to 9 digits).
    """
    a_ptr += rows.to(tl.int64)[:, None] * a_row_stride
    b_ptr += cols.to(tl.int64)[None, :] * b_col_stride
    compensation = tl.zeros_like(acc)  # what the running sum's roundings lost, negated
    for start in range(0, depth, BLOCK_DEPTH):
        offsets = start + tl.arange(0, BLOCK_DEPTH)
        depth_mask = offsets < depth
        a = tl.load(a_ptr + offsets[None, :], mask=row_mask[:, None] & depth_mask[None, :], other=0.0)
        b = tl.load(b_ptr + offsets[:, None] * b_depth_stride, mask=depth_mask[:, None] & col_mask[None, :], other=0.0)
        if COMPENSATED:
            step = _dot(a, b, DOT_PRECISION, UPCAST_DOTS) - compensation
            total = acc + step
            compensation = (total - acc) - step
            acc = total
        else:
            acc += _dot(a, b, DOT_PRECISION, UPCAST_DOTS)
    return acc


@triton.jit
def _activate(pre, ACTIVATION: tl.constexpr):
    """act(pre) in float32, for an activation named as in FUSED_ACTIVATIONS' values."""
    value = pre
    if ACTIVATION == "relu":
        value = tl.maximum(pre, 0.0)
    elif ACTIVATION == "leakyrelu":
        value = tl.where(pre > 0, pre, pre * _LEAKY_SLOPE)
    elif ACTIVATION == "elu":
        value = tl.where(pre > 0, pre, tl.exp(pre) - 1.0)
    elif ACTIVATION == "gelu":
        value = 0.5 * pre * (1.0 + tl.erf(pre * _SQRT_HALF))
    elif ACTIVATION == "silu":
        value = pre * tl.sigmoid(pre)
    elif ACTIVATION == "hardswish":
        value = pre * tl.clamp(pre + 3.0, 0.0, 6.0) / 6.0
    elif ACTIVATION == "tanh":
        value = 2.0 * tl.sigmoid(2.0 * pre) - 1.0  # Triton has no tanh outside libdevice
    elif ACTIVATION == "sigmoid":
        value = tl.sigmoid(pre)
    return value


@triton.jit
def _activation_slope(pre, ACTIVATION: tl.constexpr):
    """act'(pre) in float32, with torch's choices at the kinks (relu'(0) = 0, ...)."""
    slope = tl.full(pre.shape, 1.0, tl.float32)
    if ACTIVATION == "relu":
        slope = tl.where(pre > 0, 1.0, 0.0)
    elif ACTIVATION == "leakyrelu":
        slope = tl.where(pre > 0, 1.0, _LEAKY_SLOPE)
    elif ACTIVATION == "elu":
        slope = tl.where(pre > 0, 1.0, tl.exp(pre))
    elif ACTIVATION == "gelu":
        slope = 0.5 * (1.0 + tl.erf(pre * _SQRT_HALF)) + pre * _INV_SQRT_2PI * tl.exp(-0.5 * pre * pre)
    elif ACTIVATION == "silu":
        sigmoid = tl.sigmoid(pre)
        slope = sigmoid * (1.0 + pre * (1.0 - sigmoid))
    elif ACTIVATION == "hardswish":
        slope = tl.where(pre < -3.0, 0.0, tl.where(pre <= 3.0, pre / 3.0 + 0.5, 1.0))
    elif ACTIVATION == "tanh":
        tanh = 2.0 * tl.sigmoid(2.0 * pre) - 1.0
        slope = 1.0 - tanh * tanh
    elif ACTIVATION == "sigmoid":
        sigmoid = tl.sigmoid(pre)
        slope = sigmoid * (1.0 - sigmoid)
    return slope


@triton.jit(do_not_specialize=_UNSPECIALIZED)
def _hidden_kernel(
    x_ptr,
    w1_ptr,
    b1_ptr,
    grad_residual_ptr,
    w2_ptr,
    out_ptr,
    num_rows,
    width,
    hidden,
    strength,
    ACTIVATION: tl.constexpr,
    WITH_GRAD: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
    BLOCK_DEPTH: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOTS: tl.constexpr,
    COMPENSATED: tl.constexpr,
):
    """A tile of h = act(x W1^T + b1); with WITH_GRAD, of dpre = s (dr W2) * act'(x W1^T + b1),
    dr being the gradient of the residual sum x + s net(x)."""
    units = tl.program_id(0) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    unit_mask = units < hidden
    rows = tl.program_id(1) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = rows < num_rows

    pre = tl.zeros([BLOCK_ROWS, BLOCK_COLS], tl.float32)
    pre = _accumulate_product(
        pre, x_ptr, rows, row_mask, width, w1_ptr, units, unit_mask, width, 1, width,
        BLOCK_DEPTH, DOT_PRECISION, UPCAST_DOTS, COMPENSATED,
    )  # fmt: skip
    pre += tl.load(b1_ptr + units, mask=unit_mask, other=0.0).to(tl.float32)[None, :]
    if WITH_GRAD:
        # dh = s dr W2[:, units], W2 being (width, hidden) row-major.
        grad_hidden = tl.zeros([BLOCK_ROWS, BLOCK_COLS], tl.float32)
        grad_hidden = _accumulate_product(
            grad_hidden, grad_residual_ptr, rows, row_mask, width, w2_ptr, units, unit_mask, 1, hidden, width,
            BLOCK_DEPTH, DOT_PRECISION, UPCAST_DOTS, COMPENSATED,
        )  # fmt: skip
        result = grad_hidden * strength * _activation_slope(pre, ACTIVATION)
    else:
        result = _activate(pre, ACTIVATION)
    offsets = rows.to(tl.int64)[:, None] * hidden + units[None, :]
    tl.store(out_ptr + offsets, result.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & unit_mask[None, :])


@triton.jit(do_not_specialize=_UNSPECIALIZED)
def _projection_kernel(
    x_ptr,
    weight_ptr,
    hidden_ptr,
    folded_weight_ptr,
    folded_bias_ptr,
    out_ptr,
    num_rows,
    width,
    hidden,
    out_width,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
    BLOCK_DEPTH: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOTS: tl.constexpr,
    COMPENSATED: tl.constexpr,
):
    """A tile of K = x Wk^T + h G^T + c."""
    cols = tl.program_id(0) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    col_mask = cols < out_width
    rows = tl.program_id(1) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = rows < num_rows

    acc = tl.zeros([BLOCK_ROWS, BLOCK_COLS], tl.float32)
    acc = _accumulate_product(
        acc, x_ptr, rows, row_mask, width, weight_ptr, cols, col_mask, width, 1, width,
        BLOCK_DEPTH, DOT_PRECISION, UPCAST_DOTS, COMPENSATED,
    )  # fmt: skip
    acc = _accumulate_product(
        acc, hidden_ptr, rows, row_mask, hidden, folded_weight_ptr, cols, col_mask, hidden, 1, hidden,
        BLOCK_DEPTH, DOT_PRECISION, UPCAST_DOTS, COMPENSATED,
    )  # fmt: skip
    acc += tl.load(folded_bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    offsets = rows.to(tl.int64)[:, None] * out_width + cols[None, :]
    tl.store(out_ptr + offsets, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


# -- launching --------------------------------------------------------------------------------


class LaunchConfig(NamedTuple):
    """How the kernels tile their (tokens x columns) outputs, for a dtype and a pass."""

    block_rows: int  # tokens a program computes
    block_cols: int  # hidden units or output features a program computes
    block_depth: int  # the slice of the reduced dimension one dot step takes
    num_warps: int
    num_stages: int
    dot_precision: str
    upcast_dots: bool
    compensated: bool  # Kahan-summed reduction steps: float32 CUDA-core dots (see _accumulate_product)
    # Triton 3.9's interpreter truncates float32 to bfloat16 where GPUs round to nearest (its
    # rounding path is wrong when a carry reaches the exponent), doubling the error of every
    # bfloat16 store. Interpreted bfloat16 kernels store float32; torch rounds it.
    store_float32: bool = False

    @staticmethod
    def for_dtype(dtype: torch.dtype, interpreted: bool = False, backward: bool = False) -> LaunchConfig:
        """Half precision: 128 x 128 tiles, 64-deep steps, 8 warps, 3 stages (96 KiB of shared
        memory) as in Triton's matmul tutorial; the backward hidden kernel holds two float32
        accumulators (pre and dh), so half the columns. float32 dots run on CUDA cores, whose
        operands live in registers: 64 x 64 tiles (32 x 64 backward), 16-deep steps, summed
        with compensation (4 additions an element a step, against 16 fused multiply-adds).
        Tensor cores' float32 accumulation needs none: their error is eager's (H200 runs).

        Under the interpreter, whose time goes into per-operation overhead, tiles are 128 x 256
        and steps 256 deep, for every dtype: the same code, masks and loops, a tenth the steps.
        """
        if interpreted:
            float32 = dtype == torch.float32
            return LaunchConfig(128, 256, 256, 4, 1, "ieee", True, float32, store_float32=dtype == torch.bfloat16)
        if dtype == torch.float32:
            return LaunchConfig(64, 32 if backward else 64, 16, 4, 2, "ieee", False, True)
        return LaunchConfig(128, 64 if backward else 128, 64, 8, 3, "tf32", False, False)  # half-precision dots ignore tf32

    def output(self, like: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        """An uninitialised (rows, cols) output for a kernel; see :meth:`rounded`."""
        return like.new_empty(rows, cols, dtype=torch.float32 if self.store_float32 else like.dtype)

    @staticmethod
    def rounded(output: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """A kernel's output in the dtype of ``like`` (a no-op unless :attr:`store_float32`)."""
        return output.to(like.dtype)

    def grid(self, rows: int, cols: int) -> tuple[int, int]:
        # Column tiles vary fastest, so the programs sharing a tile of x run together.
        return -(-cols // self.block_cols), -(-rows // self.block_rows)

    def options(self) -> dict:
        # maxnreg: as in chunk_concat, ptxas otherwise spills rather than use more registers.
        return dict(
            BLOCK_ROWS=self.block_rows, BLOCK_COLS=self.block_cols, BLOCK_DEPTH=self.block_depth,
            DOT_PRECISION=self.dot_precision, UPCAST_DOTS=self.upcast_dots, COMPENSATED=self.compensated,
            num_warps=self.num_warps, num_stages=self.num_stages, maxnreg=255,
        )  # fmt: skip


class _HyperProjection(torch.autograd.Function):
    """One net and its projection: K = (x + s net(x)) Wk^T (+ bias), x being (tokens, width)."""

    @staticmethod
    def forward(ctx, x, weight, bias, w1, b1, w2, b2, strength, activation):
        (num_rows, width), hidden, out_width = x.shape, w1.shape[0], weight.shape[0]
        # The fold: one product each, scaled by s before its one rounding.
        no_bias = x.new_zeros(())
        folded_weight = torch.addmm(no_bias, weight, w2, alpha=strength)
        folded_bias = torch.addmv(no_bias if bias is None else bias, weight, b2, alpha=strength)

        interpreted = is_interpreted(_hidden_kernel)
        config = LaunchConfig.for_dtype(x.dtype, interpreted)
        hidden_values = config.output(x, num_rows, hidden)
        _hidden_kernel[config.grid(num_rows, hidden)](
            x, w1, b1, None, None, hidden_values, num_rows, width, hidden, strength,
            ACTIVATION=activation, WITH_GRAD=False, **config.options(),
        )  # fmt: skip
        hidden_values = config.rounded(hidden_values, x)
        out = config.output(x, num_rows, out_width)
        _projection_kernel[config.grid(num_rows, out_width)](
            x, weight, hidden_values, folded_weight, folded_bias, out, num_rows, width, hidden, out_width,
            **config.options(),
        )  # fmt: skip
        ctx.save_for_backward(x, weight, w1, b1, w2, b2, hidden_values)
        ctx.strength, ctx.activation, ctx.interpreted = strength, activation, interpreted
        return config.rounded(out, x)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, w1, b1, w2, b2, hidden_values = ctx.saved_tensors
        needs_x, needs_weight, needs_bias, needs_w1, needs_b1, needs_w2, needs_b2 = ctx.needs_input_grad[:7]
        strength, grad_out = ctx.strength, grad_out.contiguous()
        grad_x = grad_weight = grad_bias = grad_w1 = grad_b1 = grad_w2 = grad_b2 = None
        if needs_x or needs_w1 or needs_b1 or needs_w2 or needs_b2:
            # dr = dK Wk, the gradient of the residual sum x + s net(x). From it, unfolded:
            # dh = s dr W2 (through G, whose rounding is the same for every token, the error
            # would add up over tokens in dW1 and db1), dW2 = s dr^T h, db2 = s sum dr.
            grad_residual = torch.mm(grad_out, weight)
            if needs_w2:
                grad_w2 = grad_residual.t().mm(hidden_values).mul_(strength)
            if needs_b2:
                grad_b2 = grad_residual.sum(0).mul_(strength)
        if needs_x or needs_w1 or needs_b1:
            (num_rows, width), hidden = x.shape, w1.shape[0]
            config = LaunchConfig.for_dtype(x.dtype, ctx.interpreted, backward=True)
            grad_pre = config.output(x, num_rows, hidden)
            _hidden_kernel[config.grid(num_rows, hidden)](
                x, w1, b1, grad_residual, w2, grad_pre, num_rows, width, hidden, strength,
                ACTIVATION=ctx.activation, WITH_GRAD=True, **config.options(),
            )  # fmt: skip
            grad_pre = config.rounded(grad_pre, x)
            if needs_w1:
                grad_w1 = grad_pre.t().mm(x)
            if needs_b1:
                grad_b1 = grad_pre.sum(0)
            if needs_x:
                grad_x = grad_residual.addmm_(grad_pre, w1)  # dr is not needed any more
        if needs_weight or needs_bias:
            grad_bias = grad_out.sum(0)
        if needs_weight:
            # dWk = dK^T (x + s net(x)) = dK^T x + s (dK^T h) W2^T + s (sum dK) b2^T
            grad_weight = grad_out.t().mm(x).addmm_(grad_out.t().mm(hidden_values), w2.t(), alpha=strength)
            grad_weight.addr_(grad_bias, b2, alpha=strength)
        return grad_x, grad_weight, grad_bias if needs_bias else None, grad_w1, grad_b1, grad_w2, grad_b2, None, None


# -- the op -----------------------------------------------------------------------------------


class MLP(NamedTuple):
    """A hypernetwork's two-Linear ``net``: ``act(x @ w1.T + b1) @ w2.T + b2``."""

    w1: torch.Tensor  # (hidden, width)
    b1: torch.Tensor  # (hidden,)
    w2: torch.Tensor  # (width, hidden)
    b2: torch.Tensor  # (width,)


def hyper_kv(
    x: torch.Tensor,
    k_weight: torch.Tensor,
    v_weight: torch.Tensor,
    k_mlp: MLP,
    v_mlp: MLP,
    activation: str,
    strength: float = 1.0,
    k_bias: torch.Tensor | None = None,
    v_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton op; :func:`hyper_kv_reference` defines it and documents the arguments.

    Runs on CUDA tensors, or on CPU tensors when ``TRITON_INTERPRET=1`` was set before Triton
    was first imported. Differentiable in every tensor.
    """
    kernel_activation = _check_arguments(x, k_weight, v_weight, k_mlp, v_mlp, activation, k_bias, v_bias)
    rows = x.reshape(-1, x.shape[-1]).contiguous()

    def project(weight: torch.Tensor, mlp: MLP, bias: torch.Tensor | None) -> torch.Tensor:
        parameters = (weight, bias, *mlp)
        out = _HyperProjection.apply(
            rows, *(None if tensor is None else tensor.contiguous() for tensor in parameters), float(strength),
            kernel_activation,
        )  # fmt: skip
        return out.view(*x.shape[:-1], weight.shape[0])

    return project(k_weight, k_mlp, k_bias), project(v_weight, v_mlp, v_bias)


def _check_arguments(x, k_weight, v_weight, k_mlp, v_mlp, activation, k_bias, v_bias) -> str:
    """ValueError unless the shapes and dtypes fit together; the kernels' activation name."""
    if activation not in FUSED_ACTIVATIONS:
        raise ValueError(f"activation {activation!r} is not one of {', '.join(FUSED_ACTIVATIONS)}")
    width = x.shape[-1]
    for role, weight, mlp, bias in (("k", k_weight, k_mlp, k_bias), ("v", v_weight, v_mlp, v_bias)):
        hidden = mlp.w1.shape[0]
        expected = {
            f"{role}_weight": (weight.shape[0], width),
            f"{role}_mlp.w1": (hidden, width),
            f"{role}_mlp.b1": (hidden,),
            f"{role}_mlp.w2": (width, hidden),
            f"{role}_mlp.b2": (width,),
            **({} if bias is None else {f"{role}_bias": (weight.shape[0],)}),
        }
        tensors = {f"{role}_weight": weight, **{f"{role}_mlp.{k}": t for k, t in mlp._asdict().items()}}
        tensors |= {} if bias is None else {f"{role}_bias": bias}
        for name, tensor in tensors.items():
            if tuple(tensor.shape) != expected[name]:
                raise ValueError(f"{name} must have shape {expected[name]} for x of width {width}, got {tuple(tensor.shape)}")
            if tensor.dtype != x.dtype:
                raise ValueError(f"{name} is {tensor.dtype}, x is {x.dtype}: they must share a dtype")
    return FUSED_ACTIVATIONS[activation]


def not_supported_reasons(
    x: torch.Tensor, k_weight: torch.Tensor, v_weight: torch.Tensor, k_mlp: MLP, v_mlp: MLP
) -> list[str]:
    """Why :func:`hyper_kv` cannot take these inputs here (empty: it can)."""
    mlps = {f"{role}_mlp.{name}": tensor for role, mlp in (("k", k_mlp), ("v", v_mlp)) for name, tensor in mlp._asdict().items()}
    reasons = platform_reasons(_hidden_kernel, x.device) + dtype_reasons(x=x, k_weight=k_weight, v_weight=v_weight, **mlps)
    widths = {"width": x.shape[-1], "k hidden width": k_mlp.w1.shape[0], "v hidden width": v_mlp.w1.shape[0]}
    reasons += [
        f"{name} {size} is no multiple of {ALIGNMENT} (rows load without vectors, and registers spill)"
        for name, size in widths.items()
        if size % ALIGNMENT
    ]
    return reasons


def structure_not_supported_reasons(
    activation: str,
    linears: int,
    *,
    layer_norm: bool = False,
    dropout_active: bool = False,
    activate_output: bool = False,
) -> list[str]:
    """Why a hypernetwork module of this structure cannot run as :func:`hyper_kv` (empty: it can).

    Args:
        activation: the web UI's name (``"linear"`` for none).
        linears: how many Linears ``net`` has (``len(layer_structure) - 1``).
        layer_norm: a LayerNorm follows each Linear.
        dropout_active: some Dropout would drop values (it exists and the module is training).
        activate_output: the activation follows the last Linear too.
    """
    reasons = []
    if activation not in FUSED_ACTIVATIONS:
        reasons.append(f"activation {activation!r} has no fused kernel")
    if linears == 1:
        reasons.append("one Linear is an affine map: fold it into the projection instead")
    elif linears != 2:
        reasons.append(f"{linears} Linears: the op fuses exactly two")
    if layer_norm:
        reasons.append("LayerNorm after the Linears is not fused")
    if dropout_active:
        reasons.append("Dropout in training mode is not fused")
    if activate_output and activation != NO_ACTIVATION:
        reasons.append("an activation after the last Linear is not fused")
    return reasons


def hyper_kv_reference(
    x: torch.Tensor,
    k_weight: torch.Tensor,
    v_weight: torch.Tensor,
    k_mlp: MLP,
    v_mlp: MLP,
    activation: str,
    strength: float = 1.0,
    k_bias: torch.Tensor | None = None,
    v_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of an attention layer whose k/v input a hypernetwork rewrites; defines the op.

    Args:
        x: ``(..., width)`` the k/v input (the context, or the image tokens in self-attention).
        k_weight, v_weight: ``(out_width, width)`` weights of ``to_k`` and ``to_v``.
        k_mlp, v_mlp: the two nets (:class:`MLP`: ``w1`` ``(hidden, width)``, ``b1``,
            ``w2`` ``(width, hidden)``, ``b2``); hidden is any width (``2 * width`` for the
            usual ``[1, 2, 1]`` structure).
        activation: between the Linears; a web UI name of :data:`FUSED_ACTIVATIONS`
            (``"linear"``: none; ``"swish"`` is Hardswish, as in web UI files).
        strength: ``s`` in ``x + s * net(x)``.
        k_bias, v_bias: optional ``(out_width,)`` projection biases (SD 1.x has none).

    Returns:
        ``(key, value)``, each ``(..., out_width)`` in the dtype of ``x``, computed in that dtype
        op by op as the web UI's modules and ``to_k``/``to_v`` do; differentiable in every tensor.
    """
    _check_arguments(x, k_weight, v_weight, k_mlp, v_mlp, activation, k_bias, v_bias)
    # The web UI's module for the name (as its files mean it), with its default arguments.
    act = (lambda pre: pre) if activation == NO_ACTIVATION else ACTIVATIONS[activation]()

    def project(weight: torch.Tensor, mlp: MLP, bias: torch.Tensor | None) -> torch.Tensor:
        net = F.linear(act(F.linear(x, mlp.w1, mlp.b1)), mlp.w2, mlp.b2)
        return F.linear(x + strength * net, weight, bias)

    return project(k_weight, k_mlp, k_bias), project(v_weight, v_mlp, v_bias)
