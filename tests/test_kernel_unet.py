"""A U-Net training step with hypernetworks runs forward and backward through the fused kernels
(hyper_kv in self-attention, cross_attention in cross-attention) and gives the loss and the
gradients of the eager processors.

The step runs in an interpreter worker (Triton's interpreter on CPU tensors), once with
``NAI_FAST_KERNELS=triton`` and once with ``reference`` (the processors' eager path: module
calls, ``to_k``/``to_v``, SDPA), on the tiny preset's U-Net config.
"""

from __future__ import annotations

import os
from collections import Counter

import pytest
import torch
from kernel_proofs import fresh_seed, result_of, triton_workers

pytestmark = pytest.mark.slow  # a U-Net training step under Triton's interpreter

# (activation, U-Net trainable too): hypernetwork training, and a fine-tune with a hypernetwork
CASES = [("relu", False), ("gelu", True)]


def training_step_job(case, seed: int) -> dict:
    """Loss and gradients of one step for each kernel mode, and the fused ops' call counts."""
    from diffusers import UNet2DConditionModel

    from nai_fast.hypernetworks.processors import apply_hypernetworks, hypernetwork_penalty
    from nai_fast.models.configs import load_config
    from nai_fast.hypernetworks.modules import Hypernetwork
    from nai_fast.kernels.cross_attention import _CrossAttention
    from nai_fast.kernels.hyper_kv import _HyperProjection

    activation, train_unet = case
    torch.manual_seed(seed)
    # The tiny U-Net cut to two levels with attention at the top one (4 transformer blocks, so the
    # interpreter stays quick), and a 64-wide context unlike any self-attention width.
    config = load_config("tiny", "unet") | {
        "block_out_channels": [32, 64],
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "cross_attention_dim": 64,
    }
    unet = UNet2DConditionModel.from_config(config).requires_grad_(train_unet)
    # Widths 32 (self-attention) and 64 (mid-block self-attention, and the text context).
    hypernetwork = Hypernetwork(widths=(32, 64), activation=activation, weight_init="XavierNormal")
    apply_hypernetworks(unet, hypernetwork, strengths=0.7, penalty_weights={32: 0.5})
    latents, target, context = inputs_clear_of_relu_kinks(unet, hypernetwork)
    trained = dict(hypernetwork.named_parameters())
    if train_unet:
        trained |= {f"unet.{name}": p for name, p in unet.named_parameters() if p.requires_grad}

    calls = Counter()
    for name, function in (("hyper_kv", _HyperProjection), ("cross_attention", _CrossAttention)):

        def counted(*args, _apply=function.apply, _name=name):
            calls[_name] += 1
            return _apply(*args)

        function.apply = counted

    results = {"seed": seed, "blocks": sum(name.endswith("attn1") for name, _ in unet.named_modules())}
    for mode in ("reference", "triton"):
        os.environ["NAI_FAST_KERNELS"] = mode
        for parameter in trained.values():
            parameter.grad = None
        prediction = unet(latents, 500, encoder_hidden_states=context).sample
        loss = torch.nn.functional.mse_loss(prediction, target) + hypernetwork_penalty(unet)
        loss.backward()
        results[mode] = (loss.detach(), {name: p.grad.clone() for name, p in trained.items()})
        results[f"{mode} calls"] = dict(calls)
        calls.clear()
    return results


# How far from 0 every ReLU input must stay, relative to that input's RMS. ReLU's derivative jumps
# at 0, so an input within rounding of 0 can fall on different sides in the two runs and move a
# gradient by a whole token's share. The kernel's pre-activations differ from eager's by up to
# ~1e-6 of their RMS (a sixth of them differ at all); a draw's smallest |input| is ~1e-6 to 3e-5
# of it (125k inputs), so about half the draws pass.
RELU_MARGIN = 1e-5


def inputs_clear_of_relu_kinks(unet, hypernetwork, draws: int = 40) -> tuple[torch.Tensor, ...]:
    """Latents, target and context on which no ReLU input of the (eager) hypernetwork lies
    within ``RELU_MARGIN`` of 0, so that both runs take the same branch of every ReLU."""
    smallest = []

    def record(module, inputs, output):
        x = inputs[0]
        smallest.append(x.abs().min() / x.square().mean().sqrt())

    hooks = [m.register_forward_hook(record) for m in hypernetwork.modules() if isinstance(m, torch.nn.ReLU)]
    os.environ["NAI_FAST_KERNELS"] = "reference"
    try:
        for _ in range(draws):
            latents, target, context = torch.randn(2, 4, 8, 12), torch.randn(2, 4, 8, 12), torch.randn(2, 77, 64)
            smallest.clear()
            with torch.no_grad():
                unet(latents, 500, encoder_hidden_states=context)
            if not smallest or min(smallest) >= RELU_MARGIN:
                return latents, target, context
    finally:
        for hook in hooks:
            hook.remove()
    raise AssertionError(f"no draw of {draws} kept every ReLU input {RELU_MARGIN:g} of its RMS from 0")


@pytest.fixture(scope="module")
def steps():
    with triton_workers(interpret=True, processes=min(2, os.cpu_count() or 1)) as pool:
        jobs = {case: (seed := fresh_seed(), pool.apply_async(training_step_job, (case, seed))) for case in CASES}
        yield {case: result_of(job, seed) for case, (seed, job) in jobs.items()}


@pytest.mark.parametrize("case", CASES, ids=[f"{a}{'-finetune' if t else ''}" for a, t in CASES])
def test_training_step_equals_the_eager_processors(steps, case):
    results = steps[case]
    blocks = results["blocks"]  # each with one self-attention (attn1) and one cross-attention (attn2)
    assert blocks == 4, "down 0, mid, up 1 (two blocks)"
    assert results["triton calls"] == {"hyper_kv": 2 * blocks, "cross_attention": blocks}, "K, V: a call each"
    assert results["reference calls"] == {}, "the eager run used no kernel"
    (kernel_loss, kernel_grads), (eager_loss, eager_grads) = results["triton"], results["reference"]
    torch.testing.assert_close(kernel_loss, eager_loss, rtol=1e-5, atol=1e-6)
    assert kernel_grads.keys() == eager_grads.keys()
    for name, eager_grad in eager_grads.items():
        assert eager_grad.abs().max() > 0, f"{name}: no gradient reached it"
        torch.testing.assert_close(
            kernel_grads[name], eager_grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name} (seed {results['seed']}): {m}"
        )
