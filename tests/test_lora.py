"""LoRA files (kohya / web UI, diffusers, PEFT) merged into the tiny preset's weights: every layout
gives the same merged weights, a LoRA for another model is refused by name, strength 0 is the
model without it bit for bit, strength 1 the model with ``W + up @ down * alpha / rank`` merged in,
removal restores the exact weights, and the hypernetwork processors' caches see the change."""

import copy
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from nai_fast.engine.generate import GenerationParameters, txt2img
from nai_fast.hypernetworks.modules import Hypernetwork
from nai_fast.hypernetworks.processors import apply_hypernetworks, remove_hypernetworks
from nai_fast.models.checkpoints import _unet_to_original
from nai_fast.models.load import load_model
from nai_fast.models.lora import (
    Lora,
    LoraError,
    LoraMismatchError,
    apply_loras,
    installed_loras,
    load_lora,
    lora_hash,
    loras_applied,
    remove_loras,
)

FAST = dict(width=64, height=64, steps=2, progress=False, seed=3)
RANK = 4
# U-Net modules the test LoRA targets: attention projections (both kinds), a feed-forward Linear,
# the 1x1 proj_in conv and a 3x3 ResNet conv (as kohya's LoCon writes them).
UNET_TARGETS = (
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v",
    "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0",
    "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2",
    "down_blocks.0.attentions.0.proj_in",
    "down_blocks.1.resnets.0.conv1",
)
TEXT_TARGETS = ("encoder.layers.0.self_attn.q_proj", "encoder.layers.1.mlp.fc1")
CROSS_TO_K = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"


@pytest.fixture(scope="module")
def model():
    return load_model("tiny")


def random_updates(model, unet=UNET_TARGETS, text=TEXT_TARGETS, seed=0, alpha=2.0):
    """{(component, path): (down, up, alpha)} fitting ``model``: conv downs keep the kernel."""
    generator = torch.Generator().manual_seed(seed)
    updates = {}
    for component, paths in (("unet", unet), ("text_encoder", text)):
        network = getattr(model, component)
        for path in paths:
            weight = network.get_submodule(path).weight
            down = torch.randn(RANK, *weight.shape[1:], generator=generator) * 0.3
            up = torch.randn(weight.shape[0], RANK, *([1, 1] if weight.ndim == 4 else []), generator=generator) * 0.3
            updates[component, path] = (down, up, alpha)
    return updates


def kohya_name(component, path):
    # kohya trains on transformers 4, whose CLIP nests everything under text_model.
    return "lora_unet_" + path.replace(".", "_") if component == "unet" else "lora_te_text_model_" + path.replace(".", "_")


def kohya_state(updates, names=kohya_name):
    state = {}
    for (component, path), (down, up, alpha) in updates.items():
        name = names(component, path)
        state |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(alpha)}
    return state


def merged_reference(model, updates, strength=1.0):
    """A copy of ``model`` with ``W + strength * (up @ down) * alpha / rank`` written into its weights."""
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for (component, path), (down, up, alpha) in updates.items():
            weight = getattr(reference, component).get_submodule(path).weight
            delta = (up.reshape(up.shape[0], -1) @ down.reshape(RANK, -1)).reshape(weight.shape) * (alpha / RANK)
            if strength != 1:
                delta = delta * strength
            weight.copy_((weight.float() + delta).to(weight.dtype))
    return reference


def weights(model):
    return {f"{c}.{k}": v.clone() for c in ("unet", "text_encoder") for k, v in getattr(model, c).state_dict().items()}


def assert_same_weights(model, expected):
    found = weights(model)
    assert found.keys() == expected.keys()
    different = [key for key in found if not torch.equal(found[key], expected[key])]
    assert not different, different[:5]


def image(model, **options):
    return np.asarray(txt2img(model, "a red circle", **(FAST | options))[0].image)


# -- the file layouts ---------------------------------------------------------------------------------


def write_layouts(model, updates, folder):
    """The same LoRA as each tool writes it; returns {layout: path}."""
    paths = {}
    state = kohya_state(updates)
    save_file({k: v.half() for k, v in state.items()}, folder / "kohya.safetensors", {"ss_network_dim": str(RANK)})
    paths["kohya safetensors (fp16)"] = folder / "kohya.safetensors"
    torch.save(state, folder / "kohya.pt")
    paths["kohya .pt"] = folder / "kohya.pt"

    # Older kohya-style files name U-Net modules by the original (LDM) layout.
    originals = _unet_to_original({f"{p}.weight": None for c, p in updates if c == "unet"}, model.unet.config)
    ldm = dict(zip([p for c, p in updates if c == "unet"], (name.removesuffix(".weight") for name in originals)))
    ldm_state = kohya_state(updates, lambda c, p: "lora_unet_" + ldm[p].replace(".", "_") if c == "unet" else kohya_name(c, p))
    assert any("input_blocks" in key for key in ldm_state)
    save_file(ldm_state, folder / "ldm.safetensors")
    paths["kohya, original U-Net names"] = folder / "ldm.safetensors"

    from diffusers import StableDiffusionPipeline

    def peft_keys(component):
        prefix = "text_model." if component == "text_encoder" else ""
        return {f"{prefix}{p}.lora_{ab}.weight": (down if ab == "A" else up)
                for (c, p), (down, up, _) in updates.items() if c == component for ab in "AB"}  # fmt: skip

    metadata = {"r": RANK, "lora_alpha": 2.0, "target_modules": ["to_k"]}
    StableDiffusionPipeline.save_lora_weights(
        folder / "diffusers", unet_lora_layers=peft_keys("unet"), text_encoder_lora_layers=peft_keys("text_encoder"),
        unet_lora_adapter_metadata=metadata, text_encoder_lora_adapter_metadata=metadata,
    )  # fmt: skip
    paths["diffusers save_lora_weights"] = folder / "diffusers" / "pytorch_lora_weights.safetensors"

    # PEFT's save_pretrained of a U-Net and of a text encoder: base_model.model.<path>, alphas in the config.
    for component in ("unet", "text_encoder"):
        (folder / component).mkdir()
        save_file({f"base_model.model.{k}": v for k, v in peft_keys(component).items()},
                  folder / component / "adapter_model.safetensors")  # fmt: skip
        config = {"peft_type": "LORA", "r": RANK, "lora_alpha": 2.0, "target_modules": ["to_k"]}
        (folder / component / "adapter_config.json").write_text(json.dumps(config))
        paths[f"PEFT ({component})"] = folder / component / "adapter_model.safetensors"
    return paths


def test_every_layout_merges_to_the_same_weights_as_the_formula(model, tmp_path):
    updates = random_updates(model)
    reference = weights(merged_reference(model, updates))
    half = {k: (v[0].half().float(), v[1].half().float(), v[2]) for k, v in updates.items()}
    reference_half = weights(merged_reference(model, half))
    before = weights(model)
    paths = write_layouts(model, updates, tmp_path)
    for layout, path in paths.items():
        loras = [load_lora(path)]
        if layout.startswith("PEFT"):  # PEFT writes one network per adapter: apply both together
            if layout != "PEFT (unet)":
                continue
            loras.append(load_lora(paths["PEFT (text_encoder)"]))
        assert sum(len(lora.layers) for lora in loras) == len(updates), layout
        with loras_applied(model, loras):
            assert_same_weights(model, reference_half if "fp16" in layout else reference)
        assert_same_weights(model, before)


def test_old_diffusers_attention_processor_keys(model, tmp_path):
    path = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"
    updates = random_updates(model, unet=(path,), text=(), alpha=RANK)  # no alpha in the file: scale 1
    down, up, _ = updates["unet", path]
    processor = path.replace(".to_k", ".processor.to_k_lora")
    save_file({f"{processor}.down.weight": down, f"{processor}.up.weight": up}, tmp_path / "procs.safetensors")
    expected = weights(merged_reference(model, updates))
    with loras_applied(model, load_lora(tmp_path / "procs.safetensors")):
        assert_same_weights(model, expected)


def test_a_kohya_file_without_alphas_has_scale_one(model, tmp_path):
    updates = random_updates(model, alpha=RANK)
    state = {k: v for k, v in kohya_state(updates).items() if not k.endswith(".alpha")}
    save_file(state, tmp_path / "no-alpha.safetensors")
    expected = weights(merged_reference(model, updates))
    with loras_applied(model, load_lora(tmp_path / "no-alpha.safetensors")):
        assert_same_weights(model, expected)


# -- refusals ---------------------------------------------------------------------------------------


def refused(model, state, tmp_path, error=LoraMismatchError):
    save_file(state, tmp_path / "other.safetensors")
    before = weights(model)
    with pytest.raises(error) as raised:
        apply_loras(model, load_lora(tmp_path / "other.safetensors"))
    assert_same_weights(model, before)  # nothing merged, not even the layers that fit
    assert installed_loras(model) == []
    return str(raised.value)


def test_unknown_module_names_are_refused_by_name(model, tmp_path):
    state = kohya_state(random_updates(model))
    down = torch.zeros(RANK, 32)
    state |= {"lora_unet_down_blocks_7_attentions_0_to_k.lora_down.weight": down,
              "lora_unet_down_blocks_7_attentions_0_to_k.lora_up.weight": torch.zeros(32, RANK)}  # fmt: skip
    message = refused(model, state, tmp_path)
    assert "LoRA 'other' is not for this model" in message
    assert "1 of its 10 layers name modules this model lacks (lora_unet_down_blocks_7_attentions_0_to_k)" in message


def test_wrong_widths_are_refused_by_name(model, tmp_path):
    # An SD 1.x-wide cross-attention to_k (768 context) on the tiny model (32).
    state = {"lora_unet_" + CROSS_TO_K.replace(".", "_") + ".lora_down.weight": torch.zeros(RANK, 768),
             "lora_unet_" + CROSS_TO_K.replace(".", "_") + ".lora_up.weight": torch.zeros(32, RANK)}  # fmt: skip
    message = refused(model, state, tmp_path)
    assert "do not fit this model's widths" in message
    assert "attn2_to_k: down (4, 768) and up (32, 4) do not fit the weight (32, 32)" in message


def test_sdxl_files_are_refused_by_name(model, tmp_path):
    state = kohya_state(random_updates(model, text=()))
    state |= {"lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(RANK, 1280),
              "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(1280, RANK)}  # fmt: skip
    save_file(state, tmp_path / "sdxl.safetensors")
    with pytest.raises(LoraMismatchError, match=r"LoRA 'sdxl' is for SDXL, not SD 1.x: .*lora_te2_text_model"):
        load_lora(tmp_path / "sdxl.safetensors")


def test_other_kinds_are_refused_by_name(model, tmp_path):
    state = {"lora_unet_x.hada_w1_a": torch.zeros(2, 2), "lora_unet_x.hada_w1_b": torch.zeros(2, 2)}
    save_file(state, tmp_path / "loha.safetensors")
    with pytest.raises(LoraError, match=r"LoRA 'loha' is LoHa \(hada_w1_a...\), which is not supported"):
        load_lora(tmp_path / "loha.safetensors")
    torch.save({"lora_unet_x.lora_down.weight": torch.zeros(2, 2), "blob": object()}, tmp_path / "code.pt")
    with pytest.raises(LoraError, match="code.pt"):
        load_lora(tmp_path / "code.pt")


def test_a_text_encoder_lora_needs_a_text_encoder(model, tmp_path):
    save_file(kohya_state(random_updates(model, unet=())), tmp_path / "te.safetensors")
    with pytest.raises(LoraMismatchError, match="has layers for text_encoder, not given"):
        apply_loras({"unet": model.unet}, load_lora(tmp_path / "te.safetensors"))


# -- strengths, composition, removal ------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_file(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("lora") / "style.safetensors"
    save_file(kohya_state(random_updates(model)), path)
    return path


def test_strength_zero_is_the_model_without_it_bit_for_bit(model, lora_file):
    plain = image(model)
    before = {name: parameter for name, parameter in model.unet.named_parameters()}
    with loras_applied(model, load_lora(lora_file), 0.0):
        assert all(parameter is before[name] for name, parameter in model.unet.named_parameters())
        assert np.array_equal(image(model), plain)


@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_strength_s_is_the_model_with_the_update_merged(model, lora_file, strength):
    reference = merged_reference(model, random_updates(model), strength)
    with loras_applied(model, load_lora(lora_file), strength):
        with_lora = image(model)
        parameters = txt2img(model, "a red circle", **FAST)[0].parameters
    assert np.array_equal(with_lora, image(reference))
    assert not np.array_equal(with_lora, image(model))
    assert parameters.loras == (("style", strength),)
    assert parameters.lora_hashes == (("style", lora_hash(lora_file)),)


def test_several_loras_add_up(model, tmp_path):
    first, second = random_updates(model, seed=1), random_updates(model, seed=2, unet=UNET_TARGETS[:3], text=())
    save_file(kohya_state(first), tmp_path / "a.safetensors")
    save_file(kohya_state(second), tmp_path / "b.safetensors")
    loras = [load_lora(tmp_path / "a.safetensors"), load_lora(tmp_path / "b.safetensors")]
    with loras_applied(model, loras, [0.5, 1.5]):
        found = weights(model)
    expected = weights(merged_reference(merged_reference(model, first, 0.5), second, 1.5))
    assert found.keys() == expected.keys()
    for key in found:  # the sum is rounded once, the reference twice
        torch.testing.assert_close(found[key], expected[key], rtol=1e-6, atol=1e-6)


def test_removal_restores_the_exact_weights_in_half_precision(model, lora_file):
    half = copy.deepcopy(model).to(dtype=torch.float16)
    originals = {name: parameter for name, parameter in half.unet.named_parameters()}
    before = weights(half)
    apply_loras(half, load_lora(lora_file), 0.7)
    assert half.unet.get_submodule(CROSS_TO_K).weight.dtype == torch.float16
    assert not torch.equal(half.unet.get_submodule(CROSS_TO_K).weight, before[f"unet.{CROSS_TO_K}.weight"])
    apply_loras(half, load_lora(lora_file), 0.3)  # applying again replaces the set
    assert [strength for _, strength in installed_loras(half)] == [0.3]
    remove_loras(half)
    assert_same_weights(half, before)
    assert all(parameter is originals[name] for name, parameter in half.unet.named_parameters())


def test_a_text_encoder_lora_changes_the_conditioning(model, tmp_path):
    from nai_fast.text.encoder import LongPromptEncoder

    save_file(kohya_state(random_updates(model, unet=())), tmp_path / "te.safetensors")
    encoder = LongPromptEncoder(model.tokenizer, model.text_encoder)
    with torch.no_grad():
        plain = encoder.encode("a red circle", "")[0]
        with loras_applied(model, load_lora(tmp_path / "te.safetensors")):
            changed = encoder.encode("a red circle", "")[0]
        again = encoder.encode("a red circle", "")[0]
    assert not torch.equal(plain, changed) and torch.equal(plain, again)


# -- with hypernetworks: the caches see the merge, and the fast paths stay on -------------------------


def test_a_lora_on_a_cached_cross_attention_projection_is_seen_and_the_cache_stays_on(model, tmp_path):
    torch.manual_seed(0)
    hypernetwork = Hypernetwork(widths=(32, 64), activation="linear", weight_init="XavierNormal")
    updates = random_updates(model, unet=(CROSS_TO_K, UNET_TARGETS[0]), text=())
    save_file(kohya_state(updates), tmp_path / "k.safetensors")
    lora = load_lora(tmp_path / "k.safetensors")
    apply_hypernetworks(model.unet, hypernetwork)
    try:
        plain = image(model)  # fills the K/V cache and the folded self-attention projections
        with loras_applied(model, lora):
            with_lora = image(model)
            attn2 = model.unet.get_submodule(CROSS_TO_K.removesuffix(".to_k"))
            assert len(attn2.processor._key_values)  # the cache is on with the LoRA merged
        after = image(model)
    finally:
        remove_hypernetworks(model.unet)
    fresh = merged_reference(model, updates)
    apply_hypernetworks(fresh.unet, hypernetwork)
    assert not np.array_equal(with_lora, plain)
    assert np.array_equal(with_lora, image(fresh))
    assert np.array_equal(after, plain)


# -- parameters text and CLI -------------------------------------------------------------------------


def test_the_parameters_text_records_loras_and_round_trips():
    parameters = GenerationParameters(
        prompt="a cat", seed=2, loras=(("style", 0.8), ("eyes", 1.0)), lora_hashes=(("style", "0123456789ab"),)
    )
    text = parameters.to_text()
    # As the web UI writes it: the LoRAs as tags in the prompt, their hashes in a field.
    assert text.startswith("a cat <lora:style:0.8> <lora:eyes:1>\n")
    assert text.endswith('Lora hashes: "style: 0123456789ab"')
    read = GenerationParameters.from_text(text)
    assert read.loras == parameters.loras and read.lora_hashes == parameters.lora_hashes
    assert read.to_text() == text
    # nai_fast's older `Lora weights` field still reads.
    older = GenerationParameters.from_text('a cat\nSteps: 28, Seed: 2, Lora weights: "style: 0.8, eyes: 1"')
    assert older.loras == parameters.loras


def test_cli_applies_loras_with_strengths_and_records_them(model, lora_file, tmp_path, capsys, monkeypatch):
    from PIL import Image

    from nai_fast.cli import main

    monkeypatch.chdir(tmp_path)  # away from a demo's nai-fast-output/, which --preset tiny would use

    argv = ["generate", "--preset", "tiny", "--prompt", "a red circle", "--width", "64", "--height", "64"]
    argv += ["--steps", "2", "--seed", "3", "--output-dir", str(tmp_path), "--lora", f"{lora_file}:0.6"]
    assert main(argv) == 0
    (written,) = capsys.readouterr().out.split()
    with Image.open(written) as png:
        pixels, text = np.asarray(png.convert("RGB")), png.text["parameters"]
    assert text.startswith("a red circle <lora:style:0.6>\n")
    assert f'Lora hashes: "style: {lora_hash(lora_file)}"' in text
    assert np.array_equal(pixels, image(merged_reference(model, random_updates(model), 0.6)))


def test_cli_checks_lora_files_before_loading_a_model(tmp_path, capsys):
    from nai_fast.cli import main

    with pytest.raises(SystemExit):
        main(["generate", "--preset", "tiny", "--prompt", "x", "--lora", str(tmp_path / "missing.safetensors:0.5")])
    assert "--lora " + str(tmp_path / "missing.safetensors") + ": no such file or folder" in capsys.readouterr().err


def test_a_lora_is_a_lora():
    with pytest.raises(TypeError):
        apply_loras({"unet": nn.Linear(2, 2)}, ["style.safetensors"])
    assert repr(Lora(())) == "Lora('lora', 0 layers, kohya)"
