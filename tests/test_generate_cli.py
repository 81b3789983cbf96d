"""`nai-fast generate` as a user runs it (the installed console script, in a subprocess): inputs
are checked before any model is built, nothing is silently a no-op, seeds and sizes behave as in
the web UI, and warnings are one clean line each. Issue #10, sections 3 and 4."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from console_script import console_script
from PIL import Image

from nai_fast.engine.generate import GenerationParameters
from nai_fast.hypernetworks.modules import Hypernetwork

pytestmark = pytest.mark.slow  # each test runs the console script

REPO = Path(__file__).resolve().parents[1]
LONG_PROMPT = ", ".join(["a photo of a cat sitting on a red chair"] * 30)  # about 330 tokens: cut at 225


def nai_fast(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    """The console script, running this checkout (PYTHONPATH first), in ``cwd`` (so no
    ``nai-fast-output/hypernetwork.safetensors`` of the caller's is picked up)."""
    environment = os.environ | {
        "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "OMP_NUM_THREADS": "1",
    }
    return subprocess.run(
        [console_script(), *argv], cwd=cwd, env=environment, capture_output=True, text=True, timeout=300
    )


def generate(*extra: str, cwd: Path, prompt: str = "a cat") -> subprocess.CompletedProcess:
    return nai_fast("generate", "--prompt", prompt, "--steps", "1", "--output-dir", "out", *extra, cwd=cwd)


def assert_refused(result: subprocess.CompletedProcess, message: str) -> None:
    """Exit status 2, the message on stderr, and no traceback."""
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


# -- one run at the defaults: no size, seed -1, an over-long prompt ----------------------------------


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """``nai-fast generate --preset tiny --seed -1`` with no size: the run the three tests below
    read (one model load for all of them)."""
    folder = tmp_path_factory.mktemp("default-run")
    result = generate("--preset", "tiny", "--seed", "-1", cwd=folder, prompt=LONG_PROMPT)
    assert result.returncode == 0, result.stderr
    (path,) = result.stdout.split()
    with Image.open(folder / path) as image:
        return result, image.size, image.text["parameters"], Path(path).name


def test_seed_minus_one_draws_a_seed_that_is_printed_and_written_in_the_png(default_run):
    result, _, text, name = default_run
    printed = re.findall(r"^seed: (\d+)$", result.stderr, flags=re.MULTILINE)
    assert len(printed) == 1
    seed = int(printed[0])
    assert 0 <= seed <= 2**32 - 1
    assert GenerationParameters.from_text(text).seed == seed and f"Seed: {seed}," in text
    assert name == f"00000-{seed}.png"


def test_the_default_size_is_the_models_resolution_and_draws_no_size_warning(default_run):
    result, size, text, _ = default_run
    assert size == (128, 128)  # the tiny preset's resolution (SD 1.x: 512x512)
    assert "Size: 128x128" in text
    assert "far from the model's training buckets" not in result.stderr


def test_a_warning_is_one_clean_line_on_stderr(default_run):
    result, _, _, _ = default_run
    lines = [line for line in result.stderr.splitlines() if "prompt longer than" in line]
    assert len(lines) == 1
    assert re.fullmatch(r"WARNING: prompt longer than 225 tokens; cut: '.*red chair'", lines[0])
    assert not re.search(r"nai_fast[/\\]\w+\.py|UserWarning|warnings\.warn", result.stderr)  # no source, no line


# -- refused before anything is built ------------------------------------------------------------


def test_a_hypernetwork_for_another_model_is_refused_and_no_image_is_written(tmp_path):
    Hypernetwork(widths=(768, 320, 640, 1280)).save(tmp_path / "sd1-style.safetensors")
    result = generate("--preset", "tiny", "--hypernetwork", "sd1-style.safetensors:0.8", cwd=tmp_path)
    assert_refused(result, "hypernetwork 'sd1-style' (sd1-style.safetensors) has modules for k/v widths")
    assert "320, 640, 768, 1280" in result.stderr and "widths 32, 64" in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_strength_that_is_not_a_number_is_named(tmp_path):
    result = generate("--preset", "tiny", "--hypernetwork", "FILE:abc", cwd=tmp_path)
    assert_refused(result, "argument --hypernetwork: 'FILE:abc': the strength after the last ':' must be a number")
    assert "No such file" not in result.stderr


@pytest.mark.parametrize("seed", [str(2**32), "-2"])
def test_seeds_outside_the_web_uis_range_are_argument_errors(tmp_path, seed):
    result = generate("--preset", "tiny", "--seed", seed, cwd=tmp_path)
    assert_refused(result, f"argument --seed: must lie in 0..4294967295, or be -1 for a random seed; got {seed}")
    assert "Overflow" not in result.stderr


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--cfg-rescale", "1.5"], "--cfg-rescale must lie in 0..1, got 1.5"),
        (["--cfg-rescale", "0.7", "--scale", "1"], "at --scale 1 there is no guidance"),
    ],
)
def test_a_cfg_rescale_that_cannot_apply_is_refused_and_writes_nothing(tmp_path, options, message):
    assert_refused(generate("--preset", "tiny", *options, cwd=tmp_path), message)
    assert not (tmp_path / "out").exists()


def test_a_wrong_model_path_fails_before_any_model_is_built_and_leaves_no_folder(tmp_path):
    result = generate("--model", "nowhere.safetensors", cwd=tmp_path)
    assert_refused(result, "nai-fast generate: error: --model nowhere.safetensors: no such file or folder")
    assert not (tmp_path / "out").exists()
    # Checked before torch is even imported, so certainly before a model is built.
    code = (
        "import sys\nfrom nai_fast.cli import main\n"
        "try:\n    main(['generate', '--model', 'nowhere.safetensors', '--prompt', 'x', '--output-dir', 'out'])\n"
        "except SystemExit as exit:\n    assert exit.code == 2, exit.code\n"
        "heavy = {'torch', 'diffusers', 'transformers'} & set(sys.modules)\nassert not heavy, heavy\n"
    )
    environment = os.environ | {"PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=environment, check=True, capture_output=True)


# -- textual-inversion embeddings (issue #14) -----------------------------------------------------


def test_a_missing_embeddings_dir_is_an_argument_error_before_anything_loads(tmp_path):
    result = generate("--preset", "tiny", "--embeddings-dir", "nowhere", cwd=tmp_path)
    assert_refused(result, "nai-fast generate: error: --embeddings-dir nowhere: no such file or folder")
    (tmp_path / "a-file.pt").write_bytes(b"")
    result = generate("--preset", "tiny", "--embeddings-dir", "a-file.pt", cwd=tmp_path)
    assert_refused(result, "nai-fast generate: error: --embeddings-dir a-file.pt: not a folder")
    assert not (tmp_path / "out").exists()
    code = (
        "import sys\nfrom nai_fast.cli import main\n"
        "try:\n    main(['generate', '--preset', 'tiny', '--embeddings-dir', 'nowhere', '--prompt', 'x'])\n"
        "except SystemExit as exit:\n    assert exit.code == 2, exit.code\n"
        "heavy = {'torch', 'diffusers', 'transformers'} & set(sys.modules)\nassert not heavy, heavy\n"
    )
    environment = os.environ | {"PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=environment, check=True, capture_output=True)


def test_an_embedding_for_another_model_is_refused_naming_its_file(tmp_path):
    import torch

    (tmp_path / "embeddings").mkdir()
    torch.save({"string_to_param": {"*": torch.randn(2, 768)}, "name": "sd1-style", "step": 10},
               tmp_path / "embeddings" / "sd1-style.pt")  # fmt: skip
    result = generate("--preset", "tiny", "--embeddings-dir", "embeddings", cwd=tmp_path, prompt="sd1-style, a cat")
    assert_refused(result, "embedding 'sd1-style' (embeddings/sd1-style.pt) has vectors of width 768, but this text "
                   "encoder's are 32 wide")  # fmt: skip
    assert not (tmp_path / "out").exists()


def test_embeddings_from_several_dirs_are_used_by_name(tmp_path):
    import torch
    from safetensors.torch import save_file

    for folder in ("one", "two"):
        (tmp_path / folder).mkdir()
    save_file({"emb_params": torch.randn(2, 32)}, tmp_path / "one" / "style.safetensors")  # the tiny model's width
    save_file({"<token>": torch.randn(32)}, tmp_path / "two" / "learned_embeds.safetensors")
    result = generate("--preset", "tiny", "--seed", "1", "--embeddings-dir", "one", "--embeddings-dir", "two",
                      cwd=tmp_path, prompt="(style:1.2), learned_embeds, a cat")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "embeddings (2): style, learned_embeds" in result.stderr
    (path,) = result.stdout.split()
    assert (tmp_path / path).is_file()
