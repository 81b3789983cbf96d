"""The fidelity detector against the demo set's own drawings, and the measure's smoke run."""

import json
import subprocess

import numpy as np
import pytest
from console_script import console_script

from nai_fast.demo.fidelity import ATTRIBUTES, FidelityReport, detect, evaluate, outline_visible, random_scenes
from nai_fast.engine.demo_data import COLORS, SIZES, Scene


@pytest.mark.parametrize("outline", [False, True], ids=["plain", "outline"])
def test_the_detector_reads_the_demo_sets_own_drawings(outline):
    scenes = random_scenes(400, seed=7)
    right = {attribute: 0 for attribute in ATTRIBUTES}
    outlines = []
    for index, scene in enumerate(scenes):
        width, height = SIZES[index % len(SIZES)]
        detection = detect(scene.render(width, height, outline=outline))
        for attribute, ok in detection.matches(scene).items():
            right[attribute] += ok
        if outline_visible(scene):
            outlines.append(detection.outline)
        else:
            assert not detection.outline  # black on black shows nothing
    assert right == {attribute: len(scenes) for attribute in ATTRIBUTES}
    assert len(outlines) > 200 and all(outlines) == outline and any(outlines) == outline


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
    assert (detection.background, detection.color, detection.position, detection.outline) == ("blue", None, None, False)


def test_a_report_counts_each_attribute_and_the_outline_only_where_it_can_show():
    red_on_blue = Scene("red", "circle", True, "blue", "top left")
    black_on_blue = Scene("black", "square", False, "blue", "center")
    report = FidelityReport()
    report.rows.append((red_on_blue, (128, 128), detect(red_on_blue.render(128, 128, outline=True))))
    report.rows.append((black_on_blue, (128, 192), detect(Scene("red", "square", False, "blue", "center").render(128, 192))))
    assert report.rate("background") == 1.0
    assert report.rate("color") == 0.5 and report.rate("color", (128, 128)) == 1.0
    assert report.rate("position") == 1.0
    assert report.rate("outline") == 1.0  # the black square's row cannot show an outline
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
    assert len(list((tmp_path / "shuffled").glob("*.png"))) == 6


def test_nai_fast_eval_checks_its_sizes_before_loading_a_model(capsys):
    from nai_fast.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["eval", "--size", "128x100"])
    assert exited.value.code == 2
    assert "--size 128x100: height must be a positive multiple of 64, got 100" in capsys.readouterr().err
