"""A training run's checkpoint: what is saved, in which order, and how a resume restores it.

A checkpoint is the trained weights in the files people use (``hypernetwork.safetensors`` and
``hypernetwork.pt``, the web UI's format; or ``unet.safetensors`` with diffusers key names and
``unet_ema.safetensors`` with EMA), then ``training_state.pt``, written last: it commits the
checkpoint, so it never refers to weights newer than the files beside it. Every file is written
atomically (:mod:`nai_fast.engine.train_state`), by rank 0 only; every rank takes part, since the
state holds each rank's random states.

``training_state.pt`` holds the trainable weights, the optimizer, LR scheduler, grad scaler and EMA
states, the step, the sampler's consumed position, the counters (:class:`Progress`), every rank's
random states and the config. :func:`restore_checkpoint` puts all of it back, so a resumed run
continues exactly where the saved one was.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from .config import HYPERNETWORK_FILES
from .train_state import atomic_write, load_state, restore_rng_states, rng_states, save_state

if TYPE_CHECKING:
    from ..data.loading import BucketBatchSampler
    from ..hypernetworks.modules import Hypernetwork
    from .distributed import Session

__all__ = [
    "EMA_UNET_FILE",
    "HYPERNETWORK_FILES",
    "STATE_FILE",
    "UNET_FILE",
    "Progress",
    "Resumable",
    "restore_checkpoint",
    "save_checkpoint",
]

log = logging.getLogger(__name__)

UNET_FILE = "unet.safetensors"
EMA_UNET_FILE = "unet_ema.safetensors"
STATE_FILE = "training_state.pt"

STATE_FORMAT = 1
# Config fields that may change between a run and its resume without changing what is trained.
RESUMABLE_CHANGES = frozenset(
    {
        "max_steps",
        "resume",
        "overwrite",
        "save_every",
        "sample_every",
        "sample_prompts",
        "sample_steps",
        "workers",
        "device",
        "progress",
        "tensorboard",
        "record_items",
        "max_consecutive_skips",
    }
)


@dataclass
class Progress:
    """How far a run is: the optimizer steps done, the sampler position after the last batch used
    (``epoch``, ``position``), and the counts a resume carries on."""

    step: int = 0
    epoch: int = 0
    position: int = 0
    skipped_steps: int = 0
    consecutive_skips: int = 0
    empty_batches: int = 0
    load_failures: dict[str, str] = field(default_factory=dict)  # path -> reason


@dataclass
class Resumable:
    """The live objects a checkpoint saves and a resume restores. ``hypernetwork``: the trained one,
    or None when fine-tuning (``trainable`` is then the U-Net)."""

    trainable: nn.Module
    optimizer: Any
    lr_scheduler: Any
    scaler: Any
    ema: Any  # an EMA with parameters, shadow, state_dict, load_state_dict; or None
    sampler: BucketBatchSampler
    hypernetwork: Hypernetwork | None


def save_checkpoint(
    session: Session, output_dir: Path, parts: Resumable, progress: Progress, config: dict[str, Any]
) -> dict[str, Path]:
    """Write a checkpoint at ``progress``: on every rank (it gathers the ranks' random states and
    load failures, merging the failures into ``progress``); rank 0 writes. The files written, by name
    (none on other ranks)."""
    gathered = session.gather((rng_states(), progress.load_failures))
    for _, failures in gathered:
        for path, reason in failures.items():
            progress.load_failures.setdefault(path, reason)
    if not session.is_main:
        return {}
    paths = _save_weights(output_dir, parts)
    state = {
        "format": STATE_FORMAT,
        "step": progress.step,
        "trainable": parts.trainable.state_dict(),
        "optimizer": parts.optimizer.state_dict(),
        "lr_scheduler": parts.lr_scheduler.state_dict(),
        "grad_scaler": parts.scaler.state_dict(),
        "ema": None if parts.ema is None else parts.ema.state_dict(),
        "sampler": parts.sampler.state_dict(consumed=progress.position) | {"epoch": progress.epoch},
        "rng": [states for states, _ in gathered],
        "counters": {
            "skipped_steps": progress.skipped_steps,
            "consecutive_skips": progress.consecutive_skips,
            "empty_batches": progress.empty_batches,
            "load_failures": progress.load_failures,
        },
        "config": json.dumps(config),
    }
    paths[STATE_FILE] = save_state(state, output_dir / STATE_FILE)  # last: it commits the checkpoint
    return paths


def _save_weights(output_dir: Path, parts: Resumable) -> dict[str, Path]:
    """The trained weights in the files people use."""
    if parts.hypernetwork is not None:
        return {name: atomic_write(output_dir / name, parts.hypernetwork.save) for name in HYPERNETWORK_FILES}
    unet = parts.trainable
    paths = {UNET_FILE: _save_safetensors(unet.state_dict(), output_dir / UNET_FILE)}
    if parts.ema is not None:
        names = {id(p): name for name, p in unet.named_parameters()}
        weights = dict(unet.state_dict())
        for parameter, shadow in zip(parts.ema.parameters, parts.ema.shadow):
            weights[names[id(parameter)]] = shadow.to(parameter.dtype)
        paths[EMA_UNET_FILE] = _save_safetensors(weights, output_dir / EMA_UNET_FILE)
    return paths


def _save_safetensors(weights: dict[str, Tensor], path: Path) -> Path:
    import safetensors.torch

    tensors = {name: tensor.detach().to("cpu").contiguous() for name, tensor in weights.items()}
    return atomic_write(path, lambda temporary: safetensors.torch.save_file(tensors, temporary))


def restore_checkpoint(
    session: Session, output_dir: Path, parts: Resumable, config: dict[str, Any]
) -> Progress | None:
    """Load ``output_dir``'s checkpoint into ``parts`` and this rank's random generators; its
    :class:`Progress`, or None (and a warning) when there is none. ``config``: this run's, to warn
    about options changed since the save."""
    path = output_dir / STATE_FILE
    if not path.is_file():
        if session.is_main:
            log.warning("resume: no %s in %s, starting from step 0", STATE_FILE, output_dir)
        return None
    state = load_state(path)
    if state.get("format") != STATE_FORMAT:
        raise ValueError(f"cannot resume from {path}: unknown state format {state.get('format')!r}")
    if session.is_main:
        _warn_about_changed_config(json.loads(state["config"]), config)
    if parts.hypernetwork is not None:
        _check_widths(state["trainable"], parts.hypernetwork, path)
    _load_into(parts, state, path)
    _restore_random_states(session, state["rng"])
    counters = state["counters"]
    progress = Progress(
        step=int(state["step"]),
        epoch=int(state["sampler"]["epoch"]),
        position=int(state["sampler"]["position"]),
        skipped_steps=int(counters["skipped_steps"]),
        consecutive_skips=int(counters["consecutive_skips"]),
        empty_batches=int(counters["empty_batches"]),
        load_failures=dict(counters["load_failures"]),
    )
    if parts.hypernetwork is not None:
        parts.hypernetwork.step = progress.step
    if session.is_main:
        log.info("resumed from %s at step %d", path, progress.step)
    return progress


def _load_into(parts: Resumable, state: dict[str, Any], path: Path) -> None:
    try:
        parts.trainable.load_state_dict(state["trainable"])
        parts.optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as error:
        raise ValueError(f"cannot resume from {path}: {error}") from error
    parts.lr_scheduler.load_state_dict(state["lr_scheduler"])
    if state["grad_scaler"]:
        parts.scaler.load_state_dict(state["grad_scaler"])
    if parts.ema is not None and state["ema"] is not None:
        parts.ema.load_state_dict(state["ema"])
    parts.sampler.load_state_dict(state["sampler"])


def _restore_random_states(session: Session, ranks: list[dict[str, Any]]) -> None:
    if len(ranks) == session.world_size:
        restore_rng_states(ranks[session.rank])
    elif session.is_main:
        log.warning(
            "resume: saved with %d ranks, running with %d; random states not restored", len(ranks), session.world_size
        )


def _check_widths(saved: dict[str, Tensor], hypernetwork: Hypernetwork, path: Path) -> None:
    """A saved hypernetwork for other k/v widths (another model) is refused by its widths."""
    from ..hypernetworks.processors import HypernetworkMismatchError

    widths = sorted({int(key.split(".")[1]) for key in saved if key.startswith("pairs.")})
    if widths != sorted(hypernetwork.widths):
        raise HypernetworkMismatchError(
            f"cannot resume from {path}: its hypernetwork has modules for k/v widths "
            f"{', '.join(map(str, widths))}, but this model's attention layers take k/v inputs of widths "
            f"{', '.join(map(str, sorted(hypernetwork.widths)))} (resumed with another model?)"
        )


def _warn_about_changed_config(saved: dict[str, Any], config: dict[str, Any]) -> None:
    current = json.loads(json.dumps(config))  # tuples as lists, as saved
    changed = sorted(key for key in current if key not in RESUMABLE_CHANGES and saved.get(key) != current[key])
    if changed:
        log.warning(
            "resume: options changed since the checkpoint: %s; the run will differ from an uninterrupted one",
            ", ".join(f"{key} {saved.get(key)!r} -> {current[key]!r}" for key in changed),
        )
