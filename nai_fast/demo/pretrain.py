"""Train the ``tiny`` preset from scratch on the demo's coloured shapes, on a CPU.

``python -m nai_fast.demo.pretrain --install`` made the weights the package ships
(``nai_fast/models/weights/tiny.safetensors``). Four stages, seeded and repeatable; each
one's result is kept in ``--output-dir``, so running the command again resumes where it stopped:

1. **Data**: ``make_demo_dataset`` draws the tagged shapes; a second set in the outline style
   joins the VAE's images only, so the VAE is a general codec of such pictures (as SD's VAE saw
   far more than any fine-tune) while the U-Net never sees an outline.
2. **VAE**: a plain loop here (the engine trains denoisers, not autoencoders): every image fitted
   to its bucket at the model's resolution, random crops, MSE plus a small KL term, and latents
   that preview their colours linearly, as SD's do (:func:`_train_vae` says why). Then the
   latent scaling factor is measured, as SD's 0.18215 was: one over the latents' std.
3. **Text encoder**: random CLIP weights (the real tokenizer) learn which words of a caption go
   together (:func:`_train_text_encoder` says why they must).
4. **U-Net**: :func:`nai_fast.engine.train.train` in ``finetune`` mode: aspect-ratio buckets,
   cached latents, tag shuffling and caption dropout (for guidance), an EMA of the weights. The
   run checkpoints as any run does, and resumes. It predicts v, not epsilon, with offset noise:
   these pictures are mostly one flat colour, which the sampler's first, noisiest steps decide.
   An epsilon loss all but ignores how well those steps predict the picture (its weight on the
   image error is the signal-to-noise ratio, 0.005 at the last timestep; v's is that plus one),
   and on a 16x16 latent the mean colour still shows through the noisiest training inputs, so a
   model learns to read it there instead of from the prompt; offset noise hides it (NovelAI's V3
   moved to v-prediction for the same colour errors).

Prints a tqdm bar per stage; writes ``loss.png`` (every stage's loss), the logs and ``minutes.json``
(what each stage took).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

__all__ = ["PretrainConfig", "pretrain"]


@dataclass
class PretrainConfig:
    """The budget and settings of a pretraining run (each a ``--option`` of the command)."""

    output_dir: str = "nai-fast-pretrain"
    images: int = 3000  # tagged images of the demo vocabulary
    vae_images: int = 1500  # extra outline-style images for the VAE only
    vae_steps: int = 1600
    vae_batch_size: int = 16
    vae_crop: int = 64
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-6  # SD's VAE's; more makes the latents so noisy that small shapes lose their colour
    vae_preview_weight: float = 1.0  # the latents' linear colour preview (see _train_vae)
    text_steps: int = 300
    text_batch_size: int = 64
    text_lr: float = 1e-3
    unet_steps: int = 1700
    batch_size: int = 32
    lr: float = 1e-3
    prediction_type: str = "v_prediction"
    noise_offset: float = 0.1
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        from ..models.stable_diffusion import check_prediction_type

        check_prediction_type(self.prediction_type)


def pretrain(config: PretrainConfig, weights: Path) -> dict[str, float]:
    """Run the stages and write the model to ``weights``; returns the minutes each stage took."""
    from ..engine.demo_data import make_demo_dataset
    from ..models.presets import build_preset, save_pretrained_weights

    output = Path(config.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    stages = _Stages(output)
    data, extra = output / "data", output / "vae-extra"
    with stages.timed("data", resumed=True):  # a second run finds the data: adds nothing
        sets = ((data, config.images, config.seed, False), (extra, config.vae_images, config.seed + 1, True))
        for folder, count, seed, outline in sets:
            if not (folder / f"{count - 1:05d}.txt").is_file():
                make_demo_dataset(folder, count=count, seed=seed, outline=outline)

    model = build_preset("tiny-random", seed=config.seed)
    losses = {
        "VAE": stages.network("vae", model.vae, lambda: _train_vae(model, [data, extra], config, output)),
    }
    scaling = _measure_scaling_factor(model, data, config)
    model.vae.register_to_config(scaling_factor=scaling)
    log.info("VAE latent scaling factor %.5f", scaling)
    losses["text encoder"] = stages.network(
        "text_encoder", model.text_encoder, lambda: _train_text_encoder(model, config, output)
    )
    with stages.timed("unet", resumed=True):
        result = _train_unet(model, data, config, output)
    losses["U-Net"] = _read_column(output / "unet" / "training_log.csv", "loss")
    _plot_losses(losses, output / "loss.png")

    metadata = {
        "made_by": "python -m nai_fast.demo.pretrain",
        "config": repr(asdict(config)),
        "minutes": repr({key: round(value, 1) for key, value in stages.minutes.items()}),
        "unet_final_loss": repr(result.final_loss),
        "torch": torch.__version__,
    }
    save_pretrained_weights(
        weights,
        metadata,
        prediction_type=config.prediction_type,
        unet=model.unet,
        vae=model.vae,
        text_encoder=model.text_encoder,
    )
    return stages.minutes


class _Stages:
    """Each stage's result and minutes in the output folder, so that a second run resumes.

    A network stage writes ``NAME.safetensors`` and its log ``NAME_log.csv``; a run that finds the
    file loads it instead. ``minutes.json`` keeps what every finished stage took, across runs.
    """

    def __init__(self, output: Path) -> None:
        self.output = output
        self.minutes_file = output / "minutes.json"
        self.minutes: dict[str, float] = json.loads(self.minutes_file.read_text()) if self.minutes_file.is_file() else {}

    @contextmanager
    def timed(self, name: str, *, resumed: bool = False):
        """Time a stage; ``resumed``: it goes on where an earlier run stopped, so the minutes add up.
        Kept when the stage is interrupted too: a resumed U-Net run then adds to the time already spent."""
        started = time.monotonic()
        try:
            yield
        finally:
            spent = (time.monotonic() - started) / 60
            self.minutes[name] = spent + (self.minutes.get(name, 0.0) if resumed else 0.0)
            self.minutes_file.write_text(json.dumps(self.minutes, indent=1))

    def network(self, name: str, module: torch.nn.Module, train) -> list[float]:
        """Train ``module`` by ``train()`` unless an earlier run saved it; its losses."""
        import safetensors.torch

        file = self.output / f"{name}.safetensors"
        if file.is_file():
            module.load_state_dict(safetensors.torch.load_file(str(file)))
        else:
            with self.timed(name):
                train()
            safetensors.torch.save_file(module.state_dict(), str(file))
        return _read_column(self.output / f"{name}_log.csv", "loss")


def _fitted_images(folder: Path, resolution: int, unit: int, limit: int | None = None) -> list[torch.Tensor]:
    """The images of ``folder`` (the first ``limit``, or all) fitted to their buckets (scaled,
    cropped at a seeded offset), as uint8 CHW."""
    from ..data.buckets import assign, scaled_buckets
    from ..data.images import fit
    from ..data.scan import scan

    found = scan(folder)
    buckets = scaled_buckets(resolution, unit)
    images = []
    for path, bucket in list(zip(found.paths, assign(found.sizes, buckets).tolist()))[:limit]:
        width, height = buckets[bucket]
        pixels = fit(found.root / path, int(width), int(height), 0).pixels  # in [-1, 1]
        images.append(((pixels + 1) * 127.5).round().to(torch.uint8))
    return images


def _train_vae(model, folders: list[Path], config: PretrainConfig, output: Path) -> list[float]:
    """Train the VAE; besides reconstruction and KL, its latents must give a linear colour preview.

    SD's latents are close to a linear map of the colours they cover (the web UI's cheap live
    preview is one 4x3 matrix). Trained on reconstruction alone, this VAE found a code that is not:
    green, blue and black shapes lay on one line of the latent space, their codes differing only
    in length and shifting with the background, so a small error of the U-Net's in a shape's latent
    drew another colour. So a 1x1 convolution, trained with the VAE and then dropped, must map the
    latent means to the image's 8x8-pixel averages: every colour keeps its own direction.
    """
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from tqdm.auto import tqdm

    vae = model.vae.train().requires_grad_(True)
    images = [image for folder in folders for image in _fitted_images(folder, model.resolution, model.size_unit)]
    rng = np.random.default_rng(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    preview = torch.nn.Conv2d(vae.config.latent_channels, 3, 1)
    parameters = [*vae.parameters(), *preview.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=config.vae_lr, weight_decay=0.0)
    schedule = get_cosine_schedule_with_warmup(optimizer, 50, config.vae_steps)
    losses = []
    crop, cell = config.vae_crop, model.vae_scale_factor  # cell: the pixels a latent covers, per side
    with open(output / "vae_log.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["step", "loss", "mse", "kl", "preview"])
        bar = tqdm(range(1, config.vae_steps + 1), desc="VAE", disable=not config.progress)
        for step in bar:
            batch = []
            for index in rng.integers(len(images), size=config.vae_batch_size):
                image = images[index]
                top = rng.integers(image.shape[1] - crop + 1)
                left = rng.integers(image.shape[2] - crop + 1)
                batch.append(image[:, top : top + crop, left : left + crop])
            pixels = torch.stack(batch).float() / 127.5 - 1
            posterior = vae.encode(pixels).latent_dist
            latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
            reconstruction = vae.decode(latents).sample
            mse = torch.nn.functional.mse_loss(reconstruction, pixels)
            kl = 0.5 * (posterior.mean**2 + posterior.var - 1 - posterior.logvar).mean()
            preview_mse = torch.nn.functional.mse_loss(preview(posterior.mean), torch.nn.functional.avg_pool2d(pixels, cell))
            loss = mse + config.vae_kl_weight * kl + config.vae_preview_weight * preview_mse
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            writer.writerow([step, losses[-1], mse.item(), kl.item(), preview_mse.item()])
            bar.set_postfix(mse=f"{mse.item():.4f}")
    vae.eval().requires_grad_(False)
    return losses


def _train_text_encoder(model, config: PretrainConfig, output: Path) -> list[float]:
    """Teach the random CLIP text encoder which words go together, so the U-Net can read a scene.

    A random causal transformer passes each word on but barely binds it to its neighbours: in
    ``red circle, blue background`` the ``background`` token hardly tells which colour preceded
    it, and with tags in any order that binding is all there is. So the encoder (through the
    same long-prompt encoder and penultimate layer the U-Net reads) trains with one attention
    probe per scene attribute, a learned query over the tokens and a linear classifier, as the
    U-Net's cross-attention will read them, on random scenes with tags shuffled; the probes are
    then dropped. Like CLIP's own pretraining, it shapes the text features before any image
    model reads them.
    """
    from tqdm.auto import tqdm

    from ..engine.demo_data import Scene
    from ..text.encoder import LongPromptEncoder

    text_encoder = model.text_encoder.train().requires_grad_(True)
    encoder = LongPromptEncoder(model.tokenizer, text_encoder, clip_skip=2, max_chunks=1, syntax="none", comma_backtrack=0)
    probes = _AttributeProbes(text_encoder.config.hidden_size)
    parameters = [*text_encoder.parameters(), *probes.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=config.text_lr, weight_decay=0.0)
    rng = np.random.default_rng([config.seed, 2])
    losses = []
    with open(output / "text_encoder_log.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["step", "loss", "accuracy"])
        bar = tqdm(range(1, config.text_steps + 1), desc="text encoder", disable=not config.progress)
        for step in bar:
            scenes = [Scene.draw_random(rng) for _ in range(config.text_batch_size)]
            captions = []
            for scene in scenes:
                tags = scene.tags
                rng.shuffle(tags)
                captions.append(", ".join(tags))
            half = len(captions) // 2  # prompts and "negatives" run in one call
            cond, uncond = encoder.encode(captions[:half], captions[half:])
            loss, accuracy = probes(torch.cat([cond, uncond]), scenes)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimizer.step()
            losses.append(loss.item())
            writer.writerow([step, losses[-1], accuracy])
            bar.set_postfix(loss=f"{losses[-1]:.3f}", accuracy=f"{accuracy:.2f}")
    text_encoder.eval().requires_grad_(False)
    return losses


class _AttributeProbes(torch.nn.Module):
    """Per scene attribute, a learned query attending over the tokens and a linear classifier."""

    def __init__(self, width: int) -> None:
        from ..engine.demo_data import COLORS, POSITIONS, SHAPES

        super().__init__()
        self.classes = {
            "color": list(COLORS),
            "background": list(COLORS),
            "shape": list(SHAPES),
            "large": [False, True],
            "position": list(POSITIONS),
        }
        self.queries = torch.nn.Parameter(torch.randn(len(self.classes), width) / width**0.5)
        self.keys = torch.nn.Linear(width, width)
        self.heads = torch.nn.ModuleList(torch.nn.Linear(width, len(names)) for names in self.classes.values())

    def forward(self, features: torch.Tensor, scenes) -> tuple[torch.Tensor, float]:
        weights = torch.softmax(torch.einsum("btw,aw->bat", self.keys(features), self.queries), dim=-1)
        pooled = torch.einsum("bat,btw->baw", weights, features)
        loss, right = 0.0, 0.0
        for index, (attribute, names) in enumerate(self.classes.items()):
            target = torch.tensor([names.index(getattr(scene, attribute)) for scene in scenes])
            logits = self.heads[index](pooled[:, index])
            loss = loss + torch.nn.functional.cross_entropy(logits, target)
            right += (logits.argmax(-1) == target).float().mean().item()
        return loss, right / len(self.classes)


@torch.no_grad()
def _measure_scaling_factor(model, folder: Path, config: PretrainConfig) -> float:
    """One over the std of the latents of up to 256 images, so the U-Net sees unit variance."""
    images = _fitted_images(folder, model.resolution, model.size_unit, limit=256)
    samples = [model.vae.encode(image[None].float() / 127.5 - 1).latent_dist.mean.flatten() for image in images]
    return float(1.0 / torch.cat(samples).std())


def _train_unet(model, data: Path, config: PretrainConfig, output: Path):
    from diffusers import DDPMScheduler

    from ..engine.config import TrainConfig
    from ..engine.train import train

    model = model.with_scheduler(DDPMScheduler.from_config(model.scheduler.config, prediction_type=config.prediction_type))
    run = output / "unet"
    resume = (run / "training_state.pt").is_file()
    train_config = TrainConfig(
        model="tiny-random",
        data=str(data),
        output_dir=str(run),
        resume=resume,
        mode="finetune",
        max_steps=config.unet_steps,
        batch_size=config.batch_size,
        lr=config.lr,
        lr_schedule="cosine",
        warmup_steps=min(200, config.unet_steps // 10),
        resolution=model.resolution,
        cache_latents=True,
        caption_dropout=0.1,  # unconditional steps, for classifier-free guidance
        noise_offset=config.noise_offset,
        shuffle_tags=True,  # tag order carries no meaning, as in NovelAI's training
        max_chunks=1,
        ema=True,
        ema_decay=0.999,
        save_every=250,
        seed=config.seed,
        progress=config.progress,
        tensorboard=False,
    )
    result = train(train_config, model=model)
    import safetensors.torch

    # The EMA of the weights draws better than the last step's weights.
    model.unet.load_state_dict(safetensors.torch.load_file(str(run / "unet_ema.safetensors")))
    model.unet.eval().requires_grad_(False)
    return result


def _read_column(path: Path, column: str) -> list[float]:
    with open(path, newline="") as file:
        return [float(row[column]) for row in csv.DictReader(file)]


def _plot_losses(curves: dict[str, list[float]], path: Path, size: tuple[int, int] = (480, 200)) -> None:
    """Each curve (smoothed, log scale) in its own panel of one PNG; no plotting library needed."""
    from PIL import Image, ImageDraw

    width, height = size
    sheet = Image.new("RGB", (width, height * len(curves)), "white")
    draw = ImageDraw.Draw(sheet)
    for panel, (name, values) in enumerate(curves.items()):
        top = panel * height
        logs = np.log10(np.maximum(values, 1e-8))
        smoothed = np.convolve(logs, np.ones(25) / 25, mode="valid") if len(logs) >= 25 else logs
        low, high = float(smoothed.min()), float(smoothed.max()) + 1e-9
        points = [
            (40 + (width - 50) * i / max(len(smoothed) - 1, 1), top + 20 + (height - 40) * (high - v) / (high - low))
            for i, v in enumerate(smoothed)
        ]
        draw.line(points, fill=(40, 80, 220), width=2)
        draw.text((45, top + 4), f"{name} loss (log10, smoothed): {10**high:.4f} -> {10**smoothed[-1]:.4f}", fill="black")
        draw.rectangle((40, top + 18, width - 10, top + height - 18), outline=(160, 160, 160))
    sheet.save(path)


def main(argv: list[str] | None = None) -> int:
    from ..models.presets import pretrained_weights_path

    defaults = PretrainConfig()
    parser = argparse.ArgumentParser(prog="python -m nai_fast.demo.pretrain", description=__doc__.split("\n\n")[0])
    for name, value in asdict(defaults).items():
        if name == "progress":
            continue
        parser.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--weights", type=Path, help="where the model goes (default: OUTPUT_DIR/tiny.safetensors)")
    target.add_argument("--install", action="store_true", help="write the weights the package ships (the tiny preset's)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    weights = pretrained_weights_path("tiny") if args.install else (args.weights or Path(args.output_dir) / "tiny.safetensors")
    settings = {key: value for key, value in vars(args).items() if key not in ("weights", "install")}
    started = time.monotonic()
    minutes = pretrain(PretrainConfig(**settings), weights)
    stages = ", ".join(f"{stage} {spent:.1f}" for stage, spent in minutes.items())
    print(f"wrote {weights} in {(time.monotonic() - started) / 60:.1f} min ({stages})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
