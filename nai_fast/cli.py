"""The ``nai-fast`` command line.

Each subcommand imports what it needs when it runs, so ``nai-fast --help``
stays instant.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections.abc import Sequence

from . import __version__


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nai-fast", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"nai_fast {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_buckets(commands)
    _add_generate(commands)
    _add_train(commands)
    _add_info(commands)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.argv = argv  # as typed: `train` prints it back, with --resume, when a signal stops the run
    _configure_logging(args.command)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, RuntimeError) as error:
        parser.exit(2, f"nai-fast {args.command}: error: {error}\n")
    except KeyboardInterrupt as error:  # Ctrl-C where nothing handles it, or a second one (nai_fast.engine.stop.Aborted)
        parser.exit(getattr(error, "exit_code", 130), f"nai-fast {args.command}: {error or 'interrupted'}\n")


def _configure_logging(command: str) -> None:
    """Log records reach the user as one line each on stderr (``WARNING: prompt longer ...``),
    unless the program embedding us configured logging itself. Training reports its progress
    at INFO; the other commands say only what needs attention, each thing once (generate
    meets the same size and prompt at every batch)."""
    root = logging.getLogger()
    if root.handlers:
        return
    level = logging.INFO if command == "train" else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s: %(message)s", stream=sys.stderr)
    if command != "train":
        root.handlers[0].addFilter(_OncePerMessage())


class _OncePerMessage(logging.Filter):
    """Lets each distinct message through once."""

    def __init__(self) -> None:
        super().__init__()
        self._seen: set[tuple[int, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.levelno, record.getMessage())
        if key in self._seen:
            return False
        self._seen.add(key)
        return True


def _add_buckets(commands: argparse._SubParsersAction) -> None:
    from .data.buckets import PRESETS

    command = commands.add_parser(
        "buckets",
        help="show how a folder of images falls into aspect-ratio buckets",
        description="Scan DIR for images (or use a built-in sample of image sizes) and show how they fall "
        "into aspect-ratio buckets: images per bucket, pruning, aspect error, cropping, batches per epoch.",
    )
    command.add_argument("dir", nargs="?", help="image folder (default: a built-in sample of image sizes)")
    command.add_argument("--preset", choices=sorted(PRESETS), default="sd1", help="bucket grid (default: sd1)")
    command.add_argument("--batch-size", type=int, default=4, help="images per batch (default: 4)")
    command.add_argument("--world-size", type=int, default=1, help="data-parallel ranks (default: 1)")
    command.add_argument(
        "--max-aspect-error",
        type=float,
        default=0.5,
        help="prune images whose aspect error reaches this; in log units the default 0.5 prunes "
        "images that would lose about 40%% or more of their pixels (default: 0.5)",
    )
    command.add_argument("--metric", choices=("log", "linear"), default="log", help="aspect metric (default: log)")
    command.add_argument("--seed", type=int, default=0, help="shuffle seed of the epoch shown (default: 0)")
    command.add_argument("--plot", metavar="FILE.png", help="also write a chart of the distribution")
    command.add_argument("--json", action="store_true", help="print the figures as JSON instead of a table")
    command.set_defaults(run=_run_buckets)


def _run_buckets(args: argparse.Namespace) -> int:
    from .data.buckets import preset_buckets
    from .data.report import describe, format_table, plot

    if args.dir is None:
        from .data.sample import sample_sizes

        sizes, source, found = sample_sizes(), "built-in sample", None
    else:
        from .data.scan import scan

        found = scan(args.dir, progress=sys.stderr.isatty())
        sizes, source = found.sizes, args.dir
        if not found.paths:
            print(f"no images found under {args.dir}", file=sys.stderr)
            print(_skipped_lines(found.skipped_files(), limit=None), file=sys.stderr, end="")
            return 1
    figures = describe(
        sizes,
        preset_buckets(args.preset),
        batch_size=args.batch_size,
        world_size=args.world_size,
        max_aspect_error=args.max_aspect_error,
        metric=args.metric,
        seed=args.seed,
    )
    figures = {"source": source, "preset": args.preset, **figures}
    if found is not None:
        figures["unreadable"] = found.skipped_counts()
        figures["skipped"] = found.skipped_files()
        figures["files"] = found.num_files
    if args.plot:
        plot(figures, args.plot)
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        print(f"{source}, preset {args.preset}\n")
        print(format_table(figures))
        if figures.get("skipped"):
            print(f"\n{_skipped_lines(figures['skipped'], limit=_SKIPPED_SHOWN)}", end="")
        if args.plot:
            print(f"\nchart written to {args.plot}")
    return 0


_SKIPPED_SHOWN = 10  # skipped files named in the text report; --json lists every one


def _skipped_lines(skipped: list[dict[str, str]], limit: int | None) -> str:
    """The skipped files, one ``path: reason`` line each, the first ``limit`` of them."""
    if not skipped:
        return ""
    shown = skipped if limit is None else skipped[:limit]
    heading = "skipped files"
    if len(shown) < len(skipped):
        heading += f" (first {len(shown)} of {len(skipped)}; --json lists all)"
    return heading + ":\n" + "".join(f"  {item['path']}: {item['reason']}\n" for item in shown)


# Built-in models of nai_fast.models.presets.PRESETS, spelled out so `--help` needs no torch import
# (tests/test_generate.py checks the two agree).
_MODEL_PRESETS = ("sd15", "tiny")
_TRAIN_OUTPUT = "nai-fast-output"  # nai_fast.engine.generate.DEFAULT_TRAIN_OUTPUT, spelled out for the same reason
_SIZE_STEP = 64  # nai_fast.engine.generate.SIZE_STEP: sizes are checked before torch is imported
_MAX_SEED = 2**32 - 1  # nai_fast.engine.generate.MAX_SEED


def _add_generate(commands: argparse._SubParsersAction) -> None:
    command = commands.add_parser(
        "generate",
        help="generate images from a prompt (txt2img)",
        description="Generate images from a prompt with classifier-free guidance, NovelAI's way (penultimate "
        "CLIP layer, long weighted prompts, hypernetworks, LoRAs), and write them as PNGs named INDEX-SEED.png "
        "carrying their generation parameters (the web UI's 'parameters' text). Image i of a run uses seed "
        "SEED+i, so any image can be made again alone. Arguments and files are checked before any model loads.",
    )
    source = command.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--preset", choices=_MODEL_PRESETS, help="a built-in model with random weights (tiny: small, fast, for demos)"
    )
    source.add_argument("--model", metavar="PATH", help="a diffusers folder or a single .safetensors/.ckpt checkpoint")
    command.add_argument("--vae", metavar="FILE", help="a VAE file replacing the model's own")
    command.add_argument(
        "--hypernetwork",
        metavar="FILE[:STRENGTH]",
        action="append",
        default=[],
        type=_hypernetwork_argument,
        help="a hypernetwork (.pt or .safetensors) and its strength (default 1); repeat to apply several in "
        f"order. Without it, --preset tiny uses {_TRAIN_OUTPUT}/hypernetwork.safetensors when "
        "`nai-fast train --preset tiny` has written it",
    )
    command.add_argument(
        "--lora",
        metavar="FILE[:STRENGTH]",
        action="append",
        default=[],
        type=_hypernetwork_argument,  # the same FILE[:STRENGTH] rule
        help="a LoRA (kohya/web UI, diffusers or PEFT layout; .safetensors or .pt) and its strength (default 1), "
        "merged into the weights; repeat to apply several (they add up)",
    )
    command.add_argument(
        "--prompt", required=True, metavar="TEXT", help="what to draw; long prompts, (emphasis:1.2) and BREAK work"
    )
    command.add_argument(
        "--negative-prompt", default="", metavar="TEXT", help="what to steer away from (default: none)"
    )
    command.add_argument(
        "--seed",
        type=_seed_argument,
        help=f"seed of the first image, 0..{_MAX_SEED}; -1: a random one, printed (default: -1)",
    )
    command.add_argument(
        "--width",
        type=int,
        help="pixels, a multiple of 64 (default: the model's resolution: 512 for SD 1.x, 128 for --preset tiny)",
    )
    command.add_argument("--height", type=int, help="pixels, a multiple of 64 (default: the model's resolution)")
    command.add_argument("--steps", type=_positive_int, default=28, help="sampling steps (default: 28)")
    command.add_argument(
        "--sampler",
        choices=("euler_a", "euler", "ddim", "dpmpp_2m_karras"),
        default="euler_a",
        help="sampler (default: euler_a, NovelAI's)",
    )
    command.add_argument("--scale", type=float, default=11.0, help="classifier-free guidance scale (default: 11)")
    command.add_argument(
        "--clip-skip", type=_positive_int, default=2, help="CLIP layer, from the last; 2 is NovelAI's (default: 2)"
    )
    command.add_argument("--batch-size", type=_positive_int, default=1, help="images per batch (default: 1)")
    command.add_argument("--batch-count", type=_positive_int, default=1, help="batches to generate (default: 1)")
    command.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    command.add_argument(
        "--dtype",
        choices=("float32", "float16", "bfloat16"),
        help="precision of the networks (default: float16 on CUDA, float32 elsewhere)",
    )
    command.add_argument(
        "--output-dir", default="nai-fast-images", metavar="DIR", help="where PNGs go (default: nai-fast-images)"
    )
    command.set_defaults(run=_run_generate)


def _hypernetwork_argument(text: str) -> tuple[str, float]:
    # FILE or FILE:STRENGTH. The text after the last colon is a strength when it reads as a
    # number; otherwise it must be part of the path (C:\x.pt, or a file whose name has a colon).
    path, colon, strength = text.rpartition(":")
    if not colon:
        return text, 1.0
    try:
        value = float(strength)
    except ValueError:
        if "/" in strength or "\\" in strength or os.path.exists(text):
            return text, 1.0
        raise argparse.ArgumentTypeError(
            f"{text!r}: the strength after the last ':' must be a number, got {strength!r} (and no file is "
            f"named {text!r})"
        ) from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r}: the strength must be a finite number, got {strength!r}")
    return path, value


def _seed_argument(text: str) -> int | None:
    """A seed in 0..2**32-1, or None (a random one) for -1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if value == -1:
        return None
    if not 0 <= value <= _MAX_SEED:
        raise argparse.ArgumentTypeError(f"must lie in 0..{_MAX_SEED}, or be -1 for a random seed; got {value}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _run_generate(args: argparse.Namespace) -> int:
    import secrets
    from pathlib import Path

    # Everything that can be checked without a model is checked first, before torch is even
    # imported: a wrong size, seed or path fails at once, and a failed run writes nothing.
    for name in ("width", "height"):
        side = getattr(args, name)
        if side is not None and (side <= 0 or side % _SIZE_STEP):
            raise ValueError(f"{name} must be a positive multiple of {_SIZE_STEP}, got {side}")
    count = args.batch_count * args.batch_size
    if args.seed is not None and args.seed + count - 1 > _MAX_SEED:
        raise ValueError(
            f"--seed {args.seed} with {count} images gives seeds past {_MAX_SEED}; use a seed of at most "
            f"{_MAX_SEED - count + 1}"
        )
    _check_exists("--model", args.model)
    _check_exists("--vae", args.vae)
    for path, _ in args.hypernetwork:
        _check_exists("--hypernetwork", path, file=True)
    for path, _ in args.lora:
        _check_exists("--lora", path, file=True)

    import torch

    from .hypernetworks.processors import apply_hypernetworks
    from .engine.generate import DEFAULT_TRAIN_OUTPUT, TRAINED_HYPERNETWORK_FILE, save_numbered, txt2img
    from .hypernetworks.modules import Hypernetwork
    from .models.load import load_model
    from .text.encoder import LongPromptEncoder

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))
    hypernetworks = list(args.hypernetwork)
    trained = Path(DEFAULT_TRAIN_OUTPUT) / TRAINED_HYPERNETWORK_FILE
    if not hypernetworks and trained.is_file():
        if args.preset == "tiny":  # the demo: `nai-fast train --preset tiny` trained it for these weights
            print(f"using the hypernetwork trained for the tiny preset: {trained}", file=sys.stderr)
            hypernetworks.append((str(trained), 1.0))
        else:
            print(f"hint: {trained} holds a trained hypernetwork; add --hypernetwork {trained} to use it", file=sys.stderr)
    model = load_model(args.model or args.preset, vae=args.vae)
    model.to(device, None if dtype == model.unet.dtype else dtype)
    if hypernetworks:
        networks = [Hypernetwork.load(path).to(device) for path, _ in hypernetworks]
        # Refuses a hypernetwork made for another model (it would change nothing).
        apply_hypernetworks(model.unet, networks, [strength for _, strength in hypernetworks])
    if args.lora:
        from .models.lora import apply_loras, load_lora

        # Merged into working copies of the weights, after the move: refuses a LoRA for another model.
        apply_loras(model, [load_lora(path) for path, _ in args.lora], [strength for _, strength in args.lora])
    # Like the web UI, every image's seed lies in 0..2**32-1: a drawn seed leaves room for the batch.
    seed = secrets.randbelow(_MAX_SEED + 2 - count) if args.seed is None else args.seed
    print(f"seed: {seed}", file=sys.stderr)
    encoder = LongPromptEncoder(model.tokenizer, model.text_encoder, clip_skip=args.clip_skip)
    for batch in range(args.batch_count):
        images = txt2img(
            model,
            args.prompt,
            negative_prompt=args.negative_prompt,
            width=args.width,  # None: the model's own resolution
            height=args.height,
            steps=args.steps,
            guidance_scale=args.scale,
            seed=seed + batch * args.batch_size,
            sampler=args.sampler,
            clip_skip=args.clip_skip,
            batch_size=args.batch_size,
            encoder=encoder,
            progress=sys.stderr.isatty(),
        )
        for generated in images:
            print(save_numbered(generated, args.output_dir))  # makes the folder with the first image
    return 0


def _check_exists(option: str, path: str | None, file: bool = False) -> None:
    """FileNotFoundError naming ``option`` unless ``path`` (when given) exists (as a file)."""
    if path is None:
        return
    if not os.path.exists(path):
        raise FileNotFoundError(f"{option} {path}: no such file or folder")
    if file and not os.path.isfile(path):
        raise FileNotFoundError(f"{option} {path}: not a file")


def _add_train(commands: argparse._SubParsersAction) -> None:
    command = commands.add_parser(
        "train",
        help="train a hypernetwork (or fine-tune the U-Net) on a folder of tagged images",
        description="Train a NovelAI-style hypernetwork (default) or fine-tune the U-Net on a folder of images "
        "with .txt tags beside them, with aspect-ratio buckets, shuffled tags, prompts of varied length "
        "(up to 225 tokens) and the penultimate CLIP layer. Writes hypernetwork.safetensors and "
        "hypernetwork.pt (the web UI's format), or unet.safetensors, plus training_state.pt (for --resume), "
        "training_log.csv and samples/ into the output folder; every checkpoint file is replaced atomically. "
        "Ctrl-C or SIGTERM finishes the current step, saves a checkpoint and prints the command that resumes "
        "it (exit status 130 or 143); a second one stops at once. "
        "Runs unchanged under torchrun (one process per GPU, or gloo on CPU).",
    )
    source = command.add_mutually_exclusive_group()
    source.add_argument(
        "--preset", choices=_MODEL_PRESETS, help="a built-in model with random weights (default: tiny, for demos)"
    )
    source.add_argument("--model", metavar="PATH", help="a diffusers folder or a single .safetensors/.ckpt checkpoint")
    command.add_argument(
        "--data",
        metavar="DIR",
        help="images with .txt tags beside them (default with --preset tiny: a small procedural dataset made "
        "once in OUTPUT_DIR/demo-data)",
    )
    command.add_argument(
        "--output-dir", default=_TRAIN_OUTPUT, metavar="DIR", help=f"where results go (default: {_TRAIN_OUTPUT})"
    )
    earlier_run = command.add_mutually_exclusive_group()
    earlier_run.add_argument(
        "--resume", action="store_true", help="continue the run whose checkpoint is OUTPUT_DIR/training_state.pt"
    )
    earlier_run.add_argument(
        "--overwrite",
        action="store_true",
        help="start over in an OUTPUT_DIR that holds a run, replacing it at the first save (without this or "
        "--resume, such a folder is refused and left as it is)",
    )
    command.add_argument(
        "--mode",
        choices=("hypernetwork", "finetune"),
        default="hypernetwork",
        help="train a hypernetwork with everything else frozen, or fine-tune the U-Net (default: hypernetwork)",
    )
    command.add_argument(
        "--max-steps",
        type=_positive_int,
        default=1000,
        help="optimizer steps in all, resumed ones included (default: 1000)",
    )
    command.add_argument(
        "--batch-size", type=_positive_int, default=4, help="images per batch and process (default: 4)"
    )
    command.add_argument(
        "--grad-accum", type=_positive_int, default=1, help="batches whose gradients add up to one step (default: 1)"
    )
    command.add_argument("--lr", type=float, default=1e-5, help="AdamW learning rate (default: 1e-5)")
    command.add_argument(
        "--lr-schedule",
        choices=("constant", "cosine", "linear"),
        default="constant",
        help="after warmup (default: constant)",
    )
    command.add_argument("--warmup-steps", type=int, default=0, help="linear warmup from 0 (default: 0)")
    command.add_argument(
        "--resolution",
        type=int,
        metavar="PIXELS",
        help="side of the square base bucket; the SD 1.x grid (512x768 budget, sides 256..1024) is scaled to it "
        "(default: 128 for --preset tiny, the model's native size otherwise, 512 for SD 1.x)",
    )
    command.add_argument(
        "--mixed-precision",
        choices=("no", "fp16", "bf16"),
        default="no",
        help="autocast dtype; fp16 on CUDA adds loss scaling; frozen networks are stored in it on CUDA (default: no)",
    )
    command.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute U-Net activations in backward: less memory, slower",
    )
    command.add_argument(
        "--max-grad-norm",
        type=float,
        default=1.0,
        help="clip the gradient norm to this; 0 turns clipping off (default: 1)",
    )
    command.add_argument(
        "--penalty-weight",
        type=float,
        default=1.0,
        help="weight of NovelAI's penalty on the hypernetwork's shallowest (320-wide in SD 1.x) modules; 0 turns "
        "it off (default: 1)",
    )
    command.add_argument(
        "--ema", action="store_true", help="keep an EMA of the U-Net weights (finetune; unet_ema.safetensors)"
    )
    command.add_argument("--ema-decay", type=float, default=0.9999, help="EMA decay (default: 0.9999)")
    command.add_argument(
        "--caption-dropout", type=float, default=0.0, help="probability of training on an empty caption (default: 0)"
    )
    command.add_argument(
        "--keep-tokens", type=int, default=0, metavar="K", help="leading tags kept in place when shuffling (default: 0)"
    )
    command.add_argument(
        "--min-caption-tokens",
        type=int,
        default=50,
        help="captions are cut (trailing tags dropped) to a token budget drawn between this and 75 x max chunks "
        "(default: 50)",
    )
    command.add_argument("--max-chunks", type=_positive_int, default=3, help="75-token chunks per caption (default: 3)")
    command.add_argument(
        "--clip-skip",
        type=_positive_int,
        default=2,
        help="CLIP layer counted from the last: 2 is NovelAI's (default: 2)",
    )
    command.add_argument(
        "--hypernetwork-structure",
        default="1,2,1",
        metavar="M,M,...",
        help="widths of the hypernetwork's layers as multiples of the input width, starting and ending with 1 "
        "(default: 1,2,1)",
    )
    command.add_argument(
        "--activation",
        default="linear",
        help="after each hidden layer: linear (none), relu, swish, ... (default: linear)",
    )
    command.add_argument("--layer-norm", action="store_true", help="a LayerNorm after every hypernetwork layer")
    command.add_argument(
        "--hypernetwork-dropout", type=float, default=0.0, help="dropout after the hidden layers (default: 0)"
    )
    command.add_argument(
        "--cache-latents",
        action="store_true",
        help="encode each image once per bucket and keep its VAE latents; freezes one crop per image and bucket",
    )
    command.add_argument(
        "--save-every",
        type=int,
        default=500,
        metavar="N",
        help="checkpoint every N steps; 0: only at the end (default: 500)",
    )
    command.add_argument(
        "--sample-every",
        type=int,
        default=0,
        metavar="N",
        help="sample images every N steps and at the end; 0: never (default: 0)",
    )
    command.add_argument(
        "--sample-prompt",
        action="append",
        default=[],
        metavar="TEXT",
        help="prompt of a sample image (seed SEED+i for the i-th); repeat for several (default: the first image's tags)",
    )
    command.add_argument(
        "--sample-steps", type=_positive_int, default=20, help="sampling steps of samples (default: 20)"
    )
    command.add_argument(
        "--seed", type=int, default=0, help="seed of shuffles, crops, noise and initial weights (default: 0)"
    )
    command.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default: 0)")
    command.add_argument("--device", help="torch device (default: this process's GPU if there is one, else cpu)")
    command.add_argument(
        "--max-consecutive-skips",
        type=_positive_int,
        default=10,
        help="stop after this many steps in a row with a non-finite loss (default: 10)",
    )
    command.add_argument("--no-progress", action="store_true", help="no progress bar")
    command.set_defaults(run=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from .engine.train import TrainConfig, TrainingInterrupted, train

    try:
        structure = tuple(float(m) for m in args.hypernetwork_structure.split(","))
    except ValueError:
        raise ValueError(
            f"--hypernetwork-structure must be numbers separated by commas, got {args.hypernetwork_structure!r}"
        ) from None
    config = TrainConfig(
        model=args.model or args.preset or "tiny",
        data=args.data,
        output_dir=args.output_dir,
        mode=args.mode,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        lr=args.lr,
        lr_schedule=args.lr_schedule,
        warmup_steps=args.warmup_steps,
        resolution=args.resolution,
        mixed_precision=args.mixed_precision,
        gradient_checkpointing=args.gradient_checkpointing,
        max_grad_norm=args.max_grad_norm or None,
        penalty_weight=args.penalty_weight,
        ema=args.ema,
        ema_decay=args.ema_decay,
        caption_dropout=args.caption_dropout,
        keep_tokens=args.keep_tokens,
        min_caption_tokens=args.min_caption_tokens,
        max_chunks=args.max_chunks,
        clip_skip=args.clip_skip,
        hypernetwork_structure=structure,
        activation=args.activation,
        layer_norm=args.layer_norm,
        hypernetwork_dropout=args.hypernetwork_dropout,
        cache_latents=args.cache_latents,
        save_every=args.save_every,
        sample_every=args.sample_every,
        sample_prompts=tuple(args.sample_prompt),
        sample_steps=args.sample_steps,
        seed=args.seed,
        workers=args.workers,
        device=args.device,
        resume=args.resume,
        overwrite=args.overwrite,
        max_consecutive_skips=args.max_consecutive_skips,
        progress=not args.no_progress and sys.stderr.isatty(),
    )
    try:
        result = train(config)
    except TrainingInterrupted as stopped:
        if stopped.rank == 0:
            print(
                f"stopped by {stopped.signal.name} at step {stopped.step}, checkpoint saved in {stopped.output_dir}; "
                f"resume with: {_resume_command(args.argv)}",
                file=sys.stderr,
                flush=True,
            )
        return stopped.exit_code
    for path in result.paths:
        print(path)
    if result.paths:  # rank 0 only: the others wrote nothing
        loss = "n/a" if result.final_loss is None else f"{result.final_loss:.4f}"
        skipped = ", ".join(f"{count} {reason}" for reason, count in result.skipped_files.items()) or "none"
        print(
            f"{result.steps} steps, last loss {loss}; skipped steps {result.skipped_steps}, empty batches "
            f"{result.empty_batches}; files not trained on: {skipped}",
            file=sys.stderr,
        )
    return 0


def _resume_command(argv: Sequence[str]) -> str:
    """The command that continues a stopped run: this one, with --resume (and without --overwrite)."""
    import shlex

    # argparse takes unambiguous prefixes of an option too ("--overw"); "--o" alone is ambiguous.
    words = [word for word in argv if not (len(word) > 3 and "--overwrite".startswith(word))]
    if "--resume" not in words:
        words.append("--resume")
    return f"{_launcher()} {shlex.join(words)}"


def _launcher() -> str:
    """How this process was started, as a command to type again (the program before the arguments)."""
    import shlex
    import shutil
    from pathlib import Path

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun
        ranks_here = os.environ.get("LOCAL_WORLD_SIZE", "")
        if ranks_here == os.environ["WORLD_SIZE"]:
            return f"torchrun --nproc_per_node={ranks_here} -m nai_fast.cli"
        return "torchrun <the same torchrun options> -m nai_fast.cli"
    program = sys.argv[0] if sys.argv else ""
    if Path(program).name == "cli.py":  # python -m nai_fast.cli
        return f"{shlex.quote(sys.executable)} -m nai_fast.cli"
    if Path(program).name == "nai-fast" and os.path.isfile(program):  # the console script
        on_path = shutil.which("nai-fast")
        return "nai-fast" if on_path and os.path.samefile(on_path, program) else shlex.quote(program)
    return "nai-fast"  # main() called from Python


def _add_info(commands: argparse._SubParsersAction) -> None:
    command = commands.add_parser(
        "info",
        help="show versions, the GPU, and which kernels run; with --kernels, their cost model",
        description="Show the versions of nai_fast and its libraries, CUDA and the GPUs, the compiled extension, "
        "and which implementation each fused op takes here (NAI_FAST_KERNELS). With --kernels, also the cost "
        "model's figures for every fused op at the SD 1.x U-Net's attention shapes (float16, classifier-free "
        "guidance): FLOPs, the HBM bytes the kernels and the eager ops move, and the roofline time floors on "
        "A100 (312 TFLOP/s, 2.0 TB/s) and H100 SXM (989 TFLOP/s, 3.35 TB/s).",
    )
    command.add_argument("--kernels", action="store_true", help="also print the kernels' cost model")
    command.add_argument(
        "--size",
        metavar="WxH",
        action="append",
        type=_size_argument,
        help="image size for --kernels; repeat for several (default: 512x512 and 512x768)",
    )
    command.add_argument("--chunks", type=_positive_int, default=1, help="prompt chunks of 77 tokens (default: 1)")
    command.add_argument("--json", action="store_true", help="print JSON instead of text")
    command.set_defaults(run=_run_info)


def _size_argument(text: str) -> tuple[int, int]:
    width, _, height = text.lower().partition("x")
    try:
        return int(width), int(height)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 512x768, got {text!r}") from None


def _run_info(args: argparse.Namespace) -> int:
    from .info import environment, format_environment, format_kernel_costs, kernel_costs

    info = environment()
    sizes = args.size or [(512, 512), (512, 768)]
    if args.kernels:
        info["kernel_costs"] = {
            f"{width}x{height}": kernel_costs(width, height, chunks=args.chunks) for width, height in sizes
        }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(format_environment(info))
    for size, rows in info.get("kernel_costs", {}).items():
        print(f"\nfused kernels at {size}, {args.chunks} prompt chunk(s), float16, per call:\n")
        print(format_kernel_costs(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
