"""The tiny model's pretraining script on a tiny budget, and the shipped weights."""

import ast
import csv
import json

import numpy as np
import pytest
import safetensors.torch
import torch

from nai_fast.demo import pretrain
from nai_fast.demo.fidelity import random_scenes
from nai_fast.models.load import load_model
from nai_fast.models.presets import PRETRAINED_WEIGHTS, load_pretrained_weights, pretrained_weights_path


def _column(path, name):
    with open(path, newline="") as file:
        return [float(row[name]) for row in csv.DictReader(file)]


@pytest.mark.slow
def test_the_first_steps_of_pretraining_lower_both_losses_and_write_loadable_weights(tmp_path):
    weights = tmp_path / "tiny.safetensors"
    budget = ["--images", "48", "--vae-images", "16", "--vae-steps", "40", "--text-steps", "40",
              "--unet-steps", "40", "--batch-size", "8", "--text-batch-size", "16"]  # fmt: skip
    arguments = ["--output-dir", str(tmp_path / "run"), "--weights", str(weights), "--no-progress", *budget]
    assert pretrain.main(arguments) == 0

    vae = _column(tmp_path / "run" / "vae_log.csv", "mse")
    text = _column(tmp_path / "run" / "text_encoder_log.csv", "loss")
    unet = _column(tmp_path / "run" / "unet" / "training_log.csv", "loss")
    assert len(vae) == len(text) == len(unet) == 40
    assert sum(vae[-5:]) < 0.8 * sum(vae[:5])
    assert sum(text[-5:]) < sum(text[:5])
    assert sum(unet[-10:]) < sum(unet[:10])
    assert (tmp_path / "run" / "loss.png").is_file()

    model = load_model("tiny-random")
    metadata = load_pretrained_weights(weights, unet=model.unet, vae=model.vae, text_encoder=model.text_encoder)
    assert metadata["made_by"] == "python -m nai_fast.demo.pretrain"
    assert model.vae.config.scaling_factor == pytest.approx(float(metadata["vae_scaling_factor"]))
    assert metadata["prediction_type"] == "v_prediction"
    assert set(ast.literal_eval(metadata["minutes"])) == {"data", "vae", "text_encoder", "unet"}

    # A second run finds every stage done and writes the same networks.
    first = safetensors.torch.load_file(weights)
    minutes = json.loads((tmp_path / "run" / "minutes.json").read_text())
    weights.unlink()
    assert pretrain.main(arguments) == 0
    second = safetensors.torch.load_file(weights)
    assert first.keys() == second.keys() and all(torch.equal(first[key], second[key]) for key in first)
    # ... and keeps what the first run's stages took (the resumed ones add what they did)
    again = json.loads((tmp_path / "run" / "minutes.json").read_text())
    assert (again["vae"], again["text_encoder"]) == (minutes["vae"], minutes["text_encoder"])
    assert again["data"] >= minutes["data"] > 0 and again["unet"] >= minutes["unet"] > 0


def test_an_interrupted_stage_keeps_its_minutes_and_a_resumed_one_adds_to_them(tmp_path):
    stages = pretrain._Stages(tmp_path)
    with pytest.raises(KeyboardInterrupt), stages.timed("unet", resumed=True):
        raise KeyboardInterrupt  # as a signal stops the U-Net's run
    interrupted = json.loads((tmp_path / "minutes.json").read_text())["unet"]
    assert interrupted > 0
    with pretrain._Stages(tmp_path).timed("unet", resumed=True):
        pass
    assert json.loads((tmp_path / "minutes.json").read_text())["unet"] >= interrupted


def test_the_shipped_weights_load_offline_in_float32_and_are_not_the_random_ones():
    path = pretrained_weights_path("tiny")
    assert path.is_file() and path.stat().st_size <= 10 * 2**20, "the package ships at most 10 MB of weights"
    trained, random = load_model("tiny"), load_model("tiny-random")
    assert trained.unet.dtype == torch.float32 and trained.source == "preset tiny"
    for name, parameter in trained.unet.named_parameters():
        assert not torch.equal(parameter, dict(random.unet.named_parameters())[name]), name
    assert trained.vae.config.scaling_factor != random.vae.config.scaling_factor
    # what the shipped U-Net predicts comes from its file; the random one's from the config
    assert (trained.prediction_type, random.prediction_type) == ("v_prediction", "epsilon")
    assert set(PRETRAINED_WEIGHTS) == {"tiny"}


def test_a_weights_file_for_other_networks_is_refused(tmp_path):
    from nai_fast.models.presets import save_pretrained_weights
    from nai_fast.models.stable_diffusion import ModelFileError

    small = load_model("tiny-random")
    save_pretrained_weights(tmp_path / "w.safetensors", {}, unet=small.unet, vae=small.vae, text_encoder=small.text_encoder)
    from diffusers import UNet2DConditionModel

    config = dict(small.unet.config, block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D",) * 2)
    other = UNet2DConditionModel.from_config({**config, "up_block_types": ("CrossAttnUpBlock2D",) * 2})
    with pytest.raises(ModelFileError, match="unet weights do not match"):
        load_pretrained_weights(tmp_path / "w.safetensors", unet=other)


def test_the_shipped_vae_previews_its_colours_linearly():
    """A 4x3 map plus an offset, fitted on half the scenes, takes the shipped VAE's latents of the
    other half to their 8x8-pixel averages: the code ``_train_vae`` trains for (every colour a
    direction of its own), which the VAE trained on reconstruction alone lacked (its R^2 here: 0.23)."""
    model = load_model("tiny")
    latents, averages = [], []
    with torch.no_grad():
        for scene in random_scenes(24, seed=7):
            pixels = torch.from_numpy(np.asarray(scene.render(128, 128), dtype=np.float32) / 127.5 - 1)
            pixels = pixels.permute(2, 0, 1)[None]
            latent = model.vae.encode(pixels).latent_dist.mean[0].flatten(1).T  # (cells, channels)
            latents.append(torch.cat([latent, torch.ones(len(latent), 1)], dim=1))
            averages.append(torch.nn.functional.avg_pool2d(pixels, model.vae_scale_factor)[0].flatten(1).T)
    preview = torch.linalg.lstsq(torch.cat(latents[:12]), torch.cat(averages[:12])).solution
    held_latents, held_averages = torch.cat(latents[12:]), torch.cat(averages[12:])
    residual = ((held_latents @ preview - held_averages) ** 2).sum()
    assert 1 - residual / ((held_averages - held_averages.mean(0)) ** 2).sum() > 0.95
