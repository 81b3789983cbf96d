"""The training engine (nai_fast.engine.train), its captions and checkpoint files, and ``nai-fast train``.

Every run uses the tiny preset (built once per module, deep-copied per run), 64-96 px
images at a 64 px base bucket, and a handful of steps. Torch runs on one thread: on
shared cores more threads only fight each other.
"""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import json
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time
import typing
from pathlib import Path

import numpy as np
import pytest
import torch
from console_script import console_script
from PIL import Image

from nai_fast.engine import checkpoint
from nai_fast.engine import train as train_module
from nai_fast.engine import train_state
from nai_fast.engine.config import add_train_options
from nai_fast.engine.captions import CaptionAugmenter, CaptionPolicy, split_tags
from nai_fast.engine.demo_data import make_demo_dataset
from nai_fast.engine.train_state import atomic_write, load_state, save_state
from nai_fast.cli import main
from nai_fast.hypernetworks.modules import Hypernetwork
from nai_fast.engine.stop import Aborted
from nai_fast.engine.train import DEMO_DATA_DIR, STATE_FILE, RunExists, TrainConfig, TrainingDiverged, TrainingInterrupted, train

pytestmark = pytest.mark.slow  # real training runs, several processes

REPO = Path(__file__).resolve().parents[1]
SIZES = ((64, 64), (64, 96), (96, 64))
COLORS = ("red", "green", "blue", "yellow")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny():
    from nai_fast.models.load import load_model

    return load_model("tiny")


def write_images(folder: Path, count: int, seed: int = 0) -> Path:
    """``count`` small PNGs with tag files: a coloured square on a coloured background."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(count):
        width, height = SIZES[index % len(SIZES)]
        color, background = rng.choice(len(COLORS), size=2, replace=False)
        pixels = np.zeros((height, width, 3), dtype=np.uint8)
        pixels[:] = rng.integers(0, 256, 3)
        pixels[height // 4 : height // 2, width // 4 : width // 2] = rng.integers(0, 256, 3)
        Image.fromarray(pixels).save(folder / f"{index:03d}.png")
        tags = f"{COLORS[color]} square, {COLORS[background]} background, small, shape {index}"
        (folder / f"{index:03d}.txt").write_text(tags, encoding="utf-8")
    return folder


def truncate(path: Path) -> None:
    """Keep the PNG header (the scan reads the size from it) but cut the pixels: loading fails."""
    path.write_bytes(path.read_bytes()[:200])


def make_config(tmp_path: Path, data: Path, **changes) -> TrainConfig:
    options = dict(
        data=str(data),
        output_dir=str(tmp_path / "out"),
        max_steps=2,
        batch_size=2,
        resolution=64,
        save_every=0,
        progress=False,
        tensorboard=False,
    )
    return TrainConfig(**(options | changes))


def log_rows(output_dir: str | Path) -> list[dict[str, str]]:
    with open(Path(output_dir) / "training_log.csv", newline="") as file:
        return list(csv.DictReader(file))


def state_dicts_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def child_environment() -> dict[str, str]:
    """For a child process: this checkout's package, and one thread (as here, so results match bit for bit)."""
    return os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


# Captions


def augmenter(**policy) -> CaptionAugmenter:
    from nai_fast.text.tokenizer import load_tokenizer

    tokenizer = load_tokenizer()
    return CaptionAugmenter(CaptionPolicy(**policy), lambda text: tokenizer.encode(text, add_special_tokens=False))


LONG_CAPTION = ", ".join(f"tag number {i} with several words" for i in range(60))  # ~420 tokens


def test_captions_keep_leading_tags_and_vary_in_length_within_the_limit():
    captions = augmenter(keep_tokens=2, min_tokens=50, max_tokens=225)
    tags = split_tags(LONG_CAPTION)
    lengths, orders = [], set()
    for item in range(40):
        caption = captions(LONG_CAPTION, epoch=0, item=item)
        kept = split_tags(caption)
        assert kept[:2] == tags[:2]
        assert set(kept) <= set(tags) and len(set(kept)) == len(kept)
        lengths.append(captions.token_count(kept))
        orders.add(tuple(kept[2:5]))
    assert max(lengths) <= 225 and min(lengths) <= 75  # from under one chunk to at most three
    assert max(lengths) > 150
    assert len(orders) > 30  # shuffled


def test_captions_are_a_function_of_seed_epoch_and_item():
    captions = augmenter(dropout=0.3)
    first = [captions(LONG_CAPTION, epoch, item) for epoch in range(3) for item in range(10)]
    again = [captions(LONG_CAPTION, epoch, item) for epoch in range(3) for item in range(10)]
    assert first == again
    assert len(set(first)) > 10
    assert 0 < first.count("") < len(first)  # dropout


def test_short_captions_are_kept_whole_without_shuffle():
    captions = augmenter(shuffle=False)
    assert captions("red circle, blue background, top left", 0, 0) == "red circle, blue background, top left"


def test_caption_token_count_matches_the_tokenizer():
    from nai_fast.text.tokenizer import load_tokenizer

    tokenizer = load_tokenizer()
    captions = augmenter()
    tags = ["red circle", "blue background", "1girl", "long hair (braided)"]
    assert captions.token_count(tags) == len(tokenizer.encode(", ".join(tags), add_special_tokens=False))


# Buckets


# Atomic files


def test_atomic_write_replaces_whole_files_and_cleans_up_after_a_failure(tmp_path):
    target = tmp_path / "state.pt"
    save_state({"step": 1}, target)

    def fail_half_way(temporary: Path) -> None:
        temporary.write_bytes(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, fail_half_way)
    assert load_state(target) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.pt"]


def test_random_states_round_trip_through_a_weights_only_state(tmp_path):
    import random

    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    save_state({"rng": train_state.rng_states()}, tmp_path / "s.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(4)
    np.random.seed(4)
    random.seed(4)
    train_state.restore_rng_states(load_state(tmp_path / "s.pt")["rng"])
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]


# Training runs


def test_hypernetwork_training_writes_loadable_files_and_leaves_the_model_alone(tmp_path, tiny):
    data = write_images(tmp_path / "data", 6)
    model = copy.deepcopy(tiny)
    result = train(make_config(tmp_path, data, max_steps=3, save_every=2, record_items=True), model=model)

    out = tmp_path / "out"
    assert result.steps == 3 and len(result.losses) == 3 and np.isfinite(result.losses).all()
    assert {p.name for p in result.paths} == {"hypernetwork.safetensors", "hypernetwork.pt", STATE_FILE}
    trained = result.hypernetwork.state_dict()
    for name in ("hypernetwork.safetensors", "hypernetwork.pt"):
        loaded = Hypernetwork.load(out / name)
        assert loaded.step == 3 and loaded.widths == (32, 64)
        assert state_dicts_equal(loaded.state_dict(), trained)
    assert torch.load(out / "hypernetwork.pt", weights_only=True)["layer_structure"] == [1.0, 2.0, 1.0]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        initial = Hypernetwork((32, 64))
    assert not state_dicts_equal(initial.state_dict(), trained)  # it learned something
    for name in ("unet", "vae", "text_encoder"):  # frozen: not a bit changed
        assert state_dicts_equal(getattr(model, name).state_dict(), getattr(tiny, name).state_dict())
    assert model.unet.attn_processors.keys() == tiny.unet.attn_processors.keys()
    assert not any("Hypernetwork" in type(p).__name__ for p in model.unet.attn_processors.values())
    assert [row["step"] for row in log_rows(out)] == ["1", "2", "3"]
    assert all(len(items) == 2 for items in result.trained_items)
    assert result.skipped_files == {} and result.skipped_steps == 0 and result.empty_batches == 0


def test_finetuning_writes_unet_and_ema_weights(tmp_path, tiny):
    import safetensors.torch

    data = write_images(tmp_path / "data", 4)
    model = copy.deepcopy(tiny)
    result = train(make_config(tmp_path, data, mode="finetune", ema=True, ema_decay=0.5, lr=1e-3), model=model)

    out = tmp_path / "out"
    assert not (out / "hypernetwork.safetensors").exists()
    trained = safetensors.torch.load_file(out / "unet.safetensors")
    ema = safetensors.torch.load_file(out / "unet_ema.safetensors")
    original = tiny.unet.state_dict()
    assert trained.keys() == original.keys() == ema.keys()
    assert state_dicts_equal(trained, {k: v for k, v in model.unet.state_dict().items()})
    assert not state_dicts_equal(trained, original)
    assert not state_dicts_equal(ema, trained) and not state_dicts_equal(ema, original)
    assert state_dicts_equal(model.vae.state_dict(), tiny.vae.state_dict())
    assert result.hypernetwork is None and result.steps == 2


@pytest.mark.parametrize(("mode", "lr", "ratio"), [("hypernetwork", 1e-2, 0.85), ("finetune", 1e-3, 0.1)])
def test_loss_falls_when_overfitting_one_image(tmp_path, tiny, mode, lr, ratio):
    data = write_images(tmp_path / "data", 1)
    config = make_config(tmp_path, data, mode=mode, lr=lr, batch_size=1, max_steps=30, fixed_noise=True)
    losses = train(config, model=copy.deepcopy(tiny)).losses
    assert len(losses) == 30
    assert losses[-1] < ratio * losses[0]


def test_gradient_checkpointing_trains_the_same_weights(tmp_path, tiny):
    data = write_images(tmp_path / "data", 2)
    models = {flag: copy.deepcopy(tiny) for flag in (False, True)}
    plain, checkpointed = (
        train(
            make_config(tmp_path / str(flag), data, lr=1e-3, gradient_checkpointing=flag), model=model
        ).hypernetwork.state_dict()
        for flag, model in models.items()
    )
    assert any(getattr(module, "gradient_checkpointing", False) for module in models[True].unet.modules())
    assert all(torch.allclose(plain[k], checkpointed[k], rtol=0, atol=1e-6) for k in plain)


def test_bf16_autocast_and_v_prediction_train(tmp_path, tiny):
    from diffusers import DDPMScheduler

    data = write_images(tmp_path / "data", 2)
    model = copy.deepcopy(tiny).with_scheduler(
        DDPMScheduler.from_config(tiny.scheduler.config, prediction_type="v_prediction")
    )
    result = train(make_config(tmp_path, data, mixed_precision="bf16", mode="finetune"), model=model)
    assert result.steps == 2 and np.isfinite(result.losses).all()


def test_noise_offset_shifts_each_images_noise_per_channel(tmp_path, tiny, monkeypatch):
    """Offset noise: the noise's mean over each latent channel spreads as wide as the offset says."""
    data = write_images(tmp_path / "data", 4)
    spreads = {}
    for offset in (0.0, 1.0):
        model = copy.deepcopy(tiny)
        noises = []
        add_noise = model.scheduler.add_noise
        monkeypatch.setattr(model.scheduler, "add_noise", lambda x, noise, t: noises.append(noise) or add_noise(x, noise, t))
        train(make_config(tmp_path / str(offset), data, batch_size=4, max_steps=4, noise_offset=offset), model=model)
        means = torch.cat(noises).mean(dim=(2, 3))  # (images, channels), over 8x8 latents or more
        spreads[offset] = means.std().item()
    assert spreads[0.0] < 0.25  # 1/8 expected: the mean of at least 64 standard normal draws
    assert 0.6 < spreads[1.0] < 1.5
    with pytest.raises(ValueError, match="noise_offset must be at least 0"):
        TrainConfig(noise_offset=-0.1)


def test_sample_images_are_written_with_their_parameters(tmp_path, tiny):
    pytest.importorskip("nai_fast.engine.generate")
    data = write_images(tmp_path / "data", 2)
    config = make_config(
        tmp_path, data, max_steps=1, sample_every=1, sample_steps=2, sample_prompts=("red square", "blue square")
    )
    result = train(config, model=copy.deepcopy(tiny))
    samples = sorted((tmp_path / "out" / "samples").iterdir())
    assert [p.name for p in samples] == ["step000001-0.png", "step000001-1.png"]
    assert set(samples) <= set(result.paths)
    with Image.open(samples[1]) as image:
        assert image.size == (64, 64) and image.text["parameters"].startswith("blue square")


@pytest.mark.parametrize(
    "changes",
    [
        dict(mode="hypernetwork", hypernetwork_dropout=0.2, caption_dropout=0.3, workers=1),  # global RNG restored
        dict(mode="finetune", ema=True, grad_accum=2, lr_schedule="cosine", cache_latents=True),
    ],
    ids=["hypernetwork", "finetune"],
)
def test_resuming_gives_the_same_weights_as_one_run(tmp_path, tiny, changes):
    data = write_images(tmp_path / "data", 3)  # 3 batches of 1 an epoch: runs cross epochs, resume mid-epoch
    common = dict(batch_size=1, lr=1e-3, warmup_steps=2, save_every=2, max_steps=5) | changes

    whole = train(make_config(tmp_path / "whole", data, **common), model=copy.deepcopy(tiny))
    # The first part stops at step 2 as if killed after its checkpoint; the schedule still spans 5 steps.
    first = make_config(tmp_path / "parts", data, **common)
    original_loop = train_module._Run._train_loop

    def stop_after_two(run):
        run.config.max_steps, target = 2, run.config.max_steps
        try:
            original_loop(run)
        finally:
            run.config.max_steps = target

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_module._Run, "_train_loop", stop_after_two)
        train(first, model=copy.deepcopy(tiny))
    resumed_model = copy.deepcopy(tiny)
    rest = train(make_config(tmp_path / "parts", data, resume=True, **common), model=resumed_model)

    assert rest.steps == 5 and len(rest.losses) == 3
    assert rest.losses == whole.losses[2:]
    whole_state = load_state(tmp_path / "whole" / "out" / STATE_FILE)
    parts_state = load_state(tmp_path / "parts" / "out" / STATE_FILE)
    assert state_dicts_equal(whole_state["trainable"], parts_state["trainable"])
    if changes["mode"] == "finetune":
        assert all(torch.equal(a, b) for a, b in zip(whole_state["ema"]["shadow"], parts_state["ema"]["shadow"]))
    assert whole_state["sampler"] == parts_state["sampler"]
    assert [row["loss"] for row in log_rows(tmp_path / "parts" / "out")] == [
        row["loss"] for row in log_rows(tmp_path / "whole" / "out")
    ]


@pytest.mark.parametrize("failing", ["training_state", "hypernetwork"])
def test_an_interrupted_checkpoint_write_keeps_the_previous_checkpoint(tmp_path, tiny, monkeypatch, failing):
    data = write_images(tmp_path / "data", 4)
    real_save = torch.save
    calls = {"count": 0}

    def save_then_die_at_the_second_checkpoint(obj, path, *args, **kwargs):
        if failing in Path(path).name:
            calls["count"] += 1
            if calls["count"] == 2:
                Path(path).write_bytes(b"half a checkpoint")
                raise OSError("killed while writing")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_then_die_at_the_second_checkpoint)
    with pytest.raises(OSError, match="killed while writing"):
        train(make_config(tmp_path, data, max_steps=4, save_every=2), model=copy.deepcopy(tiny))

    out = tmp_path / "out"
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary file left
    assert load_state(out / STATE_FILE)["step"] == 2
    assert Hypernetwork.load(out / "hypernetwork.pt").step == (2 if failing == "hypernetwork" else 4)
    assert Hypernetwork.load(out / "hypernetwork.safetensors").step == 4  # written before the failing file


def test_a_signal_during_a_periodic_save_stops_at_that_checkpoint(tmp_path, tiny, monkeypatch):
    data = write_images(tmp_path / "data", 3)
    common = dict(batch_size=1, lr=1e-3, save_every=2, hypernetwork_dropout=0.2)
    whole = train(make_config(tmp_path / "whole", data, max_steps=4, **common), model=copy.deepcopy(tiny))
    real_save = train_module._Run._save_checkpoint
    saved_at = []

    def save_with_sigterm(run):
        saved_at.append(run.step)
        os.kill(os.getpid(), signal.SIGTERM)  # a scheduler's, while the checkpoint is being written
        real_save(run)

    monkeypatch.setattr(train_module._Run, "_save_checkpoint", save_with_sigterm)
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingInterrupted) as stopped:
        train(make_config(tmp_path / "parts", data, max_steps=100, **common), model=copy.deepcopy(tiny))
    assert signal.getsignal(signal.SIGTERM) is handler
    assert (stopped.value.signal, stopped.value.step, stopped.value.exit_code) == (signal.SIGTERM, 2, 143)
    assert "resume=True" in str(stopped.value)
    assert saved_at == [2]  # that save is the checkpoint; no second one, no step 3
    monkeypatch.undo()
    parts = train(make_config(tmp_path / "parts", data, max_steps=4, resume=True, **common), model=copy.deepcopy(tiny))
    assert parts.losses == whole.losses[2:]
    assert state_dicts_equal(parts.hypernetwork.state_dict(), whole.hypernetwork.state_dict())


@pytest.mark.parametrize("failing", ["hypernetwork", "training_state"])
def test_a_second_ctrl_c_while_saving_stops_at_once_keeping_the_last_checkpoint(tmp_path, tiny, monkeypatch, failing):
    data = write_images(tmp_path / "data", 4)
    out = tmp_path / "out"
    config = make_config(tmp_path, data, max_steps=10, batch_size=1, save_every=2)
    real_accumulate, real_save, real_write = (
        train_module._Run._accumulate,
        train_module._Run._save_checkpoint,
        train_state.atomic_write,
    )
    asked, before_the_save = [], {}

    def ctrl_c_during_step_3(run, batches):
        if run.step == 2 and not asked:
            asked.append(signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return real_accumulate(run, batches)

    def save(run):
        if asked:  # the save the stop asks for: the folder as it was before it
            before_the_save.update(folder_bytes(out))
        real_save(run)

    def write(path, writer):
        def write_then_ctrl_c(temporary):
            writer(temporary)
            os.kill(os.getpid(), signal.SIGINT)  # again, with this file half done
            raise AssertionError("the second SIGINT did not stop the save")

        return real_write(path, write_then_ctrl_c if asked and failing in Path(path).name else writer)

    monkeypatch.setattr(train_module._Run, "_accumulate", ctrl_c_during_step_3)
    monkeypatch.setattr(train_module._Run, "_save_checkpoint", save)
    monkeypatch.setattr(checkpoint, "atomic_write", write)  # the weight files'
    monkeypatch.setattr(train_state, "atomic_write", write)  # save_state's
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(Aborted) as aborted:
        train(config, model=copy.deepcopy(tiny))

    assert aborted.value.exit_code == 130
    assert signal.getsignal(signal.SIGINT) is handler  # put back
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary file left
    after = folder_bytes(out)
    assert after[STATE_FILE] == before_the_save[STATE_FILE] and load_state(out / STATE_FILE)["step"] == 2
    # The weight files go before training_state.pt, which commits them; a save stopped at it has replaced them.
    for name in ("hypernetwork.safetensors", "hypernetwork.pt"):
        if failing == "hypernetwork":
            assert after[name] == before_the_save[name]
        else:
            assert Hypernetwork.load(out / name).step == 3
    monkeypatch.undo()
    resume = make_config(tmp_path, data, max_steps=4, batch_size=1, save_every=2, resume=True)
    resumed = train(resume, model=copy.deepcopy(tiny))
    assert resumed.steps == 4 and len(resumed.losses) == 2


def nan_after(calls: int, count: int | None = None):
    """A stand-in for the diffusion loss: NaN from call ``calls`` + 1, for ``count`` calls (None: ever after)."""
    real = train_module._prediction_loss
    seen = {"calls": 0}

    def loss(prediction, target):
        seen["calls"] += 1
        value = real(prediction, target)
        bad = seen["calls"] > calls and (count is None or seen["calls"] <= calls + count)
        return value * float("nan") if bad else value

    return loss


def test_a_non_finite_loss_skips_the_step(tmp_path, tiny, monkeypatch):
    data = write_images(tmp_path / "data", 4)
    monkeypatch.setattr(train_module, "_prediction_loss", nan_after(1, count=1))
    model = copy.deepcopy(tiny)
    result = train(make_config(tmp_path, data, max_steps=3, batch_size=1), model=model)
    assert result.steps == 3 and result.skipped_steps == 1
    assert np.isfinite(result.losses).all()
    assert all(torch.isfinite(p).all() for p in result.hypernetwork.parameters())
    assert [row["skipped_steps"] for row in log_rows(tmp_path / "out")] == ["0", "1", "1"]


def test_non_finite_losses_in_a_row_stop_the_run_keeping_the_last_checkpoint(tmp_path, tiny, monkeypatch):
    data = write_images(tmp_path / "data", 4)
    monkeypatch.setattr(train_module, "_prediction_loss", nan_after(2))
    config = make_config(tmp_path, data, max_steps=10, batch_size=1, save_every=2, max_consecutive_skips=3)
    with pytest.raises(TrainingDiverged, match="not finite for 3 steps in a row") as raised:
        train(config, model=copy.deepcopy(tiny))
    assert STATE_FILE in str(raised.value)
    out = tmp_path / "out"
    assert load_state(out / STATE_FILE)["step"] == 2
    saved = Hypernetwork.load(out / "hypernetwork.safetensors")
    assert saved.step == 2 and all(torch.isfinite(p).all() for p in saved.parameters())


def test_an_empty_batch_is_skipped_and_its_file_reported(tmp_path, tiny, caplog):
    data = write_images(tmp_path / "data", 4)
    truncate(data / "002.png")
    # Epoch 0 is 4 batches of 1 with 3 good ones: 4 steps take all of it and go on into epoch 1.
    config = make_config(tmp_path, data, max_steps=4, batch_size=1, record_items=True)
    with caplog.at_level("WARNING", logger="nai_fast.engine.train"):
        result = train(config, model=copy.deepcopy(tiny))
    empties = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped an empty batch")]
    assert result.steps == 4 and result.empty_batches == len(empties) >= 1
    assert "epoch 0" in empties[0]
    assert result.skipped_files == {"OSError: image file is truncated": 1}  # once, however often it failed
    trained = [item for step in result.trained_items for item in step]
    assert sorted(trained[:3]) == ["000.png", "001.png", "003.png"] and "002.png" not in trained
    assert log_rows(tmp_path / "out")[-1]["skipped"] == "1"


DDP_SCRIPT = """
import json, os, sys
import torch
from nai_fast.models.load import load_model
from nai_fast.engine.train import TrainConfig, train

data, output_dir, report = sys.argv[1:4]
config = TrainConfig(data=data, output_dir=output_dir, max_steps=4, batch_size=1, resolution=64, lr=1e-3,
                     save_every=2, progress=False, tensorboard=False, record_items=True)
result = train(config, model=load_model("tiny"))
rank = int(os.environ["RANK"])  # train() has closed the process group it opened
torch.save({"rank": rank, "items": result.trained_items, "paths": [str(p) for p in result.paths],
            "empty_batches": result.empty_batches, "skipped": result.skipped_files, "losses": result.losses,
            "weights": result.hypernetwork.state_dict()}, f"{report}/rank{rank}.pt")
"""


def test_two_processes_under_torchrun_share_the_work(tmp_path):
    data = write_images(tmp_path / "data", 8)
    truncate(data / "005.png")  # one rank gets an empty batch: both must skip it together
    script = tmp_path / "ddp_train.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT))
    report = tmp_path / "report"
    report.mkdir()
    environment = child_environment()
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(script),
        str(data),
        str(tmp_path / "out"),
        str(report),
    ]
    finished = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=240)
    assert finished.returncode == 0, finished.stderr[-4000:]

    ranks = [torch.load(report / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    # Epoch 0 is 4 batches of 1 per rank, one of them skipped on both: its first 3 steps, then epoch 1.
    epoch_0 = [[item for step in rank["items"][:3] for item in step] for rank in ranks]
    assert set(epoch_0[0]).isdisjoint(epoch_0[1])  # disjoint shards
    assert len(set(epoch_0[0] + epoch_0[1])) == 6 and "005.png" not in epoch_0[0] + epoch_0[1]
    assert ranks[0]["empty_batches"] == ranks[1]["empty_batches"] >= 1
    assert ranks[0]["skipped"] == ranks[1]["skipped"] == {"OSError: image file is truncated": 1}
    assert state_dicts_equal(ranks[0]["weights"], ranks[1]["weights"])
    assert ranks[0]["losses"] == ranks[1]["losses"]  # the logged loss is the mean over ranks
    assert ranks[1]["paths"] == [] and ranks[0]["paths"]
    assert [row["step"] for row in log_rows(tmp_path / "out")] == ["1", "2", "3", "4"]  # one writer
    assert state_dicts_equal(
        Hypernetwork.load(tmp_path / "out" / "hypernetwork.safetensors").state_dict(), ranks[0]["weights"]
    )
    assert len(load_state(tmp_path / "out" / STATE_FILE)["rng"]) == 2  # both ranks' random states


DDP_STOP_SCRIPT = """
import json, os, sys
from pathlib import Path
from nai_fast.engine import checkpoint
from nai_fast.engine import train_state
from nai_fast.models.load import load_model
from nai_fast.engine.train import TrainConfig, TrainingInterrupted, train

data, output_dir, report = sys.argv[1:4]
rank = int(os.environ["RANK"])
written = []
real_write = train_state.atomic_write

def recording_write(path, write):
    written.append(Path(path).name)
    return real_write(path, write)

checkpoint.atomic_write = train_state.atomic_write = recording_write
Path(report, f"rank{rank}.pid").write_text(str(os.getpid()))
config = TrainConfig(data=data, output_dir=output_dir, max_steps=100000, batch_size=1, resolution=64, lr=1e-3,
                     save_every=0, progress=False, tensorboard=False)
try:
    train(config, model=load_model("tiny"))
    outcome = {"finished": True}
except TrainingInterrupted as stopped:
    outcome = {"signal": stopped.signal.name, "step": stopped.step, "exit_code": stopped.exit_code}
outcome["written"] = written
Path(report, f"rank{rank}.json").write_text(json.dumps(outcome))
# Exit 0: a rank leaving with 143 first would have torchrun end the other before it reports.
"""


def test_under_torchrun_a_signal_to_one_rank_stops_both_after_the_same_step(tmp_path):
    data = write_images(tmp_path / "data", 8)
    script = tmp_path / "ddp_stop.py"
    script.write_text(textwrap.dedent(DDP_STOP_SCRIPT))
    report = tmp_path / "report"
    report.mkdir()
    out = tmp_path / "out"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    with open(tmp_path / "stderr", "w") as stderr:
        process = subprocess.Popen(
            [*command, str(data), str(out), str(report)], env=child_environment(), stdout=stderr, stderr=stderr
        )
        try:
            wait_for_logged_steps(process, out, 1, tmp_path / "stderr")
            os.kill(int((report / "rank1.pid").read_text()), signal.SIGTERM)  # rank 1 only
            code = process.wait(timeout=240)
        finally:
            process.kill()
    assert code == 0, (tmp_path / "stderr").read_text()[-4000:]

    ranks = [json.loads((report / f"rank{r}.json").read_text()) for r in (0, 1)]
    step = ranks[0]["step"]
    assert ranks[0]["signal"] == ranks[1]["signal"] == "SIGTERM" and ranks[0]["exit_code"] == 143
    assert ranks[1]["step"] == step >= 1
    assert ranks[1]["written"] == []  # rank 0 alone writes
    assert ranks[0]["written"][-1] == STATE_FILE
    assert load_state(out / STATE_FILE)["step"] == step
    assert len(load_state(out / STATE_FILE)["rng"]) == 2  # both ranks took part in the save
    assert [int(row["step"]) for row in log_rows(out)] == list(range(1, step + 1))


# The command line


def test_cli_trains_on_the_demo_dataset_and_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    base = ["train", "--preset", "tiny", "--output-dir", str(out), "--resolution", "64", "--batch-size", "2"]
    assert main([*base, "--max-steps", "2"]) == 0
    demo_data = out / DEMO_DATA_DIR
    assert demo_data.is_dir() and len(list(demo_data.glob("*.png"))) > 8
    styled = make_demo_dataset(tmp_path / "styled", 1, seed=0, hue_shift=True)  # the demo's style, the same scenes
    assert (demo_data / "00000.png").read_bytes() == (styled / "00000.png").read_bytes()
    assert Hypernetwork.load(out / "hypernetwork.pt").step == 2
    assert Hypernetwork.load(out / "hypernetwork.safetensors").step == 2
    assert main([*base, "--max-steps", "3", "--resume"]) == 0
    assert Hypernetwork.load(out / "hypernetwork.pt").step == 3
    assert "hypernetwork.safetensors" in capsys.readouterr().out
    state = load_state(out / STATE_FILE)
    assert json.loads(state["config"])["data"] is None and state["step"] == 3


def train_arguments(data: Path, out: Path, *more: str) -> list[str]:
    return [
        "train",
        "--preset",
        "tiny",
        "--data",
        str(data),
        "--output-dir",
        str(out),
        "--resolution",
        "64",
        "--batch-size",
        "1",
        "--lr",
        "1e-3",
        "--save-every",
        "0",
        "--no-progress",
        *more,
    ]


def run_console(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [console_script(), *arguments], env=child_environment(), capture_output=True, text=True, timeout=300
    )


def wait_for_logged_steps(process: subprocess.Popen, out: Path, steps: int, stderr: Path) -> None:
    """Until the run's CSV log (a row per step, written as it happens) has ``steps`` rows."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"training ended before its step {steps}: {stderr.read_text()[-4000:]}")
        if (out / "training_log.csv").is_file() and len(log_rows(out)) >= steps:
            return
        time.sleep(0.05)
    pytest.fail(f"no step {steps} within 240 s")


def test_a_folder_holding_a_run_is_left_untouched_unless_overwrite_is_given(tmp_path, capsys, monkeypatch):
    data = write_images(tmp_path / "data", 3)
    out = tmp_path / "out"
    assert main(train_arguments(data, out, "--max-steps", "3")) == 0
    before, modified = folder_bytes(out), os.stat(out).st_mtime_ns

    refused = run_console(*train_arguments(data, out, "--max-steps", "2"))
    assert refused.returncode == 2, refused.stderr
    message = refused.stderr.strip().splitlines()[-1]
    assert "a run at step 3" in message and "--resume" in message and "--overwrite" in message, message
    assert "Traceback" not in refused.stderr
    assert folder_bytes(out) == before and os.stat(out).st_mtime_ns == modified  # not a byte, not a name

    # The refusal comes before the model is built; Python callers get RunExists.
    monkeypatch.setattr(train_module, "_load_model", lambda source: pytest.fail("built a model"))
    with pytest.raises(RunExists, match="at step 3") as refused_here:
        train(make_config(tmp_path, data))
    assert refused_here.value.step == 3
    monkeypatch.undo()
    with pytest.raises(ValueError, match="not both"):
        make_config(tmp_path, data, resume=True, overwrite=True)
    with pytest.raises(SystemExit) as exited:
        main(train_arguments(data, out, "--resume", "--overwrite"))
    assert exited.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    assert folder_bytes(out) == before

    assert main(train_arguments(data, out, "--max-steps", "1", "--overwrite")) == 0
    assert load_state(out / STATE_FILE)["step"] == 1 and Hypernetwork.load(out / "hypernetwork.pt").step == 1
    assert [row["step"] for row in log_rows(out)] == ["1"]


def test_resume_at_max_steps_says_there_is_nothing_to_do(tmp_path):
    data = write_images(tmp_path / "data", 3)
    out = tmp_path / "out"
    assert main(train_arguments(data, out, "--max-steps", "2")) == 0
    done = run_console(*train_arguments(data, out, "--max-steps", "2", "--resume"))
    assert done.returncode == 0, done.stderr
    said = [line for line in done.stderr.splitlines() if "nothing to do" in line]
    assert len(said) == 1 and "step 2 of max 2" in said[0], done.stderr
    assert load_state(out / STATE_FILE)["step"] == 2


def test_resuming_a_hypernetwork_made_for_other_widths_names_both(tmp_path):
    data = write_images(tmp_path / "data", 3)
    out = tmp_path / "out"
    assert main(train_arguments(data, out, "--max-steps", "1")) == 0
    state = load_state(out / STATE_FILE)
    state["trainable"] = Hypernetwork([320, 640, 768, 1280]).state_dict()  # an SD 1.x run's
    save_state(state, out / STATE_FILE)
    before = folder_bytes(out)
    refused = run_console(*train_arguments(data, out, "--max-steps", "2", "--resume"))
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "k/v widths 320, 640, 768, 1280, but this model's attention layers take k/v inputs of widths" in refused.stderr
    assert folder_bytes(out) == before


@pytest.mark.parametrize("number", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_training_with_a_checkpoint_that_resumes_exactly(tmp_path, number):
    data = write_images(tmp_path / "data", 3)  # 3 batches an epoch: the runs cross epochs
    out = tmp_path / "stopped" / "out"
    # SIGINT as a terminal sends it, to the process group (with a DataLoader worker in it); SIGTERM to the process.
    workers = ("--workers", "1") if number == signal.SIGINT else ()
    arguments = train_arguments(data, out, "--max-steps", "100000", *workers)
    stderr_path = tmp_path / "stderr"
    with open(stderr_path, "w") as stderr:
        process = subprocess.Popen(
            [console_script(), *arguments],
            env=child_environment(),
            stdout=stderr,
            stderr=stderr,
            start_new_session=True,
        )
        try:
            wait_for_logged_steps(process, out, 1, stderr_path)
            if number == signal.SIGINT:
                os.killpg(process.pid, number)
            else:
                process.send_signal(number)
            code = process.wait(timeout=240)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
    said = stderr_path.read_text()
    assert code == 128 + number, said[-4000:]
    assert "Traceback" not in said
    assert said.count("finishing this step") == 1  # said by the training process, not by its DataLoader worker
    stops = [line for line in said.splitlines() if line.startswith(f"stopped by {signal.Signals(number).name} at step")]
    assert len(stops) == 1, said[-4000:]

    step = load_state(out / STATE_FILE)["step"]
    assert f" at step {step}, checkpoint saved in {out};" in stops[0]
    for name in ("hypernetwork.safetensors", "hypernetwork.pt"):
        assert Hypernetwork.load(out / name).step == step
    assert [int(row["step"]) for row in log_rows(out)] == list(range(1, step + 1))
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
    resume = shlex.split(stops[0].partition("resume with: ")[2])
    assert resume[1:] == [*arguments, "--resume"], stops[0]

    total = step + 2
    assert main([*train_arguments(data, tmp_path / "whole" / "out", *workers), "--max-steps", str(total)]) == 0
    if number == signal.SIGINT:  # the printed command itself
        resumed = subprocess.run(
            [*resume, "--max-steps", str(total)], env=child_environment(), capture_output=True, text=True, timeout=300
        )
        assert resumed.returncode == 0, resumed.stderr[-4000:]
    else:  # its arguments, here (one subprocess less)
        assert main([*resume[1:], "--max-steps", str(total)]) == 0
    whole, parts = (load_state(folder / "out" / STATE_FILE) for folder in (tmp_path / "whole", tmp_path / "stopped"))
    assert parts["step"] == whole["step"] == total
    assert state_dicts_equal(whole["trainable"], parts["trainable"])
    assert whole["optimizer"]["state"].keys() == parts["optimizer"]["state"].keys()
    assert all(
        torch.equal(whole["optimizer"]["state"][k]["exp_avg"], parts["optimizer"]["state"][k]["exp_avg"])
        for k in whole["optimizer"]["state"]
    )
    assert [row["loss"] for row in log_rows(tmp_path / "stopped" / "out")] == [
        row["loss"] for row in log_rows(tmp_path / "whole" / "out")
    ]


def train_options() -> argparse.ArgumentParser:
    """A parser with `nai-fast train`'s options (the command adds them the same way)."""
    parser = argparse.ArgumentParser(prog="nai-fast train")
    add_train_options(parser)
    return parser


def test_cli_help_explains_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for action in train_options()._actions[1:]:  # after -h
        assert all(flag in text for flag in action.option_strings), action.option_strings
        assert " ".join(action.help.replace("%%", "%").split()[:6]) in text, action.dest


def other_value(spec: dataclasses.Field, action: argparse.Action) -> tuple[object, list[str]]:
    """A value for a TrainConfig field other than its default, and the command-line words that set it."""
    flag, default = action.option_strings[0], spec.default
    kind = typing.get_type_hints(TrainConfig)[spec.name]
    if isinstance(default, bool):
        return not default, [action.option_strings[0] if not default else action.option_strings[-1]]
    if action.choices:
        value = next(choice for choice in action.choices if choice != default)
        return value, [flag, value]
    if kind == tuple[str, ...]:
        return ("a red square", "a blue circle"), [flag, "a red square", flag, "a blue circle"]
    if kind == tuple[float, ...]:
        return (1.0, 3.0, 0.5, 1.0), [flag, "1,3,0.5,1"]
    if isinstance(default, float):
        value = default / 2 if default else 0.25
        return value, [flag, repr(value)]
    if kind in (int, int | None):
        return (default or 0) + 7, [flag, str((default or 0) + 7)]
    return f"{spec.name}-value", [flag, f"{spec.name}-value"]


def test_every_train_config_field_is_an_option_of_nai_fast_train(monkeypatch):
    """A command line setting every TrainConfig field to a value other than its default gives exactly that
    config: a field is an option as soon as it exists. Fields in one mutually exclusive group (resume,
    overwrite) are set by a command line each."""
    parser = train_options()
    actions: dict[str, argparse.Action] = {}
    for action in parser._actions[1:]:
        if not action.choices or action.dest not in actions:  # --model PATH rather than --preset {sd15,tiny}
            actions[action.dest] = action
    assert set(actions) == {spec.name for spec in dataclasses.fields(TrainConfig)}
    later = {
        action.dest
        for group in parser._mutually_exclusive_groups
        for action in group._group_actions[1:]
        if action.dest != group._group_actions[0].dest
    }
    assert later == {"overwrite"}
    seen: list[TrainConfig] = []

    def record(config):
        seen.append(config)
        return train_module.TrainResult(0, None, [], {}, 0, 0)

    monkeypatch.setattr(train_module, "train", record)
    values, words = {}, []
    for spec in dataclasses.fields(TrainConfig):
        if spec.name not in later:
            values[spec.name], more = other_value(spec, actions[spec.name])
            words += more
    assert main(["train", *words]) == 0
    assert seen[-1] == TrainConfig(**values)
    assert [name for name in values if getattr(seen[-1], name) == getattr(TrainConfig(), name)] == []
    for name in sorted(later):
        value, more = other_value(TrainConfig.__dataclass_fields__[name], actions[name])
        assert main(["train", *more]) == 0
        assert getattr(seen[-1], name) == value
    assert main(["train", "--preset", "sd15", "--max-grad-norm", "0", "--max-aspect-error", "none"]) == 0
    assert (seen[-1].model, seen[-1].max_grad_norm, seen[-1].max_aspect_error) == ("sd15", None, None)
    assert main(["train"]) == 0
    assert seen[-1] == TrainConfig(progress=sys.stderr.isatty())  # the defaults: one source


def test_train_config_checks_the_choices_and_bounds_its_options_state(capsys):
    for changes, message in (
        ({"mode": "dreambooth"}, "mode must be one of"),
        ({"max_steps": 0}, "max_steps must be at least 1, got 0"),
        ({"seed": -1}, "seed must not be negative, got -1"),
    ):
        with pytest.raises(ValueError, match=message):
            TrainConfig(**changes)
    with pytest.raises(SystemExit) as exited:
        main(["train", "--batch-size", "0"])
    assert exited.value.code == 2 and "--batch-size: must be at least 1, got 0" in capsys.readouterr().err


def test_cli_options_that_exclude_each_other(capsys):
    for pair in (["--preset", "tiny", "--model", "m"], ["--resume", "--overwrite"]):
        with pytest.raises(SystemExit) as exited:
            main(["train", *pair])
        assert exited.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_the_resume_command_repeats_the_arguments_with_resume_instead_of_overwrite(monkeypatch):
    from nai_fast import cli

    monkeypatch.setattr(sys, "argv", [cli.__file__, "train"])  # python -m nai_fast.cli
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    command = cli._resume_command(["train", "--overw", "--output-dir", "my runs/a", "--max-steps", "9"])
    assert shlex.split(command) == [
        *(sys.executable, "-m", "nai_fast.cli", "train", "--output-dir", "my runs/a", "--max-steps", "9", "--resume")
    ]
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert cli._resume_command(["train", "--resume"]) == "torchrun --nproc_per_node=2 -m nai_fast.cli train --resume"


def test_cli_turns_a_second_signal_into_its_exit_status(tmp_path, capsys, monkeypatch):
    def aborted(config):
        raise Aborted(signal.SIGTERM)

    monkeypatch.setattr(train_module, "train", aborted)
    with pytest.raises(SystemExit) as exited:
        main(["train", "--output-dir", str(tmp_path / "out")])
    assert exited.value.code == 143
    assert "stopped at once by a second SIGTERM" in capsys.readouterr().err


def test_cli_reports_bad_options_as_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["train", "--output-dir", str(tmp_path), "--hypernetwork-structure", "1,x,1"])
    assert exited.value.code == 2
    assert "hypernetwork-structure" in capsys.readouterr().err
