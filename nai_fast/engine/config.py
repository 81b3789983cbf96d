"""What a training run depends on (:class:`TrainConfig`), and the names the engines and the command line share.

Imports nothing heavy (no torch, no NumPy), so ``nai-fast --help`` and ``nai-fast train
--help`` read these without loading the engines.

``nai-fast train``'s options are made from :class:`TrainConfig`'s fields: each field's
metadata (:func:`option`) holds its help text and whatever about its option cannot be
read from the field's name, type and default (a flag, choices, a lower bound, a parser).
:func:`add_train_options` adds an option per field to a parser and :func:`train_config`
turns the parsed arguments back into a :class:`TrainConfig`, so a new option is one field.
The choices and lower bounds given there are also what :class:`TrainConfig` checks.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "DEFAULT_TRAIN_OUTPUT",
    "HYPERNETWORK_FILES",
    "LR_SCHEDULES",
    "MIXED_PRECISION",
    "MODEL_PRESETS",
    "MODES",
    "TRAINED_HYPERNETWORK_FILE",
    "TrainConfig",
    "add_train_options",
    "option",
    "train_config",
]

# nai_fast.models.presets.PRESETS, spelled out here because that module imports torch
# (tests/test_generate.py checks the two agree).
MODEL_PRESETS = ("sd15", "tiny", "tiny-random")

DEFAULT_TRAIN_OUTPUT = "nai-fast-output"  # `nai-fast train`'s default output folder; `generate --preset tiny` looks there
TRAINED_HYPERNETWORK_FILE = "hypernetwork.safetensors"  # a trained hypernetwork, as `nai-fast generate` finds it
HYPERNETWORK_FILES = (TRAINED_HYPERNETWORK_FILE, "hypernetwork.pt")  # what training writes: ours, the web UI's format

MODES = ("hypernetwork", "finetune")
LR_SCHEDULES = ("constant", "cosine", "linear")
MIXED_PRECISION = ("no", "fp16", "bf16")


_OPTION_KEYS = frozenset(
    {"flag", "metavar", "choices", "minimum", "parse", "switch", "exclusive", "alternatives", "when_absent"}
)


def option(help: str, **how: Any) -> dict[str, Any]:
    """A :class:`TrainConfig` field's metadata: its help text, and how ``nai-fast train`` sets it.

    The option is ``--`` + the field's name with dashes, of the field's type; ``(default: ...)``
    is added to the help from the field's default unless the help says it. ``how`` may say:

    ``flag``: another name for the option. ``metavar``: the value's name in the help.
    ``choices``: the allowed values (TrainConfig checks them too). ``minimum``: an integer's
    lower bound (TrainConfig checks it too). ``parse``: a function from the option's text to
    the value. ``switch``: a flag that only turns the field on (no ``--no-`` form; other
    booleans get both). ``exclusive``: a group name; at most one option of a group per command.
    ``alternatives``: several options that set this one field, mutually exclusive, as
    ``{flag: option(help, ...)}``. ``when_absent``: a function giving the value when the
    command line does not set it (instead of the field's default). A tuple field without
    ``parse`` is a repeated option, one item each time.
    """
    unknown = set(how) - _OPTION_KEYS
    if unknown:
        raise TypeError(f"unknown option settings: {sorted(unknown)}")
    return {"help": help, **how}


def _numbers(text: str) -> tuple[float, ...]:
    """``1,2,1`` -> ``(1.0, 2.0, 1.0)``."""
    try:
        return tuple(float(item) for item in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be numbers separated by commas, got {text!r}") from None


def _norm_limit(text: str) -> float | None:
    """A gradient norm limit; 0 (or none): no limit."""
    try:
        return _number_or_none(float)(text) or None
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number (0 or none: no limit), got {text!r}") from None


def _stderr_is_a_terminal() -> bool:
    return sys.stderr.isatty()


@dataclass
class TrainConfig:
    """Everything a training run depends on. ``nai-fast train --help`` describes each field (as an option)."""

    model: str = field(
        default="tiny",  # a preset name (nai_fast.models.presets.PRESETS) or a model path
        metadata=option(
            "the model to train",
            alternatives={
                "--preset": option(
                    "a built-in model: tiny (trained on the demo's shapes, the default), tiny-random or sd15 (random weights)", choices=MODEL_PRESETS
                ),
                "--model": option("a diffusers folder or a single .safetensors/.ckpt checkpoint", metavar="PATH"),
            },
        ),
    )
    data: str | None = field(
        default=None,  # None: a demo dataset (tiny preset only)
        metadata=option(
            "images with .txt tags beside them (default with --preset tiny: the demo's tagged shapes with every hue "
            "drawn as the next around the colour wheel, a style the tiny model never saw, made once in "
            "OUTPUT_DIR/demo-data-hue-shift)",
            metavar="DIR",
        ),
    )
    output_dir: str = field(
        default=DEFAULT_TRAIN_OUTPUT,  # where `nai-fast generate --preset tiny` looks
        metadata=option("where results go", metavar="DIR"),
    )
    resume: bool = field(
        default=False,
        metadata=option(
            "continue the run whose checkpoint is OUTPUT_DIR/training_state.pt", switch=True, exclusive="earlier run"
        ),
    )
    overwrite: bool = field(
        default=False,  # else a folder holding a run is refused (nai_fast.engine.train.RunExists)
        metadata=option(
            "start over in an OUTPUT_DIR that holds a run, replacing it at the first save (without this or "
            "--resume, such a folder is refused and left as it is)",
            switch=True,
            exclusive="earlier run",
        ),
    )
    mode: str = field(
        default="hypernetwork",
        metadata=option(
            "train a hypernetwork with everything else frozen, or fine-tune the U-Net", choices=MODES
        ),
    )
    max_steps: int = field(
        default=1000, metadata=option("optimizer steps in all, resumed ones included", minimum=1)
    )
    batch_size: int = field(default=4, metadata=option("images per batch and process", minimum=1))
    grad_accum: int = field(default=1, metadata=option("batches whose gradients add up to one step", minimum=1))
    lr: float = field(default=1e-5, metadata=option("AdamW learning rate"))
    lr_schedule: str = field(default="constant", metadata=option("after warmup", choices=LR_SCHEDULES))
    warmup_steps: int = field(default=0, metadata=option("linear warmup from 0", minimum=0))
    weight_decay: float = field(default=0.01, metadata=option("AdamW weight decay"))
    resolution: int | None = field(
        default=None,  # None: the model's (512 for SD 1.x, 128 for tiny)
        metadata=option(
            "side of the square base bucket; the SD 1.x grid (512x768 budget, sides 256..1024) is scaled to it "
            "(default: 128 for --preset tiny, the model's native size otherwise, 512 for SD 1.x)",
            metavar="PIXELS",
        ),
    )
    max_aspect_error: float | None = field(
        default=0.5,
        metadata=option(
            "prune images whose aspect error (log units, to the nearest bucket) reaches this; 0.5 prunes images "
            "that would lose about 40% or more of their pixels; none: keep every image"
        ),
    )
    mixed_precision: str = field(
        default="no",
        metadata=option(
            "autocast dtype; fp16 on CUDA adds loss scaling; frozen networks are stored in it on CUDA",
            choices=MIXED_PRECISION,
        ),
    )
    gradient_checkpointing: bool = field(
        default=False, metadata=option("recompute U-Net activations in backward: less memory, slower")
    )
    max_grad_norm: float | None = field(
        default=1.0,  # None or 0: no clipping
        metadata=option("clip the gradient norm to this; 0 turns clipping off", parse=_norm_limit),
    )
    penalty_weight: float = field(
        default=1.0,
        metadata=option(
            "weight of NovelAI's penalty on the hypernetwork's shallowest (320-wide in SD 1.x) modules; 0 turns "
            "it off"
        ),
    )
    ema: bool = field(
        default=False, metadata=option("keep an EMA of the U-Net weights (finetune; unet_ema.safetensors)")
    )
    ema_decay: float = field(default=0.9999, metadata=option("EMA decay"))
    caption_dropout: float = field(default=0.0, metadata=option("probability of training on an empty caption"))
    noise_offset: float = field(
        default=0.0,
        metadata=option(
            "add this times one normal draw per image and latent channel to the noise (offset noise), so the model "
            "cannot read an image's mean colour off the noisiest inputs; 0.05-0.1 is usual, 0 turns it off"
        ),
    )
    keep_tokens: int = field(
        default=0, metadata=option("leading tags kept in place when shuffling", metavar="K", minimum=0)
    )
    shuffle_tags: bool = field(
        default=True, metadata=option("shuffle each caption's tags (all but the first --keep-tokens)")
    )
    min_caption_tokens: int = field(
        default=50,
        metadata=option(
            "captions are cut (trailing tags dropped) to a token budget drawn between this and 75 x max chunks"
        ),
    )
    max_chunks: int = field(default=3, metadata=option("75-token chunks per caption", minimum=1))
    clip_skip: int = field(default=2, metadata=option("CLIP layer counted from the last: 2 is NovelAI's", minimum=1))
    hypernetwork_structure: tuple[float, ...] = field(
        default=(1.0, 2.0, 1.0),
        metadata=option(
            "widths of the hypernetwork's layers as multiples of the input width, starting and ending with 1",
            metavar="M,M,...",
            parse=_numbers,
        ),
    )
    activation: str = field(
        default="linear", metadata=option("after each hidden layer: linear (none), relu, swish, ...")
    )
    layer_norm: bool = field(default=False, metadata=option("a LayerNorm after every hypernetwork layer"))
    hypernetwork_dropout: float = field(default=0.0, metadata=option("dropout after the hidden layers"))
    cache_latents: bool = field(
        default=False,
        metadata=option(
            "encode each image once per bucket and keep its VAE latents; freezes one crop per image and bucket"
        ),
    )
    save_every: int = field(
        default=500, metadata=option("checkpoint every N steps; 0: only at the end", metavar="N", minimum=0)
    )
    sample_every: int = field(
        default=0,
        metadata=option("sample images every N steps and at the end; 0: never", metavar="N", minimum=0),
    )
    sample_prompts: tuple[str, ...] = field(
        default=(),
        metadata=option(
            "prompt of a sample image (seed SEED+i for the i-th); repeat for several (default: the first image's "
            "tags)",
            flag="--sample-prompt",
            metavar="TEXT",
        ),
    )
    sample_steps: int = field(default=20, metadata=option("sampling steps of samples", minimum=1))
    seed: int = field(default=0, metadata=option("seed of shuffles, crops, noise and initial weights", minimum=0))
    workers: int = field(default=0, metadata=option("DataLoader worker processes", minimum=0))
    device: str | None = field(
        default=None,
        metadata=option("torch device (default: this process's GPU if there is one, else cpu)"),
    )
    max_consecutive_skips: int = field(
        default=10,
        metadata=option("stop after this many steps in a row with a non-finite loss", minimum=1),
    )
    fixed_noise: bool = field(
        default=False, metadata=option("the same noise and timesteps at every step (for overfitting checks)")
    )
    record_items: bool = field(
        default=False,
        metadata=option(
            "list the files each step trained on in TrainResult.trained_items (for Python callers; the command "
            "prints nothing of it)"
        ),
    )
    progress: bool = field(
        default=True,
        metadata=option("a progress bar (default: when stderr is a terminal)", when_absent=_stderr_is_a_terminal),
    )
    tensorboard: bool = field(
        default=True,
        metadata=option("also log to OUTPUT_DIR/tensorboard, when torch.utils.tensorboard can be imported"),
    )

    def __post_init__(self) -> None:
        self.hypernetwork_structure = tuple(float(m) for m in self.hypernetwork_structure)
        self.sample_prompts = tuple(self.sample_prompts)
        for spec in dataclasses.fields(self):
            value = getattr(self, spec.name)
            choices = spec.metadata.get("choices")
            if choices is not None and value not in choices:
                raise ValueError(f"{spec.name} must be one of {choices}, got {value!r}")
            minimum = spec.metadata.get("minimum")
            if minimum is not None and int(value) < minimum:
                raise ValueError(f"{spec.name} {_at_least(minimum)}, got {value}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.resume and self.overwrite:
            raise ValueError("resume continues the run in output_dir and overwrite replaces it: set one, not both")
        if self.ema and self.mode != "finetune":
            raise ValueError("ema applies to mode 'finetune' only")
        if self.noise_offset < 0.0:
            raise ValueError(f"noise_offset must be at least 0, got {self.noise_offset}")
        if not 0.0 <= self.hypernetwork_dropout < 1.0:
            raise ValueError(f"hypernetwork_dropout must lie in [0, 1), got {self.hypernetwork_dropout}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# The command line


def add_train_options(parser: argparse.ArgumentParser) -> None:
    """Add to ``parser`` an option for every :class:`TrainConfig` field, as its metadata says
    (:func:`option`). Options left out of a command line are left out of the parsed namespace,
    so the field's default applies; :func:`train_config` builds the config."""
    hints = typing.get_type_hints(TrainConfig)
    groups: dict[str, Any] = {}
    for spec in dataclasses.fields(TrainConfig):
        how = spec.metadata
        if "alternatives" in how:
            group = parser.add_mutually_exclusive_group()
            for flag, alternative in how["alternatives"].items():
                _add_option(group, flag, spec.name, hints[spec.name], alternative, None)
            continue
        target: Any = parser
        if "exclusive" in how:
            if how["exclusive"] not in groups:
                groups[how["exclusive"]] = parser.add_mutually_exclusive_group()
            target = groups[how["exclusive"]]
        flag = how.get("flag", "--" + spec.name.replace("_", "-"))
        _add_option(target, flag, spec.name, hints[spec.name], how, spec.default)


def train_config(arguments: argparse.Namespace) -> TrainConfig:
    """The :class:`TrainConfig` of a command line parsed by a parser :func:`add_train_options` made:
    each field the command line set, the others at their defaults (or ``when_absent``'s value)."""
    values = {}
    for spec in dataclasses.fields(TrainConfig):
        if hasattr(arguments, spec.name):
            values[spec.name] = getattr(arguments, spec.name)
        elif "when_absent" in spec.metadata:
            values[spec.name] = spec.metadata["when_absent"]()
    return TrainConfig(**values)


def _add_option(target: Any, flag: str, name: str, hint: Any, how: Any, default: Any) -> None:
    kind, optional = _unwrap_optional(hint)
    settings: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": _help(how, default)}
    for key in ("metavar", "choices"):
        if key in how:
            settings[key] = how[key]
    if "parse" in how:
        settings["type"] = how["parse"]
    elif kind is bool:
        settings["action"] = "store_true" if how.get("switch") else argparse.BooleanOptionalAction
    elif typing.get_origin(kind) is tuple:
        settings["action"] = "append"  # a repeated option, one item each time
        settings["type"] = typing.get_args(kind)[0]
    elif kind in (int, float):
        parse = _number_or_none(kind) if optional else kind
        settings["type"] = parse if "minimum" not in how else _bounded(parse, how["minimum"])
    else:
        settings["type"] = kind
    target.add_argument(flag, **settings)


def _unwrap_optional(hint: Any) -> tuple[Any, bool]:
    """``X | None`` -> ``(X, True)``; ``X`` -> ``(X, False)``."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        (kind,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        return kind, True
    return hint, False


def _number_or_none(kind: type) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        return None if text.strip().lower() == "none" else kind(text)

    parse.__name__ = kind.__name__  # argparse's message: "invalid float value: 'x'"
    return parse


def _bounded(parse: Callable[[str], Any], minimum: int) -> Callable[[str], Any]:
    def bounded(text: str) -> Any:
        value = parse(text)
        if value is not None and value < minimum:
            raise argparse.ArgumentTypeError(f"{_at_least(minimum)}, got {value}")
        return value

    bounded.__name__ = getattr(parse, "__name__", "value")
    return bounded


def _at_least(minimum: int) -> str:
    return "must not be negative" if minimum == 0 else f"must be at least {minimum}"


def _help(how: Any, default: Any) -> str:
    """The option's help, with the field's default unless the help states one (or there is none to show)."""
    text = how["help"]
    if "(default" not in text and not how.get("switch") and default not in (None, ()):
        text += f" (default: {_shown(default)})"
    return text.replace("%", "%%")  # argparse formats help with %


def _shown(value: Any) -> str:
    """A default as one would type it: 1e-5, 0.9999, 1,2,1, on/off."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        if value.is_integer():
            return str(int(value))
        return repr(value).replace("e-0", "e-").replace("e+0", "e+")
    if isinstance(value, tuple):
        return ",".join(_shown(item) for item in value)
    return str(value)
