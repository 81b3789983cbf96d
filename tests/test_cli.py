"""The `nai-fast` command line and the package's import weight."""

import json
import subprocess
import sys

import pytest
from console_script import console_script
from PIL import Image

from nai_fast.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    return code, capsys.readouterr().out


def test_buckets_on_the_builtin_sample(capsys):
    code, out = run(capsys, "buckets")
    assert code == 0
    assert "built-in sample" in out and "512x512" in out and "batches per epoch" in out
    assert "catch-all batches" in out


def test_buckets_json_accounts_for_every_image(capsys):
    code, out = run(capsys, "buckets", "--json", "--batch-size", "8", "--world-size", "4")
    figures = json.loads(out)
    assert code == 0
    assert figures["assigned"] + figures["pruned_aspect"] == figures["images"] == 20000
    assert sum(row["images"] for row in figures["buckets"]) == figures["assigned"]
    assert figures["batches_per_epoch"] == figures["assigned"] // 32
    assert figures["catchall_mean_crop"] < figures["catchall_mean_crop_square"]


def test_buckets_on_a_folder_with_a_plot(tmp_path, capsys):
    for index, size in enumerate([(512, 768), (768, 512), (600, 600), (100, 2000)]):
        Image.new("RGB", size, "white").save(tmp_path / f"{index}.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG but not really")
    chart = tmp_path / "chart.png"
    code, out = run(capsys, "buckets", str(tmp_path), "--batch-size", "1", "--json", "--plot", str(chart))
    figures = json.loads(out)
    assert code == 0
    assert figures["files"] == 5 and figures["unreadable"] == {"not_image": 1}
    assert figures["skipped"] == [{"path": "broken.png", "reason": "not_image"}]
    assert figures["assigned"] == 3 and figures["pruned_aspect"] == 1  # 1:20 is too far from 1:4
    with Image.open(chart) as image:
        assert image.size[0] > 300


def test_buckets_names_skipped_files(tmp_path, capsys):
    Image.new("RGB", (512, 512), "white").save(tmp_path / "fine.png")
    for index in range(12):
        (tmp_path / f"broken{index:02}.png").write_bytes(b"\x89PNG but not really")
    (tmp_path / "empty.jpg").write_bytes(b"")
    code, out = run(capsys, "buckets", str(tmp_path), "--batch-size", "1")
    assert code == 0
    assert "skipped files (first 10 of 13; --json lists all):" in out
    assert "  empty.jpg: empty\n" in out and "  broken00.png: not_image\n" in out
    assert "broken09.png" not in out  # the 10th shown is broken08 after empty.jpg
    code, out = run(capsys, "buckets", str(tmp_path), "--batch-size", "1", "--json")
    skipped = json.loads(out)["skipped"]
    assert len(skipped) == 13 and {"path": "broken11.png", "reason": "not_image"} in skipped


def test_buckets_on_a_folder_without_images(tmp_path):
    (tmp_path / "notes.txt").write_text("no pictures here")
    result = subprocess.run([console_script(), "buckets", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr == f"no images found under {tmp_path}\n"
    assert result.stdout == ""


def test_missing_folder_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["buckets", str(tmp_path / "nowhere")])
    assert exit_info.value.code == 2
    assert "not a directory" in capsys.readouterr().err


def test_console_script_is_installed():
    out = subprocess.run([console_script(), "--version"], capture_output=True, text=True, check=True).stdout
    assert out.startswith("nai_fast ")


def test_importing_the_package_stays_light():
    code = (
        "import sys, nai_fast, nai_fast.data.buckets, nai_fast.data.report, nai_fast.data.sample, nai_fast.text,"
        " nai_fast.text.prompts, nai_fast.engine.config;"
        "heavy = {'torch', 'diffusers', 'transformers', 'PIL', 'matplotlib'} & set(sys.modules);"
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_train_help_stays_light():
    """`nai-fast train --help` builds its options from TrainConfig (engine/config.py) without torch
    (NumPy comes with the buckets command's presets)."""
    code = (
        "import sys\n"
        "from nai_fast.cli import main\n"
        "try:\n    main(['train', '--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = {'torch', 'diffusers', 'transformers', 'PIL'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert "--weight-decay" in out and "--no-shuffle-tags" in out
