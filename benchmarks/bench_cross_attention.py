"""cross_attention at SD 1.x shapes: our kernels against eager, SDPA's backends and xformers.

Shapes: the cross-attention layers of SD 1.x at 512 x 512 and 512 x 768, batch 2 (prompt and
negative, classifier-free guidance), 8 heads; Lq 4096/1024/256/64 (resp. 6144/1536/384/96)
queries at head dims 40/80/160/160; Lk 77, 154, 231 keys (1 to 3 prompt chunks).

On a GPU (float16), forward and forward+backward of every provider are timed the way
``triton.testing.do_bench`` does (warm-up, then the median of CUDA-event timings), rotating
through input sets larger than L2 so no call finds its inputs cached; reported as TFLOP/s
(the op's minimal FLOPs) and as the fraction of the roofline floor the run reaches. Without a
GPU, it times the eager reference on the CPU and reports the cost model's predictions: bytes
and launches fused versus eager, A100 and H100 floors, forward and backward.

    pytest benchmarks/bench_cross_attention.py                          # full
    pytest benchmarks/bench_cross_attention.py --benchmark-disable      # smoke: once, small
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from conftest import BASELINE, smoke_mode
from cost_report import PASSES, predictions
from gpu.kernel_speed import attention_providers
from gpu.timing import median_ms, rotations_for

from nai_fast.kernels.cost import A100, H100_SXM, Device, cross_attention_cost
from nai_fast.kernels.cross_attention import cross_attention_reference
from nai_fast.kernels.shapes import attention_levels

BATCH, HEADS = 2, 8
KEY_LENGTHS = (77, 154, 231)
# (Lq, head_dim) of SD 1.x's distinct cross-attention layers at 512x512 and 512x768.
LAYERS = sorted(
    {(level.tokens, level.head_dim) for size in ((512, 512), (512, 768)) for level in attention_levels(*size)},
    key=lambda layer: (-layer[0], layer[1]),
)
FULL = [(query_length, key_length, head_dim) for query_length, head_dim in LAYERS for key_length in KEY_LENGTHS]
SMOKE = [(256, 77, 40)]


def pytest_generate_tests(metafunc):
    if "shape" in metafunc.fixturenames:
        shapes = SMOKE if smoke_mode(metafunc.config) else FULL
        metafunc.parametrize("shape", shapes, ids=[f"Lq{lq}-Lk{lk}-D{d}" for lq, lk, d in shapes])


def describe(shape) -> str:
    query_length, key_length, head_dim = shape
    return f"B={BATCH} H={HEADS} Lq={query_length} Lk={key_length} d={head_dim}"


# -- CPU: the eager reference, and what the cost model predicts for GPUs ----------------------


def test_reference_and_predictions(timed, benchmark, note, shape):
    """Times eager forward+backward on this machine (float32); notes float16 GPU predictions."""
    query_length, key_length, head_dim = shape
    q = torch.randn(BATCH, HEADS, query_length, head_dim, requires_grad=True)
    k, v = (torch.randn(BATCH, HEADS, key_length, head_dim, requires_grad=True) for _ in "kv")
    grad_out = torch.randn_like(q)

    def forward_backward():
        output = cross_attention_reference(q, k, v)
        output.backward(grad_out)
        return output

    output = timed(f"cross_attention fwd+bwd {describe(shape)} (CPU)", BASELINE, forward_backward)
    assert torch.isfinite(output).all() and torch.isfinite(q.grad).all()

    info, summary = predictions(
        {
            name: cross_attention_cost(BATCH, HEADS, query_length, key_length, head_dim, backward=backward)
            for name, backward in PASSES
        }
    )
    benchmark.extra_info |= info
    note(f"cross_attention {describe(shape)}, float16 GPU model, fused vs eager: {summary}")


# -- GPU: every provider, timed with CUDA events ---------------------------------------------

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def providers() -> dict[str, Callable]:
    """nai_fast's Triton op, the eager reference and every SDPA backend (the GPU check's list)."""
    return attention_providers(dry_run=False)


def roofline_device() -> Device | None:
    name = torch.cuda.get_device_name()
    return next((device for device in (H100_SXM, A100) if device.name.split()[0] in name), None)


@requires_cuda
@pytest.mark.parametrize("passes", ["forward", "forward+backward"])
def test_gpu_providers(shape, passes, smoke, note, benchmark):
    query_length, key_length, head_dim = shape
    dtype, training = torch.float16, passes != "forward"
    cost = cross_attention_cost(BATCH, HEADS, query_length, key_length, head_dim)
    minimal = cost.minimal
    if training:
        minimal = minimal + cross_attention_cost(BATCH, HEADS, query_length, key_length, head_dim, backward=True).minimal
    set_bytes = cost.minimal.bytes  # q, k, v, grad_out: as many bytes as q, k, v, output
    rotations = 1 if smoke else max(2, rotations_for(set_bytes))
    inputs = [
        [torch.randn(BATCH, HEADS, length, head_dim, device="cuda", dtype=dtype, requires_grad=training)
         for length in (query_length, key_length, key_length, query_length)]
        for _ in range(rotations)
    ]  # fmt: skip
    device = roofline_device()
    floor_ms = minimal.time_floor(device) * 1e3 if device else None
    results = {}
    for name, attend in providers().items():

        def call(i, attend=attend):
            q, k, v, grad_out = inputs[i]
            output = attend(q, k, v)
            if training:
                torch.autograd.grad(output, (q, k, v), grad_out)

        try:
            call(0)
        except RuntimeError as error:  # a backend that does not take this shape or dtype
            note(f"cross_attention {passes} {describe(shape)}: {name} unavailable ({str(error).splitlines()[0]})")
            continue
        ms = median_ms(lambda i, call=call: call(i % rotations), "cuda", warmup=1 if smoke else 10, repeats=1 if smoke else 50)
        results[name] = ms
        tflops = (minimal.tensor_flops / (ms * 1e-3)) / 1e12
        roofline = f", {floor_ms / ms:.0%} of the {device.name} floor" if floor_ms else ""
        note(f"cross_attention {passes} {describe(shape)} fp16: {name:<24} {ms * 1e3:9.1f} us {tflops:7.1f} TFLOP/s{roofline}")
    benchmark.extra_info |= {f"{passes}_{name}_ms": ms for name, ms in results.items()}
    assert "nai_fast" in results and "eager" in results
    note(f"cross_attention {passes} {describe(shape)}: nai_fast {results['eager'] / results['nai_fast']:.2f}x eager")
