"""A whole SD 1.x U-Net step with a hypernetwork: the fused kernels against the eager processors.

GPU (skipped without CUDA): the real SD 1.x U-Net config (random weights, float16) at 512x512
(64x64 latents), a classifier-free guidance batch of 2, a 3-chunk context (231 tokens), a
``[1, 2, 1]`` relu hypernetwork of widths 320/640/768/1280. Each kernel mode of
``NAI_FAST_KERNELS`` runs the same processors:

- ``reference``: the eager path (modules, ``to_k``/``to_v``, PyTorch SDPA), the baseline;
- ``auto``: the kernels where the cost model predicts a win on this GPU (kernels/policy.py);
- ``triton``: every kernel everywhere it applies.

Timed with CUDA events (median of rounds after warm-up): an inference step, and a training
step (forward and backward, gradients for the hypernetwork only).

CPU: what the cost model predicts for the attention ops of one step (``nai-fast info
--kernels``'s rows, summed over the layers): the floors of the ops ``auto`` runs fused
against all-eager, forward and forward+backward, on A100 and H100. Eager cross-attention
is counted with its scores materialised (each op's reference); the processors' real
baseline, PyTorch SDPA, moves less, so these ratios bound the gain from above for that op.
The rest of the U-Net (convolutions, feed-forwards, norms) is the same in every mode and
left out.

    pytest benchmarks/bench_unet_kernels.py                          # full
    pytest benchmarks/bench_unet_kernels.py --benchmark-disable      # smoke
"""

from __future__ import annotations

import pytest
import torch
from conftest import BASELINE, FAST
from gpu.timing import median_ms

from nai_fast.info import kernel_costs

MODES = {"reference": BASELINE, "auto": FAST, "triton": "every kernel"}  # mode -> role
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("size", [(512, 512), (512, 768)], ids=["512x512", "512x768"])
def test_predicted_attention_time_per_step(note, size):
    rows = kernel_costs(*size, chunks=3)
    for device in ("a100", "h100"):
        for passes, label in ((("forward",), "inference"), (("forward", "backward"), "training")):
            chosen = eager = 0.0
            for row in rows:
                if row["pass"] in passes:
                    eager += row["calls"] * row[f"{device}_eager_us"]
                    chosen += row["calls"] * row[f"{device}_{'fused' if row[f'{device}_auto'] else 'eager'}_us"]
            assert 0 < chosen <= eager, "auto never takes a kernel predicted slower"
            note(
                f"U-Net attention ops {size[0]}x{size[1]}, 3 chunks, {label} step, {device.upper()} floors: "
                f"auto {chosen:.0f} us vs eager {eager:.0f} us ({eager / chosen:.2f}x predicted; "
                "eager attention with materialised scores)"
            )


@requires_cuda
@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
def test_unet_step_on_gpu(timed, note, monkeypatch, smoke, training):
    from diffusers import UNet2DConditionModel

    from nai_fast.hypernetworks.processors import apply_hypernetworks
    from nai_fast.models.configs import load_config
    from nai_fast.hypernetworks.modules import Hypernetwork

    torch.manual_seed(0)
    config = load_config("tiny" if smoke else "sd1", "unet")
    unet = UNet2DConditionModel.from_config(config).to("cuda", torch.float16).requires_grad_(False)
    widths = sorted({*config["block_out_channels"], config["cross_attention_dim"]})
    hypernetwork = Hypernetwork(widths=widths, activation="relu", weight_init="XavierNormal").to("cuda", torch.float16)
    apply_hypernetworks(unet, hypernetwork)
    latent_side = 8 if smoke else 64
    latents = torch.randn(2, 4, latent_side, latent_side, device="cuda", dtype=torch.float16)
    context = torch.randn(2, 231, config["cross_attention_dim"], device="cuda", dtype=torch.float16)
    hypernetwork.train(training).requires_grad_(training)

    def step():
        with torch.set_grad_enabled(training):
            out = unet(latents, 500, encoder_hidden_states=context).sample
            if training:
                out.float().square().mean().backward()
        return out

    def synchronized_step():
        step()
        torch.cuda.synchronize()

    group = f"U-Net {'training' if training else 'inference'} step{' [smoke]' if smoke else ''}"
    outputs, medians = {}, {}
    for mode, role in MODES.items():
        monkeypatch.setenv("NAI_FAST_KERNELS", mode)
        outputs[mode] = step().float()  # warm-up: compilation, caches
        medians[mode] = median_ms(lambda _: step(), "cuda", warmup=0, repeats=3 if smoke else 20)
        if role in (BASELINE, FAST):
            timed(group, role, synchronized_step, rounds=3 if smoke else 10)
    note(f"{group}, CUDA-event medians: " + ", ".join(f"{mode} {ms:.2f} ms" for mode, ms in medians.items()))
    for mode in ("auto", "triton"):
        torch.testing.assert_close(outputs[mode], outputs["reference"], rtol=2e-2, atol=2e-2)

