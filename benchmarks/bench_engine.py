"""The engines end to end on the CPU: generation time per image and hypernetwork training
images/s, nai_fast versus an eager baseline assembled from the web UI's ways.

Both sides run the same code except for two interchangeable parts:

- **attention processors**: nai_fast's (:func:`~nai_fast.hypernetworks.processors.apply_hypernetworks`:
  one module call per context, cross-attention K/V kept for the generation) versus
  stock diffusers attention with the web UI's per-layer hypernetwork
  (:class:`baselines.WebUIProcessor`, every module in every layer at every step);
- **text encoder**: :class:`~nai_fast.text.encoder.LongPromptEncoder` (every chunk of prompt and
  negative in one call, only the layers needed) versus :class:`baselines.ChunkByChunkEncoder`
  (:func:`~nai_fast.text.encoder.encode_chunk_by_chunk`: one call per chunk, all layers).

Measured, for the ``tiny`` preset and the real SD 1.x architecture (``sd15``, random weights):

- **generation**: :func:`~nai_fast.engine.generate.txt2img` of one image with a ``[1, 2, 1]`` relu
  hypernetwork, a 161-token tag prompt (3 chunks) and a negative prompt, Euler a, CFG;
  seconds per image (best of the rounds). Each round installs the processors anew, so
  nai_fast's one-time work (K/V for the context) is inside the timing. Both sides must
  give images of the same size whose pixels differ by at most a few levels (the same math,
  summed in another order; the largest difference is reported).
- **training step**: one hypernetwork training step written once below (VAE encode of a
  fixed batch, noise, timesteps, context of long captions, U-Net forward through the
  hypernetwork, MSE, backward, clipping, AdamW) with either side's two parts; images/s.
  :func:`~nai_fast.engine.train.train` cannot take the baseline's parts, hence the step-level
  comparison. The shallow-layer penalty is off on the nai_fast side (the baseline has none);
  both sides must give the same loss and gradient norm at every step.
- **train() end to end** (nai_fast only, a note): :func:`~nai_fast.engine.train.train` on the demo
  dataset, images/s from its ``training_log.csv`` and over the whole call.

Full mode: generation of tiny at 256x256 (20 steps, best of 3) and sd15 at 256x256 (4 steps,
one round); training steps of tiny at 128x128 (batch 4, best of 3) and sd15 at 256x256 (batch
2, best of 2); about 7 minutes on 2 cores. The sd15 figures rest on one or two rounds of tens
of seconds: on a shared machine another process's load moves them by 2x either way (read
them next to bench_hypernetwork.py's interleaved step overheads). Smoke mode: tiny at 64x64,
2 steps, one round, well under a minute.

    pytest benchmarks/bench_engine.py                          # full
    pytest benchmarks/bench_engine.py --benchmark-disable      # smoke
"""

from __future__ import annotations

import csv
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from baselines import ChunkByChunkEncoder, install_processors
from conftest import BASELINE, FAST, best_seconds, smoke_mode

from nai_fast.engine.demo_data import make_demo_dataset
from nai_fast.engine.generate import no_resolution_warning, txt2img
from nai_fast.hypernetworks.modules import Hypernetwork
from nai_fast.models.load import load_model
from nai_fast.models.stable_diffusion import StableDiffusion
from nai_fast.text.encoder import LongPromptEncoder
from nai_fast.engine.train import TrainConfig, train

ROLES = [BASELINE, FAST]
PROMPT = (
    "masterpiece, best quality, 1girl, solo, long hair, looking at viewer, smile, open mouth, blue eyes, "
    "blonde hair, hair ornament, long sleeves, dress, ribbon, holding, standing, full body, flower, outdoors, "
    "sky, day, cloud, hair ribbon, white dress, blue sky, petals, grass, cherry blossoms, wind, hand up, sun hat, "
    "hat flower, straw hat, field, flower field, lens flare, depth of field, light particles, from side, "
    "floating hair, sundress, bare shoulders, collarbone, blush, ponytail, sidelocks, bangs, white flower, "
    "pink flower, tree, mountain, horizon, landscape, summer, sunlight, shadow, scenery, wide shot, "
    "detailed background, beautiful detailed eyes, highly detailed, sharp focus"
)  # 161 tokens: 3 chunks
NEGATIVE_PROMPT = (
    "lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, fewer digits, cropped, "
    "worst quality, low quality, normal quality, jpeg artifacts, signature, watermark, username, blurry"
)
SAMPLER, GUIDANCE_SCALE, CLIP_SKIP, SEED = "euler_a", 11.0, 2, 0
HYPERNETWORK_STRUCTURE, HYPERNETWORK_ACTIVATION = (1, 2, 1), "relu"
# The largest difference in 8-bit pixel levels allowed between the two sides' images.
PIXEL_LEVELS_TOLERATED = 2
TRAINING_DEFAULTS = TrainConfig()  # learning rate, weight decay and clipping as train() uses them


@dataclass(frozen=True)
class Setup:
    preset: str
    generation_size: int
    generation_steps: int
    generation_rounds: int
    train_size: int
    train_batch: int
    train_rounds: int
    end_to_end_steps: int  # train() steps

    def __str__(self) -> str:
        return self.preset


FULL_SETUPS = [
    Setup("tiny", 256, 20, 3, train_size=128, train_batch=4, train_rounds=3, end_to_end_steps=6),
    Setup("sd15", 256, 4, 1, train_size=256, train_batch=2, train_rounds=2, end_to_end_steps=3),
]
SMOKE_SETUPS = [Setup("tiny", 64, 2, 1, train_size=64, train_batch=2, train_rounds=1, end_to_end_steps=2)]

# What the baseline's run left for the nai_fast run to be checked against.
_baseline_images: dict[str, np.ndarray] = {}
_baseline_training: dict[str, list[tuple[float, float]]] = {}  # per step: loss, gradient norm


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "setup" in metafunc.fixturenames:
        setups = SMOKE_SETUPS if smoke_mode(metafunc.config) else FULL_SETUPS
        metafunc.parametrize("setup", setups, ids=str)


@dataclass(frozen=True)
class Engine:
    """A model and the attention processors it came with."""

    model: StableDiffusion
    stock_processors: dict[str, object]


@lru_cache(maxsize=None)  # each preset built once (sd15 takes ~15 s), freed after the module
def engine_for(preset: str) -> Engine:
    model = load_model(preset)
    for network in (model.unet, model.vae, model.text_encoder):
        network.requires_grad_(False)  # only the hypernetwork ever trains here
    return Engine(model, dict(model.unet.attn_processors))


@pytest.fixture
def engine(setup: Setup) -> Engine:
    return engine_for(setup.preset)


@pytest.fixture(scope="module", autouse=True)
def free_models() -> Iterator[None]:
    yield
    engine_for.cache_clear()


# -- the two interchangeable parts ---------------------------------------------------


def install_role(engine: Engine, role: str, hypernetwork: Hypernetwork) -> None:
    """``role``'s processors on the U-Net (nai_fast's without the training penalty, which the
    baseline lacks)."""
    install_processors(engine.model.unet, engine.stock_processors, role, [hypernetwork], penalty_weights={})


def restore_processors(engine: Engine) -> None:
    install_processors(engine.model.unet, engine.stock_processors, "stock", [])


def text_encoder_for(role: str, model: StableDiffusion, syntax: str) -> LongPromptEncoder | ChunkByChunkEncoder:
    encoder = LongPromptEncoder(model.tokenizer, model.text_encoder, clip_skip=CLIP_SKIP, syntax=syntax)
    return encoder if role == FAST else ChunkByChunkEncoder(encoder)


def new_hypernetwork(model: StableDiffusion) -> Hypernetwork:
    """A ``[1, 2, 1]`` relu hypernetwork for every k/v width of the U-Net, drawn from a fixed
    seed (the same weights for both sides), in eval mode."""
    config = model.unet.config
    widths = sorted(set(config.block_out_channels) | {config.cross_attention_dim})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        return Hypernetwork(widths, layer_structure=HYPERNETWORK_STRUCTURE, activation=HYPERNETWORK_ACTIVATION)


def smoke_caveat(smoke: bool) -> str:
    return " [smoke: tiny sizes, one round, not a measurement]" if smoke else ""


# -- generation -------------------------------------------------------------------------


def generate(engine: Engine, role: str, hypernetwork: Hypernetwork, encoder, size: int, steps: int) -> np.ndarray:
    """One image as a new generation would make it: processors installed anew (empty caches)."""
    install_role(engine, role, hypernetwork)
    try:
        with no_resolution_warning():  # small sizes are the point on a CPU
            (generated,) = txt2img(
                engine.model,
                PROMPT,
                negative_prompt=NEGATIVE_PROMPT,
                width=size,
                height=size,
                steps=steps,
                guidance_scale=GUIDANCE_SCALE,
                seed=SEED,
                sampler=SAMPLER,
                clip_skip=CLIP_SKIP,
                encoder=encoder,
                progress=False,
            )
    finally:
        restore_processors(engine)
    return np.asarray(generated.image)


@pytest.mark.parametrize("role", ROLES)
def test_generation(timed, note, smoke, setup, engine, role):
    hypernetwork = new_hypernetwork(engine.model)
    encoder = text_encoder_for(role, engine.model, syntax="a1111")
    size, steps = setup.generation_size, setup.generation_steps
    generate(engine, role, hypernetwork, encoder, size=64, steps=1)  # warm-up: lazy set-up, first calls
    group = f"txt2img {setup.preset} {size}x{size}, {steps} steps"
    image = timed(group, role, lambda: generate(engine, role, hypernetwork, encoder, size, steps), setup.generation_rounds)
    seconds = best_seconds(group, role)
    note(f"generation, {setup.preset} {size}x{size}, {steps} steps, {role}: {seconds:.2f} s/image{smoke_caveat(smoke)}")
    assert image.shape == (size, size, 3)
    if role == BASELINE:
        _baseline_images[setup.preset] = image
    elif setup.preset in _baseline_images:
        difference = np.abs(image.astype(np.int16) - _baseline_images[setup.preset].astype(np.int16))
        note(
            f"generation, {setup.preset}: nai_fast's pixels differ from the baseline's by at most "
            f"{difference.max()} of 255 levels (mean {difference.mean():.4f})"
        )
        assert difference.max() <= PIXEL_LEVELS_TOLERATED, "both sides compute the same image"


# -- training ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainingBatch:
    pixels: torch.Tensor  # [batch, 3, side, side] in [-1, 1]
    captions: list[str]
    seed: int  # of the VAE posterior sample, the noise and the timesteps: the same at every step


def training_batch(setup: Setup) -> TrainingBatch:
    """Fixed random pixels, and long captions: the prompt's tags, each caption rotated."""
    generator = torch.Generator().manual_seed(2)
    pixels = torch.rand(setup.train_batch, 3, setup.train_size, setup.train_size, generator=generator) * 2 - 1
    tags = PROMPT.split(", ")
    shift = len(tags) // setup.train_batch
    captions = [", ".join(tags[i * shift :] + tags[: i * shift]) for i in range(setup.train_batch)]
    return TrainingBatch(pixels, captions, seed=3)


def training_step(
    model: StableDiffusion, encoder, hypernetwork: Hypernetwork, optimizer: torch.optim.Optimizer, batch: TrainingBatch
) -> tuple[float, float]:
    """One hypernetwork training step as train() takes it (less the penalty and the data
    loading), through whichever processors are installed and with ``encoder``; the loss and
    the gradient norm."""
    generator = torch.Generator().manual_seed(batch.seed)
    scheduler = model.scheduler
    with torch.no_grad():
        latents = model.vae.encode(batch.pixels).latent_dist.sample(generator) * model.vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),), generator=generator)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        target = noise if model.prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, timesteps)
        # As train() does: half the captions go in as "negatives", so one encode call takes all.
        half = (len(batch.captions) + 1) // 2
        first, second = batch.captions[:half], batch.captions[half:]
        cond, uncond = encoder.encode(first, second + [""] * (half - len(second)))
        context = torch.cat([cond, uncond])[: len(batch.captions)]
    prediction = model.unet(noisy, timesteps, encoder_hidden_states=context, return_dict=False)[0]
    loss = F.mse_loss(prediction, target)
    loss.backward()
    gradient_norm = torch.nn.utils.clip_grad_norm_(hypernetwork.parameters(), TRAINING_DEFAULTS.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach()), float(gradient_norm)


@pytest.mark.parametrize("role", ROLES)
def test_training_step(timed, note, smoke, setup, engine, role):
    model = engine.model
    hypernetwork = new_hypernetwork(model).train()
    optimizer = torch.optim.AdamW(
        hypernetwork.parameters(), lr=TRAINING_DEFAULTS.lr, weight_decay=TRAINING_DEFAULTS.weight_decay
    )
    encoder = text_encoder_for(role, model, syntax="none")  # train() parses no emphasis
    batch = training_batch(setup)
    size, images = setup.train_size, setup.train_batch
    losses_and_gradient_norms: list[tuple[float, float]] = []  # per step
    install_role(engine, role, hypernetwork)
    try:
        group = f"train step {setup.preset} {size}x{size}, batch {images}"
        timed(
            group,
            role,
            lambda: losses_and_gradient_norms.append(training_step(model, encoder, hypernetwork, optimizer, batch)),
            setup.train_rounds,
        )
        seconds = best_seconds(group, role)
    finally:
        restore_processors(engine)
    note(
        f"training, {setup.preset} {size}x{size}, batch {images}, {role}: {images / seconds:.2f} images/s "
        f"({seconds:.2f} s/step){smoke_caveat(smoke)}"
    )
    if role == BASELINE:
        _baseline_training[setup.preset] = losses_and_gradient_norms
    elif setup.preset in _baseline_training:
        # Per step, from the same initial weights, batch and noise. (Not the trained weights:
        # Adam moves a weight whose gradient is about zero by up to the learning rate either
        # way, so rounding alone makes them differ by that much.)
        ours = torch.tensor(losses_and_gradient_norms, dtype=torch.float64)
        baseline = torch.tensor(_baseline_training[setup.preset], dtype=torch.float64)
        loss_difference, norm_difference = (ours / baseline - 1).abs().amax(dim=0).tolist()
        note(
            f"training, {setup.preset}: nai_fast's losses and gradient norms differ from the baseline's by at most "
            f"{loss_difference:.1e} and {norm_difference:.1e} (relative)"
        )
        torch.testing.assert_close(ours, baseline, rtol=1e-3, atol=0, msg="both sides compute the same step")


def test_train_end_to_end(note, smoke, setup, engine, tmp_path):
    """nai_fast's train() on the demo dataset: images/s per step from its log, and over the
    whole call (model set-up, data scan and the final checkpoint included)."""
    config = TrainConfig(
        model=setup.preset,
        data=str(make_demo_dataset(tmp_path / "data", count=32)),
        output_dir=str(tmp_path / "run"),
        max_steps=setup.end_to_end_steps,
        batch_size=setup.train_batch,
        resolution=setup.train_size,
        activation=HYPERNETWORK_ACTIVATION,
        hypernetwork_structure=HYPERNETWORK_STRUCTURE,
        save_every=0,
        progress=False,
        tensorboard=False,
    )
    start = time.perf_counter()
    result = train(config, model=engine.model)
    seconds = time.perf_counter() - start
    assert result.steps == config.max_steps
    with open(tmp_path / "run" / "training_log.csv", newline="") as log:
        per_step = [float(row["images_per_s"]) for row in csv.DictReader(log)]
    steady = per_step[1:] or per_step  # the first step pays first-call costs
    images = config.max_steps * config.batch_size
    note(
        f"train() end to end, {setup.preset} at resolution {setup.train_size}, batch {config.batch_size}, "
        f"{config.max_steps} steps, nai_fast: {statistics.median(steady):.2f} images/s (median of its log's steps "
        f"after the first), {images / seconds:.2f} images/s over the whole call ({seconds:.1f} s)"
        f"{smoke_caveat(smoke)}"
    )
