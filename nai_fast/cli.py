"""The ``nai-fast`` command line.

Long because each subcommand's options and early input checks live here, importing no torch;
the train options themselves come from TrainConfig's fields (engine/config.py).

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
from .engine.config import DEFAULT_TRAIN_OUTPUT as _TRAIN_OUTPUT  # engine/config imports no torch
from .engine.config import MODEL_PRESETS as _MODEL_PRESETS
from .engine.config import HYPERNETWORK_FILES, TRAINED_HYPERNETWORK_FILE, add_train_options, train_config


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nai-fast", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"nai_fast {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_buckets(commands)
    _add_generate(commands)
    _add_train(commands)
    _add_info(commands)
    _add_eval(commands)
    _add_demo(commands)
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


# Spelled out so `--help` needs no torch import (tests/test_generate.py checks they agree).
_SIZE_STEP = 64  # nai_fast.engine.generate.SIZE_STEP: sizes are checked before torch is imported
_MAX_SEED = 2**32 - 1  # nai_fast.engine.generate.MAX_SEED
_SAMPLERS = ("euler_a", "euler", "ddim", "dpmpp_2m_karras")  # nai_fast.engine.generate.SAMPLERS
# What `generate` takes when neither the command line nor --from-png gives it.
_GENERATE_DEFAULTS = {
    "negative_prompt": "", "steps": 28, "sampler": "euler_a", "scale": 11.0, "cfg_rescale": 0.0, "clip_skip": 2
}


_CFG_RESCALE_HELP = (
    "pull the guided prediction back toward the conditional one's spread by this fraction, 0 to 1 (the web UI's "
    "CFG Rescale; 0.7 is usual for v-prediction models)"
)


def _add_generate(commands: argparse._SubParsersAction) -> None:
    command = commands.add_parser(
        "generate",
        help="generate images from a prompt (txt2img)",
        description="Generate images from a prompt with classifier-free guidance, NovelAI's way (penultimate "
        "CLIP layer, long weighted prompts, hypernetworks, LoRAs), and write them as PNGs named INDEX-SEED.png "
        "carrying their generation parameters (the web UI's 'parameters' text). Image i of a run uses seed "
        "SEED+i, so any image can be made again alone; --from-png makes one again from its PNG. Prompt tags "
        "<hypernet:NAME:STRENGTH> and <lora:NAME:STRENGTH> apply the file NAME (its stem) found in "
        "--hypernetwork-dir / --lora-dir. Arguments and files are checked before any model loads.",
    )
    command.add_argument(
        "--from-png",
        metavar="FILE",
        help="take every setting from FILE's parameters (a PNG from nai-fast or the web UI): prompt, negative, "
        "seed, size, steps, sampler, scale, CFG rescale, clip skip, model (a preset name), hypernetworks and LoRAs "
        "(by name, found in --hypernetwork-dir / --lora-dir) and embeddings (by name, in --embeddings-dir); an option "
        "given here overrides its setting. An image nai-fast made comes back pixel-identical",
    )
    source = command.add_mutually_exclusive_group()
    source.add_argument(
        "--preset", choices=_MODEL_PRESETS, help="a built-in model: tiny (trained on the demo's shapes), tiny-random or sd15 (random weights)"
    )
    source.add_argument(
        "--model",
        metavar="PATH",
        help="a diffusers folder or a single .safetensors/.ckpt checkpoint (--preset or --model is required, "
        "unless --from-png names a preset)",
    )
    command.add_argument("--vae", metavar="FILE", help="a VAE file replacing the model's own")
    _add_hypernetwork_option(
        command,
        f"Without it, --preset tiny uses {_TRAIN_OUTPUT}/{TRAINED_HYPERNETWORK_FILE} when `nai-fast train --preset "
        "tiny` has written it",
    )
    command.add_argument(
        "--hypernetwork-dir",
        metavar="DIR",
        action="append",
        default=[],
        help="a folder of hypernetworks (.pt/.safetensors, subfolders included) for <hypernet:NAME:STRENGTH> "
        "tags in the prompt, NAME being a file name without its suffix; repeat for several",
    )
    command.add_argument(
        "--lora-dir",
        metavar="DIR",
        action="append",
        default=[],
        help="a folder of LoRAs (.safetensors/.pt, subfolders included) for <lora:NAME:STRENGTH> tags in the "
        "prompt; repeat for several",
    )
    command.add_argument(
        "--embeddings-dir",
        metavar="DIR",
        action="append",
        default=[],
        help="a folder of textual-inversion embeddings (the web UI's .pt/.safetensors, diffusers' learned_embeds "
        "files; subfolders included), each used in prompts by its file name without the suffix; repeat for several",
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
        "--prompt",
        metavar="TEXT",
        help="what to draw (required unless --from-png); long prompts, (emphasis:1.2), BREAK and "
        "<hypernet:NAME:STRENGTH>/<lora:NAME:STRENGTH> tags work",
    )
    command.add_argument("--negative-prompt", metavar="TEXT", help="what to steer away from (default: none)")
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
    command.add_argument("--steps", type=_positive_int, help="sampling steps (default: 28)")
    command.add_argument("--sampler", choices=_SAMPLERS, help="sampler (default: euler_a, NovelAI's)")
    command.add_argument("--scale", type=float, help="classifier-free guidance scale (default: 11)")
    command.add_argument("--cfg-rescale", type=float, metavar="PHI", help=_CFG_RESCALE_HELP + " (default: 0, off)")
    command.add_argument(
        "--clip-skip", type=_positive_int, help="CLIP layer, from the last; 2 is NovelAI's (default: 2)"
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


def _add_hypernetwork_option(command: argparse.ArgumentParser, more_help: str = "") -> None:
    command.add_argument(
        "--hypernetwork",
        metavar="FILE[:STRENGTH]",
        action="append",
        default=[],
        type=_hypernetwork_argument,
        help="a hypernetwork (.pt or .safetensors) and its strength (default 1); repeat to apply several in "
        f"order. {more_help}".strip(),
    )


def _check_side(name: str, side: int) -> None:
    if side <= 0 or side % _SIZE_STEP:
        raise ValueError(f"{name} must be a positive multiple of {_SIZE_STEP}, got {side}")


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


def _seed_argument(text: str) -> int:
    """A seed in 0..2**32-1, or -1 (a random one)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if value == -1:
        return value
    if not 0 <= value <= _MAX_SEED:
        raise argparse.ArgumentTypeError(f"must lie in 0..{_MAX_SEED}, or be -1 for a random seed; got {value}")
    return value


def _check_cfg_rescale(rescale: float, scale: float) -> None:
    """txt2img's checks of guidance_rescale, as option errors before any model loads."""
    if not 0 <= rescale <= 1:
        raise ValueError(f"--cfg-rescale must lie in 0..1, got {rescale:g}")
    if rescale and scale == 1:
        raise ValueError("--cfg-rescale rescales guided predictions; at --scale 1 there is no guidance")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _run_generate(args: argparse.Namespace) -> int:
    import secrets
    from pathlib import Path

    # Everything that can be checked without a model is checked first, before torch is even
    # imported: a wrong size, seed, path or prompt tag fails at once, and a failed run writes nothing.
    if args.from_png is not None:
        _settings_from_png(args)
    for name, value in _GENERATE_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.prompt is None:
        raise ValueError("--prompt is required (or --from-png FILE)")
    if args.model is None and args.preset is None:
        raise ValueError("one of --preset and --model is required (or --from-png of an image made with a preset)")
    for name in ("width", "height"):
        if getattr(args, name) is not None:
            _check_side(name, getattr(args, name))
    _check_cfg_rescale(args.cfg_rescale, args.scale)
    count = args.batch_count * args.batch_size
    if args.seed not in (None, -1) and args.seed + count - 1 > _MAX_SEED:
        raise ValueError(
            f"--seed {args.seed} with {count} images gives seeds past {_MAX_SEED}; use a seed of at most "
            f"{_MAX_SEED - count + 1}"
        )
    _check_exists("--model", args.model)
    _check_exists("--vae", args.vae)
    for path, _ in args.hypernetwork:
        _check_exists("--hypernetwork", path, file=True)
    for folder in args.embeddings_dir:
        _check_exists("--embeddings-dir", folder)
        if not os.path.isdir(folder):
            raise NotADirectoryError(f"--embeddings-dir {folder}: not a folder")
    for path, _ in args.lora:
        _check_exists("--lora", path, file=True)
    from .engine.assets import find_networks, resolve_tags
    from .text.tags import extract_network_tags

    for folder in args.hypernetwork_dir:
        find_networks("hypernet", [folder])  # a missing folder or a clash of names fails here, tags or not
    for folder in args.lora_dir:
        find_networks("lora", [folder])
    # Tags first, then the files given: the order the PNG's prompt lists them in (tags, then appended).
    tagged = resolve_tags(
        extract_network_tags(args.prompt)[1], hypernetwork_dirs=args.hypernetwork_dir, lora_dirs=args.lora_dir
    )
    hypernetworks = [(str(path), strength) for path, strength in tagged["hypernet"]] + list(args.hypernetwork)
    loras = [(str(path), strength) for path, strength in tagged["lora"]] + list(args.lora)

    import torch

    from .engine.generate import DEFAULT_TRAIN_OUTPUT, TRAINED_HYPERNETWORK_FILE, save_numbered, txt2img
    from .text.embeddings import load_embeddings
    from .text.encoder import LongPromptEncoder

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))
    trained = Path(DEFAULT_TRAIN_OUTPUT) / TRAINED_HYPERNETWORK_FILE
    if not hypernetworks and args.from_png is None and trained.is_file():
        if args.preset == "tiny":  # the demo: `nai-fast train --preset tiny` trained it for these weights
            print(f"using the hypernetwork trained for the tiny preset: {trained}", file=sys.stderr)
            hypernetworks.append((str(trained), 1.0))
        else:
            print(f"hint: {trained} holds a trained hypernetwork; add --hypernetwork {trained} to use it", file=sys.stderr)
    embeddings = load_embeddings(args.embeddings_dir)  # read (and any bad file refused) before the model loads
    if args.embeddings_dir:
        print(f"embeddings ({len(embeddings)}): {', '.join(embeddings) or 'none found'}", file=sys.stderr)
    for name in getattr(args, "png_embeddings", ()):
        if name not in embeddings:
            raise ValueError(f"the PNG's prompt uses the embedding {name!r}, not found in --embeddings-dir")
    model = _load_model(args.model or args.preset, hypernetworks, device, dtype, vae=args.vae)
    if loras:
        from .models.lora import apply_loras, load_lora

        # Merged into working copies of the weights, after the move: refuses a LoRA for another model.
        apply_loras(model, [load_lora(path) for path, _ in loras], [strength for _, strength in loras])
    # Like the web UI, every image's seed lies in 0..2**32-1: a drawn seed leaves room for the batch.
    seed = secrets.randbelow(_MAX_SEED + 2 - count) if args.seed in (None, -1) else args.seed
    print(f"seed: {seed}", file=sys.stderr)
    # Refuses an embedding made for another text encoder (its width), naming the file.
    encoder = LongPromptEncoder(model.tokenizer, model.text_encoder, clip_skip=args.clip_skip, embeddings=embeddings)
    for batch in range(args.batch_count):
        images = txt2img(
            model,
            args.prompt,
            negative_prompt=args.negative_prompt,
            width=args.width,  # None: the model's own resolution
            height=args.height,
            steps=args.steps,
            guidance_scale=args.scale,
            guidance_rescale=args.cfg_rescale,
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


def _load_model(source, hypernetworks: list[tuple[str, float]], device, dtype, vae: str | None = None):
    """The model ``source`` names on ``device`` in ``dtype``, with ``hypernetworks`` applied."""
    from pathlib import Path

    from .hypernetworks.modules import Hypernetwork
    from .hypernetworks.processors import apply_hypernetworks
    from .models.load import load_model

    model = load_model(source, vae=vae)
    model.to(device, None if dtype == model.unet.dtype else dtype)
    if hypernetworks:
        networks = [Hypernetwork.load(path).to(device) for path, _ in hypernetworks]
        for network, (path, _) in zip(networks, hypernetworks):
            network.name = Path(path).stem  # the name a prompt tag finds it by, as in the web UI
        # Refuses a hypernetwork made for another model (it would change nothing).
        apply_hypernetworks(model.unet, networks, [strength for _, strength in hypernetworks])
    return model


def _settings_from_png(args: argparse.Namespace) -> None:
    """Fill every generate option not given on the command line from the PNG's parameters text
    (Pillow only: no torch yet). The model comes from it only when it names a preset."""
    from PIL import Image, UnidentifiedImageError

    from .engine.generate import GenerationParameters  # imports torch: parsing is cheap beside the model

    _check_exists("--from-png", args.from_png, file=True)
    try:
        with Image.open(args.from_png) as image:
            text = getattr(image, "text", {}).get("parameters")
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"--from-png {args.from_png}: not a readable image ({error})") from None
    if not text:
        raise ValueError(f"--from-png {args.from_png}: the image carries no 'parameters' text")
    parameters = GenerationParameters.from_text(text)
    if args.prompt is None:
        # The prompt with a tag for every network the image was made with (older PNGs' Hypernet fields too).
        args.prompt = parameters.tagged_prompt()
    from_png = {
        "negative_prompt": parameters.negative_prompt,
        "seed": parameters.seed,
        "width": parameters.width,
        "height": parameters.height,
        "steps": parameters.steps,
        "scale": parameters.guidance_scale,
        "cfg_rescale": parameters.guidance_rescale,
        "clip_skip": parameters.clip_skip,
    }
    for name, value in from_png.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.sampler is None:
        if parameters.sampler not in _SAMPLERS:
            raise ValueError(
                f"--from-png {args.from_png}: sampler {parameters.sampler!r} is not one nai-fast has "
                f"({', '.join(_SAMPLERS)}); choose one with --sampler"
            )
        args.sampler = parameters.sampler
    if args.model is None and args.preset is None:
        if parameters.model not in _MODEL_PRESETS:
            raise ValueError(
                f"--from-png {args.from_png}: the image was made with the model {parameters.model!r}; give it "
                "with --model PATH (only a preset's name is found by itself)"
            )
        args.preset = parameters.model
    # The web UI lists the embeddings a prompt used as `TI hashes: "name: hash, ..."`.
    args.png_embeddings = [name for name, _ in _named_pairs(dict(parameters.extra).get("TI hashes", ""))]


def _named_pairs(text: str) -> list[tuple[str, str]]:
    """``"a: 1, b: 2"`` -> ``[("a", "1"), ("b", "2")]``."""
    return [(name, value) for name, _, value in (item.rpartition(": ") for item in text.split(", ") if item)]


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
        "(up to 225 tokens) and the penultimate CLIP layer. Writes {} and {} (the web UI's format), or "
        "unet.safetensors, plus training_state.pt (for --resume), "
        "training_log.csv and samples/ into the output folder; every checkpoint file is replaced atomically. "
        "Ctrl-C or SIGTERM finishes the current step, saves a checkpoint and prints the command that resumes "
        "it (exit status 130 or 143); a second one stops at once. "
        "Runs unchanged under torchrun (one process per GPU, or gloo on CPU). Each option sets the "
        "nai_fast.TrainConfig field of its name.".format(*HYPERNETWORK_FILES),
    )
    add_train_options(command)  # an option per TrainConfig field
    command.set_defaults(run=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from .engine.train import TrainingInterrupted, train

    config = train_config(args)
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


def _add_eval(commands: argparse._SubParsersAction) -> None:
    command = commands.add_parser(
        "eval",
        help="score how well a model draws tag prompts of the demo's vocabulary",
        description="Generate an image for each of N random tag prompts of the demo vocabulary (red circle, large, "
        "blue background, top left), seed i for prompt i, at each size, with Euler a, and judge each with a simple "
        "detector (nai_fast.demo.fidelity): the background colour, the shape's colour and its position; also "
        "how often the background is in the demo style's shifted hue. Prints the share right per size, for the "
        "tags in the order written and shuffled.",
    )
    source = command.add_mutually_exclusive_group()
    source.add_argument("--preset", choices=_MODEL_PRESETS, default="tiny", help="a built-in model (default: tiny)")
    source.add_argument("--model", metavar="PATH", help="a diffusers folder or a single .safetensors/.ckpt checkpoint")
    _add_hypernetwork_option(command)
    command.add_argument("--prompts", type=_positive_int, default=96, help="random prompts, seeds 0..N-1 (default: 96)")
    command.add_argument(
        "--size",
        metavar="WxH",
        action="append",
        type=_size_argument,
        help="image size; repeat for several (default: the model's square, portrait and landscape buckets, "
        "128x128, 128x192 and 192x128 for tiny)",
    )
    command.add_argument(
        "--order", choices=("written", "shuffled", "both"), default="both", help="tag order of the prompts (default: both)"
    )
    command.add_argument("--steps", type=_positive_int, default=20, help="Euler a steps (default: 20)")
    command.add_argument(
        "--scale", type=float, default=_GENERATE_DEFAULTS["scale"], help="guidance scale (default: generate's, 11)"
    )
    command.add_argument(
        "--cfg-rescale", type=float, default=_GENERATE_DEFAULTS["cfg_rescale"], metavar="PHI",
        help=_CFG_RESCALE_HELP + " (default: generate's, 0)",
    )  # fmt: skip
    command.add_argument("--images-dir", metavar="DIR", help="also save every image there, with its parameters")
    command.add_argument("--device", help="torch device (default: the GPU if there is one, else cpu)")
    command.add_argument("--json", action="store_true", help="print JSON instead of tables")
    command.set_defaults(run=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    _check_exists("--model", args.model)
    for path, _ in args.hypernetwork:
        _check_exists("--hypernetwork", path, file=True)
    for width, height in args.size or ():
        _check_side(f"--size {width}x{height}: width", width)
        _check_side(f"--size {width}x{height}: height", height)
    _check_cfg_rescale(args.cfg_rescale, args.scale)
    import torch

    from .demo.fidelity import evaluate, random_scenes, standard_sizes

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = _load_model(args.model or args.preset, args.hypernetwork, device, torch.float32)
    sizes = args.size or standard_sizes(model)
    scenes = random_scenes(args.prompts)
    orders = ("written", "shuffled") if args.order == "both" else (args.order,)
    reports = {}
    for order in orders:
        save = None
        if args.images_dir is not None:
            from .engine.generate import save_png

            folder = os.path.join(args.images_dir, order)

            def save(index, size, generated, folder=folder):
                os.makedirs(folder, exist_ok=True)
                save_png(generated.image, os.path.join(folder, f"{index:05d}-{size[0]}x{size[1]}.png"), generated.parameters)

        reports[order] = evaluate(
            model, scenes, sizes, shuffled=order == "shuffled", steps=args.steps, guidance_scale=args.scale,
            guidance_rescale=args.cfg_rescale, progress=sys.stderr.isatty(), on_image=save,
        )
    if args.json:
        print(json.dumps({order: report.as_dict() for order, report in reports.items()}, indent=2))
        return 0
    name = args.model or f"preset {args.preset}"
    with_networks = "".join(f" + {path}:{strength:g}" for path, strength in args.hypernetwork)
    for order, report in reports.items():
        guidance = f"scale {args.scale:g}" + (f", CFG rescale {args.cfg_rescale:g}" if args.cfg_rescale else "")
        print(f"{name}{with_networks}: {args.prompts} prompts, tags {order}, Euler a {args.steps} steps, {guidance}")
        print(report.table() + "\n")
    return 0


def _add_demo(commands: argparse._SubParsersAction) -> None:
    command = commands.add_parser(
        "demo",
        help="draw with the tiny model without and with the demo's style hypernetwork, and measure the style",
        description="The demo's last step, after `nai-fast train --preset tiny` learned the hue-shift style "
        "(every hue drawn as the next around the colour wheel) from its generated shapes: draws the same prompts "
        "with the tiny model without and with that hypernetwork at three aspect ratios, writes a contact sheet "
        "(row one without, row two with) and every PNG with its parameters, and prints how often the style "
        "shows and how well the prompts are followed (with it, as the style draws them), without and with it.",
    )
    command.add_argument(
        "--hypernetwork",
        metavar="FILE",
        default=os.path.join(_TRAIN_OUTPUT, TRAINED_HYPERNETWORK_FILE),
        help=f"the style hypernetwork (default: {_TRAIN_OUTPUT}/{TRAINED_HYPERNETWORK_FILE}, where `nai-fast train "
        "--preset tiny` writes it)",
    )
    command.add_argument("--output-dir", metavar="DIR", default="nai-fast-images", help="where the images go")
    command.add_argument("--prompts", type=_positive_int, default=12, help="random prompts measured, at each size (default: 12)")
    command.set_defaults(run=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    if not os.path.isfile(args.hypernetwork):
        raise FileNotFoundError(
            f"--hypernetwork {args.hypernetwork}: no such file; train it first: nai-fast train --preset tiny"
        )
    from .demo.showcase import showcase

    print(showcase(args.hypernetwork, args.output_dir, prompts=args.prompts, progress=sys.stderr.isatty()).summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
