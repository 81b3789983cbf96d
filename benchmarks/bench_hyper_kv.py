"""hyper_kv: the eager reference on CPU with the cost model's GPU predictions; on a GPU, the
fused op against the eager reference.

The op's k/v input in SD 1.x self-attention is the image tokens: batch 2 (prompt and negative
prompt) x 4096 / 1024 / 256 tokens of width 320 / 640 / 1280 at 512 x 512 (x 1.5 at 512 x
768), [1, 2, 1] hypernetworks, no projection bias. Without a GPU there is no fast path to
race (the kernels are Triton), so on CPU this times the eager reference, forward and
forward + backward, and notes what the cost model predicts for float16 on an A100 and an
H100: bytes moved, launches, roofline floors. On CUDA it times the fused op against the
eager reference with CUDA events (the GPU check's median, gpu/timing.py) and reports TFLOP/s and
the fraction of the roofline floor reached. Goal: >= 2x eager for non-linear hypernetworks.

    pytest benchmarks/bench_hyper_kv.py                          # full
    pytest benchmarks/bench_hyper_kv.py --benchmark-disable      # smoke
"""

from __future__ import annotations

import pytest
import torch
from conftest import BASELINE, smoke_mode
from cost_report import PASSES, predictions
from gpu.timing import median_ms

from nai_fast.kernels.cost import H100_SXM, hyper_kv_cost
from nai_fast.kernels.hyper_kv import MLP, hyper_kv, hyper_kv_reference
from nai_fast.kernels.shapes import attention_levels

ACTIVATION, STRENGTH = "gelu", 1.0


def self_attention_shapes(width: int, height: int) -> list[tuple[int, int]]:
    """(tokens, channels) of each distinct self-attention k/v input of SD 1.x, batch 2."""
    levels = attention_levels(width, height)
    return sorted({(level.batch * level.tokens, level.channels) for level in levels}, reverse=True)


FULL = [(f"{w}x{h}", *shape) for w, h in ((512, 512), (512, 768)) for shape in self_attention_shapes(w, h)]
SMOKE = [("smoke", 77, 64)]


def pytest_generate_tests(metafunc):
    if "shape" in metafunc.fixturenames:
        shapes = SMOKE if smoke_mode(metafunc.config) else FULL
        metafunc.parametrize("shape", shapes, ids=[f"{name}-M{tokens}-C{width}" for name, tokens, width in shapes])


def make_inputs(tokens: int, width: int, device: str, dtype: torch.dtype, requires_grad: bool) -> tuple:
    """x, k_weight, v_weight, k_mlp, v_mlp, as hyper_kv takes them; the nets need gradients."""

    def normal(*shape: int, scale: float = 1.0, grad: bool = False) -> torch.Tensor:
        tensor = torch.randn(*shape, dtype=torch.float32) * scale  # the CPU's generator: see gpu.kernel_speed
        return tensor.to(device, dtype).requires_grad_(grad and requires_grad)

    def mlp() -> MLP:
        hidden = 2 * width
        return MLP(
            normal(hidden, width, scale=width**-0.5, grad=True), normal(hidden, scale=0.1, grad=True),
            normal(width, hidden, scale=hidden**-0.5, grad=True), normal(width, scale=0.1, grad=True),
        )  # fmt: skip

    x = normal(tokens, width, grad=True)
    return x, normal(width, width, scale=width**-0.5), normal(width, width, scale=width**-0.5), mlp(), mlp()


def test_reference_on_cpu(timed, benchmark, note, shape):
    name, tokens, width = shape
    x, k_weight, v_weight, k_mlp, v_mlp = make_inputs(tokens, width, "cpu", torch.float32, requires_grad=True)
    grads = [torch.randn(tokens, width), torch.randn(tokens, width)]

    def forward_backward():
        outputs = hyper_kv_reference(x, k_weight, v_weight, k_mlp, v_mlp, ACTIVATION, STRENGTH)
        torch.autograd.backward(outputs, grads)
        return outputs

    key, value = timed(f"hyper_kv fwd+bwd {name} M={tokens} C={width}", BASELINE, forward_backward)
    assert key.shape == value.shape == (tokens, width) and torch.isfinite(key).all()

    info, summary = predictions(
        {name: hyper_kv_cost(tokens, width, activation=ACTIVATION, backward=backward) for name, backward in PASSES}
    )
    benchmark.extra_info |= info
    note(f"hyper_kv {name} M={tokens} C={width} ({ACTIVATION}), float16 GPU model, fused vs eager: {summary}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused op needs a CUDA GPU")
@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward+backward"])
def test_fused_against_eager_on_gpu(note, shape, backward):
    """Median CUDA-event times; TFLOP/s counts the op's useful tensor FLOPs (the floor's)."""
    name, tokens, width = shape
    inputs = make_inputs(tokens, width, "cuda", torch.float16, requires_grad=backward)
    grads = [torch.randn(tokens, width, device="cuda", dtype=torch.float16) for _ in range(2)]
    times = {}
    for label, op in (("eager", hyper_kv_reference), ("fused", hyper_kv)):

        def call(_=None, op=op):
            outputs = op(*inputs, ACTIVATION, STRENGTH)
            if backward:
                torch.autograd.grad(outputs, [inputs[0], *inputs[3], *inputs[4]], grads)

        call()  # compile, and check it runs
        times[label] = median_ms(call, "cuda", warmup=10, repeats=50) / 1e3

    costs = [hyper_kv_cost(tokens, width, activation=ACTIVATION)]
    if backward:
        costs.append(hyper_kv_cost(tokens, width, activation=ACTIVATION, backward=True))
    useful_flops = sum(cost.minimal.tensor_flops for cost in costs)
    floor = sum(cost.implemented.time_floor(H100_SXM) for cost in costs)
    note(
        f"hyper_kv GPU {name} M={tokens} C={width} {'fwd+bwd' if backward else 'fwd'}: "
        f"eager {times['eager'] * 1e6:.1f} us, fused {times['fused'] * 1e6:.1f} us "
        f"({times['eager'] / times['fused']:.2f}x), fused {useful_flops / times['fused'] / 1e12:.0f} TFLOP/s, "
        f"{floor / times['fused']:.0%} of the H100 SXM roofline floor"
    )
