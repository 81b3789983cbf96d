"""Prompt tags <hypernet:NAME:S> / <lora:NAME:S>, names found in folders, the web UI's sampler fields,
and `nai-fast generate --from-png` giving back the same pixels (issue #14)."""

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from test_lora import kohya_state, random_updates

from nai_fast.cli import main
from nai_fast.engine.assets import NAMES_SHOWN, find_networks, resolve_tags
from nai_fast.engine.generate import GenerationParameters
from nai_fast.hypernetworks.modules import Hypernetwork
from nai_fast.models.load import load_model
from nai_fast.text.tags import NetworkTag, extract_network_tags

# -- the tags ------------------------------------------------------------------------------------


def test_tags_are_removed_and_returned_in_order():
    text, tags = extract_network_tags("a cat <lora:style:0.8>, <hypernet:anime> on a chair<lora:eyes:-1.5>")
    assert text == "a cat ,  on a chair"  # removed as the web UI removes them: whitespace stays
    assert tags == [NetworkTag("lora", "style", 0.8), NetworkTag("hypernet", "anime", 1.0), NetworkTag("lora", "eyes", -1.5)]
    assert [tag.text for tag in tags] == ["<lora:style:0.8>", "<hypernet:anime:1>", "<lora:eyes:-1.5>"]


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ("<lyco:thing:0.5>", "unknown kind 'lyco'"),
        ("<lora:style:abc>", "the strength must be a number, got 'abc'"),
        ("<lora:style:0.5:0.8>", "one strength only"),
        ("<lora:style:nan>", "the strength must be finite"),
    ],
)
def test_bad_tags_are_refused_by_name_unless_lenient(prompt, message):
    with pytest.raises(ValueError, match=message):
        extract_network_tags(f"a cat {prompt}")
    assert extract_network_tags(f"a cat {prompt}", strict=False) == ("a cat ", [])


# -- the web UI's parameters text ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "sampler"),
    [
        ("Sampler: DPM++ 2M, Schedule type: Karras", "dpmpp_2m_karras"),
        ("Sampler: DPM++ 2M Karras", "dpmpp_2m_karras"),  # before v1.9
        ("Sampler: DPM++ 2M, Schedule type: Automatic", "dpmpp_2m_karras"),  # Karras is its own schedule
        ("Sampler: Euler a, Schedule type: Automatic", "euler_a"),
        ("Sampler: Euler a", "euler_a"),
        ("Sampler: Euler", "euler"),
        ("Sampler: DDIM", "ddim"),
        ("Sampler: Euler, Schedule type: Karras", "Euler Karras"),  # not one of ours: kept as it is
    ],
)
def test_the_web_uis_sampler_fields_read(fields, sampler):
    assert GenerationParameters.from_text(f"a cat\nSteps: 20, {fields}, CFG scale: 7, Seed: 1").sampler == sampler


def test_tags_in_the_prompt_are_the_networks_and_older_hypernet_fields_still_read():
    text = (
        "a cat <lora:style:0.8> <hypernet:anime:0.5>\nNegative prompt: <lora:ignored:1>, blurry\n"
        'Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x768, Model: m, '
        'Lora hashes: "style: 0123456789ab"'
    )
    parsed = GenerationParameters.from_text(text)
    assert parsed.prompt == "a cat <lora:style:0.8> <hypernet:anime:0.5>"  # the tags stay, as in the web UI
    assert parsed.loras == (("style", 0.8),) and parsed.hypernetworks == (("anime", 0.5),)  # positive prompt only
    assert parsed.tagged_prompt() == parsed.prompt and parsed.to_text() == text
    older = GenerationParameters.from_text("a cat\nSteps: 20, Sampler: Euler a, Seed: 1, Hypernet: anime, "
                                           "Hypernet strength: 0.5, Hypernet 2: other")  # fmt: skip
    assert older.hypernetworks == (("anime", 0.5), ("other", 1.0))
    assert older.tagged_prompt() == "a cat <hypernet:anime:0.5> <hypernet:other:1>"


# -- names found in folders ----------------------------------------------------------------------


def test_names_are_file_stems_found_recursively_and_an_unknown_name_lists_them(tmp_path):
    (tmp_path / "a" / "sub").mkdir(parents=True)
    (tmp_path / "a" / "sub" / "style.safetensors").write_bytes(b"")
    (tmp_path / "a" / "eyes.pt").write_bytes(b"")
    (tmp_path / "a" / "notes.txt").write_bytes(b"")
    assert find_networks("lora", [tmp_path / "a"]) == {
        "eyes": tmp_path / "a" / "eyes.pt",
        "style": tmp_path / "a" / "sub" / "style.safetensors",
    }
    resolved = resolve_tags([NetworkTag("lora", "style", 0.5)], lora_dirs=[tmp_path / "a"])
    assert resolved == {"hypernet": [], "lora": [(tmp_path / "a" / "sub" / "style.safetensors", 0.5)]}
    with pytest.raises(ValueError, match=r"<lora:nope:1>: no LoRA named 'nope' in .*; found: eyes, style$"):
        resolve_tags([NetworkTag("lora", "nope")], lora_dirs=[tmp_path / "a"])
    with pytest.raises(ValueError, match="no --hypernetwork-dir was given"):
        resolve_tags([NetworkTag("hypernet", "style")], lora_dirs=[tmp_path / "a"])


def test_the_list_of_names_is_capped_and_two_files_of_one_name_are_refused(tmp_path):
    for index in range(NAMES_SHOWN + 5):
        (tmp_path / f"net{index:02d}.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"found: net00, .*net19 \(and 5 more\)"):
        resolve_tags([NetworkTag("hypernet", "nope")], hypernetwork_dirs=[tmp_path])
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "net00.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=r"two hypernetwork files are named 'net00': .*net00.pt and .*net00.safetensors"):
        find_networks("hypernet", [tmp_path])


# -- the CLI: tags equal files, and --from-png ---------------------------------------------------

SMALL = ["--preset", "tiny", "--width", "64", "--height", "64", "--steps", "2", "--seed", "7"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    folder = tmp_path_factory.mktemp("assets")
    (folder / "hypernetworks" / "styles").mkdir(parents=True)
    (folder / "loras").mkdir()
    torch.manual_seed(0)
    Hypernetwork(widths=(32, 64), activation="relu", weight_init="XavierNormal").save(
        folder / "hypernetworks" / "styles" / "anime.safetensors"
    )
    save_file(kohya_state(random_updates(load_model("tiny"))), folder / "loras" / "style.safetensors")
    return folder


@pytest.fixture(autouse=True)
def away_from_a_demo_run(tmp_path, monkeypatch):
    """Without a hypernetwork given, --preset tiny uses a demo's nai-fast-output/ where it runs."""
    monkeypatch.chdir(tmp_path)


def run(capsys, *argv):
    assert main(["generate", *argv]) == 0
    (written,) = capsys.readouterr().out.split()
    with Image.open(written) as image:
        return np.asarray(image.convert("RGB")), image.text["parameters"], written


def test_tags_give_the_pixels_of_the_files_and_from_png_gives_them_back(assets, tmp_path, capsys):
    hypernetwork = assets / "hypernetworks" / "styles" / "anime.safetensors"
    lora = assets / "loras" / "style.safetensors"
    dirs = ["--hypernetwork-dir", str(assets / "hypernetworks"), "--lora-dir", str(assets / "loras")]
    by_files, text, _ = run(capsys, *SMALL, "--prompt", "a red circle", "--negative-prompt", "blurry",
                            "--hypernetwork", f"{hypernetwork}:0.8", "--lora", f"{lora}:0.6",
                            "--output-dir", str(tmp_path / "files"))  # fmt: skip
    assert text.startswith("a red circle <hypernet:anime:0.8> <lora:style:0.6>\nNegative prompt: blurry\n")
    by_tags, tag_text, _ = run(capsys, *SMALL, "--prompt", "a red circle <hypernet:anime:0.8> <lora:style:0.6>",
                               "--negative-prompt", "blurry", *dirs, "--output-dir", str(tmp_path / "tags"))  # fmt: skip
    np.testing.assert_array_equal(by_tags, by_files)
    assert tag_text == text
    plain, _, _ = run(capsys, *SMALL, "--prompt", "a red circle", "--output-dir", str(tmp_path / "plain"))
    assert not np.array_equal(plain, by_files)

    # Every setting from the PNG, the model included (it names the tiny preset): the same pixels.
    png = tmp_path / "files" / "00000-7.png"
    again, again_text, name = run(capsys, "--from-png", str(png), *dirs, "--output-dir", str(tmp_path / "again"))
    np.testing.assert_array_equal(again, by_files)
    assert again_text == text and name.endswith("00000-7.png")
    # An option given overrides the PNG's setting.
    _, overridden, _ = run(capsys, "--from-png", str(png), "--steps", "1", "--sampler", "ddim", *dirs,
                           "--output-dir", str(tmp_path / "overridden"))  # fmt: skip
    assert "Steps: 1, Sampler: DDIM, CFG scale: 11, Seed: 7, Size: 64x64" in overridden


def refused(capsys, *argv):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", *argv])
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_unknown_names_and_missing_assets_are_errors_naming_them(assets, tmp_path, capsys):
    err = refused(capsys, *SMALL, "--prompt", "a cat <lora:nope:0.5>", "--lora-dir", str(assets / "loras"),
                  "--output-dir", str(tmp_path / "out"))  # fmt: skip
    assert "<lora:nope:0.5>: no LoRA named 'nope' in" in err and "found: style" in err
    err = refused(capsys, *SMALL, "--prompt", "a cat <hypernet:anime>", "--output-dir", str(tmp_path / "out"))
    assert "<hypernet:anime:1> names a hypernetwork, but no --hypernetwork-dir was given" in err
    assert not (tmp_path / "out").exists()
    # A PNG naming a hypernetwork the folders lack.
    png = tmp_path / "made.png"
    Image.new("RGB", (64, 64)).save(png, pnginfo=_info("a cat <hypernet:missing:0.5>\nSteps: 2, Sampler: Euler a, "
                                                        "CFG scale: 7, Seed: 1, Size: 64x64, Model: tiny"))  # fmt: skip
    err = refused(capsys, "--from-png", str(png), "--hypernetwork-dir", str(assets / "hypernetworks"),
                  "--output-dir", str(tmp_path / "out"))  # fmt: skip
    assert "<hypernet:missing:0.5>: no hypernetwork named 'missing'" in err and "found: anime" in err
    # A model that is not a preset must be given; a sampler nai_fast lacks must be chosen.
    Image.new("RGB", (64, 64)).save(png, pnginfo=_info("a cat\nSteps: 2, Sampler: Euler a, Seed: 1, Model: anything-v4"))
    assert "the model 'anything-v4'; give it with --model PATH" in refused(capsys, "--from-png", str(png))
    Image.new("RGB", (64, 64)).save(png, pnginfo=_info("a cat\nSteps: 2, Sampler: DPM++ SDE, Seed: 1, Model: tiny"))
    assert "sampler 'DPM++ SDE' is not one nai-fast has" in refused(capsys, "--from-png", str(png))
    Image.new("RGB", (64, 64)).save(png)
    assert "carries no 'parameters' text" in refused(capsys, "--from-png", str(png))
    assert "--prompt is required (or --from-png FILE)" in refused(capsys, "--preset", "tiny")


def _info(text):
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    return info
