"""cross_attention, proven without a GPU: the Triton kernels against the float64 reference
(under Triton's interpreter), their compilation for sm_80 and sm_90, the dispatcher."""

from __future__ import annotations

import importlib
import math
import os

import pytest
import torch
from kernel_proofs import (
    assert_fits_the_target,
    assert_results_as_accurate_as_eager,
    compile_distinct,
    fresh_seed,
    poisoned_allocations,
    recorded_launches,
    result_of,
    submit_cases,
)

import nai_fast.kernels as kernels
from nai_fast.kernels.cross_attention import (
    MAX_FLOAT32_HEAD_DIM,
    MAX_HEAD_DIM,
    LaunchConfig,
    cross_attention_reference,
    head_tiles,
    not_supported_reasons,
)
from nai_fast.kernels.cost import A100, H100_SXM, cross_attention_cost, measure_eager

MODULE = "nai_fast.kernels.cross_attention"
HEAD_DIMS = (40, 64, 80, 160)  # SD 1.x: 40, 80, 160; SD 2.x and SDXL: 64
TAILED_HEAD_DIMS = (40, 80, 160)  # main and tail tiles; 64 is a main tile alone
# Shared memory a block may use: 163 KiB on A100, 227 KiB on H100.


def op_module():
    """The kernel module (the package attribute of its name is the dispatching function)."""
    return importlib.import_module(MODULE)


# -- inputs -----------------------------------------------------------------------------------


def random_inputs(shape: tuple[int, ...], dtype: torch.dtype, mask: str | None = None) -> dict[str, torch.Tensor]:
    """Fresh q, k, v and an output gradient, representable in ``dtype``, held in float64, and
    with ``mask`` a key padding mask of that kind (see :func:`random_key_padding_mask`).

    Keys get a spread of norms so that the softmax is neither flat nor one-hot.
    """
    batch, heads, query_length, key_length, head_dim = shape
    tensors = dict(
        q=torch.randn(batch, heads, query_length, head_dim, dtype=torch.float64),
        k=torch.randn(batch, heads, key_length, head_dim, dtype=torch.float64)
        * (0.5 + torch.rand(batch, heads, key_length, 1, dtype=torch.float64)),
        v=torch.randn(batch, heads, key_length, head_dim, dtype=torch.float64),
        grad_out=torch.randn(batch, heads, query_length, head_dim, dtype=torch.float64),
    )
    inputs = {name: tensor.to(dtype).double() for name, tensor in tensors.items()}
    return inputs | ({} if mask is None else {"key_padding_mask": random_key_padding_mask(mask, batch, key_length)})


def random_key_padding_mask(kind: str, batch: int, key_length: int) -> torch.Tensor:
    """bool (batch, Lk), True where a key takes part: "random" keys (each with probability
    0.6, and at least two an item), a "prefix" of random length per item (a padded prompt),
    or "empty item": random, but the first item has no valid key at all.

    Two keys at least: with one, softmax is constant and grad q exactly zero, so in a batch of
    two with an empty item the float64 grad q is zero and no relative error is defined (seen:
    5 keys, bfloat16, on the H200, 2026-11-30)."""
    if kind == "prefix":
        return torch.arange(key_length) < torch.randint(1, key_length + 1, (batch, 1))
    mask = torch.rand(batch, key_length) < 0.6
    two_keys = torch.rand(batch, key_length).argsort(dim=1)[:, :2]
    mask.scatter_(1, two_keys, True)
    if kind == "empty item":
        mask[0] = False
    return mask


def run(op, inputs: dict, dtype: torch.dtype, scale: float | None) -> list[torch.Tensor]:
    """[output, grad q, grad k, grad v] of ``op`` on ``inputs`` in ``dtype``."""
    q, k, v = (inputs[name].to(dtype, copy=True).requires_grad_() for name in ("q", "k", "v"))
    output = op(q, k, v, scale, key_padding_mask=inputs.get("key_padding_mask"))
    output.backward(inputs["grad_out"].to(dtype))
    return [output.detach(), q.grad, k.grad, v.grad]


# -- numerics (jobs run in interpreter workers) ----------------------------------------------

# (batch, heads, Lq, Lk, head_dim), dtype, scale, key padding mask: every head dim (main tile
# only at 8 and 64; main and tail tiles at 40, 80, 160) and dtype, Lq 1 to 400, Lk 77, 100, 154,
# 231 and 308 (1 to 4 prompt chunks; 100 is no multiple of 77), every kind of mask.
CASES = [
    ((1, 2, 77, 77, 40), torch.float32, None, None),
    ((2, 2, 96, 77, 8), torch.float32, None, None),  # under tl.dot's 16: the tiny U-Net's head dim
    ((2, 1, 1, 308, 64), torch.float32, None, None),
    ((1, 1, 300, 100, 80), torch.float32, None, None),
    ((1, 2, 100, 231, 80), torch.float32, 0.3, "random"),
    ((1, 1, 65, 154, 160), torch.float32, None, None),
    ((2, 1, 33, 77, 160), torch.float32, None, "empty item"),
    ((1, 2, 77, 77, 40), torch.float16, None, None),
    ((1, 1, 300, 77, 160), torch.float16, None, None),
    ((2, 1, 5, 308, 80), torch.float16, None, "prefix"),
    ((1, 1, 100, 231, 64), torch.float16, 0.3, None),
    ((2, 2, 70, 100, 40), torch.float16, None, "random"),
    ((2, 1, 40, 231, 80), torch.float16, None, "empty item"),
    ((1, 2, 77, 100, 80), torch.bfloat16, None, None),
    ((1, 1, 400, 308, 40), torch.bfloat16, None, None),
    ((2, 1, 1, 77, 160), torch.bfloat16, None, None),
    ((3, 1, 20, 308, 160), torch.bfloat16, None, "random"),
    ((2, 1, 50, 77, 64), torch.bfloat16, None, "prefix"),
]


def case_id(case) -> str:
    (batch, heads, query_length, key_length, head_dim), dtype, scale, mask = case
    scale_note = "" if scale is None else f"-scale{scale}"
    mask_note = "" if mask is None else "-mask_" + mask.replace(" ", "_")
    dtype_name = str(dtype).removeprefix("torch.")
    return f"B{batch}-H{heads}-Lq{query_length}-Lk{key_length}-D{head_dim}-{dtype_name}{scale_note}{mask_note}"


def exponent_floor(inputs: dict, scale: float | None) -> float:
    """The error the kernel's exponentials cannot avoid: it evaluates exp2(s - lse) with the
    scores s and the log-sum-exp in float32 (base 2), where a value of magnitude M carries
    ~M ulp of absolute error, a relative error of ~M eps in every probability (recomputed in
    the backward from a stored lse, so forward and backward roundings add up). Eager's softmax
    subtracts the row max first and exponentiates values near 0. 2 M eps with M the largest
    |lse| in base 2: below ERROR_FLOOR at SD's scale, up to 5e-6 at Lk 231 with scale 0.3."""
    q, k = inputs["q"], inputs["k"]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale
    if "key_padding_mask" in inputs:
        scores = scores.masked_fill(~inputs["key_padding_mask"][:, None, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1) / math.log(2)
    largest = lse[torch.isfinite(lse)].abs().max().item() if torch.isfinite(lse).any() else 0.0
    return 2 * largest * torch.finfo(torch.float32).eps


def numerics_job(case, seed: int) -> None:
    """Output and gradients against the float64 reference, as close as eager in the same dtype;
    with a mask, exact zeros where nothing flows: outputs of items with no valid key, gradients
    of keys and values that take no part."""
    torch.manual_seed(seed)
    shape, dtype, scale, mask = case
    inputs = random_inputs(shape, dtype, mask)
    exact = run(cross_attention_reference, inputs, torch.float64, scale)
    eager = run(cross_attention_reference, inputs, dtype, scale)
    with poisoned_allocations():
        kernel = run(op_module().cross_attention, inputs, dtype, scale)
    floor = exponent_floor(inputs, scale)
    assert_results_as_accurate_as_eager(("output", "grad q", "grad k", "grad v"), kernel, eager, exact, floor)
    if mask is not None:
        takes_part = inputs["key_padding_mask"]
        output, grad_q, grad_k, grad_v = kernel
        empty_items = ~takes_part.any(dim=1)
        assert not output[empty_items].any() and not grad_q[empty_items].any()
        assert not grad_k.transpose(1, 2)[~takes_part].any() and not grad_v.transpose(1, 2)[~takes_part].any()


@pytest.fixture(scope="module")
def numerics(interpreter):
    """Every case, sent to the workers at once: id -> (seed, pending result)."""
    return submit_cases(interpreter, numerics_job, CASES, case_id)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_reference(numerics, case):
    """See numerics_job; a failure reports the seed that reproduces it."""
    seed, job = numerics[case_id(case)]
    result_of(job, seed)


def non_contiguous_job(seed: int) -> None:
    """Views in SDPA's layout taken from (batch, length, heads, head_dim) projections."""
    torch.manual_seed(seed)
    q, k, v = (torch.randn(1, length, 2, 40).transpose(1, 2) for length in (9, 77, 77))
    torch.testing.assert_close(op_module().cross_attention(q, k, v), cross_attention_reference(q, k, v))


def mismatched_inputs_job() -> None:
    op, q, k = op_module().cross_attention, torch.randn(1, 2, 5, 40), torch.randn(1, 2, 77, 40)
    with pytest.raises(ValueError, match="k and v of one shape"):
        op(q, k, k[:, :, :70])
    with pytest.raises(ValueError, match="k and v of one shape"):
        op(q, k[..., :32], k[..., :32])
    with pytest.raises(ValueError, match="at least one key"):
        op(q, k[:, :, :0], k[:, :, :0])
    with pytest.raises(ValueError, match="share a dtype"):
        op(q, k, k.half())
    for bad_mask in (torch.ones(1, 77), torch.ones(1, 70, dtype=torch.bool), torch.ones(2, 77, dtype=torch.bool)):
        with pytest.raises(ValueError, match="key_padding_mask must be a bool"):
            op(q, k, k, key_padding_mask=bad_mask)


def test_non_contiguous_inputs(interpreter):
    seed = fresh_seed()
    result_of(interpreter.apply_async(non_contiguous_job, (seed,)), seed)


def test_mismatched_inputs_raise(interpreter):
    result_of(interpreter.apply_async(mismatched_inputs_job))


# -- compiles for real targets (a job run in a compiling worker) ------------------------------

# Every LaunchConfig: each head dim in float16 and float32, and bfloat16 (the float16 tiles)
# at one; with a key padding mask (kernel variants of their own) the float16 configs with a
# tail tile and the widest float32 one (64 with a mask, left out for time, compiled to 141 to
# 179 registers without spills when the tiles were chosen).
COMPILE_VARIANTS = [(head_dim, torch.float16, None) for head_dim in HEAD_DIMS]
COMPILE_VARIANTS += [(head_dim, torch.float16, "random") for head_dim in TAILED_HEAD_DIMS]
COMPILE_VARIANTS += [(head_dim, torch.float32, None) for head_dim in HEAD_DIMS]
COMPILE_VARIANTS += [(max(HEAD_DIMS), torch.float32, "random"), (80, torch.bfloat16, None)]


def compile_job() -> list:
    """Forward and backward launches of COMPILE_VARIANTS, compiled for sm_80 and sm_90."""
    from nai_fast.kernels.compile_check import TARGETS

    with recorded_launches(op_module()) as launches:
        for head_dim, dtype, mask in COMPILE_VARIANTS:
            run(op_module().cross_attention, random_inputs((1, 2, 3, 5, head_dim), dtype, mask), dtype, None)
    return compile_distinct(launches, TARGETS)


@pytest.fixture(scope="module")
def compiled(compiler):
    return result_of(compiler.apply_async(compile_job))


def test_compile_variants_reach_every_config():
    assert max(HEAD_DIMS) <= MAX_FLOAT32_HEAD_DIM  # every head dim runs on Triton in float32 too
    every_config = {LaunchConfig.for_head(d, dtype) for d in HEAD_DIMS for dtype in (torch.float16, torch.float32)}
    assert every_config == {LaunchConfig.for_head(d, dtype) for d, dtype, _ in COMPILE_VARIANTS}


@pytest.mark.parametrize("target", ["sm_80", "sm_90"])
def test_compiles_without_spills(compiled, target, record_property):
    results = [result for result in compiled if result.target == target]
    assert len(results) == 3 * len(COMPILE_VARIANTS)
    for result in results:
        assert_fits_the_target(result, record_property)


@pytest.mark.parametrize("target", ["sm_80", "sm_90"])
def test_half_precision_dots_run_on_tensor_cores(compiled, target):
    """HMMA on sm_80; HMMA or the warpgroup HGMMA (wgmma) on sm_90."""
    from nai_fast.kernels.compile_check import sass_mnemonics

    tensor_core = {"HMMA"} if target == "sm_80" else {"HMMA", "HGMMA"}
    half = [r for r in compiled if r.target == target and ("fp16" in r.description or "bf16" in r.description)]
    assert len(half) == 3 * sum(dtype != torch.float32 for _, dtype, _ in COMPILE_VARIANTS)
    for result in half:
        mnemonics = sass_mnemonics(result.binary)
        assert {"LDG", "STG"} <= mnemonics  # global loads and stores: the disassembly is real
        assert tensor_core & mnemonics, f"{result.description} on {target}: no tensor-core instruction"


# -- dispatch ---------------------------------------------------------------------------------


def small_args() -> tuple[torch.Tensor, ...]:
    return torch.randn(1, 2, 5, 40), torch.randn(1, 2, 77, 40), torch.randn(1, 2, 77, 40)


def triton_mode_job(args: tuple, scale: float | None, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
    os.environ[kernels.ENV_VAR] = "triton"
    try:
        return kernels.cross_attention(*args, scale, key_padding_mask=key_padding_mask)
    finally:
        del os.environ[kernels.ENV_VAR]


@pytest.mark.parametrize("scale, masked", [(None, False), (0.5, True)])
def test_triton_mode_runs_the_kernels_on_cpu_under_the_interpreter(interpreter, scale, masked):
    """The dispatcher passes the scale and the key padding mask through."""
    args = small_args()
    mask = random_key_padding_mask("random", 1, 77) if masked else None
    with_triton = result_of(interpreter.apply_async(triton_mode_job, (args, scale, mask)))
    torch.testing.assert_close(with_triton, cross_attention_reference(*args, scale, key_padding_mask=mask))
    if masked:
        assert not torch.allclose(with_triton, cross_attention_reference(*args, scale))


def test_default_scale_is_that_of_sdpa():
    q, k, v = small_args()
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(cross_attention_reference(q, k, v), sdpa)


@pytest.mark.parametrize("kind", ["random", "prefix", "empty item"])
def test_reference_masks_like_sdpa(kind):
    """Its boolean attn_mask, and zeros for an item with no valid key; gradients stay finite."""
    q, k, v = (tensor.repeat(2, 1, 1, 1).requires_grad_() for tensor in small_args())
    mask = random_key_padding_mask(kind, 2, 77)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
    ours = cross_attention_reference(q, k, v, key_padding_mask=mask)
    torch.testing.assert_close(ours, sdpa)
    ours.sum().backward()
    assert all(torch.isfinite(tensor.grad).all() for tensor in (q, k, v))
    assert not k.grad.transpose(1, 2)[~mask].any()


@pytest.mark.parametrize(
    "head_dim, tiles",
    [(40, (32, 16)), (64, (64, 0)), (80, (64, 16)), (160, (128, 32)), (8, (16, 0)), (24, (32, 0)), (100, (128, 0)),
     (144, (128, 16)), (256, (256, 0))],
)  # fmt: skip
def test_head_tiles(head_dim, tiles):
    """A power-of-two main tile and tail (16 at least); one tile where two equal ones would do."""
    assert head_tiles(head_dim) == tiles


def test_unsupported_inputs_are_explained():
    wide = torch.randn(1, 1, 2, MAX_HEAD_DIM + 1, dtype=torch.float16)
    expected = f"head dim {MAX_HEAD_DIM + 1} exceeds the {MAX_HEAD_DIM} a block holds"
    assert expected in not_supported_reasons(wide, wide, wide)
    float32 = torch.randn(1, 1, 2, 192)
    expected = f"float32 head dim 192 exceeds {MAX_FLOAT32_HEAD_DIM} (registers would spill)"
    assert expected in not_supported_reasons(float32, float32, float32)
    widest = float32[..., :MAX_FLOAT32_HEAD_DIM]
    assert not any("head dim" in reason for reason in not_supported_reasons(widest, widest, widest))
    double = torch.randn(1, 1, 2, 40, dtype=torch.float64)
    assert "q is torch.float64, not float32, float16 or bfloat16" in not_supported_reasons(double, double, double)


# -- cost model -------------------------------------------------------------------------------


def test_cost_by_hand_for_sd_first_block():
    """SD 1.x at 512 x 512, first down block: 2 x 8 heads (prompt and negative), 4096 queries,
    one 77-token chunk, head dim 40, float16."""
    cost = cross_attention_cost(2, 8, 4096, 77, 40)
    queries, keys = 16 * 4096 * 40 * 2, 16 * 77 * 40 * 2  # 5,242,880 and 98,560 bytes; out, v alike
    assert cost.minimal.bytes == 2 * queries + 2 * keys == 10_682_880
    assert cost.implemented.bytes == cost.minimal.bytes + 16 * 4096 * 4  # the float32 log-sum-exp
    assert cost.minimal.tensor_flops == 4 * 16 * 4096 * 77 * 40 == 807_403_520
    # Tiles of 96 keys (3 x 32) by 48 head dims (a main tile of 32, a tail of 16) on tensor cores.
    assert cost.implemented.tensor_flops == 4 * 16 * 4096 * 96 * 48
    # Eager writes and reads the 16 x 4096 x 77 float16 scores three times each.
    assert cost.eager.bytes == cost.minimal.bytes + 6 * 16 * 4096 * 77 * 2 == 71_238_144
    assert (cost.implemented.launches, cost.eager.launches) == (1, 4)
    assert cost.predicted_speedup(A100) > 5 and cost.predicted_speedup(H100_SXM) > 5


def test_float32_products_count_on_cuda_cores():
    cost = cross_attention_cost(1, 1, 16, 16, 64, dtype_bytes=4)
    assert cost.implemented.tensor_flops == 0
    assert cost.implemented.flops == 5 * 16 * 16 + 4 * 16 * 16 * 64


def test_backward_cost_by_hand_for_sd_first_block():
    """As above, backward: 5 products at the floor, 7 as implemented (S and dP recomputed in
    both kernels); the dK/dV kernel's 3 key blocks each read the head's Q, dO, lse and delta."""
    cost = cross_attention_cost(2, 8, 4096, 77, 40, backward=True)
    queries, keys, rows = 16 * 4096 * 40 * 2, 16 * 77 * 40 * 2, 16 * 4096 * 4
    assert cost.minimal.bytes == 4 * queries + 4 * keys + rows  # Q, O, dO, dQ; K, V, dK, dV; lse
    assert cost.minimal.tensor_flops == 5 * 2 * 16 * 4096 * 77 * 40
    dq_bytes = 4 * queries + 2 * keys + 2 * rows  # Q, O, dO in, dQ out; K, V; lse in, delta out
    dkv_bytes = 3 * (2 * queries + 2 * rows) + 4 * keys
    assert cost.implemented.bytes == dq_bytes + dkv_bytes
    # dQ: 64 x 32 blocks; dK/dV: 32 keys by steps of 32 queries; 48 columns.
    assert cost.implemented.tensor_flops == 2 * 48 * 16 * 4096 * 96 * (3 + 4)
    # Scores written 3 times (dP, dS, the scaled dS) and read 6 (P twice, dP, P, dS twice);
    # Q, dO read twice, dQ written; K, V read, dK^T, dV written, dK^T copied to K's layout.
    score_bytes = 16 * 4096 * 77 * 2
    assert cost.eager.bytes == 9 * score_bytes + 4 * queries + 8 * keys
    assert (cost.implemented.launches, cost.eager.launches) == (2, 8)
    assert cost.predicted_speedup(A100) > 1.5 and cost.predicted_speedup(H100_SXM) > 1.5


def test_backward_eager_cost_is_what_autograd_runs():
    """The eager backward model against the aten ops autograd runs on the reference."""
    batch, heads, query_length, key_length, head_dim = 2, 3, 50, 100, 40
    q = torch.randn(batch, heads, query_length, head_dim, dtype=torch.float16, requires_grad=True)
    k, v = (torch.randn(batch, heads, key_length, head_dim, dtype=torch.float16, requires_grad=True) for _ in "kv")
    grad_out = torch.randn_like(q)
    forward = measure_eager(lambda: cross_attention_reference(q, k, v))
    both = measure_eager(lambda: cross_attention_reference(q, k, v).backward(grad_out))
    model = cross_attention_cost(batch, heads, query_length, key_length, head_dim, backward=True).eager
    assert (both.bytes - forward.bytes, both.launches - forward.launches) == (model.bytes, model.launches)
