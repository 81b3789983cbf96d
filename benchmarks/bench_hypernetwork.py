"""Hypernetworks in the U-Net: nai_fast's processors versus the web UI's way, both against
no hypernetwork at all.

The web UI's way (``modules/hypernetworks/hypernetwork.py``) runs every module in every
attention layer at every step; its processor is written below. nai_fast runs a
cross-attention module once per context, keeps cross-attention K/V for the whole
generation and folds affine (linear) modules into the self-attention projections.

Full mode: the real SD 1.x U-Net config (random weights), batch 2 (a classifier-free
guidance batch), 231 context tokens (3 chunks), a ``[1, 2, 1]`` hypernetwork with widths
320/640/768/1280, linear and relu:

- one U-Net step at 32x32 latents, best of 3 rounds: the steady state, every step of a
  generation but the first (nai_fast's first round pays for folding and K/V);
- a 20-step generation at 32x32 latents, from applying the hypernetwork to the last
  step, one round (about a minute per role on 2 cores): the context
  is concatenated anew at every step as the web UI's sampler does, and nai_fast's one-time
  work is inside the timing.

Each overhead is reported as a percentage of the no-hypernetwork time (stock diffusers
processors). Timings taken minutes apart drift by several percent on a shared 2-core
machine, so the step overheads are also measured interleaved (all three ways back to back
in each of 5 rounds, median of the per-round ratios): that figure is the one to read.
Smoke mode: a tiny U-Net, one step.

    pytest benchmarks/bench_hypernetwork.py                          # full, ~11 min
    pytest benchmarks/bench_hypernetwork.py --benchmark-disable      # smoke
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import lru_cache

import pytest
import torch
from baselines import install_processors
from conftest import BASELINE, FAST, best_seconds, smoke_mode
from diffusers import UNet2DConditionModel
from unets import SD1_UNET, SD1_WIDTHS, SMOKE_UNET, SMOKE_WIDTHS

from nai_fast.hypernetworks.modules import Hypernetwork

NONE = "no hypernetwork"
ACTIVATIONS = ["linear", "relu"]
GUIDANCE_SCALE = 7.5


@dataclass(frozen=True, eq=False)  # hashed by identity, for lru_cache
class Setup:
    unet_config: dict
    widths: tuple[int, ...]
    context_tokens: int
    step_latent_size: int
    generation_latent_size: int
    generation_steps: int
    step_rounds: int


FULL = Setup(
    unet_config=SD1_UNET,
    widths=SD1_WIDTHS,
    context_tokens=231,
    step_latent_size=32,
    generation_latent_size=32,
    generation_steps=20,
    step_rounds=3,
)
SMOKE = Setup(
    unet_config=SMOKE_UNET,
    widths=SMOKE_WIDTHS,
    context_tokens=10,
    step_latent_size=8,
    generation_latent_size=8,
    generation_steps=1,
    step_rounds=1,
)


@pytest.fixture(scope="module")
def setup(request: pytest.FixtureRequest) -> Setup:
    return SMOKE if smoke_mode(request.config) else FULL


@lru_cache(maxsize=1)
def model(setup: Setup) -> tuple[UNet2DConditionModel, dict[str, object], torch.Tensor]:
    """The U-Net (warmed up at both latent sizes), its stock processors, and a CFG context."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**setup.unet_config).eval().requires_grad_(False)
    context = torch.randn(2, setup.context_tokens, setup.unet_config["cross_attention_dim"])
    with torch.no_grad():
        for size in {setup.step_latent_size, setup.generation_latent_size}:
            unet(torch.randn(2, 4, size, size), 500, encoder_hidden_states=context)
    return unet, unet.attn_processors, context


@lru_cache(maxsize=2)
def hypernetwork(setup: Setup, activation: str) -> Hypernetwork:
    torch.manual_seed(1)
    return Hypernetwork(widths=setup.widths, layer_structure=(1, 2, 1), activation=activation)


def step_group(setup: Setup, activation: str | None) -> str:
    size = setup.step_latent_size
    return f"U-Net step {size}x{size}, " + (f"{activation} hypernetwork" if activation else NONE)


def generation_group(setup: Setup, activation: str | None) -> str:
    size = setup.generation_latent_size
    name = f"{setup.generation_steps}-step generation {size}x{size}, "
    return name + (f"{activation} hypernetwork" if activation else NONE)


def roles_and_activations() -> list[tuple[str, str | None]]:
    return [(NONE, None)] + [(role, activation) for activation in ACTIVATIONS for role in (BASELINE, FAST)]


ROLE_IDS = [f"{role}-{activation or 'none'}" for role, activation in roles_and_activations()]


# -- benchmarks -----------------------------------------------------------------


@pytest.mark.parametrize(("role", "activation"), roles_and_activations(), ids=ROLE_IDS)
def test_unet_step(timed, setup, role, activation):
    unet, stock_processors, context = model(setup)
    hypernetworks = [hypernetwork(setup, activation)] if activation else []
    size = setup.step_latent_size
    latents = torch.randn(2, 4, size, size, generator=torch.Generator().manual_seed(2))
    install_processors(unet, stock_processors, role, hypernetworks)

    @torch.no_grad()
    def step() -> torch.Tensor:
        return unet(latents, 500, encoder_hidden_states=context).sample

    output = timed(step_group(setup, activation), role, step, setup.step_rounds)
    if role == FAST:
        install_processors(unet, stock_processors, BASELINE, hypernetworks)
        torch.testing.assert_close(output, step(), rtol=1e-3, atol=1e-4, msg="both ways compute the same")
    install_processors(unet, stock_processors, NONE, [])


@pytest.mark.parametrize(("role", "activation"), roles_and_activations(), ids=ROLE_IDS)
def test_generation(timed, setup, role, activation):
    unet, stock_processors, context = model(setup)
    hypernetworks = [hypernetwork(setup, activation)] if activation else []
    negative, positive = context.split(1)
    size = setup.generation_latent_size
    timesteps = torch.linspace(999, 0, setup.generation_steps).round().long()

    @torch.no_grad()
    def generate() -> torch.Tensor:
        install_processors(unet, stock_processors, role, hypernetworks)  # a new generation
        latents = torch.randn(1, 4, size, size, generator=torch.Generator().manual_seed(3))
        for timestep in timesteps:
            step_context = torch.cat([negative, positive])  # anew at every step, as the web UI does
            noise_uncond, noise_cond = unet(torch.cat([latents] * 2), timestep, step_context).sample.chunk(2)
            noise = noise_uncond + GUIDANCE_SCALE * (noise_cond - noise_uncond)
            latents = latents - noise / setup.generation_steps  # an Euler-like update; the sampler costs nothing
        return latents

    timed(generation_group(setup, activation), role, generate, rounds=1)
    install_processors(unet, stock_processors, NONE, [])


def test_overheads(note, setup, smoke):
    """Each way's time over the no-hypernetwork time, from the runs above."""
    caveat = " [smoke: tiny U-Net, one round, not a measurement]" if smoke else ""
    for group_of, what in ((step_group, "step"), (generation_group, "generation")):
        reference = best_seconds(group_of(setup, None), NONE)
        for activation in ACTIVATIONS:
            times = {role: best_seconds(group_of(setup, activation), role) for role in (BASELINE, FAST)}
            if reference is None or None in times.values():
                continue
            overheads = ", ".join(
                f"{label} {100 * (times[role] / reference - 1):+.1f}%"
                for label, role in (("web UI way", BASELINE), ("nai_fast", FAST))
            )
            note(
                f"hypernetwork overhead, {what}, {activation}: {overheads} "
                f"(of {reference:.3f} s without one: {group_of(setup, None)}){caveat}"
            )


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_step_overhead_interleaved(note, setup, smoke, activation):
    """The step overheads again, robust to drift: every round times the three ways back to
    back (nai_fast after one warm-up step, as in a generation), and the report gives the
    median of each round's ratio. Separate benchmarks minutes apart differ by several
    percent on a shared 2-core machine, as much as the target they are meant to check."""
    unet, stock_processors, context = model(setup)
    hypernetworks = [hypernetwork(setup, activation)]
    size = setup.step_latent_size
    latents = torch.randn(2, 4, size, size, generator=torch.Generator().manual_seed(2))

    outputs: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def seconds_per_step(role: str, warm_up: bool) -> float:
        install_processors(unet, stock_processors, role, hypernetworks)
        if warm_up:
            unet(latents, 500, encoder_hidden_states=context)
        start = time.perf_counter()
        outputs[role] = unet(latents, 500, encoder_hidden_states=context).sample
        return time.perf_counter() - start

    ratios: dict[str, list[float]] = {BASELINE: [], FAST: []}
    for _ in range(1 if smoke else 5):
        none = seconds_per_step(NONE, warm_up=False)
        ratios[BASELINE].append(seconds_per_step(BASELINE, warm_up=False) / none)
        ratios[FAST].append(seconds_per_step(FAST, warm_up=True) / none)
    install_processors(unet, stock_processors, NONE, [])
    torch.testing.assert_close(outputs[FAST], outputs[BASELINE], rtol=1e-3, atol=1e-4, msg="both ways compute the same")
    caveat = " [smoke: tiny U-Net, one round, not a measurement]" if smoke else ""
    medians = {role: sorted(values)[len(values) // 2] for role, values in ratios.items()}
    note(
        f"hypernetwork overhead, step, {activation}, interleaved median of {len(ratios[FAST])} rounds: "
        f"web UI way {100 * (medians[BASELINE] - 1):+.1f}%, nai_fast {100 * (medians[FAST] - 1):+.1f}% "
        f"(rounds: {', '.join(f'{100 * (r - 1):+.1f}%' for r in ratios[FAST])}){caveat}"
    )
