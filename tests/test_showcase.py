"""`nai-fast demo`: the contact sheet, the PNGs and the measured presence of the style."""

import subprocess

import pytest
from console_script import console_script
from PIL import Image

from nai_fast.hypernetworks.modules import Hypernetwork


@pytest.mark.slow
def test_nai_fast_demo_writes_the_sheet_and_the_pngs_and_prints_both_rows(tmp_path):
    network = tmp_path / "style.safetensors"
    Hypernetwork(widths=(32, 64), activation="relu", weight_init="XavierNormal").save(network)
    result = subprocess.run(
        [console_script(), "demo", "--hypernetwork", str(network), "--output-dir", str(tmp_path / "out"), "--prompts", "1"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "without hypernetwork" in result.stdout and "with hypernetwork" in result.stdout
    with Image.open(tmp_path / "out" / "contact-sheet.png") as sheet:
        assert sheet.width > 6 * 128 and 2 * 192 < sheet.height < 3 * 192  # six columns, two rows
    for row in ("without", "with"):
        pngs = sorted((tmp_path / "out" / row).glob("*.png"))
        assert len(pngs) == 6
        with Image.open(pngs[0]) as image:
            assert "Steps: 20, Sampler: Euler a" in image.text["parameters"]
    with Image.open(sorted((tmp_path / "out" / "with").glob("*.png"))[0]) as image:
        assert "<hypernet:style:1>" in image.text["parameters"]


def test_nai_fast_demo_without_a_trained_hypernetwork_says_how_to_train_one(tmp_path):
    result = subprocess.run(
        [console_script(), "demo", "--hypernetwork", str(tmp_path / "absent.safetensors")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "nai-fast train --preset tiny" in result.stderr
