"""chunk_concat, proven without a GPU: the Triton kernels against the eager reference (under
Triton's interpreter), their compilation for sm_80 and sm_90, the dispatcher, the cost model."""

from __future__ import annotations

import importlib
import logging
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

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
from nai_fast.kernels.chunk_concat import MAX_WIDTH, LaunchConfig, chunk_concat_reference, not_supported_reasons
from nai_fast.kernels.cost import A100, H100_SXM, chunk_concat_cost, measure_eager

MODULE = "nai_fast.kernels.chunk_concat"
EPS = 1e-5
LOW_PRECISION = (torch.float16, torch.bfloat16)


def op_module():
    """The kernel module (the package attribute of its name is the dispatching function)."""
    return importlib.import_module(MODULE)


# -- inputs -----------------------------------------------------------------------------------


def full_layout(chunks: int, length: int) -> tuple[torch.Tensor, int]:
    """Every row kept, in shuffled order."""
    return torch.randperm(chunks * length).view(chunks, length), chunks * length


def compact_layout(chunks: int, length: int) -> tuple[torch.Tensor, int]:
    """About a quarter of the rows dropped (-1), at least one kept, the rest shuffled."""
    kept = torch.rand(chunks, length) < 0.75
    kept.view(-1)[torch.randint(chunks * length, ())] = True
    destination = torch.full((chunks, length), -1)
    destination[kept] = torch.randperm(int(kept.sum()))
    return destination, int(kept.sum())


LAYOUTS = {"full": full_layout, "compact": compact_layout}


def random_inputs(chunks: int, length: int, width: int, layout: str, dtype: torch.dtype) -> dict:
    """Fresh inputs, representable in ``dtype``, held in float64.

    Rows get their own offset and spread, as encoder states do. The LayerNorm bias has a
    positive mean: with a zero-mean output a chunk's mean, which the restore divides by,
    would be near 0 and the op ill-conditioned (trained CLIP biases are not centred).
    """
    scale = 0.5 + torch.rand(chunks, length, 1, dtype=torch.float64)
    hidden = torch.randn(chunks, length, width, dtype=torch.float64) * scale + 3 * torch.randn(chunks, length, 1)
    half_emphasised = torch.rand(chunks, length) < 0.5
    multipliers = torch.where(half_emphasised, 0.5 + torch.rand(chunks, length), torch.ones(chunks, length))
    destination, num_rows = LAYOUTS[layout](chunks, length)
    tensors = dict(
        hidden=hidden,
        weight=1 + 0.2 * torch.randn(width, dtype=torch.float64),
        bias=0.3 + 0.2 * torch.randn(width, dtype=torch.float64),
        grad_output=torch.randn(num_rows, width, dtype=torch.float64),
    )
    rounded = {name: tensor.to(dtype).double() for name, tensor in tensors.items()}
    return dict(rounded, multipliers=multipliers.float(), destination=destination, num_rows=num_rows)


def run(op, inputs: dict, dtype: torch.dtype, restore_mean: bool) -> list[torch.Tensor]:
    """[output, grad hidden, grad weight, grad bias] of ``op`` on ``inputs`` in ``dtype``."""
    hidden, weight, bias = (inputs[name].to(dtype, copy=True).requires_grad_() for name in ("hidden", "weight", "bias"))
    output = op(
        hidden, weight, bias, EPS, inputs["multipliers"], inputs["destination"], inputs["num_rows"], restore_mean
    )
    output.backward(inputs["grad_output"].to(dtype))
    return [output.detach(), hidden.grad, weight.grad, bias.grad]


# -- numerics (jobs run in interpreter workers) ----------------------------------------------

SETTINGS = [(restore_mean, layout) for restore_mean in (True, False) for layout in LAYOUTS]
CASES = [
    # float32: every setting on C 1, 3, 7; L 77 and small odd ones; D 32, 100, 768.
    *[(shape, torch.float32, *setting) for shape in [(1, 77, 768), (3, 77, 100), (7, 5, 32), (3, 1, 100)]
      for setting in SETTINGS],
    *[(shape, torch.float32, True, "compact") for shape in [(7, 77, 32), (3, 5, 768)]],
    # Half precision: every setting at a small size, both restore settings at SD's.
    *[((7, 5, 32), dtype, *setting) for dtype in LOW_PRECISION for setting in SETTINGS],
    *[((1, 77, 768), dtype, restore_mean, "compact") for dtype in LOW_PRECISION for restore_mean in (True, False)],
    *[((3, 77, 100), dtype, True, "full") for dtype in LOW_PRECISION],
]  # fmt: skip


def case_id(case) -> str:
    (chunks, length, width), dtype, restore_mean, layout = case
    restore = "restore" if restore_mean else "plain"
    return f"C{chunks}-L{length}-D{width}-{str(dtype).removeprefix('torch.')}-{restore}-{layout}"


def numerics_job(case, seed: int) -> None:
    """Output and gradients against the float64 reference, as close as eager in the same dtype."""
    torch.manual_seed(seed)
    (chunks, length, width), dtype, restore_mean, layout = case
    inputs = random_inputs(chunks, length, width, layout, dtype)
    exact = run(chunk_concat_reference, inputs, torch.float64, restore_mean)
    eager = run(chunk_concat_reference, inputs, dtype, restore_mean)
    with poisoned_allocations():
        kernel = run(op_module().chunk_concat, inputs, dtype, restore_mean)
    assert_results_as_accurate_as_eager(("output", "grad hidden", "grad weight", "grad bias"), kernel, eager, exact)


@pytest.fixture(scope="module")
def numerics(interpreter):
    """Every case, sent to the workers at once: id -> (seed, pending result)."""
    return submit_cases(interpreter, numerics_job, CASES, case_id)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_reference(numerics, case):
    """See numerics_job; a failure reports the seed that reproduces it."""
    seed, job = numerics[case_id(case)]
    result_of(job, seed)


def int32_destination_job(seed: int) -> None:
    torch.manual_seed(seed)
    inputs = random_inputs(3, 5, 32, "compact", torch.float32)
    hidden, weight, bias = (inputs[name].float() for name in ("hidden", "weight", "bias"))
    multipliers, destination, num_rows = inputs["multipliers"], inputs["destination"], inputs["num_rows"]
    op = op_module().chunk_concat
    int64 = op(hidden, weight, bias, EPS, multipliers, destination, num_rows)
    int32 = op(hidden, weight, bias, EPS, multipliers, destination.int(), num_rows)
    torch.testing.assert_close(int32, int64, rtol=0, atol=0)


def no_multiplier_gradient_job(seed: int, op_name: str) -> None:
    torch.manual_seed(seed)
    op = op_module().chunk_concat if op_name == "kernel" else chunk_concat_reference
    inputs = random_inputs(2, 5, 32, "full", torch.float32)
    hidden = inputs["hidden"].float().requires_grad_()
    multipliers = inputs["multipliers"].requires_grad_()
    weight, bias = inputs["weight"].float(), inputs["bias"].float()
    op(hidden, weight, bias, EPS, multipliers, inputs["destination"], inputs["num_rows"]).sum().backward()
    assert hidden.grad is not None and multipliers.grad is None


def out_of_range_job(seed: int) -> None:
    """Outside the precondition the kernel still stays inside its output: rows whose
    destination is num_rows are dropped, and the memory right after the output is untouched."""
    torch.manual_seed(seed)
    inputs = random_inputs(2, 5, 32, "full", torch.float32)
    destination, num_rows = inputs["destination"], inputs["num_rows"]
    args = [inputs[name].float() for name in ("hidden", "weight", "bias")]
    guarded = torch.zeros(2 * num_rows, 32)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "empty", lambda *shape, **options: guarded[:num_rows])  # the op's only allocation
        out_of_range = destination.masked_fill(destination == num_rows - 1, num_rows)
        op_module().chunk_concat(*args, EPS, inputs["multipliers"], out_of_range, num_rows, restore_mean=False)
    expected = chunk_concat_reference(*args, EPS, inputs["multipliers"], destination, num_rows, restore_mean=False)
    torch.testing.assert_close(guarded[: num_rows - 1], expected[: num_rows - 1])
    assert (guarded[num_rows - 1 :] == 0).all()


def mismatched_shapes_job() -> None:
    op, hidden, weight = op_module().chunk_concat, torch.randn(2, 5, 32), torch.ones(32)
    destination = torch.arange(10).view(2, 5)
    with pytest.raises(ValueError, match="multipliers and destination"):
        op(hidden, weight, weight, EPS, torch.ones(2, 4), destination, 10)
    with pytest.raises(ValueError, match="weight and bias"):
        op(hidden, weight[:31], weight, EPS, torch.ones(2, 5), destination, 10)


def unrestorable_mean_job(seed: int, dtype: torch.dtype) -> None:
    """A fresh final LayerNorm (weight 1, bias 0) makes every chunk's mean ~0: the restore is
    skipped, not divided by ~0, and kernel and reference agree, gradients included."""
    torch.manual_seed(seed)
    inputs = random_inputs(3, 77, 64, "full", dtype)
    inputs["weight"], inputs["bias"] = torch.ones(64, dtype=torch.float64), torch.zeros(64, dtype=torch.float64)
    plain = run(chunk_concat_reference, inputs, torch.float64, restore_mean=False)
    reference = run(chunk_concat_reference, inputs, dtype, restore_mean=True)
    with poisoned_allocations():
        kernel = run(op_module().chunk_concat, inputs, dtype, restore_mean=True)
    for name, got, want in zip(("output", "grad hidden", "grad weight", "grad bias"), kernel, reference):
        assert torch.isfinite(got).all() and torch.isfinite(want).all(), name
    tolerance = dict(rtol=2e-2, atol=2e-2) if dtype != torch.float32 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(kernel[0].double(), plain[0], **tolerance)
    torch.testing.assert_close(reference[0].double(), plain[0], **tolerance)
    for got, want in zip(kernel[1:], plain[1:]):
        torch.testing.assert_close(got.double(), want, **tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_a_mean_near_zero_is_not_restored(interpreter, dtype):
    seed = fresh_seed()
    result_of(interpreter.apply_async(unrestorable_mean_job, (seed, dtype)), seed)


def test_an_unrestored_chunk_is_reported_once(monkeypatch, caplog):
    monkeypatch.setattr(op_module(), "_reported_unrestored", False)
    hidden, multipliers = torch.randn(2, 5, 32), 1 + torch.rand(2, 5)
    destination = torch.arange(10).view(2, 5)
    with caplog.at_level(logging.WARNING, logger=MODULE):
        for _ in range(2):
            output = chunk_concat_reference(hidden, torch.ones(32), torch.zeros(32), EPS, multipliers, destination, 10)
    assert torch.isfinite(output).all()
    assert [record.getMessage()[:60] for record in caplog.records] == [
        "emphasis 'original' not restored for 2 of 2 chunks: their we"
    ]


def test_int32_destination_gives_the_same_output(interpreter):
    seed = fresh_seed()
    result_of(interpreter.apply_async(int32_destination_job, (seed,)), seed)


@pytest.mark.parametrize("op_name", ["kernel", "reference"])
def test_multipliers_get_no_gradient(interpreter, op_name):
    seed = fresh_seed()
    result_of(interpreter.apply_async(no_multiplier_gradient_job, (seed, op_name)), seed)


def test_out_of_range_destinations_are_dropped_not_written(interpreter):
    seed = fresh_seed()
    result_of(interpreter.apply_async(out_of_range_job, (seed,)), seed)


def test_mismatched_shapes_raise(interpreter):
    result_of(interpreter.apply_async(mismatched_shapes_job))


# -- compiles for real targets (jobs run in a compiling worker) -------------------------------

# Every LaunchConfig (a power-of-two width each) in float16, the dtype that matters; then
# float32 at SD's width, and bfloat16 at a width not divisible by 16 (no vector loads).
COMPILE_WIDTHS = [2**exponent for exponent in range(6, 12)]
COMPILE_VARIANTS = [(width, torch.float16) for width in COMPILE_WIDTHS] + [(768, torch.float32), (100, torch.bfloat16)]


def compile_job() -> tuple[set[tuple], list]:
    """Every kernel launch the op makes for COMPILE_VARIANTS, forward and backward, with and
    without the mean restore, compiled for sm_80 and sm_90. Returns the launches' (kernel,
    options) and the binaries."""
    from nai_fast.kernels.compile_check import TARGETS

    with recorded_launches(op_module()) as launches:
        for width, dtype in COMPILE_VARIANTS:
            for restore_mean in (True, False):
                run(op_module().chunk_concat, random_inputs(1, 3, width, "compact", dtype), dtype, restore_mean)
    launched = {(launch.kernel.__name__, *sorted(launch.kwargs.items())) for launch in launches}
    return launched, compile_distinct(launches, TARGETS)


@pytest.fixture(scope="module")
def compiled(compiler):
    return result_of(compiler.apply_async(compile_job))


def test_compile_widths_reach_every_config():
    every_config = {LaunchConfig.for_width(width) for width in range(1, MAX_WIDTH + 1)}
    assert every_config == {LaunchConfig.for_width(width) for width in COMPILE_WIDTHS}


def test_every_kernel_variant_is_launched(compiled):
    launched, _ = compiled
    flags = {"_row_sums_kernel": "WITH_GRAD", "_forward_kernel": "RESTORE_MEAN", "_backward_kernel": "RESTORE_MEAN"}
    for config in {LaunchConfig.for_width(width) for width in COMPILE_WIDTHS}:
        for kernel, flag in flags.items():
            for value in (True, False):
                assert (kernel, *sorted({**config.options(), flag: value}.items())) in launched


@pytest.mark.parametrize("target", ["sm_80", "sm_90"])
def test_compiles_without_spills(compiled, target, record_property):
    results = [result for result in compiled[1] if result.target == target]
    assert len(results) >= 3 * 2 * len(COMPILE_WIDTHS)
    for result in results:
        assert_fits_the_target(result, record_property)


def test_sass_shows_no_tensor_core_instructions(compiled):
    """This op has no dot (the check is ready for kernels that have one); its biggest kernel
    at SD's width, on each target."""
    from nai_fast.kernels.compile_check import sass_mnemonics

    sd_config = "BLOCK_WIDTH=1024"
    backward = [
        r for r in compiled[1] if r.description.startswith("_backward_kernel(*fp16") and sd_config in r.description
    ]
    assert {result.target for result in backward} == {"sm_80", "sm_90"}
    for result in backward:
        mnemonics = sass_mnemonics(result.binary)
        assert {"LDG", "STG"} <= mnemonics  # global loads and stores: the disassembly is real
        assert not {"HMMA", "HGMMA"} & mnemonics, result.description
        assert "mma" not in result.binary.ptx


# -- dispatch ---------------------------------------------------------------------------------


def small_args(chunks: int = 1) -> tuple:
    """chunk_concat arguments: 4 rows a chunk, 8 wide, full layout; the bias keeps the chunk
    means away from 0."""
    hidden, weight, bias = torch.randn(chunks, 4, 8), torch.ones(8), torch.full((8,), 0.5)
    destination = torch.arange(chunks * 4).view(chunks, 4)
    return hidden, weight, bias, EPS, torch.rand(chunks, 4) + 0.5, destination, chunks * 4


def triton_mode_job(args: tuple) -> torch.Tensor:
    os.environ[kernels.ENV_VAR] = "triton"
    try:
        return kernels.chunk_concat(*args)
    finally:
        del os.environ[kernels.ENV_VAR]


def test_triton_mode_runs_the_kernels_on_cpu_under_the_interpreter(interpreter):
    args = small_args(chunks=2)
    with_triton = result_of(interpreter.apply_async(triton_mode_job, (args,)))
    torch.testing.assert_close(with_triton, chunk_concat_reference(*args))


def test_triton_mode_says_what_cpu_tensors_need(compiler):
    with pytest.raises(AssertionError, match="RuntimeError: NAI_FAST_KERNELS=triton, but .*TRITON_INTERPRET=1"):
        result_of(compiler.apply_async(triton_mode_job, (small_args(),)))


def test_unsupported_inputs_are_explained():
    wide = not_supported_reasons(torch.randn(1, 2, MAX_WIDTH + 1), torch.ones(1), torch.ones(1))
    assert f"rows of {MAX_WIDTH + 1} values exceed the {MAX_WIDTH} one block holds" in wide
    double = not_supported_reasons(torch.randn(1, 2, 8, dtype=torch.float64), torch.ones(8), torch.ones(8))
    assert "hidden is torch.float64, not float32, float16 or bfloat16" in double


def test_auto_mode_on_cuda_falls_back_with_a_logged_reason(monkeypatch, caplog):
    monkeypatch.setenv(kernels.ENV_VAR, "auto")
    cuda_tensor = SimpleNamespace(device=torch.device("cuda"))

    def module(reasons):
        return SimpleNamespace(an_op="triton", an_op_reference="reference", not_supported_reasons=lambda _: reasons)

    with caplog.at_level(logging.WARNING, logger="nai_fast.kernels"):
        assert kernels._implementation(module([]), "an_op", cuda_tensor) == "triton"
        assert kernels._implementation(module(["rows too wide"]), "an_op", cuda_tensor) == "reference"
    assert "an_op falls back to its eager reference: rows too wide" in caplog.text


@pytest.mark.slow  # a fresh Python process
def test_package_works_without_triton():
    script = textwrap.dedent(
        """
        import os, sys
        import torch
        sys.modules["triton"] = None  # import triton now raises ImportError
        import nai_fast.kernels as kernels
        from nai_fast.kernels.chunk_concat import chunk_concat_reference

        hidden, weight, bias = torch.randn(1, 4, 8), torch.ones(8), torch.full((8,), 0.5)
        args = (hidden, weight, bias, 1e-5, torch.ones(1, 4), torch.arange(4)[None], 4)
        assert torch.equal(kernels.chunk_concat(*args), chunk_concat_reference(*args))
        os.environ["NAI_FAST_KERNELS"] = "triton"
        try:
            kernels.chunk_concat(*args)
        except RuntimeError as error:
            assert "Triton is not installed" in str(error), error
        else:
            raise AssertionError("triton mode ran without Triton")
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, env={**os.environ, kernels.ENV_VAR: "auto"})


# -- cost model -------------------------------------------------------------------------------


def test_cost_by_hand_for_one_sd_prompt():
    """SD 1.x, batch 1: prompt and negative of 3 chunks each, compact layout, float16."""
    chunks, rows, output_rows, width = 6, 6 * 77, 2 * (75 * 3 + 2), 768
    cost = chunk_concat_cost(chunks, 77, width, output_rows)
    hidden, output = rows * width * 2, output_rows * width * 2  # 709,632 and 697,344 bytes
    small = 2 * width * 2 + rows * 4 + rows * 8  # weight and bias, multipliers, destinations
    assert cost.minimal.bytes == hidden + small + output == 1_415_592
    # The first pass reads the hidden states and parameters again and writes a float32 per row.
    assert cost.implemented.bytes == cost.minimal.bytes + hidden + 2 * width * 2 + 2 * rows * 4
    # Eager: 12 launches of the web UI's sequence, and 8 on a value per chunk skipping a ~0 mean.
    assert cost.implemented.launches == 2 and cost.eager.launches == 12 + 8
    # Eager moves every [C, L, D] tensor 9 times and the output 5 times, plus small vectors.
    assert 9 * hidden + 5 * output < cost.eager.bytes < 9 * hidden + 5 * output + 20 * rows * 8
    assert cost.minimal.time_floor(A100) == pytest.approx(cost.minimal.bytes / 2.0e12)
    assert cost.eager.time_floor(H100_SXM) == pytest.approx(cost.eager.bytes / 3.35e12)


@pytest.mark.parametrize("restore_mean", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_eager_model_matches_measured_traffic(restore_mean, dtype):
    inputs = random_inputs(3, 7, 32, "compact", torch.float32)
    hidden, weight, bias = (inputs[name].to(dtype).requires_grad_() for name in ("hidden", "weight", "bias"))
    args = (EPS, inputs["multipliers"], inputs["destination"], inputs["num_rows"], restore_mean)
    outputs = []
    forward = measure_eager(lambda: outputs.append(chunk_concat_reference(hidden, weight, bias, *args)))
    grad_output = inputs["grad_output"].to(dtype)
    backward = measure_eager(lambda: outputs[0].backward(grad_output))
    shape = dict(dtype_bytes=dtype.itemsize, restore_mean=restore_mean)
    model = [chunk_concat_cost(3, 7, 32, inputs["num_rows"], **shape, backward=flag).eager for flag in (False, True)]
    # The model is CUDA's: LayerNorm statistics in float32, where the CPU keeps them in float16.
    cpu_statistics = 0 if dtype == torch.float32 else 2 * 3 * 7 * (4 - dtype.itemsize)
    assert (forward.bytes, backward.bytes) == (model[0].bytes - cpu_statistics, model[1].bytes - cpu_statistics)
    assert (forward.launches, backward.launches) == (model[0].launches, model[1].launches)


def test_fused_moves_fewer_bytes_than_eager():
    for backward in (False, True):
        for restore_mean in (True, False):
            cost = chunk_concat_cost(24, 77, 768, 8 * 227, restore_mean=restore_mean, backward=backward)
            assert cost.minimal.bytes <= cost.implemented.bytes < cost.eager.bytes
            assert cost.minimal.flops <= cost.implemented.flops
            assert cost.predicted_speedup(H100_SXM) > 1
