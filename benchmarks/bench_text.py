"""Long-prompt encoding: one batched call over the layers needed versus the web UI's eager way.

nai_fast encodes every chunk of prompt and negative prompt in one call that
stops at the chosen layer; the baseline encodes chunk after chunk, prompt and
negative apart, runs all 12 layers and picks one. Full mode: the real SD 1.x
text-encoder size (random weights), 1 to 3 chunks, batch 1 and 4, CPU.
Smoke mode: a tiny encoder, one case.

    pytest benchmarks/bench_text.py
"""

from __future__ import annotations

import pytest
import torch
from conftest import BASELINE, FAST, smoke_mode

from nai_fast.models.configs import load_config
from nai_fast.text.encoder import LongPromptEncoder, encode_chunk_by_chunk

transformers = pytest.importorskip("transformers")

TAGS = (
    "purple eyes, 1girl, short hair, smile, open mouth, ruffled blouse, red blouse, pleated skirt, "
    "blonde hair, green scarf, waving at viewer"
)
# Tag repeats that fill 1, 2 and 3 chunks of 75 tokens (34 tokens a repeat).
REPEATS_FOR_CHUNKS = {1: 2, 2: 4, 3: 6}
FULL_CASES = [(chunks, batch) for batch in (1, 4) for chunks in (1, 2, 3)]
SMOKE_CASES = [(2, 1)]


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        cases = SMOKE_CASES if smoke_mode(metafunc.config) else FULL_CASES
        metafunc.parametrize("case", cases, ids=[f"{chunks}chunks-batch{batch}" for chunks, batch in cases])


@pytest.fixture(scope="module")
def encoder(request, tmp_path_factory):
    from nai_fast.text.tokenizer import load_tokenizer

    overrides = {}
    if smoke_mode(request.config):
        overrides = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=4)
    torch.manual_seed(0)
    text_encoder = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(**{**load_config("sd1", "text_encoder"), **overrides})
    ).eval()
    return LongPromptEncoder(load_tokenizer(), text_encoder, clip_skip=2)


@pytest.mark.parametrize("role", [BASELINE, FAST])
def test_encode_prompt_and_negative(timed, encoder, case, role):
    chunks, batch = case
    prompts = [", ".join([TAGS] * REPEATS_FOR_CHUNKS[chunks])] * batch
    negatives = [", ".join(["lowres, bad anatomy, worst quality"] * (8 * chunks - 6))] * batch
    assert len(encoder.chunks(prompts[0])) == len(encoder.chunks(negatives[0])) == chunks
    group = f"encode prompt+negative, {chunks} chunk(s), batch {batch}"
    run = encoder.encode if role == FAST else lambda p, n: encode_chunk_by_chunk(encoder, p, n)
    with torch.inference_mode():
        cond, uncond = timed(group, role, lambda: run(prompts, negatives), rounds=3)
    assert cond.shape == uncond.shape == (batch, 77 * chunks, encoder.text_encoder.config.hidden_size)
