"""Long-prompt CLIP conditioning (nai_fast.text.encoder) and the diffusers drop-in (nai_fast.engine.pipeline),
with the real CLIP tokenizer and random-weight text encoders."""

import logging
import re

import pytest
import torch

from nai_fast.models.configs import load_config
from nai_fast.text.encoder import LongPromptEncoder, encode_chunk_by_chunk

transformers = pytest.importorskip("transformers")

TAGS = (
    "purple eyes, 1girl, short hair, smile, open mouth, ruffled blouse, red blouse, pleated skirt, "
    "blonde hair, green scarf, waving at viewer"
)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from nai_fast.text.tokenizer import load_tokenizer

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NAI_FAST_CACHE", str(tmp_path_factory.mktemp("cache")))
        return load_tokenizer()


def layers_of(text_encoder):
    return getattr(text_encoder, "text_model", text_encoder).encoder.layers  # transformers 4 nests the model


def clip_text_model(**overrides):
    config = transformers.CLIPTextConfig(**{**load_config("sd1", "text_encoder"), **overrides})
    torch.manual_seed(0)
    model = transformers.CLIPTextModel(config).eval()
    # A fresh final layer norm (weight 1, bias 0) centres every row on zero, so a
    # chunk's mean, which emphasis restores, would be ~0/0; trained ones are not.
    norm = getattr(model, "text_model", model).final_layer_norm
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.2)
        norm.bias.normal_(0.0, 0.5)
    return model


@pytest.fixture(scope="module")
def tiny_encoder():
    return clip_text_model(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=4)


def token_ids(tokenizer, text):
    return tokenizer(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


def definition(text_encoder, ids, clip_skip):
    """final_layer_norm(hidden_states[-clip_skip]): what clip skip means."""
    states = text_encoder(ids, output_hidden_states=True).hidden_states
    return getattr(text_encoder, "text_model", text_encoder).final_layer_norm(states[-clip_skip])


# -- clip skip ---------------------------------------------------------------------


@torch.no_grad()
@pytest.mark.slow  # the real SD 1.x text encoder
def test_penultimate_layer_of_the_real_sd1_text_encoder(tokenizer):
    text_encoder = clip_text_model()
    assert len(layers_of(text_encoder)) == 12
    prompt = "a photo of a cat, masterpiece"
    ids = token_ids(tokenizer, prompt)
    for clip_skip in (1, 2):
        cond, uncond = LongPromptEncoder(tokenizer, text_encoder, clip_skip=clip_skip).encode(prompt)
        torch.testing.assert_close(cond, definition(text_encoder, ids, clip_skip), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(uncond, definition(text_encoder, token_ids(tokenizer, ""), clip_skip), rtol=1e-4, atol=1e-4)
    plain = text_encoder(ids).last_hidden_state
    torch.testing.assert_close(LongPromptEncoder(tokenizer, text_encoder, clip_skip=1).encode(prompt)[0], plain, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_runs_only_the_layers_it_needs(tokenizer, tiny_encoder):
    calls = []
    hooks = [layer.register_forward_hook(lambda *_, i=i: calls.append(i)) for i, layer in enumerate(layers_of(tiny_encoder))]
    try:
        LongPromptEncoder(tokenizer, tiny_encoder, clip_skip=2).encode(TAGS, "lowres")
    finally:
        for hook in hooks:
            hook.remove()
    assert calls == [0, 1, 2], "one batched call through the first three of four layers"
    assert len(layers_of(tiny_encoder)) == 4, "the encoder is restored"


# -- chunks, shapes, equivalence with the web UI's eager order ------------------------------


@torch.no_grad()
@pytest.mark.parametrize("layout", ["a1111", "compact"])
@pytest.mark.parametrize("emphasis", ["original", "no_norm", "ignore"])
def test_batched_equals_chunk_by_chunk(tokenizer, tiny_encoder, layout, emphasis):
    encoder = LongPromptEncoder(tokenizer, tiny_encoder, layout=layout, emphasis=emphasis)
    prompts = [f"(masterpiece:1.3), {TAGS}, [[sketch]]", ", ".join([TAGS] * 4), "cat BREAK (dog)"]
    negatives = ["lowres, (bad hands:1.2)", "", ", ".join(["worst quality"] * 40)]
    cond, uncond = encoder.encode(prompts, negatives)
    expected_cond, expected_uncond = encode_chunk_by_chunk(encoder, prompts, negatives)
    torch.testing.assert_close(cond, expected_cond, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(uncond, expected_uncond, rtol=1e-5, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("repeats, chunks", [(1, 1), (2, 1), (3, 2), (5, 3), (7, 3)])
def test_chunk_counts_and_equal_shapes(tokenizer, tiny_encoder, repeats, chunks):
    encoder = LongPromptEncoder(tokenizer, tiny_encoder)
    for negative in ("", TAGS, ", ".join([TAGS] * 3)):  # 7 repeats are cut at 3 chunks (a logged warning)
        cond, uncond = encoder.encode(", ".join([TAGS] * repeats), negative)
        count = max(chunks, len(encoder.chunks(negative)))
        assert cond.shape == uncond.shape == (1, 77 * count, 64)


@torch.no_grad()
def test_compact_layout_keeps_one_bos_and_one_eos(tokenizer, tiny_encoder):
    prompt = ", ".join([TAGS] * 3)
    full, _ = LongPromptEncoder(tokenizer, tiny_encoder).encode(prompt)
    compact, _ = LongPromptEncoder(tokenizer, tiny_encoder, layout="compact").encode(prompt)
    assert full.shape[1] == 154 and compact.shape[1] == 152
    torch.testing.assert_close(compact, torch.cat([full[:, :76], full[:, 78:]], dim=1))


def test_over_long_prompt_warns_quoting_the_cut(tokenizer, tiny_encoder, caplog):
    encoder = LongPromptEncoder(tokenizer, tiny_encoder, max_chunks=1)
    with caplog.at_level(logging.WARNING, logger="nai_fast.text.encoder"):
        cond, _ = encoder.encode(", ".join([TAGS] * 3))
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    assert re.search("longer than 75 tokens; cut: .*waving at viewer", record.getMessage())
    assert cond.shape[1] == 77
    unlimited = LongPromptEncoder(tokenizer, tiny_encoder, max_chunks=None)
    assert len(unlimited.chunks(", ".join([TAGS] * 9))) == 5


def test_break_and_comma_backtrack(tokenizer, tiny_encoder):
    encoder = LongPromptEncoder(tokenizer, tiny_encoder)
    assert len(encoder.chunks("1girl BREAK red hair")) == 2
    assert len(LongPromptEncoder(tokenizer, tiny_encoder, syntax="none").chunks("1girl BREAK red hair")) == 1
    long_tags = ", ".join([TAGS] * 2) + ", ruffled blouse, red blouse, pleated skirt"
    backtracked = encoder.chunks(long_tags)
    plain = LongPromptEncoder(tokenizer, tiny_encoder, comma_backtrack=0).chunks(long_tags)
    comma = tokenizer.convert_tokens_to_ids(",</w>")
    first = [t for t in backtracked.ids[0][1:76] if t != tokenizer.eos_token_id]
    assert first[-1] == comma, "the cut tag moved to the next chunk"
    assert plain.ids[0][75] != tokenizer.eos_token_id and plain.ids[0][75] != comma


# -- emphasis ----------------------------------------------------------------------------


@torch.no_grad()
@pytest.mark.parametrize(
    "syntax, prompt, weight",
    [("a1111", "a (cat:1.5) b", 1.5), ("a1111", "a ((cat)) b", 1.1 * 1.1), ("a1111", "a [cat] b", 1 / 1.1),
     ("nai", "a {{cat}} b", 1.05 * 1.05), ("nai", "a [cat] b", 1 / 1.05)],
)  # fmt: skip
def test_emphasis_math(tokenizer, tiny_encoder, syntax, prompt, weight):
    plain_prompt = "a cat b"
    plain, _ = LongPromptEncoder(tokenizer, tiny_encoder, syntax=syntax, emphasis="ignore").encode(plain_prompt)
    no_norm, _ = LongPromptEncoder(tokenizer, tiny_encoder, syntax=syntax, emphasis="no_norm").encode(prompt)
    original, _ = LongPromptEncoder(tokenizer, tiny_encoder, syntax=syntax, emphasis="original").encode(prompt)
    ignored, _ = LongPromptEncoder(tokenizer, tiny_encoder, syntax=syntax, emphasis="ignore").encode(prompt)
    cat = 2  # BOS, "a", "cat"
    weights = torch.ones(77, 1, dtype=plain.dtype)
    weights[cat] = weight
    torch.testing.assert_close(ignored, plain)
    torch.testing.assert_close(no_norm[0], plain[0] * weights)
    torch.testing.assert_close(original[0], plain[0] * weights * plain.mean() / (plain[0] * weights).mean())
    torch.testing.assert_close(original.mean(), plain.mean())


@torch.no_grad()
def test_none_syntax_keeps_brackets_as_text(tokenizer, tiny_encoder):
    encoder = LongPromptEncoder(tokenizer, tiny_encoder, syntax="none", emphasis="no_norm")
    chunks = encoder.chunks("(cat:1.5)")
    assert set(chunks.weights[0]) == {1.0}
    literal = tokenizer.encode("(cat:1.5)", add_special_tokens=False)
    assert chunks.ids[0][1 : 1 + len(literal)] == literal and literal[0] == tokenizer.encode("(", add_special_tokens=False)[0]


# -- dtype, device, gradients, arguments ------------------------------------------------


def test_gradients_reach_the_used_layers_only(tokenizer):
    text_encoder = clip_text_model(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=3)
    cond, uncond = LongPromptEncoder(tokenizer, text_encoder, clip_skip=2).encode("(red:1.2) hair, smile", "lowres")
    (cond.square().sum() + uncond.sum()).backward()
    layers, model = layers_of(text_encoder), getattr(text_encoder, "text_model", text_encoder)
    assert model.embeddings.token_embedding.weight.grad.abs().sum() > 0
    assert layers[1].mlp.fc2.weight.grad.abs().sum() > 0
    assert model.final_layer_norm.weight.grad.abs().sum() > 0
    assert layers[2].mlp.fc2.weight.grad is None, "the skipped layer takes no part"


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_outputs_follow_the_encoder_dtype(tokenizer, dtype):
    text_encoder = clip_text_model(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2)
    cond, uncond = LongPromptEncoder(tokenizer, text_encoder.to(dtype)).encode(["a", "b c"])
    assert cond.dtype == uncond.dtype == dtype and cond.shape == (2, 77, 32)


@pytest.mark.parametrize(
    "options, message",
    [(dict(clip_skip=0), "clip_skip"), (dict(clip_skip=5), "clip_skip"), (dict(emphasis="loud"), "emphasis"),
     (dict(syntax="xml"), "syntax"), (dict(layout="wide"), "layout")],
)  # fmt: skip
def test_bad_options_are_clear_errors(tokenizer, tiny_encoder, options, message):
    with pytest.raises(ValueError, match=message):
        LongPromptEncoder(tokenizer, tiny_encoder, **options)


def test_mismatched_negative_prompts_are_a_clear_error(tokenizer, tiny_encoder):
    with pytest.raises(ValueError, match="2 prompts but 1 negative"):
        LongPromptEncoder(tokenizer, tiny_encoder).encode(["a", "b"], ["c"])


# -- the diffusers drop-in ----------------------------------------------------------------


@pytest.fixture(scope="module")
def pipeline(tokenizer, tiny_encoder):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64, attention_head_dim=8, norm_num_groups=32,
    )  # fmt: skip
    vae = diffusers.AutoencoderKL(
        block_out_channels=(32,), down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
        latent_channels=4, norm_num_groups=32,
    )  # fmt: skip
    return diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=tiny_encoder, tokenizer=tokenizer, unet=unet, scheduler=diffusers.DDIMScheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip


@torch.no_grad()
def test_short_prompts_match_diffusers_clip_skip_where_it_works(pipeline, tokenizer, tiny_encoder):
    from nai_fast import patch_pipeline, unpatch_pipeline

    prompt = "a photo of a cat"
    expected = definition(tiny_encoder, token_ids(tokenizer, prompt), clip_skip=2)
    try:
        stock, _ = pipeline.encode_prompt(prompt, "cpu", 1, True, clip_skip=1)
    except AttributeError:  # diffusers 0.42 reaches for .text_model, which transformers 5 removed
        assert not hasattr(tiny_encoder, "text_model")
    else:
        torch.testing.assert_close(stock, expected, rtol=1e-5, atol=1e-5)
    patch_pipeline(pipeline)
    try:
        ours, _ = pipeline.encode_prompt(prompt, "cpu", 1, True, clip_skip=1)
    finally:
        unpatch_pipeline(pipeline)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_patch_pipeline_encodes_long_prompts_for_both_sides(pipeline):
    from nai_fast import patch_pipeline, unpatch_pipeline

    own = type(pipeline).encode_prompt
    long_prompt, long_negative = ", ".join([TAGS] * 3), "lowres, " * 60
    encoder = patch_pipeline(pipeline, clip_skip=2)
    try:
        cond, uncond = pipeline.encode_prompt(long_prompt, "cpu", 2, True, long_negative)
        expected_cond, expected_uncond = encoder.encode(long_prompt, long_negative)
        assert cond.shape == uncond.shape == (2, 231, 64)
        torch.testing.assert_close(cond, expected_cond.repeat(2, 1, 1))
        torch.testing.assert_close(uncond, expected_uncond.repeat(2, 1, 1))
        # diffusers' clip_skip=1 is our clip_skip=2; 0 is the last layer.
        penultimate, _ = encoder.encode(long_prompt)
        torch.testing.assert_close(pipeline.encode_prompt(long_prompt, "cpu", 1, True, clip_skip=1)[0], penultimate)
        last, _ = encoder.encode(long_prompt, clip_skip=1)
        torch.testing.assert_close(pipeline.encode_prompt(long_prompt, "cpu", 1, False, clip_skip=0)[0], last)
        assert pipeline.encode_prompt(long_prompt, "cpu", 1, False)[1] is None

        latents = pipeline(
            long_prompt, negative_prompt="lowres", height=16, width=16, num_inference_steps=2, output_type="latent",
            generator=torch.Generator().manual_seed(0),
        ).images  # fmt: skip
        assert latents.shape == (1, 4, 16, 16) and torch.isfinite(latents).all()
    finally:
        unpatch_pipeline(pipeline)
    assert pipeline.encode_prompt.__func__ is own
    short, _ = pipeline.encode_prompt("a cat", "cpu", 1, True)
    assert short.shape == (1, 77, 64)


# -- the fused kernel inside the encoder ------------------------------------------------------


def triton_encoder_job(cache_dir: str, layout: str) -> None:
    """In a worker whose Triton interprets: encode, and backpropagate, through the Triton
    chunk_concat and through its reference; both must agree."""
    import os

    from nai_fast.text.tokenizer import load_tokenizer

    os.environ["NAI_FAST_CACHE"] = cache_dir
    tokenizer = load_tokenizer()
    text_encoder = clip_text_model(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=3)
    prompts, negatives = [f"(red:1.3) hair, [smile], {TAGS}", ", ".join([TAGS] * 3)], ["lowres", "(bad:0.8) hands"]
    results = {}
    for mode in ("reference", "triton"):
        os.environ["NAI_FAST_KERNELS"] = mode
        text_encoder.zero_grad()
        cond, uncond = LongPromptEncoder(tokenizer, text_encoder, layout=layout).encode(prompts, negatives)
        (cond.square().sum() + (uncond * uncond.detach().sign()).sum()).backward()
        norm = text_encoder.final_layer_norm
        grads = (norm.weight.grad, norm.bias.grad, text_encoder.embeddings.token_embedding.weight.grad)
        results[mode] = [cond, uncond, *grads]
    for reference, triton in zip(results["reference"], results["triton"]):
        # Relative to the largest value: the embedding gradient sums many terms that cancel.
        assert (triton - reference).abs().max() <= 1e-5 * reference.abs().max()


@pytest.mark.slow  # the kernel interpreted in a worker process
@pytest.mark.parametrize("layout", ["a1111", "compact"])
def test_encoder_through_the_triton_kernel_under_the_interpreter(tokenizer, layout):
    from kernel_proofs import result_of, triton_workers

    pytest.importorskip("triton")
    cache_dir = str(tokenizer.name_or_path).removesuffix("/clip_tokenizer")
    with triton_workers(interpret=True) as pool:
        result_of(pool.apply_async(triton_encoder_job, (cache_dir, layout)))
