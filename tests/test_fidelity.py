"""The fidelity detector against the demo set's own drawings, and the measure's smoke run."""

import json
import subprocess

import numpy as np
import pytest
from console_script import console_script

from nai_fast.demo.fidelity import (
    ATTRIBUTES,
    STYLE,
    FidelityReport,
    detect,
    evaluate,
    hue_shift_visible,
    random_scenes,
)
from nai_fast.engine.demo_data import COLORS, HUE_SHIFT, SIZES, Scene


@pytest.mark.parametrize("styled", [False, True], ids=["plain", "hue-shifted"])
def test_the_detector_reads_the_demo_sets_own_drawings(styled):
    scenes = random_scenes(400, seed=7)
    report = FidelityReport(styled=styled)
    for index, scene in enumerate(scenes):
        size = SIZES[index % len(SIZES)]
        report.rows.append((scene, size, detect((scene.hue_shifted() if styled else scene).render(*size))))
    assert {attribute: report.rate(attribute) for attribute in ATTRIBUTES} == dict.fromkeys(ATTRIBUTES, 1.0)
    assert report.rate(STYLE) == float(styled)
    assert sum(hue_shift_visible(scene) for scene in scenes) > 250  # 5 of 7 backgrounds have a hue


def test_the_hue_shift_turns_each_hue_to_the_next_and_keeps_white_and_black():
    hues = ["red", "yellow", "green", "blue", "purple"]
    assert [HUE_SHIFT[hue] for hue in hues] == hues[1:] + hues[:1]
    assert HUE_SHIFT["white"] == "white" and HUE_SHIFT["black"] == "black" and set(HUE_SHIFT) == set(COLORS)
    assert not hue_shift_visible(Scene("red", "circle", True, "white", "center"))


def test_the_detector_tolerates_blur_and_noise():
    from PIL import ImageFilter

    rng = np.random.default_rng(0)
    scenes = random_scenes(100, seed=3)
    right = 0
    for scene in scenes:
        blurred = scene.render(128, 192).filter(ImageFilter.GaussianBlur(2))
        noisy = np.clip(np.asarray(blurred, dtype=np.float32) + rng.normal(0, 12, (192, 128, 3)), 0, 255)
        right += all(detect(noisy.astype(np.uint8)).matches(scene).values())
    assert right >= 97


def test_an_empty_picture_has_no_shape():
    flat = Scene("red", "circle", True, "blue", "center").render(64, 64)
    flat.paste(COLORS["blue"], (0, 0, 64, 64))
    detection = detect(flat)
    assert (detection.background, detection.color, detection.position) == ("blue", None, None)


def test_a_report_counts_each_attribute_and_the_hue_shift_only_where_it_can_show():
    red_on_blue = Scene("red", "circle", True, "blue", "top left")
    black_on_blue = Scene("black", "square", False, "blue", "center")
    red_on_white = Scene("red", "circle", False, "white", "center")
    report = FidelityReport()
    report.rows.append((red_on_blue, (128, 128), detect(red_on_blue.render(128, 128))))
    report.rows.append((black_on_blue, (128, 192), detect(Scene("red", "square", False, "purple", "center").render(128, 192))))
    report.rows.append((red_on_white, (128, 128), detect(red_on_white.hue_shifted().render(128, 128))))
    assert report.rate("background") == 2 / 3 and report.rate("background", (128, 192)) == 0.0
    assert report.rate("color") == 1 / 3 and report.rate("color", (128, 128)) == 0.5
    assert report.rate("position") == 1.0
    assert report.rate(STYLE) == 0.5  # blue drawn purple, as the style would; the white row cannot show it
    report.styled = True  # now the rows are judged against the scenes as the style draws them
    assert report.rate("background", (128, 192)) == 1.0 and report.rate("background", (128, 128)) == 0.5
    assert report.rate("color") == 1 / 3 and report.rate(STYLE) == 0.5  # the black square was drawn red
    assert json.loads(json.dumps(report.as_dict()))["by_size"]["128x192"]["color"] == 0.0


def test_shuffled_prompts_hold_the_same_tags():
    seen = []
    scenes = random_scenes(3, seed=1)

    def on_image(index, size, generated):
        seen.append(generated.parameters.prompt)

    from nai_fast.models.load import load_model

    model = load_model("tiny-random")
    evaluate(model, scenes, [(128, 128)], shuffled=True, steps=1, progress=False, on_image=on_image)
    assert [sorted(prompt.split(", ")) for prompt in seen] == [sorted(scene.tags) for scene in scenes]
    assert [prompt.split(", ") for prompt in seen] != [scene.tags for scene in scenes]


@pytest.mark.slow
def test_nai_fast_eval_runs_on_a_few_prompts(tmp_path):
    result = subprocess.run(
        [console_script(), "eval", "--prompts", "2", "--steps", "2", "--json", "--images-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
    )
    report = json.loads(result.stdout)
    assert set(report) == {"written", "shuffled"}
    assert report["written"]["images"] == 6 and set(report["written"]["by_size"]) == {"128x128", "128x192", "192x128"}
    assert all(0.0 <= report[order][attribute] <= 1.0 for order in report for attribute in ATTRIBUTES)
    assert report["written"]["styled"] is False and STYLE in report["written"]
    assert len(list((tmp_path / "shuffled").glob("*.png"))) == 6


def test_nai_fast_eval_checks_its_sizes_before_loading_a_model(capsys):
    from nai_fast.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["eval", "--size", "128x100"])
    assert exited.value.code == 2
    assert "--size 128x100: height must be a positive multiple of 64, got 100" in capsys.readouterr().err
