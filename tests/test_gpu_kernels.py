"""On a GPU: every kernel, forward and backward, against its float64 reference, as accurate as
the eager reference in the same dtype (the interpreter tests' rule, tests/kernel_proofs.py),
in float16, bfloat16 and float32, at SD 1.x shapes and odd ones; outputs start poisoned.

Skipped without CUDA; ``NAI_FAST_GPU_DRY_RUN=1`` runs tiny cases on the CPU with the
references standing in for the kernels (tests/gpu_support.py). The GPU check
(benchmarks/gpu/) runs this file first.
"""

from __future__ import annotations

import pytest
import torch
from gpu_support import DRY_RUN, check_results, kernel_op, on_device
from kernel_proofs import fresh_seed, poisoned_allocations

# Each op's inputs and runner, from its interpreter tests: one source for both.
from test_kernel_chunk_concat import random_inputs as chunk_concat_inputs
from test_kernel_chunk_concat import run as run_chunk_concat
from test_kernel_cross_attention import random_inputs as cross_attention_inputs
from test_kernel_cross_attention import run as run_cross_attention
from test_kernel_hyper_kv import random_inputs as hyper_kv_inputs
from test_kernel_hyper_kv import result_names as hyper_kv_result_names
from test_kernel_hyper_kv import run as run_hyper_kv

from nai_fast.kernels.chunk_concat import chunk_concat_reference
from nai_fast.kernels.cross_attention import cross_attention_reference
from nai_fast.kernels.hyper_kv import hyper_kv_reference

pytestmark = pytest.mark.cuda

HALF = (torch.float16, torch.bfloat16)
ALL = (*HALF, torch.float32)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def seeded() -> int:
    seed = fresh_seed()
    torch.manual_seed(seed)
    return seed


# -- cross_attention ------------------------------------------------------------------------

# (batch, heads, Lq, Lk, head_dim), key padding mask. SD 1.x: batch 2 (guidance), 8 heads, each
# level's queries and head dim at 512x512 and 512x768, 1 to 3 prompt chunks; then odd shapes:
# one query, Lk not a multiple of 77, head dims 64 and 8, a 5-key item, every mask kind.
ATTENTION_SD = [
    ((2, 8, 4096, 77, 40), None), ((2, 8, 1024, 154, 80), None), ((2, 8, 256, 231, 160), None),
    ((2, 8, 64, 77, 160), None), ((2, 8, 6144, 231, 40), None), ((2, 8, 1536, 77, 80), None),
    ((2, 8, 384, 154, 160), None), ((2, 8, 96, 231, 160), None),
]  # fmt: skip
ATTENTION_ODD = [
    ((1, 3, 1, 77, 40), None), ((3, 1, 333, 100, 80), "random"), ((2, 2, 70, 308, 64), "prefix"),
    ((2, 1, 65, 5, 160), "empty item"), ((2, 2, 130, 77, 8), None),
]  # fmt: skip
ATTENTION_DRY = [((1, 2, 5, 7, 8), None), ((2, 1, 3, 9, 40), "random")]
ATTENTION_CASES = [
    (shape, mask, dtype)
    for dtype in ALL
    for shape, mask in (ATTENTION_DRY if DRY_RUN else ATTENTION_SD + ATTENTION_ODD)
]


def attention_id(case) -> str:
    (batch, heads, query_length, key_length, head_dim), mask, dtype = case
    mask_note = "" if mask is None else "-mask_" + mask.replace(" ", "_")
    return f"B{batch}-H{heads}-Lq{query_length}-Lk{key_length}-D{head_dim}-{dtype_name(dtype)}{mask_note}"


@pytest.mark.parametrize("case", ATTENTION_CASES, ids=attention_id)
def test_cross_attention(case, record_property):
    shape, mask, dtype = case
    record_property("seed", seeded())
    inputs = on_device(cross_attention_inputs(shape, dtype, mask))
    exact = run_cross_attention(cross_attention_reference, inputs, torch.float64, None)
    eager = run_cross_attention(cross_attention_reference, inputs, dtype, None)
    with poisoned_allocations():
        kernel = run_cross_attention(kernel_op("cross_attention"), inputs, dtype, None)
    check_results(record_property, ("output", "grad q", "grad k", "grad v"), kernel, eager, exact)


# -- hyper_kv -------------------------------------------------------------------------------

# (token shape, width, hidden, out width), activation, strength, projection bias. SD 1.x
# self-attention at 512x512 (batch 2: 8192, 2048, 512 tokens of 320, 640, 1280) and its first
# level at 512x768; the text context (768 wide, 3 chunks) projected to 320; then odd shapes.
HYPER_SD = [
    (((8192,), 320, 640, 320), "relu", 1.0, False), (((2048,), 640, 1280, 640), "relu", 1.0, False),
    (((512,), 1280, 2560, 1280), "relu", 1.0, False), (((2, 6144), 320, 640, 320), "gelu", 0.8, False),
    (((2, 231), 768, 1536, 320), "swish", 1.0, False),
]  # fmt: skip
HYPER_ODD = [
    (((1,), 320, 640, 320), "relu", 1.0, True), (((33,), 640, 1280, 640), "sigmoid", 0.5, False),
    (((5, 3), 100, 150, 72), "leakyrelu", 0.3, True),
]  # fmt: skip
HYPER_DRY = [(((7,), 16, 32, 8), "relu", 1.0, True)]
HYPER_CASES = [(*case, dtype) for dtype in ALL for case in (HYPER_DRY if DRY_RUN else HYPER_SD + HYPER_ODD)]


def hyper_id(case) -> str:
    (tokens, width, hidden, out_width), activation, strength, bias, dtype = case
    notes = ("" if strength == 1.0 else f"-s{strength}") + ("-bias" if bias else "")
    shape = "x".join(map(str, tokens))
    return f"M{shape}-C{width}-H{hidden}-N{out_width}-{dtype_name(dtype)}-{activation}{notes}"


@pytest.mark.parametrize("case", HYPER_CASES, ids=hyper_id)
def test_hyper_kv(case, record_property):
    sizes, activation, strength, bias, dtype = case
    record_property("seed", seeded())
    inputs = on_device(hyper_kv_inputs(*sizes, dtype, bias))
    exact = run_hyper_kv(hyper_kv_reference, inputs, torch.float64, activation, strength)
    eager = run_hyper_kv(hyper_kv_reference, inputs, dtype, activation, strength)
    with poisoned_allocations():
        kernel = run_hyper_kv(kernel_op("hyper_kv"), inputs, dtype, activation, strength)
    check_results(record_property, hyper_kv_result_names(inputs), kernel, eager, exact)


# -- chunk_concat ---------------------------------------------------------------------------

# (chunks, length, width), mean restore, layout. SD 1.x: a prompt and a negative of 3 chunks for
# 1 and 4 images (6 and 24 chunks of 77 x 768), either layout; then odd shapes.
CONCAT_SD = [((6, 77, 768), True, "compact"), ((6, 77, 768), False, "full"), ((24, 77, 768), True, "compact")]
CONCAT_ODD = [((7, 5, 32), True, "compact"), ((3, 1, 100), False, "full"), ((1, 77, 1000), True, "full")]
CONCAT_DRY = [((2, 5, 16), True, "compact")]
CONCAT_CASES = [(*case, dtype) for dtype in ALL for case in (CONCAT_DRY if DRY_RUN else CONCAT_SD + CONCAT_ODD)]


def concat_id(case) -> str:
    (chunks, length, width), restore_mean, layout, dtype = case
    return f"C{chunks}-L{length}-D{width}-{dtype_name(dtype)}-{'restore' if restore_mean else 'plain'}-{layout}"


@pytest.mark.parametrize("case", CONCAT_CASES, ids=concat_id)
def test_chunk_concat(case, record_property):
    (chunks, length, width), restore_mean, layout, dtype = case
    record_property("seed", seeded())
    inputs = on_device(chunk_concat_inputs(chunks, length, width, layout, dtype))
    exact = run_chunk_concat(chunk_concat_reference, inputs, torch.float64, restore_mean)
    eager = run_chunk_concat(chunk_concat_reference, inputs, dtype, restore_mean)
    with poisoned_allocations():
        kernel = run_chunk_concat(kernel_op("chunk_concat"), inputs, dtype, restore_mean)
    check_results(record_property, ("output", "grad hidden", "grad weight", "grad bias"), kernel, eager, exact)
