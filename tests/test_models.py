"""Models (nai_fast.models: presets, loading, checkpoints): presets, the original single-file layout
(names checked against real SD 1.x checkpoints, and against diffusers' own converters), round
trips through every format, separate VAEs, and every refused file with its reason."""

import os
import pickle
import re
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch
from diffusers import StableDiffusionPipeline
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

from nai_fast.models import checkpoints as _checkpoints
from nai_fast.models.checkpoints import save_single_file
from nai_fast.models.load import load_model
from nai_fast.models.presets import build_preset
from nai_fast.models.stable_diffusion import ModelFileError
from nai_fast.text.tokenizer import TOKENIZER_FILES
from nai_fast.text.tokenizer import cache_dir as tokenizer_cache_dir

NETWORKS = ("unet", "vae", "text_encoder")
UNET = "model.diffusion_model."
VAE = "first_stage_model."
TEXT = "cond_stage_model.transformer.text_model."


@pytest.fixture(scope="module")
def tiny():
    """The tiny preset with every tensor made distinct (no zero or one inits left), so a swapped
    or dropped tensor shows up."""
    model = build_preset("tiny")
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for network in NETWORKS:
            for parameter in getattr(model, network).parameters():
                parameter.add_(0.02 * torch.randn(parameter.shape, generator=generator))
    return model


@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory):
    """The tiny model saved once per single-file format."""
    folder = tmp_path_factory.mktemp("saved")
    paths = {suffix: folder / f"tiny{suffix}" for suffix in (".safetensors", ".ckpt")}
    for path in paths.values():
        save_single_file(tiny, path)
    return paths


def original_state(model) -> dict[str, torch.Tensor]:
    """``model``'s tensors in the original layout, as a web UI checkpoint holds them."""
    return {key: tensor.clone() for key, tensor in _checkpoints._original_state_dict(model).items()}


def assert_same_weights(expected, actual, networks=NETWORKS):
    for network in networks:
        want, got = getattr(expected, network).state_dict(), getattr(actual, network).state_dict()
        assert want.keys() == got.keys(), network
        for key in want:
            assert got[key].dtype == torch.float32, key
            assert torch.equal(want[key], got[key]), f"{network}: {key}"


@torch.no_grad()
def outputs(model) -> dict[str, torch.Tensor]:
    """Every network's output on fixed inputs."""
    generator = torch.Generator().manual_seed(2)
    tokens = torch.tensor([[49406, 320, 1125, 539, 320, 2368, 49407] + [49407] * 70])
    context = model.text_encoder(tokens).last_hidden_state
    latents = torch.randn(1, 4, 8, 12, generator=generator)
    return {
        "context": context,
        "noise": model.unet(latents, 500, encoder_hidden_states=context).sample,
        "pixels": model.vae.decode(latents).sample,
    }


# Presets


def test_tiny_preset_runs_unet_and_vae_at_64x96(tiny):
    pixels = torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        latents = tiny.vae.encode(pixels).latent_dist.mean
        decoded = tiny.vae.decode(latents).sample
        context = tiny.text_encoder(
            tiny.tokenizer(["a photo of a cat"], return_tensors="pt").input_ids
        ).last_hidden_state
        noise = tiny.unet(latents, 999, encoder_hidden_states=context).sample
    assert latents.shape == (1, 4, 64 // tiny.vae_scale_factor, 96 // tiny.vae_scale_factor) == (1, 4, 8, 12)
    assert decoded.shape == pixels.shape
    assert context.shape == (1, 7, tiny.unet.config.cross_attention_dim)
    assert noise.shape == latents.shape
    for tensor in (latents, decoded, noise):
        assert torch.isfinite(tensor).all()
    assert tiny.prediction_type == "v_prediction"  # as the shipped weights were trained


def test_sd15_shipped_configs_have_the_real_parameter_counts():
    unet, vae, text_encoder = _checkpoints._empty_networks("sd1")  # meta device: no memory, no time

    def count(network):
        return sum(parameter.numel() for parameter in network.parameters())

    assert count(unet) == 859_520_964
    assert count(text_encoder) == 123_060_480
    assert count(vae) == 83_653_863


def test_preset_prediction_type_override():
    assert load_model("tiny", prediction_type="epsilon").prediction_type == "epsilon"
    assert load_model("tiny-random", prediction_type="v_prediction").prediction_type == "v_prediction"
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        load_model("tiny", prediction_type="x0")


# The original layout


# Names and shapes as they appear in real SD 1.4 / 1.5 checkpoints (sd-v1-5.safetensors).
REAL_SD1_TENSORS = {
    UNET + "time_embed.0.weight": (1280, 320),
    UNET + "input_blocks.0.0.weight": (320, 4, 3, 3),
    UNET + "input_blocks.1.0.in_layers.2.weight": (320, 320, 3, 3),
    UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
    UNET + "input_blocks.3.0.op.weight": (320, 320, 3, 3),
    UNET + "input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
    UNET + "input_blocks.11.0.emb_layers.1.weight": (1280, 1280),
    UNET + "middle_block.1.proj_in.weight": (1280, 1280, 1, 1),
    UNET + "middle_block.2.out_layers.3.weight": (1280, 1280, 3, 3),
    UNET + "output_blocks.0.0.in_layers.0.weight": (2560,),
    UNET + "output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
    UNET + "output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
    UNET + "output_blocks.8.2.conv.weight": (640, 640, 3, 3),
    UNET + "output_blocks.11.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
    UNET + "out.2.weight": (4, 320, 3, 3),
    VAE + "encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
    VAE + "encoder.down.1.downsample.conv.weight": (256, 256, 3, 3),
    VAE + "encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
    VAE + "encoder.norm_out.weight": (512,),
    VAE + "quant_conv.weight": (8, 8, 1, 1),
    VAE + "post_quant_conv.weight": (4, 4, 1, 1),
    VAE + "decoder.mid.block_2.conv1.weight": (512, 512, 3, 3),
    VAE + "decoder.up.3.block.2.conv2.weight": (512, 512, 3, 3),
    VAE + "decoder.up.1.upsample.conv.weight": (256, 256, 3, 3),
    VAE + "decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
    VAE + "decoder.mid.attn_1.proj_out.weight": (512, 512, 1, 1),
    TEXT + "embeddings.token_embedding.weight": (49408, 768),
    TEXT + "encoder.layers.11.mlp.fc2.weight": (768, 3072),
    TEXT + "final_layer_norm.weight": (768,),
}


def test_original_layout_names_match_real_sd1_checkpoints():
    shapes = _checkpoints._expected_shapes("sd1")
    assert {key: shapes.get(key) for key in REAL_SD1_TENSORS} == REAL_SD1_TENSORS
    # Blocks the real layout does not have.
    assert VAE + "encoder.down.3.downsample.conv.weight" not in shapes
    assert VAE + "decoder.up.0.upsample.conv.weight" not in shapes
    assert UNET + "output_blocks.11.1.conv.weight" not in shapes
    # 686 U-Net, 248 VAE and 196 text-encoder tensors; real files add the position ids (1131).
    assert len(shapes) == 686 + 248 + 196


@pytest.mark.parametrize("family", ["sd1", "tiny"])
def test_original_layout_is_what_diffusers_converters_invert(family):
    unet, vae, text_encoder = _checkpoints._empty_networks(family)
    original = _checkpoints._original_state_dict_of(unet, vae, text_encoder)
    assert all(key.startswith((UNET, VAE, TEXT)) for key in original)
    for network, convert in ((unet, convert_ldm_unet_checkpoint), (vae, convert_ldm_vae_checkpoint)):
        converted = convert(original, dict(network.config))
        assert {key: tensor.shape for key, tensor in converted.items()} == {
            key: tensor.shape for key, tensor in network.state_dict().items()
        }


# Single files


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_single_file_round_trip(tiny, saved, suffix):
    loaded = load_model(saved[suffix])
    assert_same_weights(tiny, loaded)
    expected, actual = outputs(tiny), outputs(loaded)
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name
    assert loaded.source == str(saved[suffix])
    assert loaded.prediction_type == "epsilon"
    assert loaded.unet.config.cross_attention_dim == tiny.unet.config.cross_attention_dim  # the tiny family
    assert loaded.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert not loaded.unet.training


def test_saved_files_use_the_original_layout(tiny, saved):
    with safetensors.safe_open(saved[".safetensors"], framework="pt") as file:
        keys = set(file.keys())
    checkpoint = torch.load(saved[".ckpt"], weights_only=True)
    assert set(checkpoint) == {"state_dict"}  # what CompVis scripts read
    assert set(checkpoint["state_dict"]) == keys
    assert {UNET + "input_blocks.0.0.weight", VAE + "encoder.conv_in.weight", TEXT + "embeddings.position_ids"} <= keys
    assert all(key.startswith((UNET, VAE, TEXT)) for key in keys)
    assert len(keys) == len(original_state(tiny)) + 1  # and the position ids
    assert not list(saved[".ckpt"].parent.glob(".*tmp"))


def test_plain_and_wrapped_state_dicts_with_extras_load(tiny, tmp_path):
    state = original_state(tiny)
    # What real checkpoints carry besides the networks: EMA copies, the noise schedule, counters.
    extras = {
        "model_ema.diffusion_modelout2weight": torch.zeros(3),
        "model_ema.num_updates": torch.tensor(5),
        "betas": torch.linspace(0, 1, 1000),
        "alphas_cumprod": torch.linspace(1, 0, 1000),
        VAE + "loss.logvar": torch.zeros(()),
        TEXT + "embeddings.position_ids": torch.arange(77.0)[None],  # float, as merges leave them
    }
    plain, wrapped = tmp_path / "plain.ckpt", tmp_path / "wrapped.ckpt"
    torch.save({**state, **extras}, plain)
    torch.save({"state_dict": {**state, **extras}, "global_step": 470000, "epoch": 6}, wrapped)
    for path in (plain, wrapped):
        assert_same_weights(tiny, load_model(path))


def test_old_unnested_text_encoder_names_load(tiny, tmp_path):
    # Files written with transformers < 4.19 lack `text_model.`.
    state = {key.replace(TEXT, "cond_stage_model.transformer."): tensor for key, tensor in original_state(tiny).items()}
    safetensors.torch.save_file(state, tmp_path / "old.safetensors")
    assert_same_weights(tiny, load_model(tmp_path / "old.safetensors"))


def test_half_precision_files_load_as_float32(tiny, tmp_path):
    state = {key: tensor.half() for key, tensor in original_state(tiny).items()}
    safetensors.torch.save_file(state, tmp_path / "half.safetensors")
    loaded = load_model(tmp_path / "half.safetensors")
    weight = loaded.unet.conv_in.weight
    assert weight.dtype == torch.float32
    assert torch.equal(weight, tiny.unet.conv_in.weight.half().float())


def test_single_file_prediction_type_override(saved):
    assert load_model(saved[".safetensors"], prediction_type="v_prediction").prediction_type == "v_prediction"
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        load_model(saved[".safetensors"], prediction_type="sample")


def test_ckpt_model_does_not_map_its_file(tiny, saved, tmp_path):
    # Weights are copied out of the memory-mapped file: truncating it afterwards cannot crash them.
    path = tmp_path / "copy.ckpt"
    path.write_bytes(saved[".ckpt"].read_bytes())
    loaded = load_model(path)
    with path.open("r+b") as file:
        file.truncate(100)
    assert torch.equal(loaded.unet.conv_out.weight + 0, tiny.unet.conv_out.weight)


# Diffusers folders


def save_diffusers_folder(model, folder: Path) -> Path:
    StableDiffusionPipeline(**model.pipeline_components()).save_pretrained(folder)
    # Hub folders hold the tokenizer as vocab.json + merges.txt (load_tokenizer reads those);
    # transformers 5 writes tokenizer.json only.
    for name in TOKENIZER_FILES:
        shutil.copy(tokenizer_cache_dir() / name, folder / "tokenizer" / name)
    return folder


def test_diffusers_folder_round_trip(tiny, tmp_path):
    folder = save_diffusers_folder(
        tiny.with_scheduler(
            tiny.scheduler.__class__.from_config(tiny.scheduler.config, prediction_type="v_prediction")
        ),
        tmp_path / "model",
    )
    loaded = load_model(folder)
    assert_same_weights(tiny, loaded)
    assert loaded.prediction_type == "v_prediction"  # the folder's own
    assert type(loaded.scheduler).__name__ == "DDPMScheduler"
    assert loaded.scheduler.config.beta_schedule == "scaled_linear"
    assert load_model(folder, prediction_type="epsilon").prediction_type == "epsilon"
    assert loaded.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_diffusers_folder_errors(tiny, tmp_path):
    folder = save_diffusers_folder(tiny, tmp_path / "model")
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    state = safetensors.torch.load_file(weights)
    del state["conv_in.weight"]
    safetensors.torch.save_file(state, weights)
    with pytest.raises(
        ModelFileError, match=r"unet/: the weights do not match its config: missing keys 1 tensors: conv_in\.weight"
    ):
        load_model(folder)

    os.remove(folder / "scheduler" / "scheduler_config.json")
    os.rmdir(folder / "scheduler")
    with pytest.raises(
        ModelFileError, match=re.escape(f"{folder}: the diffusers folder lacks the subfolders ['scheduler']")
    ):
        load_model(folder)

    os.remove(folder / "model_index.json")
    with pytest.raises(ModelFileError, match="a directory without model_index.json is not a diffusers model folder"):
        load_model(folder)


# Separate VAE files


def web_ui_vae_state(model) -> dict[str, torch.Tensor]:
    """A web UI VAE file's contents: the autoencoder's original keys without prefix, plus its
    training loss and EMA counters."""
    state = {key.removeprefix(VAE): tensor for key, tensor in original_state(model).items() if key.startswith(VAE)}
    return {**state, "loss.discriminator.main.0.weight": torch.zeros(2, 3), "model_ema.decay": torch.tensor(0.999)}


VAE_FILES = {
    "web_ui.vae.pt": lambda model, path: torch.save(web_ui_vae_state(model), path),
    "wrapped.ckpt": lambda model, path: torch.save({"state_dict": web_ui_vae_state(model)}, path),
    "prefixed.safetensors": lambda model, path: safetensors.torch.save_file(
        {key: tensor for key, tensor in original_state(model).items() if key.startswith(VAE)}, path
    ),
    "full_checkpoint.safetensors": lambda model, path: save_single_file(model, path),
    "diffusers.safetensors": lambda model, path: safetensors.torch.save_file(model.vae.state_dict(), path),
    "diffusers_folder": lambda model, path: model.vae.save_pretrained(path),
}


@pytest.mark.parametrize("name", sorted(VAE_FILES))
def test_separate_vae_files(tiny, tmp_path, name):
    other = build_preset("tiny-random", seed=7)  # a VAE unlike the model's own
    VAE_FILES[name](other, tmp_path / name)
    loaded = load_model("tiny", vae=tmp_path / name)
    assert_same_weights(other, loaded, networks=["vae"])
    assert not torch.equal(loaded.vae.decoder.conv_out.weight, build_preset("tiny").vae.decoder.conv_out.weight)


def test_separate_vae_of_another_shape_is_refused(tmp_path):
    path = tmp_path / "wrong.vae.pt"
    state = web_ui_vae_state(build_preset("tiny"))
    state["decoder.conv_out.weight"] = torch.zeros(3, 16, 1, 1)
    torch.save(state, path)
    message = rf"{re.escape(str(path))}: the VAE weights \(original layout\) do not match the model's VAE config: wrong shape 1 tensors: decoder.conv_out.weight \[3, 16, 1, 1\] \(needs \[3, 16, 3, 3\]\)"
    with pytest.raises(ModelFileError, match=message):
        load_model("tiny", vae=path)


# Refused files


def mutated(state, drop=(), add=None, **replace):
    state = {key: tensor for key, tensor in state.items() if key not in drop}
    state.update(add or {})
    return state


def with_context_width(state, width):
    return {
        key: torch.zeros(tensor.shape[0], width) if key.endswith("attn2.to_k.weight") else tensor
        for key, tensor in state.items()
    }


# (how a checkpoint's tensors are changed, what the error says)
BAD_CHECKPOINTS = {
    "missing": (
        lambda s: mutated(s, drop=[UNET + "out.2.bias"]),
        r"do not match the tiny test model \(tiny config\): missing 1 tensors: model\.diffusion_model\.out\.2\.bias",
    ),
    "unexpected": (
        lambda s: mutated(s, add={VAE + "encoder.extra.weight": torch.zeros(1)}),
        r"unexpected 1 tensors: first_stage_model\.encoder\.extra\.weight",
    ),
    "wrong_shape": (
        lambda s: mutated(s, add={TEXT + "final_layer_norm.bias": torch.zeros(33)}),
        r"wrong shape 1 tensors: cond_stage_model\.transformer\.text_model\.final_layer_norm\.bias \[33\] \(needs \[32\]\)",
    ),
    "integers": (
        lambda s: mutated(s, add={UNET + "out.2.bias": torch.zeros(4, dtype=torch.int32)}),
        r"model\.diffusion_model\.out\.2\.bias holds torch\.int32 values, not floating-point weights",
    ),
    "sd2_openclip": (
        lambda s: mutated(s, add={"cond_stage_model.model.ln_final.weight": torch.zeros(1024)}),
        r"looks like an SD 2\.x checkpoint \(OpenCLIP text encoder",
    ),
    "sd2_context": (
        lambda s: with_context_width(s, 1024),
        r"looks like an SD 2\.x checkpoint \(cross-attention context width 1024",
    ),
    "sdxl": (
        lambda s: mutated(s, add={"conditioner.embedders.1.model.ln_final.weight": torch.zeros(1280)}),
        r"looks like an SDXL-family checkpoint",
    ),
    "inpainting": (
        lambda s: mutated(s, add={UNET + "input_blocks.0.0.weight": torch.zeros(32, 9, 3, 3)}),
        r"looks like a U-Net with 9 input channels \(inpainting models have 9",
    ),
    "vae_alone": (
        lambda s: {k.removeprefix(VAE): t for k, t in s.items() if k.startswith(VAE)},
        r"looks like a VAE alone \(load it as a separate VAE",
    ),
    "lora": (
        lambda s: {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32)},
        r"looks like a LoRA, not a model",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CHECKPOINTS))
def test_wrong_weights_are_refused_with_the_reason(tiny, tmp_path, case):
    change, message = BAD_CHECKPOINTS[case]
    path = tmp_path / f"{case}.safetensors"
    safetensors.torch.save_file(change(original_state(tiny)), path)
    with pytest.raises(ModelFileError, match=message) as error:
        load_model(path)
    assert str(error.value).startswith(f"{path}: ")


def truncated_copy(source: Path, destination: Path) -> Path:
    data = source.read_bytes()
    destination.write_bytes(data[: len(data) // 2])
    return destination


class RunsCode:
    """A pickle payload: unpickling it calls ``function(*arguments)``."""

    def __init__(self, function, *arguments):
        self.function, self.arguments = function, arguments

    def __reduce__(self):
        return self.function, self.arguments


def test_malicious_pickles_are_refused_and_never_run(tiny, tmp_path):
    marker = tmp_path / "payload_ran"
    zipped, legacy = tmp_path / "evil.ckpt", tmp_path / "evil_legacy.ckpt"
    # torch's zip format, the payload inside an otherwise real checkpoint, via os.system ...
    torch.save({"state_dict": {**original_state(tiny), "payload": RunsCode(os.system, f"touch {marker}")}}, zipped)
    # ... and a bare legacy pickle whose payload opens (creates) a file.
    legacy.write_bytes(pickle.dumps({"state_dict": RunsCode(open, str(marker), "w")}, protocol=2))
    for path, global_name in ((zipped, r"(posix|os|nt)\.system"), (legacy, r"(builtins|io)\.open")):
        with pytest.raises(
            ModelFileError,
            match=rf"refused: loading this file needs arbitrary code execution \(it references {global_name}\); it was not unpickled",
        ):
            load_model(path)
        with pytest.raises(ModelFileError, match="it was not unpickled"):
            load_model("tiny", vae=path)
    assert not marker.exists()


def test_unreadable_files_are_refused_with_the_reason(saved, tmp_path):
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint\n")
    a_list = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], a_list)
    a_number = tmp_path / "number.ckpt"
    torch.save({"state_dict": {UNET + "out.2.bias": 5}}, a_number)
    cases = {
        tmp_path / "absent.safetensors": "no such file",
        empty: "the file is empty",
        truncated_copy(saved[".safetensors"], tmp_path / "cut.safetensors"): "truncated or corrupt safetensors file",
        truncated_copy(saved[".ckpt"], tmp_path / "cut.ckpt"): "truncated, corrupt or not a checkpoint",
        text: r"refused by the weights-only unpickler \(corrupt, or pickled with objects it does not allow\)",
        a_list: "expected a dict of tensors \\(a state dict\\), got a list",
        a_number: r"model\.diffusion_model\.out\.2\.bias is a int, not a tensor",
        tmp_path: "a directory without model_index.json is not a diffusers model folder",
    }
    for path, reason in cases.items():
        with pytest.raises(ModelFileError, match=rf"^{re.escape(str(path))}: {reason}"):
            load_model(path)
    with pytest.raises(ModelFileError, match="no such file"):
        load_model("tiny", vae=tmp_path / "absent.vae.pt")


# Saving


def test_save_replaces_atomically(tiny, tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"old contents")
    save_single_file(tiny, path)
    assert_same_weights(tiny, load_model(path))

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", fail)
    before = path.read_bytes()
    with pytest.raises(OSError, match="disk full"):
        save_single_file(tiny, path)
    assert path.read_bytes() == before
    assert [entry.name for entry in tmp_path.iterdir()] == ["model.safetensors"]  # no temporary left

    with pytest.raises(ValueError, match="use one of .safetensors, .ckpt, .pt"):
        save_single_file(tiny, tmp_path / "model.bin")


def test_diffusers_folder_saved_by_this_transformers_loads(tiny, tmp_path):
    StableDiffusionPipeline(**tiny.pipeline_components()).save_pretrained(tmp_path)
    assert_same_weights(tiny, load_model(tmp_path))
