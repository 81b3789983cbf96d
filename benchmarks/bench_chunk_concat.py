"""chunk_concat: the eager reference on CPU, with the cost model's GPU predictions attached.

The fused op exists only as Triton kernels, which need a GPU, so there is no fast CPU path
to race. This times the eager baseline, forward and backward, at SD 1.x shapes (each image
has a prompt and a negative prompt of 3 chunks: C = 6 per image, 77 tokens, 768 wide, the
compact layout of 2 x 227 rows) and attaches what the cost model predicts for float16 on an
A100 and an H100: bytes the fused kernels move against the eager sequence, launches, and
roofline time floors. Full mode: batch 1 and 4; smoke mode: batch 1 at width 64.

    pytest benchmarks/bench_chunk_concat.py                          # full
    pytest benchmarks/bench_chunk_concat.py --benchmark-disable      # smoke
"""

from __future__ import annotations

import torch
from conftest import BASELINE, smoke_mode
from cost_report import PASSES, predictions

from nai_fast.kernels.chunk_concat import chunk_concat_reference
from nai_fast.kernels.cost import chunk_concat_cost
from nai_fast.text.prompts import kept_positions

CHUNKS_PER_PROMPT, LENGTH = 3, 77
FULL = [(1, 768), (4, 768)]  # (batch, width)
SMOKE = [(1, 64)]


def pytest_generate_tests(metafunc):
    if "shape" in metafunc.fixturenames:
        shapes = SMOKE if smoke_mode(metafunc.config) else FULL
        metafunc.parametrize("shape", shapes, ids=[f"B{batch}-D{width}" for batch, width in shapes])


def compact_destination(prompts: int) -> tuple[torch.Tensor, int]:
    """Each prompt's chunks to one sequence: its first BOS, every chunk's tokens, its last EOS."""
    kept = kept_positions(CHUNKS_PER_PROMPT, "compact")
    per_prompt = torch.full((CHUNKS_PER_PROMPT * LENGTH,), -1)
    per_prompt[kept] = torch.arange(len(kept))
    offsets = torch.arange(prompts)[:, None] * len(kept)
    destination = torch.where(per_prompt >= 0, per_prompt + offsets, -1)
    return destination.view(prompts * CHUNKS_PER_PROMPT, LENGTH), prompts * len(kept)


def test_reference_forward_backward(timed, benchmark, note, shape):
    batch, width = shape
    prompts = 2 * batch  # each image's prompt and negative prompt
    chunks = prompts * CHUNKS_PER_PROMPT
    destination, num_rows = compact_destination(prompts)
    hidden = torch.randn(chunks, LENGTH, width, requires_grad=True)
    weight = (1 + 0.1 * torch.randn(width)).requires_grad_()
    bias = (0.3 + 0.1 * torch.randn(width)).requires_grad_()
    multipliers = torch.rand(chunks, LENGTH) + 0.5
    grad_output = torch.randn(num_rows, width)

    def forward_backward():
        output = chunk_concat_reference(hidden, weight, bias, 1e-5, multipliers, destination, num_rows)
        output.backward(grad_output)
        return output

    output = timed(f"chunk_concat forward+backward B={batch} D={width}", BASELINE, forward_backward, rounds=20)
    assert output.shape == (num_rows, width) and torch.isfinite(output).all()

    info, summary = predictions(
        {name: chunk_concat_cost(chunks, LENGTH, width, num_rows, backward=backward) for name, backward in PASSES}
    )
    benchmark.extra_info |= info
    note(f"chunk_concat B={batch} D={width}, float16 GPU model, fused vs eager: {summary}")
