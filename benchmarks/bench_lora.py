"""LoRAs merged into working copies of the weights: what applying and removing one costs, and
what a U-Net step costs with a LoRA and a hypernetwork both applied.

Full mode: the real SD 1.x U-Net config (random weights, float32, CPU), a rank-16 LoRA on all
attention projections (``to_q``, ``to_k``, ``to_v``, ``to_out.0`` of the 32 attention layers: 128
modules, 93.5M weights):

- apply and remove, each against the other way of merging (in place, with a backup copy of each
  affected weight, restored by copying it back);
- one U-Net step at 32x32 latents, batch 2, 231 context tokens, a linear ``[1, 2, 1]`` hypernetwork
  (its K/V cache and folding on): with the LoRA merged (nai_fast) against the hypernetwork alone
  (baseline), the ratio near 1 meaning the LoRA costs nothing per step; and, as a note, the step with
  the LoRA as a wrapper around each projection (how peft applies an unmerged LoRA), which turns the
  cache and folding off.

Smoke mode: a tiny U-Net, one round each.

    pytest benchmarks/bench_lora.py                        # full: 14 min on 2 cores shared at load 9
    pytest benchmarks/bench_lora.py --benchmark-disable    # smoke
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import lru_cache

import pytest
import torch
from conftest import BASELINE, FAST, smoke_mode
from diffusers import UNet2DConditionModel
from unets import SD1_UNET, SD1_WIDTHS, SMOKE_UNET, SMOKE_WIDTHS
from torch import nn

from nai_fast.hypernetworks.modules import Hypernetwork
from nai_fast.hypernetworks.processors import apply_hypernetworks, remove_hypernetworks
from nai_fast.models.lora import Lora, apply_loras, remove_loras

RANK = 16
PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass(frozen=True, eq=False)  # hashed by identity, for lru_cache
class Setup:
    unet_config: dict
    widths: tuple[int, ...]
    context_tokens: int
    latent_size: int
    rounds: int


FULL = Setup(
    unet_config=SD1_UNET,
    widths=SD1_WIDTHS,
    context_tokens=231,
    latent_size=32,
    rounds=3,
)
SMOKE = Setup(
    unet_config=SMOKE_UNET,
    widths=SMOKE_WIDTHS,
    context_tokens=10,
    latent_size=8,
    rounds=1,
)


@pytest.fixture(scope="module")
def setup(request: pytest.FixtureRequest) -> Setup:
    return SMOKE if smoke_mode(request.config) else FULL


@lru_cache(maxsize=1)
def model(setup: Setup) -> tuple[UNet2DConditionModel, torch.Tensor, Lora, Hypernetwork]:
    """The U-Net, a CFG context, the LoRA (kohya layout, through the loader) and a hypernetwork."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**setup.unet_config).eval().requires_grad_(False)
    context = torch.randn(2, setup.context_tokens, setup.unet_config["cross_attention_dim"])
    state = {}
    for name, module in unet.named_modules():
        if isinstance(module, nn.Linear) and name.endswith(tuple(f".{p}" for p in PROJECTIONS)) and ".attn" in name:
            key = "lora_unet_" + name.replace(".", "_")
            state[f"{key}.lora_down.weight"] = torch.randn(RANK, module.in_features) * 0.01
            state[f"{key}.lora_up.weight"] = torch.randn(module.out_features, RANK) * 0.01
            state[f"{key}.alpha"] = torch.tensor(float(RANK) / 2)
    lora = Lora.from_state_dict(state, name="bench")
    hypernetwork = Hypernetwork(widths=setup.widths, layer_structure=(1, 2, 1), activation="linear")
    return unet, context, lora, hypernetwork


def _affected(unet: nn.Module) -> list[nn.Linear]:
    return [m for n, m in unet.named_modules() if isinstance(m, nn.Linear) and ".attn" in n and n.endswith(PROJECTIONS)]


def _in_place(unet: nn.Module, lora: Lora) -> list[tuple[nn.Linear, torch.Tensor]]:
    """The other way: a backup of each weight, the update added in place."""
    backups = []
    with torch.no_grad():
        for layer in lora.layers:
            module = unet.get_submodule(layer.module)
            backups.append((module, module.weight.detach().clone()))
            module.weight.copy_((module.weight.float() + layer.delta(module.weight)).to(module.weight.dtype))
    return backups


def _restore(backups: list[tuple[nn.Linear, torch.Tensor]]) -> None:
    with torch.no_grad():
        for module, backup in backups:
            module.weight.copy_(backup)


@pytest.mark.parametrize("role", [BASELINE, FAST])
def test_apply(timed, setup, note, role):
    unet, _, lora, _ = model(setup)
    group = f"LoRA rank {RANK}, {len(lora.layers)} attention projections: apply"
    if role == FAST:
        timed(group, role, lambda: apply_loras({"unet": unet}, lora), rounds=setup.rounds)
        remove_loras({"unet": unet})
        weights = sum(module.weight.numel() for module in _affected(unet))
        note(f"{group}: {weights / 1e6:.1f}M weights affected, {weights * 4 / 2**20:.0f} MiB of working copies (float32)")
    else:
        backups = timed(group, role, lambda: _in_place(unet, lora), rounds=1)
        _restore(backups)


@pytest.mark.parametrize("role", [BASELINE, FAST])
def test_remove(timed, setup, role):
    unet, _, lora, _ = model(setup)
    group = f"LoRA rank {RANK}, {len(lora.layers)} attention projections: remove"
    if role == FAST:
        apply_loras({"unet": unet}, lora)
        timed(group, role, lambda: remove_loras({"unet": unet}), rounds=1)
    else:
        backups = _in_place(unet, lora)
        timed(group, role, lambda: _restore(backups), rounds=1)


class _Wrapped(nn.Module):
    """A projection with an unmerged LoRA beside it, as peft's ``lora.Linear`` computes it."""

    def __init__(self, base: nn.Linear, down: torch.Tensor, up: torch.Tensor, scale: float) -> None:
        super().__init__()
        self.base, self.down, self.up, self.scale = base, down, up, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.down.T) @ self.up.T * self.scale


def _step(unet: nn.Module, setup: Setup, context: torch.Tensor) -> None:
    with torch.no_grad():
        size = setup.latent_size
        unet(torch.randn(2, 4, size, size, generator=torch.Generator().manual_seed(0)), 500, encoder_hidden_states=context)


@pytest.mark.parametrize("role", [BASELINE, FAST, "wrapped"])
def test_step_with_a_lora_and_a_hypernetwork(timed, setup, note, role):
    unet, context, lora, hypernetwork = model(setup)
    group = f"U-Net step {setup.latent_size}x{setup.latent_size}, hypernetwork, with/without LoRA"
    apply_hypernetworks(unet, hypernetwork)
    wrapped = []
    try:
        if role == FAST:
            apply_loras({"unet": unet}, lora)
        elif role == "wrapped":
            for layer in lora.layers:
                parent_name, _, child = layer.module.rpartition(".")
                parent = unet.get_submodule(parent_name)
                base = getattr(parent, child)
                setattr(parent, child, _Wrapped(base, layer.down, layer.up, layer.scale))
                wrapped.append((parent, child, base))
        _step(unet, setup, context)  # fills the K/V cache and the folded projections
        if role == "wrapped":
            start = time.perf_counter()
            for _ in range(setup.rounds):
                _step(unet, setup, context)
            seconds = (time.perf_counter() - start) / setup.rounds
            note(f"{group}: LoRA as a wrapper around each projection (cache and folding off): {seconds * 1e3:.0f} ms")
            pytest.skip("a note, not a pytest-benchmark role")
        timed(group, role, lambda: _step(unet, setup, context), rounds=setup.rounds)
    finally:
        for parent, child, base in wrapped:
            setattr(parent, child, base)
        remove_loras({"unet": unet})
        remove_hypernetworks(unet)
