"""Part 4: the engine on the real SD 1.x architecture (random weights), stock diffusers against nai_fast.

Generation, float16, 512x512, batch 1 with classifier-free guidance, Euler a: per variant
the U-Net step (the guidance batch of 2, CUDA-event median) and a 20-step txt2img (prompt
encoding and VAE decoding included), in it/s, with the peak GPU memory:

- ``diffusers``: a stock ``StableDiffusionPipeline`` (SDPA attention);
- ``nai_fast``: :func:`nai_fast.txt2img`, stock processors, no hypernetwork;
- ``nai_fast processors``: nai_fast's attention processors with no hypernetwork
  (``cross_attention`` where ``auto`` takes it);
- ``web UI hypernetwork``: a ``[1, 2, 1]`` relu hypernetwork the web UI's way (every module in
  every layer at every step; prompts encoded chunk by chunk);
- ``nai_fast hypernetwork (auto)`` and ``(triton)``: the same hypernetwork nai_fast's way, with
  the kernels where ``auto`` takes them, then everywhere.

Hypernetwork training, bfloat16 autocast, 512x768, batch 4: one step (context of 3-chunk
captions, U-Net forward and backward, clipping, AdamW) the web UI's way against nai_fast's
(``auto``, then ``triton``), in images/s. The U-Net's FLOPs per step are counted once
(``torch.utils.flop_counter``), so each step time is also a fraction of the measured
matrix ceiling.

``--compile`` (a part of its own, last: it may not fit its budget): nai_fast with the
U-Net channels-last and ``torch.compile``-d. The dry run: the tiny preset on the CPU, tiny
sizes, the reference path, ``torch.compile`` with the eager backend.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gpu.ceilings import measured_device
from gpu.record import Recorder, part_arguments, run_part
from gpu.timing import median_ms, peak_memory, wall_seconds

PROMPT = "a photograph of an astronaut riding a horse on the moon, highly detailed, sharp focus"
NEGATIVE_PROMPT = "lowres, blurry"
CAPTION_TAGS = [
    f"{colour} {shape}" for colour in ("red", "green", "blue", "yellow", "purple", "white", "black")
    for shape in ("circle", "square", "triangle", "star", "hexagon", "ring", "cross")
]  # fmt: skip  # 49 tags, about 150 tokens: 3 chunks once the negative pads
GUIDANCE_SCALE, CLIP_SKIP, SEED = 7.5, 2, 0
HYPERNETWORK = dict(layer_structure=(1, 2, 1), activation="relu", weight_init="XavierNormal")
# Published SD 1.5 figures, A100 80GB, 512x512, batch 1 (it/s), printed beside ours.
ANCHORS = {"diffusers + SDPA": 31.0, "diffusers compiled, channels-last": 47.0, "stable-fast": 55.5, "TensorRT": 61.0}


@dataclass(frozen=True)
class Settings:
    preset: str
    device: torch.device
    dtype: torch.dtype  # generation
    size: int
    steps: int
    step_warmup: int
    step_repeats: int
    rounds: int  # txt2img runs timed; their median is reported
    train_width: int
    train_height: int
    train_batch: int
    train_dtype: torch.dtype
    train_warmup: int
    train_repeats: int

    @classmethod
    def for_run(cls, dry_run: bool) -> Settings:
        if dry_run:
            return cls("tiny-random", torch.device("cpu"), torch.float32, 128, 2, 1, 2, 1, 128, 192, 2, torch.bfloat16, 1, 2)
        return cls("sd15", torch.device("cuda"), torch.float16, 512, 20, 3, 20, 2, 512, 768, 4, torch.bfloat16, 2, 5)


@dataclass
class Engine:
    model: object  # nai_fast's StableDiffusion
    stock_processors: dict
    settings: Settings


def build(settings: Settings) -> Engine:
    from nai_fast import load_model

    model = load_model(settings.preset, seed=SEED)
    for network in (model.unet, model.vae, model.text_encoder):
        network.requires_grad_(False).to(settings.device, settings.dtype)
    return Engine(model, dict(model.unet.attn_processors), settings)


def new_hypernetwork(engine: Engine, dtype: torch.dtype):
    from nai_fast import Hypernetwork

    config = engine.model.unet.config
    widths = sorted({*config.block_out_channels, config.cross_attention_dim})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        hypernetwork = Hypernetwork(widths, **HYPERNETWORK)
    return hypernetwork.to(engine.settings.device, dtype)


# -- the ways of running --------------------------------------------------------------------


@dataclass(frozen=True)
class Way:
    """Who computes attention and encodes prompts: ``role`` is baselines.install_processors'
    (``nai_fast`` processors, ``baseline`` for the web UI's, anything else for stock ones)."""

    name: str
    role: str
    hypernetwork: bool
    kernels: str  # NAI_FAST_KERNELS
    web_ui_encoder: bool = False


def install(engine: Engine, way: Way, hypernetwork) -> None:
    from baselines import install_processors

    os.environ["NAI_FAST_KERNELS"] = way.kernels
    networks = [hypernetwork] if way.hypernetwork else []
    options = {"penalty_weights": {}} if way.role == "nai_fast" else {}
    install_processors(engine.model.unet, engine.stock_processors, way.role, networks, **options)


def encoder_for(engine: Engine, way: Way, syntax: str = "a1111"):
    from baselines import ChunkByChunkEncoder

    from nai_fast import LongPromptEncoder

    model = engine.model
    encoder = LongPromptEncoder(model.tokenizer, model.text_encoder, clip_skip=CLIP_SKIP, syntax=syntax)
    return ChunkByChunkEncoder(encoder) if way.web_ui_encoder else encoder


def generation_ways(dry_run: bool) -> list[Way]:
    fused = "reference" if dry_run else "triton"
    return [
        Way("nai_fast", "stock", False, "auto"),
        Way("nai_fast processors", "nai_fast", False, "auto"),
        Way("web UI hypernetwork", "baseline", True, "auto", web_ui_encoder=True),
        Way("nai_fast hypernetwork (auto)", "nai_fast", True, "auto"),
        Way(f"nai_fast hypernetwork ({fused})", "nai_fast", True, fused),
    ]


def training_ways(dry_run: bool) -> list[Way]:
    fused = "reference" if dry_run else "triton"
    return [
        Way("web UI", "baseline", True, "auto", web_ui_encoder=True),
        Way("nai_fast (auto)", "nai_fast", True, "auto"),
        Way(f"nai_fast ({fused})", "nai_fast", True, fused),
    ]


# -- generation -----------------------------------------------------------------------------


def step_inputs(engine: Engine) -> dict:
    """A guidance batch of 2 at the generation size, a 1-chunk context, a timestep tensor."""
    settings, unet = engine.settings, engine.model.unet
    side = settings.size // engine.model.vae_scale_factor
    generator = torch.Generator().manual_seed(3)
    latents = torch.randn(2, unet.config.in_channels, side, side, generator=generator)
    context = torch.randn(2, 77, unet.config.cross_attention_dim, generator=generator)
    return {
        "sample": latents.to(settings.device, settings.dtype),
        "timestep": torch.tensor(999.0, device=settings.device),
        "encoder_hidden_states": context.to(settings.device, settings.dtype),
    }


def unet_step_flops(engine: Engine) -> float:
    """FLOPs of one U-Net step (matrix products and convolutions), counted on a real call."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        engine.model.unet(**step_inputs(engine))
    return float(counter.get_total_flops())


def time_unet_step(engine: Engine) -> float:
    """Median ms of one U-Net step (guidance batch of 2) under inference mode."""
    settings, unet, inputs = engine.settings, engine.model.unet, step_inputs(engine)
    with torch.inference_mode():
        return median_ms(
            lambda _: unet(**inputs), settings.device, warmup=settings.step_warmup, repeats=settings.step_repeats
        )


def generate_with_nai_fast(engine: Engine, way: Way, steps: int) -> None:
    from nai_fast import txt2img

    settings = engine.settings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights and small dry-run sizes
        txt2img(
            engine.model, PROMPT, negative_prompt=NEGATIVE_PROMPT, width=settings.size, height=settings.size,
            steps=steps, guidance_scale=GUIDANCE_SCALE, seed=SEED, sampler="euler_a", clip_skip=CLIP_SKIP,
            encoder=encoder_for(engine, way), progress=False,
        )  # fmt: skip


def stock_pipeline(engine: Engine):
    """diffusers' own StableDiffusionPipeline on the same components, Euler a."""
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionPipeline

    components = engine.model.pipeline_components()
    components["scheduler"] = EulerAncestralDiscreteScheduler.from_config(engine.model.scheduler.config)
    pipe = StableDiffusionPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate_with_diffusers(engine: Engine, pipe, steps: int) -> None:
    settings = engine.settings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe(
            PROMPT, negative_prompt=NEGATIVE_PROMPT, height=settings.size, width=settings.size,
            num_inference_steps=steps, guidance_scale=GUIDANCE_SCALE,
            generator=torch.Generator().manual_seed(SEED), output_type="pil",
        )  # fmt: skip


def measure_generation(recorder: Recorder, engine: Engine, name: str, generate: Callable[[int], None],
                       step_flops: float, rates) -> None:  # fmt: skip
    """A U-Net step and a full txt2img with whatever is installed now."""
    settings = engine.settings
    step_ms = time_unet_step(engine)
    generate(1)  # warm-up: compiles, caches, first calls
    with peak_memory(settings.device) as peak:
        seconds = sorted(
            wall_seconds(lambda: generate(settings.steps), settings.device) for _ in range(settings.rounds)
        )
    txt2img_s = seconds[len(seconds) // 2]
    recorder.add(
        kind="generation", variant=name, size=f"{settings.size}x{settings.size}", steps=settings.steps,
        step_ms=step_ms, step_its=1e3 / step_ms, txt2img_s=txt2img_s, txt2img_its=settings.steps / txt2img_s,
        peak_gib=peak["gib"], step_tflops=step_flops / (step_ms * 1e-3) / 1e12,
        tensor_fraction=step_flops / (step_ms * 1e-3) / rates.tensor_flops,
    )  # fmt: skip


def run_generation(recorder: Recorder, engine: Engine, rates, dry_run: bool) -> None:
    settings = engine.settings
    step_flops = unet_step_flops(engine)
    recorder.info(unet_step_flops=step_flops, anchors_its=ANCHORS)
    with recorder.attempt("generation: diffusers"):
        if not recorder.out_of_time("generation: diffusers", needed=15):
            install(engine, Way("diffusers", "stock", False, "reference"), None)
            pipe = stock_pipeline(engine)
            measure_generation(recorder, engine, "diffusers", lambda steps: generate_with_diffusers(engine, pipe, steps),
                               step_flops, rates)  # fmt: skip
    hypernetwork = new_hypernetwork(engine, settings.dtype).eval()
    for way in generation_ways(dry_run):
        what = f"generation: {way.name}"
        if recorder.out_of_time(what, needed=15):
            break
        with recorder.attempt(what):
            install(engine, way, hypernetwork)
            measure_generation(
                recorder,
                engine,
                way.name,
                lambda steps, way=way: generate_with_nai_fast(engine, way, steps),
                step_flops,
                rates,
            )
    install(engine, Way("stock", "stock", False, "auto"), None)


# -- hypernetwork training ------------------------------------------------------------------


def training_batch(engine: Engine) -> dict:
    """Latents (as cached latents are), noise, timesteps, and 3-chunk tag captions."""
    settings, model = engine.settings, engine.model
    scale = model.vae_scale_factor
    shape = (
        settings.train_batch,
        model.unet.config.in_channels,
        settings.train_height // scale,
        settings.train_width // scale,
    )
    generator = torch.Generator().manual_seed(4)
    latents, noise = (torch.randn(shape, generator=generator) for _ in "ln")
    timesteps = torch.randint(
        0, model.scheduler.config.num_train_timesteps, (settings.train_batch,), generator=generator
    )
    shift = len(CAPTION_TAGS) // settings.train_batch
    captions = [", ".join(CAPTION_TAGS[i * shift :] + CAPTION_TAGS[: i * shift]) for i in range(settings.train_batch)]
    device = settings.device
    noisy = model.scheduler.add_noise(latents, noise, timesteps)
    return {
        "noisy": noisy.to(device),
        "noise": noise.to(device),
        "timesteps": timesteps.to(device),
        "captions": captions,
    }


def training_step(engine: Engine, encoder, hypernetwork, optimizer, batch: dict) -> None:
    """As nai_fast's train() takes a hypernetwork step (penalty off: the web UI has none)."""
    settings, model = engine.settings, engine.model
    with torch.no_grad():
        half = (len(batch["captions"]) + 1) // 2  # as train(): one encode call for all captions
        first, second = batch["captions"][:half], batch["captions"][half:]
        cond, uncond = encoder.encode(first, second + [""] * (half - len(second)))
        context = torch.cat([cond, uncond])[: len(batch["captions"])]
    with torch.autocast(settings.device.type, dtype=settings.train_dtype):
        prediction = model.unet(
            batch["noisy"].to(model.unet.dtype), batch["timesteps"], encoder_hidden_states=context.to(model.unet.dtype)
        ).sample
    loss = F.mse_loss(prediction.float(), batch["noise"].float())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(hypernetwork.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def run_training(recorder: Recorder, engine: Engine, dry_run: bool) -> None:
    settings, model = engine.settings, engine.model
    for network in (model.unet, model.text_encoder):
        network.to(dtype=settings.train_dtype)  # frozen networks in bf16, as train() does
    batch = training_batch(engine)
    for way in training_ways(dry_run):
        what = f"training: {way.name}"
        if recorder.out_of_time(what, needed=20):
            break
        with recorder.attempt(what):
            hypernetwork = new_hypernetwork(engine, torch.float32).train()
            optimizer = torch.optim.AdamW(hypernetwork.parameters(), lr=1e-5)
            install(engine, way, hypernetwork)
            encoder = encoder_for(engine, way, syntax="none")
            try:
                with peak_memory(settings.device) as peak:
                    ms = median_ms(
                        lambda _: training_step(engine, encoder, hypernetwork, optimizer, batch), settings.device,
                        warmup=settings.train_warmup, repeats=settings.train_repeats,
                    )  # fmt: skip
            finally:
                install(engine, Way("stock", "stock", False, "auto"), None)
            recorder.add(
                kind="training", variant=way.name, size=f"{settings.train_width}x{settings.train_height}",
                batch=settings.train_batch, dtype=str(settings.train_dtype).removeprefix("torch."), step_ms=ms,
                images_per_s=settings.train_batch / (ms * 1e-3), peak_gib=peak["gib"],
            )  # fmt: skip


# -- torch.compile --------------------------------------------------------------------------


def run_compiled(recorder: Recorder, engine: Engine, rates, dry_run: bool) -> None:
    """nai_fast, stock processors, the U-Net channels-last and compiled (the compile time is
    recorded first, so a compile that overruns the budget still says how far it got)."""
    settings, unet = engine.settings, engine.model.unet
    install(engine, Way("stock", "stock", False, "auto"), None)
    step_flops = unet_step_flops(engine)
    unet.to(memory_format=torch.channels_last)
    unet.compile(backend="eager" if dry_run else "inductor")
    recorder.add(kind="compile", stage="started", time_left_s=recorder.time_left())
    start = time.perf_counter()
    time_unet_step(engine)  # compiles
    recorder.add(kind="compile", stage="compiled", seconds=time.perf_counter() - start)
    way = Way("nai_fast, compiled U-Net (channels-last)", "stock", False, "auto")
    measure_generation(
        recorder, engine, way.name, lambda steps: generate_with_nai_fast(engine, way, steps), step_flops, rates
    )


def body(recorder: Recorder, arguments: argparse.Namespace) -> None:
    dry_run = arguments.dry_run
    settings = Settings.for_run(dry_run)
    if settings.device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("no CUDA device: run with --dry-run on a machine without a GPU")
    rates = measured_device(arguments.ceilings, settings.device)
    start = time.perf_counter()
    engine = build(settings)
    recorder.info(preset=settings.preset, dtype=str(settings.dtype), build_s=time.perf_counter() - start,
                  tensor_flops=rates.tensor_flops, rates=rates.name)  # fmt: skip
    if arguments.compile:
        run_compiled(recorder, engine, rates, dry_run)
        return
    run_generation(recorder, engine, rates, dry_run)
    run_training(recorder, engine, dry_run)


def main() -> None:
    parser = part_arguments("the GPU check's engine part")
    parser.add_argument("--compile", action="store_true", help="torch.compile the U-Net (the compile part)")
    arguments = parser.parse_args()
    run_part("compile" if arguments.compile else "engine", body, arguments)


if __name__ == "__main__":
    main()
