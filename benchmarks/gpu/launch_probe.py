"""What the host spends to launch one kernel, the floor under every eager call's host time.

Trivial Triton kernels (one argument, and the sixteen of a real one: six tensors, five
integers, a float and four compile-time constants) and one small PyTorch op, each issued many times
without waiting (gpu.timing.host_ms). GPU only: under the interpreter a launch is a
Python loop, not a launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gpu.timing import host_ms


@triton.jit
def _one_argument(out_ptr):
    tl.store(out_ptr, 1.0)


@triton.jit
def _sixteen_arguments(
    out_ptr, a_ptr, b_ptr, c_ptr, d_ptr, e_ptr, rows, cols, depth, stride_a, stride_b, scale,
    BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, BLOCK_DEPTH: tl.constexpr, FLAG: tl.constexpr,
):  # fmt: skip
    tl.store(out_ptr, 1.0)


def launch_host_us(device: torch.device, repeats: int = 500) -> dict[str, float]:
    """Host microseconds per launch, by what is launched."""
    out = torch.empty(16, device=device)
    tensors = [torch.empty(16, device=device) for _ in range(5)]
    calls = {
        "triton, 1 argument": lambda i: _one_argument[(1,)](out),
        "triton, 16 arguments": lambda i: _sixteen_arguments[(1,)](
            out, *tensors, 77, 320, 640, 320, 1, 0.5, BLOCK_ROWS=64, BLOCK_COLS=64, BLOCK_DEPTH=32, FLAG=True
        ),
        "torch.add": lambda i: torch.add(out, 1.0, out=out),
    }
    found = {}
    for name, call in calls.items():
        call(0)  # compiles
        found[name] = host_ms(call, device, repeats=repeats) * 1e3
    return found
