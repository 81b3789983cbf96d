"""The inference engine (txt2img), its PNGs, the `generate` CLI and the diffusers drop-in, on the tiny preset."""

import argparse
import dataclasses
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nai_fast.hypernetworks.processors import apply_hypernetworks, remove_hypernetworks
from nai_fast.engine.generate import (
    DEFAULT_TRAIN_OUTPUT,
    SAMPLERS,
    SIZE_STEP,
    TRAINED_HYPERNETWORK_FILE,
    MAX_SEED,
    GenerationParameters,
    check_resolution,
    make_sampler,
    no_resolution_warning,
    rescaled_guidance,
    save_numbered,
    save_png,
    seeded_generators,
    txt2img,
)
from nai_fast.hypernetworks.modules import Hypernetwork
from nai_fast.models.load import load_model

# Test sizes are far below the training buckets on purpose (speed); the warning has its own test.
FAST = dict(width=64, height=64, steps=2, progress=False)


@pytest.fixture(scope="module")
def model():
    return load_model("tiny")


@pytest.fixture
def hypernetwork():
    torch.manual_seed(0)
    network = Hypernetwork(widths=(32, 64), activation="relu", weight_init="XavierNormal")
    network.name = "tiny-hn"
    return network


def pixels(generated):
    return np.asarray(generated.image)


def assert_same_up_to_rounding(image, other):
    """For runs at different batch sizes: CPU kernels may sum in another order for another
    batch size, which moves a rare pixel by one level (seen: 1 of 12,288 values)."""
    difference = np.abs(image.astype(int) - other.astype(int))
    assert difference.max() <= 1 and np.count_nonzero(difference) <= difference.size // 1000


class UNetCalls:
    """Records every U-Net forward: its batch size and the context tensor it got."""

    def __init__(self, unet):
        self.calls = []
        self.handle = unet.register_forward_pre_hook(self.record, with_kwargs=True)

    def record(self, module, args, kwargs):
        self.calls.append((args[0].shape[0], kwargs["encoder_hidden_states"]))

    def __enter__(self):
        return self.calls

    def __exit__(self, *exc):
        self.handle.remove()


# -- determinism -------------------------------------------------------------------------------


def test_a_seed_fixes_every_image_and_image_i_is_seed_plus_i_alone(model):
    options = dict(FAST, height=128, steps=3, sampler="euler_a")  # ancestral: noise at every step
    batch = txt2img(model, "a cat", seed=10, batch_size=3, **options)
    again = txt2img(model, "a cat", seed=10, batch_size=3, **options)
    alone = txt2img(model, "a cat", seed=12, **options)
    assert [image.seed for image in batch] == [10, 11, 12]
    assert batch[0].image.size == (64, 128)
    for first, second in zip(batch, again):
        np.testing.assert_array_equal(pixels(first), pixels(second))
    assert_same_up_to_rounding(pixels(batch[2]), pixels(alone[0]))
    assert not np.array_equal(pixels(batch[0]), pixels(batch[1]))
    assert pixels(batch[0]).std() > 1  # an image, not a flat fill


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_every_sampler_runs(model, sampler):
    (generated,) = txt2img(model, "a cat", sampler=sampler, seed=3, **FAST)
    assert generated.image.size == (64, 64) and generated.image.mode == "RGB"
    label = {"dpmpp_2m_karras": "DPM++ 2M, Schedule type: Karras"}.get(sampler, SAMPLERS[sampler])  # web UI >= 1.9
    assert f"Sampler: {label}," in generated.text


def test_samplers_keep_the_noise_schedule_and_its_prediction_type(model):
    config = {**model.scheduler.config, "prediction_type": "v_prediction"}
    for name in SAMPLERS:
        sampler = make_sampler(name, config)
        assert sampler.config.prediction_type == "v_prediction"
        assert sampler.config.beta_schedule == model.scheduler.config.beta_schedule
    dpm = make_sampler("dpmpp_2m_karras", config)
    assert type(dpm).__name__ == "DPMSolverMultistepScheduler"
    assert dpm.config.algorithm_type == "dpmsolver++" and dpm.config.use_karras_sigmas
    assert type(make_sampler("euler_a", config)).__name__ == "EulerAncestralDiscreteScheduler"
    with pytest.raises(ValueError, match="unknown sampler 'plms'"):
        make_sampler("plms", config)


# -- sizes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("width, height", [(65, 64), (64, 100), (0, 64), (512, 520)])
def test_sizes_off_the_64_grid_are_clear_errors(model, width, height):
    with pytest.raises(ValueError, match="multiple of 64"):
        txt2img(model, "a cat", width=width, height=height, steps=1, progress=False)


@pytest.mark.parametrize(
    "width, height, reason",
    [(1024, 1024, "pixels"), (64, 64, "pixels"), (128, 1024, "aspect ratio"), (1024, 128, "aspect ratio")],
)
def test_sizes_far_from_the_training_buckets_warn(width, height, reason, caplog):
    with caplog.at_level(logging.WARNING, logger="nai_fast.engine.generate"):
        check_resolution(width, height)
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    assert re.search(f"{width}x{height} is far .*{reason}", record.getMessage())
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="nai_fast.engine.generate"), no_resolution_warning():
        check_resolution(width, height)  # for callers that mean the size
    assert not caplog.records


@pytest.mark.parametrize("width, height", [(512, 512), (512, 768), (768, 512), (256, 1024), (640, 640), (448, 448)])
def test_bucket_sizes_and_their_neighbours_do_not_warn(width, height, caplog):
    with caplog.at_level(logging.DEBUG):
        check_resolution(width, height)
    assert not caplog.records


def test_the_default_size_is_the_models_own_resolution(model, caplog):
    assert model.resolution == 128
    with caplog.at_level(logging.WARNING):
        (generated,) = txt2img(model, "a cat", steps=1, progress=False)
    assert generated.image.size == (128, 128) and "Size: 128x128" in generated.text
    assert not caplog.records  # the model's own size is not far from its own buckets
    (tall,) = txt2img(model, "a cat", height=192, steps=1, progress=False)
    assert tall.image.size == (128, 192)


@pytest.mark.parametrize("seed", [-1, MAX_SEED + 1, 2**63, 1.5, "7", True])
def test_seeds_outside_the_web_uis_range_are_clear_errors(model, seed):
    with pytest.raises(ValueError, match="seed must"):
        txt2img(model, "a cat", seed=seed, **FAST)


def test_every_image_of_a_batch_gets_a_seed_in_range(model):
    (last,) = txt2img(model, "a cat", seed=MAX_SEED, **FAST)
    assert last.seed == MAX_SEED
    with pytest.raises(ValueError, match=f"seed must lie in 0..{MAX_SEED} \\(and the seeds after it, for 2 images"):
        txt2img(model, "a cat", seed=MAX_SEED, batch_size=2, **FAST)


# -- guidance, prompts, hypernetworks ------------------------------------------------------------------


def test_guidance_is_one_unet_call_per_step_on_the_uncond_cond_batch(model):
    from nai_fast.text.encoder import LongPromptEncoder

    encoder = LongPromptEncoder(model.tokenizer, model.text_encoder)
    with UNetCalls(model.unet) as calls:
        txt2img(model, "a cat", negative_prompt="lowres", guidance_scale=7.0, batch_size=2, encoder=encoder, **FAST)
    assert [batch for batch, _ in calls] == [4, 4]  # steps=2, each [uncond x2; cond x2]
    context = calls[0][1]
    assert all(later is context for _, later in calls)  # one tensor, so the K/V cache recognises it
    cond, uncond = encoder.encode("a cat", "lowres")
    torch.testing.assert_close(context, torch.cat([uncond, uncond, cond, cond]), rtol=0, atol=0)


def test_guidance_scale_one_runs_the_conditional_prediction_alone(model):
    with UNetCalls(model.unet) as calls:
        (alone,) = txt2img(model, "a cat", negative_prompt="lowres", guidance_scale=1.0, seed=4, **FAST)
    assert [batch for batch, _ in calls] == [1, 1]
    # The negative prompt cannot matter at scale 1 ...
    (other_negative,) = txt2img(model, "a cat", negative_prompt="blurry", guidance_scale=1.0, seed=4, **FAST)
    np.testing.assert_array_equal(pixels(alone), pixels(other_negative))
    # ... and does at any other scale.
    (guided,) = txt2img(model, "a cat", negative_prompt="blurry", guidance_scale=2.0, seed=4, **FAST)
    assert not np.array_equal(pixels(alone), pixels(guided))


def test_guidance_rescale_brings_the_guided_spread_back_toward_the_conditional_ones():
    guided, cond = 3 * torch.randn(2, 4, 8, 8) + 1, torch.randn(2, 4, 8, 8)
    matched = rescaled_guidance(guided, cond, 1.0)
    torch.testing.assert_close(matched.std(dim=(1, 2, 3)), cond.std(dim=(1, 2, 3)))  # per image
    ratio = cond.std(dim=(1, 2, 3)) / guided.std(dim=(1, 2, 3))
    torch.testing.assert_close(matched, guided * ratio[:, None, None, None])  # a scaling, not a shift
    torch.testing.assert_close(rescaled_guidance(guided, cond, 0.7), 0.7 * matched + 0.3 * guided)


def test_guidance_rescale_changes_the_image_and_is_written_as_the_web_uis_cfg_rescale(model):
    (plain,) = txt2img(model, "a cat", guidance_scale=7.0, seed=4, **FAST)
    (rescaled,) = txt2img(model, "a cat", guidance_scale=7.0, guidance_rescale=0.7, seed=4, **FAST)
    assert not np.array_equal(pixels(plain), pixels(rescaled))
    assert "CFG Rescale" not in plain.text and rescaled.text.endswith("Clip skip: 2, CFG Rescale: 0.7")
    assert GenerationParameters.from_text(rescaled.text) == rescaled.parameters


@pytest.mark.parametrize(
    ("scale", "rescale", "message"),
    [(7.0, 1.5, "must lie in 0..1"), (7.0, -0.1, "must lie in 0..1"), (1.0, 0.7, "no guidance")],
)
def test_a_guidance_rescale_that_cannot_apply_is_an_error(model, scale, rescale, message):
    with pytest.raises(ValueError, match=message):
        txt2img(model, "a cat", guidance_scale=scale, guidance_rescale=rescale, **FAST)


def test_long_prompts_pad_the_negative_to_the_same_chunk_count(model):
    long_prompt = ", ".join(["a photo of a cat sitting on a red chair"] * 12)  # about 120 tokens: 2 chunks
    with UNetCalls(model.unet) as calls:
        (generated,) = txt2img(model, long_prompt, negative_prompt="lowres", **{**FAST, "steps": 1})
    assert calls[0][1].shape == (2, 2 * 77, model.text_encoder.config.hidden_size)
    assert generated.parameters.prompt == long_prompt


def test_hypernetwork_strength_zero_equals_no_hypernetwork(model, hypernetwork):
    (without,) = txt2img(model, "a cat", seed=2, **FAST)
    apply_hypernetworks(model.unet, hypernetwork, strengths=0.0)
    try:
        (at_zero,) = txt2img(model, "a cat", seed=2, **FAST)
        apply_hypernetworks(model.unet, hypernetwork, strengths=0.8)
        (at_some,) = txt2img(model, "a cat", seed=2, **FAST)
    finally:
        remove_hypernetworks(model.unet)
    np.testing.assert_array_equal(pixels(without), pixels(at_zero))
    assert not np.array_equal(pixels(without), pixels(at_some))
    assert "Hypernet" not in without.text
    assert at_zero.parameters.hypernetworks == (("tiny-hn", 0.0),)
    assert at_some.text.startswith("a cat <hypernet:tiny-hn:0.8>\n")  # as the web UI writes it
    assert at_some.text.endswith("Model: tiny, Clip skip: 2")


def test_training_flags_come_back_as_they_were(model, hypernetwork):
    model.unet.train()
    hypernetwork.train()
    model.vae.decoder.train()  # a mix: the VAE itself stays in eval mode
    apply_hypernetworks(model.unet, hypernetwork)
    try:
        txt2img(model, "a cat", steps=1, width=64, height=64, progress=False)
        assert model.unet.training and all(module.training for module in model.unet.modules())
        assert hypernetwork.training and not model.vae.training and model.vae.decoder.training
        assert not model.text_encoder.training
    finally:
        remove_hypernetworks(model.unet)
        model.unet.eval()
        model.vae.eval()


# -- the parameters text and PNGs -----------------------------------------------------------------


def test_pngs_carry_the_parameters_text_and_never_overwrite(model, tmp_path):
    (generated,) = txt2img(
        model, "a cat", negative_prompt="lowres, bad hands", guidance_scale=7.5, seed=1234, **FAST
    )
    expected = (
        "a cat\nNegative prompt: lowres, bad hands\n"
        "Steps: 2, Sampler: Euler a, CFG scale: 7.5, Seed: 1234, Size: 64x64, Model: tiny, Clip skip: 2"
    )
    assert generated.text == expected
    (tmp_path / "00007-99.png").write_bytes(b"someone else's")
    first, second = save_numbered(generated, tmp_path), save_numbered(generated, tmp_path)
    assert (first.name, second.name) == ("00008-1234.png", "00009-1234.png")
    assert (tmp_path / "00007-99.png").read_bytes() == b"someone else's"
    with Image.open(first) as image:
        assert image.text["parameters"] == expected
        np.testing.assert_array_equal(np.asarray(image.convert("RGB")), pixels(generated))
    unicode = expected.replace("a cat", "a cat, 猫")  # not Latin-1: Pillow writes iTXt instead of tEXt
    with Image.open(save_png(generated.image, tmp_path / "cat.png", unicode)) as image:
        assert image.text["parameters"] == unicode


@pytest.mark.parametrize(
    "parameters",
    [
        GenerationParameters(prompt="a cat"),
        GenerationParameters(
            prompt="masterpiece, (cat:1.2)\nBREAK on a chair",
            negative_prompt="lowres\nblurry",
            steps=50,
            sampler="dpmpp_2m_karras",
            guidance_scale=6.25,
            guidance_rescale=0.7,
            seed=2**32 - 1,
            width=768,
            height=512,
            model="my, model: v2",
            model_hash="93b79e09ed",
            clip_skip=1,
            hypernetworks=(("anime", 0.8), ("style, \"x\"", 1.0)),
            extra=(("ENSD", "31337"),),
        ),
        GenerationParameters(prompt="", sampler="DPM++ SDE Karras", guidance_scale=0.0, clip_skip=3),
    ],
)
def test_parameters_text_round_trips(parameters):
    # Networks go into the text as tags in the prompt, so the prompt read back carries them.
    read = GenerationParameters.from_text(parameters.to_text())
    assert read == dataclasses.replace(parameters, prompt=parameters.tagged_prompt())
    assert read.to_text() == parameters.to_text()


def test_a_web_ui_parameters_text_parses_and_writes_back_the_same():
    text = (
        "masterpiece, 1girl, blonde hair\nNegative prompt: (worst quality:1.4), watermark\n"
        "Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 2179987202, Size: 768x512, "
        "Model hash: 93b79e09ed, Model: anything-v4.5, Hypernet: anime, Hypernet strength: 0.5, Clip skip: 2, "
        "ENSD: 31337"
    )
    parsed = GenerationParameters.from_text(text)
    assert parsed.sampler == "dpmpp_2m_karras" and parsed.seed == 2179987202
    assert (parsed.width, parsed.height, parsed.guidance_scale, parsed.clip_skip) == (768, 512, 7.0, 2)
    assert parsed.negative_prompt == "(worst quality:1.4), watermark"
    assert parsed.hypernetworks == (("anime", 0.5),) and parsed.extra == (("ENSD", "31337"),)
    # Written back as the current web UI writes it: the hypernetwork a tag, the sampler split.
    assert parsed.to_text() == text.replace("blonde hair", "blonde hair <hypernet:anime:0.5>").replace(
        "DPM++ 2M Karras", "DPM++ 2M, Schedule type: Karras").replace(" Hypernet: anime, Hypernet strength: 0.5,", "")
    assert GenerationParameters.from_text("just a prompt, no settings") == GenerationParameters(
        prompt="just a prompt, no settings", clip_skip=1
    )


# -- the command line ------------------------------------------------------------------------------


def generate(*extra, output_dir):
    from nai_fast.cli import main

    argv = ["generate", "--preset", "tiny", "--prompt", "a cat", "--width", "64", "--height", "64"]
    return main([*argv, "--steps", "2", "--output-dir", str(output_dir), *extra])


def test_cli_writes_numbered_pngs_and_each_image_can_be_made_again(model, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "images"
    assert generate("--seed", "5", "--batch-size", "2", "--batch-count", "2", "--scale", "7", output_dir=out) == 0
    captured = capsys.readouterr()
    names = ["00000-5.png", "00001-6.png", "00002-7.png", "00003-8.png"]
    assert sorted(path.name for path in out.iterdir()) == names
    assert captured.out.split() == [str(out / name) for name in names]
    with Image.open(out / "00003-8.png") as image:
        written, text = np.asarray(image.convert("RGB")), image.text["parameters"]
    parameters = GenerationParameters.from_text(text)
    assert (parameters.seed, parameters.guidance_scale, parameters.hypernetworks) == (8, 7.0, ())
    (again,) = txt2img(model, "a cat", guidance_scale=7.0, seed=8, **FAST)
    assert_same_up_to_rounding(written, pixels(again))

    assert generate("--seed", "5", output_dir=out) == 0  # numbering goes on, nothing overwritten
    assert (out / "00004-5.png").is_file() and len(list(out.iterdir())) == 5


def test_tiny_preset_uses_the_hypernetwork_trained_for_it(tmp_path, monkeypatch, hypernetwork, capsys):
    monkeypatch.chdir(tmp_path)
    trained = Path(DEFAULT_TRAIN_OUTPUT) / TRAINED_HYPERNETWORK_FILE
    trained.parent.mkdir()
    hypernetwork.save(trained)
    assert generate("--seed", "1", output_dir=tmp_path / "images") == 0
    captured = capsys.readouterr()
    assert f"using the hypernetwork trained for the tiny preset: {trained}" in captured.err
    with Image.open(captured.out.split()[0]) as image:
        # Named by its file's stem, as the web UI names hypernetworks (what a prompt tag finds it by).
        assert GenerationParameters.from_text(image.text["parameters"]).hypernetworks == (("hypernetwork", 1.0),)


def test_other_models_only_get_a_hint(model, tmp_path, monkeypatch, capsys):
    from nai_fast.cli import main
    from nai_fast.models.checkpoints import save_single_file

    monkeypatch.chdir(tmp_path)
    trained = Path(DEFAULT_TRAIN_OUTPUT) / TRAINED_HYPERNETWORK_FILE
    trained.parent.mkdir()
    trained.write_bytes(b"not loaded, only pointed at")
    save_single_file(model, tmp_path / "tiny.safetensors")
    argv = ["generate", "--model", "tiny.safetensors", "--prompt", "a cat", "--width", "64", "--height", "64"]
    assert main([*argv, "--steps", "1", "--output-dir", "images"]) == 0
    captured = capsys.readouterr()
    assert f"hint: {trained} holds a trained hypernetwork; add --hypernetwork {trained}" in captured.err
    with Image.open(captured.out.split()[0]) as image:
        assert GenerationParameters.from_text(image.text["parameters"]).hypernetworks == ()


def test_cli_applies_hypernetworks_with_strengths(tmp_path, hypernetwork, capsys):
    hypernetwork.save(tmp_path / "tiny-hn.safetensors")
    path = tmp_path / "tiny-hn.safetensors"
    assert generate("--seed", "1", "--hypernetwork", f"{path}:0.5", "--sampler", "ddim", output_dir=tmp_path) == 0
    (written,) = capsys.readouterr().out.split()
    with Image.open(written) as image:
        assert image.text["parameters"].endswith("<hypernet:tiny-hn:0.5>\nSteps: 2, Sampler: DDIM, CFG scale: 11, "
                                                 "Seed: 1, Size: 64x64, Model: tiny, Clip skip: 2")  # fmt: skip


def test_cli_bad_size_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        generate("--width", "100", output_dir=tmp_path)
    assert exit_info.value.code == 2
    assert "width must be a positive multiple of 64, got 100" in capsys.readouterr().err


def test_cli_choices_match_the_library():
    from nai_fast import cli
    from nai_fast.models.presets import PRESETS

    assert sorted(cli._MODEL_PRESETS) == sorted(PRESETS)
    assert cli._TRAIN_OUTPUT == DEFAULT_TRAIN_OUTPUT
    assert (cli._SIZE_STEP, cli._MAX_SEED) == (SIZE_STEP, MAX_SEED)
    import inspect

    defaults = inspect.signature(txt2img).parameters  # the CLI's defaults are txt2img's
    names = {"scale": "guidance_scale", "cfg_rescale": "guidance_rescale"}
    assert cli._GENERATE_DEFAULTS == {name: defaults[names.get(name, name)].default for name in cli._GENERATE_DEFAULTS}
    sampler_option = next(action for action in _generate_parser()._actions if "--sampler" in action.option_strings)
    assert sorted(sampler_option.choices) == sorted(SAMPLERS)


def _generate_parser():
    import argparse

    from nai_fast import cli

    commands = argparse.ArgumentParser().add_subparsers()
    cli._add_generate(commands)
    return commands.choices["generate"]


@pytest.mark.parametrize(
    "argument, expected",
    [("hn.pt", ("hn.pt", 1.0)), ("dir/hn.pt:0.7", ("dir/hn.pt", 0.7)), ("C:\\hn.pt", ("C:\\hn.pt", 1.0)),
     ("C:\\hn.pt:-1", ("C:\\hn.pt", -1.0))],
)  # fmt: skip
def test_hypernetwork_argument_takes_an_optional_strength(argument, expected):
    from nai_fast.cli import _hypernetwork_argument

    assert _hypernetwork_argument(argument) == expected


def test_hypernetwork_argument_text_after_the_colon_is_a_number_or_part_of_a_file_name(tmp_path, monkeypatch):
    from nai_fast.cli import _hypernetwork_argument

    monkeypatch.chdir(tmp_path)
    for argument in ("hn.pt:abc", "hn.pt:", "hn.pt:nan"):
        with pytest.raises(argparse.ArgumentTypeError, match="strength"):
            _hypernetwork_argument(argument)
    Path("hn.pt:abc").write_bytes(b"")  # a file whose name has a colon is a file
    assert _hypernetwork_argument("hn.pt:abc") == ("hn.pt:abc", 1.0)


# -- the diffusers drop-in --------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", ["euler_a", "dpmpp_2m_karras"])
def test_upgraded_diffusers_pipeline_makes_the_same_images_as_txt2img(model, hypernetwork, sampler):
    from diffusers import StableDiffusionPipeline

    from nai_fast.hypernetworks.processors import HypernetworkAttnProcessor
    from nai_fast.engine.pipeline import unpatch_pipeline, upgrade_pipeline

    pipe = StableDiffusionPipeline(**model.pipeline_components())
    pipe.set_progress_bar_config(disable=True)
    own_scheduler, own_encode_prompt = pipe.scheduler, pipe.encode_prompt
    long_prompt = ", ".join(["a photo of a cat sitting on a red chair"] * 12)
    settings = dict(negative_prompt="lowres", width=64, height=128, guidance_scale=7.0)
    upgrade_pipeline(pipe, [hypernetwork], 0.8, sampler=sampler, clip_skip=2)
    try:
        assert type(pipe.scheduler).__name__ == type(make_sampler(sampler, model.scheduler.config)).__name__
        piped = pipe(
            long_prompt, num_inference_steps=3, num_images_per_prompt=2, generator=seeded_generators(21, 2),
            **settings,
        ).images  # fmt: skip
        ours = txt2img(model, long_prompt, steps=3, batch_size=2, seed=21, sampler=sampler, progress=False, **settings)
    finally:
        unpatch_pipeline(pipe)
    assert ours[0].parameters.hypernetworks == (("tiny-hn", 0.8),)  # the pipeline's U-Net is the model's
    for theirs, mine in zip(piped, ours, strict=True):
        np.testing.assert_array_equal(np.asarray(theirs), pixels(mine))
    assert pipe.scheduler is own_scheduler and pipe.encode_prompt == own_encode_prompt
    assert not any(isinstance(p, HypernetworkAttnProcessor) for p in model.unet.attn_processors.values())


def test_a_failed_upgrade_leaves_the_pipeline_as_it_was(model):
    from diffusers import StableDiffusionPipeline

    from nai_fast.engine.pipeline import upgrade_pipeline

    pipe = StableDiffusionPipeline(**model.pipeline_components())
    own_scheduler, own_encode_prompt = pipe.scheduler, pipe.encode_prompt
    with pytest.raises(ValueError, match="unknown sampler"):
        upgrade_pipeline(pipe, sampler="plms")
    with pytest.raises(TypeError, match="Hypernetwork"):
        upgrade_pipeline(pipe, ["not a hypernetwork"])
    assert pipe.scheduler is own_scheduler and pipe.encode_prompt == own_encode_prompt
    assert not hasattr(pipe, "_nai_fast_encoder")
