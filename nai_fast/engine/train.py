"""The training engine: hypernetwork training (default) or U-Net fine-tuning on a folder of tagged images.

``train(TrainConfig(...)) -> TrainResult``; ``nai-fast train`` maps its options onto
:class:`TrainConfig`. One step:

    folder (+ .txt tags) -> scan -> buckets (the sd1 grid scaled to ``resolution``)
      -> BucketBatchSampler (shuffled, sharded by rank) -> DataLoader(batch_size=None)
      -> VAE latents (sampled from the posterior; optionally cached) x scaling_factor
      -> noise + uniform timestep -> captions (tag shuffle, varied length, dropout)
      -> long-prompt CLIP context -> U-Net (+ hypernetworks) under autocast
      -> MSE on epsilon (or v) + hypernetwork penalty -> backward (accumulated)
      -> unscale, clip, AdamW, LR schedule, EMA -> checkpoints, samples, logs

**Modes.** ``"hypernetwork"``: the U-Net, VAE and text encoder are frozen
(``requires_grad`` False); a new :class:`~nai_fast.hypernetworks.modules.Hypernetwork` with one
module pair per k/v width of the U-Net is trained through
:func:`~nai_fast.hypernetworks.processors.apply_hypernetworks`, with NovelAI's shallow-layer penalty
(``penalty_weight`` on the shallowest block's width). ``"finetune"``: the U-Net is
trained (optionally with an EMA of its weights); VAE and text encoder stay frozen.

**Randomness, and why resuming is exact.** Everything a batch draws is seeded by what
the batch is, not by how the run got there: crops by ``(seed, epoch, item)`` (the
dataset), captions by ``(seed, epoch, item)`` (:mod:`nai_fast.engine.captions`), and the VAE
posterior sample, noise and timesteps by ``(seed, rank, epoch, batch position)``. The
only other randomness (Dropout in a hypernetwork) uses the global generators, whose
states are saved per rank. ``training_state.pt`` holds the trainable weights, the
optimizer, LR scheduler, grad scaler and EMA states, the step, the sampler's consumed
position, the counters, every rank's RNG states and the config; ``resume=True`` restores
all of it, so N steps, a resume and M more give the same weights as N+M steps in one run
(bit for bit on CPU). Keep ``max_steps`` when resuming: the cosine and linear schedules
span it.

**Files** (rank 0 only, each written atomically; see :mod:`nai_fast.engine.train_state`):
``hypernetwork.safetensors`` and ``hypernetwork.pt`` (the web UI's format), or
``unet.safetensors`` (diffusers key names; ``unet_ema.safetensors`` with EMA);
``training_state.pt`` last, so it never refers to weights newer than the files beside
it; ``training_log.csv``; ``samples/step{step:06d}-{i}.png``; ``tensorboard/`` when
``torch.utils.tensorboard`` can be imported.

**Bad data and bad steps.** A file that fails to load is left out of its batch (the
dataset reports it); a batch left empty is skipped by every rank together (an
all-reduced flag decides, so no rank waits in a collective the others never enter),
and the next batch takes its place in the step. A step whose loss is not finite on any
rank is skipped by all ranks: gradients are zeroed, nothing is stepped, the skip is
counted and logged; ``max_consecutive_skips`` in a row stop the run with
:class:`TrainingDiverged`, leaving the last checkpoint as it was.

**Earlier runs and stopping.** A run never replaces another by accident: when ``output_dir``
holds a checkpoint, :func:`train` raises :class:`RunExists` before it builds or writes anything,
unless ``resume`` (continue that run) or ``overwrite`` (start over, replacing it at the first
save) is set. SIGINT (Ctrl-C) or SIGTERM during the loop (:class:`~nai_fast.engine.stop.StopRequest`)
finishes the current step, writes a checkpoint at it exactly as a periodic save does, and raises
:class:`TrainingInterrupted`, which ``nai-fast train`` turns into one line with the command that
resumes the run and exit status 130 or 143; resuming gives the weights of an uninterrupted run.
A second signal stops at once (:class:`~nai_fast.engine.stop.Aborted`), keeping the last complete
checkpoint: ``training_state.pt``, written last, commits each one. Under ``torchrun`` the ranks'
requests travel in the all-reduce every step makes anyway, so all ranks stop after the same step.

**Several processes.** Under ``torchrun`` (``WORLD_SIZE > 1``) the process group is
initialised from the environment (NCCL on CUDA, gloo on CPU) and the sampler gives each
rank a disjoint shard. Gradients are averaged by ``DistributedDataParallel`` wrapped
around :class:`_Denoiser`, a module that holds the U-Net (and the hypernetwork) and runs
the U-Net: the hypernetwork's modules are called by the U-Net's attention processors,
so wrapping the Hypernetwork alone would never see a forward, but wrapping the module
that runs the U-Net does, and DDP then only reduces the parameters that require
gradients (the hypernetwork's, or the U-Net's when fine-tuning), overlapping the
all-reduce with the backward pass. Only rank 0 writes; all ranks end together.

**Latent caching** (``cache_latents``) keeps each image's VAE posterior (mean and
log-variance) per resolution in memory and samples from it every step, skipping the VAE
encoder. A cached latent freezes its crop, so with caching on, crops are seeded by
``(seed, item)`` alone: each image keeps one crop per bucket for the whole run instead
of a new one every epoch (less augmentation, much less compute), and a resumed run
rebuilds the same cache.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import json
import logging
import math
import os
import signal
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np
import torch
from torch import Tensor, nn

from .generate import DEFAULT_TRAIN_OUTPUT
from .stop import StopRequest, exit_code, ignore_stop_signals
from .train_state import atomic_write, load_state, restore_rng_states, rng_states, save_state, saved_step

if TYPE_CHECKING:
    from ..data.loading import BatchRequest
    from ..hypernetworks.modules import Hypernetwork
    from ..models.stable_diffusion import StableDiffusion

__all__ = [
    "LR_SCHEDULES",
    "MIXED_PRECISION",
    "MODES",
    "RunExists",
    "TrainConfig",
    "TrainResult",
    "TrainingDiverged",
    "TrainingInterrupted",
    "train",
]

log = logging.getLogger(__name__)

MODES = ("hypernetwork", "finetune")
LR_SCHEDULES = ("constant", "cosine", "linear")
MIXED_PRECISION = ("no", "fp16", "bf16")

HYPERNETWORK_FILES = ("hypernetwork.safetensors", "hypernetwork.pt")
UNET_FILE = "unet.safetensors"
EMA_UNET_FILE = "unet_ema.safetensors"
STATE_FILE = "training_state.pt"
LOG_FILE = "training_log.csv"
SAMPLES_DIR = "samples"
DEMO_DATA_DIR = "demo-data"
LOG_COLUMNS = ("step", "epoch", "loss", "penalty", "lr", "images_per_s", "skipped", "skipped_steps", "empty_batches")

_STATE_FORMAT = 1
_NOISE_STREAM = 0x6E6F6973  # "nois": keeps noise seeds apart from other (seed, ...) streams
# Config fields that may change between a run and its resume without changing what is trained.
_RESUMABLE_CHANGES = frozenset(
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


class TrainingDiverged(RuntimeError):
    """Too many steps in a row had a loss that was not finite."""


class RunExists(FileExistsError):
    """``output_dir`` holds an earlier run's checkpoint, and neither ``resume`` nor ``overwrite`` was set."""

    def __init__(self, output_dir: Path, step: int | None) -> None:
        self.output_dir = output_dir
        self.step = step  # None: the checkpoint could not be read
        run = f"a run at step {step}" if step is not None else "an earlier run's checkpoint"
        super().__init__(
            f"{output_dir} holds {run} ({STATE_FILE}); nothing was changed. --resume continues it, --overwrite "
            f"starts over (replacing it at the first save), or choose another --output-dir"
        )


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM stopped the run after a step: rank 0 wrote a checkpoint at ``step`` in
    ``output_dir``, from which ``resume=True`` continues exactly. Raised on every rank;
    ``exit_code`` is the shell's status for the signal (130, 143)."""

    def __init__(self, signal_number: int, step: int, output_dir: Path, rank: int = 0) -> None:
        self.signal = signal.Signals(signal_number)
        self.step = step
        self.output_dir = output_dir
        self.rank = rank
        super().__init__(
            f"stopped by {self.signal.name} at step {step}; the checkpoint in {output_dir} continues with resume=True"
        )

    @property
    def exit_code(self) -> int:
        return exit_code(self.signal)


@dataclass
class TrainConfig:
    """Everything a training run depends on. ``nai-fast train --help`` describes each option."""

    model: str = "tiny"  # a preset name (nai_fast.models.presets.PRESETS) or a model path
    data: str | None = None  # image folder with .txt tags; None: a demo dataset (tiny preset only)
    output_dir: str = DEFAULT_TRAIN_OUTPUT  # where `nai-fast generate --preset tiny` looks
    mode: str = "hypernetwork"
    max_steps: int = 1000  # optimizer steps in the whole run, resumed ones included
    batch_size: int = 4  # per rank
    grad_accum: int = 1
    lr: float = 1e-5
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.01
    resolution: int | None = None  # side of the base bucket; None: the model's (512 for SD 1.x, 128 for tiny)
    max_aspect_error: float | None = 0.5  # prune images this far (log units) from every bucket
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    max_grad_norm: float | None = 1.0  # None or 0: no clipping
    penalty_weight: float = 1.0  # hypernetwork shallow-layer penalty
    ema: bool = False  # fine-tuning only
    ema_decay: float = 0.9999
    caption_dropout: float = 0.0
    keep_tokens: int = 0
    shuffle_tags: bool = True
    min_caption_tokens: int = 50
    max_chunks: int = 3  # 75-token chunks per caption
    clip_skip: int = 2
    hypernetwork_structure: tuple[float, ...] = (1.0, 2.0, 1.0)
    activation: str = "linear"
    layer_norm: bool = False
    hypernetwork_dropout: float = 0.0  # after each hidden Linear
    cache_latents: bool = False
    save_every: int = 500  # 0: only at the end
    sample_every: int = 0  # 0: no samples
    sample_prompts: tuple[str, ...] = ()  # default: the first image's tags
    sample_steps: int = 20
    seed: int = 0
    workers: int = 0  # DataLoader worker processes
    device: str | None = None  # None: cuda (this rank's GPU) if available, else cpu
    resume: bool = False  # continue the run whose checkpoint is in output_dir
    overwrite: bool = False  # start over in an output_dir that holds a run (else refused, see RunExists)
    max_consecutive_skips: int = 10
    fixed_noise: bool = False  # the same noise and timesteps at every step (overfitting checks)
    record_items: bool = False  # list the files each step trained on in TrainResult.trained_items
    progress: bool = True
    tensorboard: bool = True  # when torch.utils.tensorboard imports

    def __post_init__(self) -> None:
        self.hypernetwork_structure = tuple(float(m) for m in self.hypernetwork_structure)
        self.sample_prompts = tuple(self.sample_prompts)
        for name, choices in (("mode", MODES), ("lr_schedule", LR_SCHEDULES), ("mixed_precision", MIXED_PRECISION)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")
        for name in (
            "max_steps",
            "batch_size",
            "grad_accum",
            "max_chunks",
            "clip_skip",
            "sample_steps",
            "max_consecutive_skips",
        ):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "save_every", "sample_every", "workers", "keep_tokens", "seed"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.resume and self.overwrite:
            raise ValueError("resume continues the run in output_dir and overwrite replaces it: set one, not both")
        if self.ema and self.mode != "finetune":
            raise ValueError("ema applies to mode 'finetune' only")
        if not 0.0 <= self.hypernetwork_dropout < 1.0:
            raise ValueError(f"hypernetwork_dropout must lie in [0, 1), got {self.hypernetwork_dropout}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class TrainResult:
    """What a run did. On ranks other than 0, ``paths`` is empty (they write nothing)."""

    steps: int  # optimizer steps done in total, resumed ones included
    final_loss: float | None  # the last step's mean diffusion loss over all ranks
    paths: list[Path]  # files written (latest version of each)
    skipped_files: dict[str, int]  # reason -> files never trained on: unreadable at scan or at load time
    skipped_steps: int  # steps skipped for a non-finite loss (resumed ones included)
    empty_batches: int  # batches skipped because none of their images loaded
    losses: list[float] = field(default_factory=list)  # per step of this run
    hypernetwork: Hypernetwork | None = field(default=None, repr=False)  # the trained one (hypernetwork mode)
    trained_items: list[list[str]] = field(
        default_factory=list, repr=False
    )  # per step, this rank's files (record_items)


def train(config: TrainConfig, *, model: StableDiffusion | None = None) -> TrainResult:
    """Run (or resume) a training run; see the module doc.

    ``model``: an already loaded model to train instead of loading ``config.model``
    (its U-Net is changed in place when fine-tuning; hypernetwork processors are removed
    again at the end). Seeds the global random generators from ``config.seed``.
    """
    session = _Session.start(config.device)
    try:
        return _Run(config, model, session).run()
    finally:
        session.close()


# Processes


@dataclass
class _Session:
    """This process's place in the run: rank, world size, device, and the collectives used."""

    world_size: int
    rank: int
    device: torch.device
    owns_process_group: bool

    @classmethod
    def start(cls, device_name: str | None) -> _Session:
        import torch.distributed as dist

        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device(device_name or ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", local_rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        owns = False
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            owns = True
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_world_size(), dist.get_rank(), device, owns)
        return cls(1, 0, device, owns)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sums over all ranks."""
        if not self.distributed:
            return [float(v) for v in values]
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(tensor)
        return tensor.tolist()

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any rank (every rank gets the same answer)."""
        return self.sum([float(flag)])[0] > 0

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order, on every rank."""
        if not self.distributed:
            return [value]
        values: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(values, value)
        return values

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def close(self) -> None:
        if self.owns_process_group:
            torch.distributed.destroy_process_group()


class _Denoiser(nn.Module):
    """Runs the U-Net; holds the hypernetwork too, so DistributedDataParallel wrapped
    around it sees the parameters the U-Net's attention processors use."""

    def __init__(self, unet: nn.Module, hypernetwork: nn.Module | None) -> None:
        super().__init__()
        self.unet = unet
        self.hypernetwork = hypernetwork

    def forward(self, noisy: Tensor, timesteps: Tensor, context: Tensor) -> Tensor:
        return self.unet(noisy, timesteps, encoder_hidden_states=context, return_dict=False)[0]


class _ExponentialMovingAverage:
    """A float32 shadow of parameters: ``shadow += (1 - decay) * (param - shadow)`` per step,
    the decay warming up as ``min(decay, (1 + n) / (10 + n))`` (diffusers' EMAModel rule)."""

    def __init__(self, parameters: Sequence[nn.Parameter], decay: float) -> None:
        self.parameters = list(parameters)
        self.decay = decay
        self.updates = 0
        self.shadow = [p.detach().float().clone() for p in self.parameters]

    @torch.no_grad()
    def update(self) -> None:
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.parameters], 1.0 - decay)
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay, self.updates = float(state["decay"]), int(state["updates"])
        self.shadow = [saved.to(p.device) for saved, p in zip(state["shadow"], self.parameters, strict=True)]


def _fixed_crop_dataset(dataset_class: type) -> type:
    """A dataset class whose crops ignore the epoch (seeded by ``(seed, 0, item)``), so a
    cached latent is the latent of the crop a batch would have loaded."""

    class FixedCropDataset(dataset_class):
        def __getitem__(self, request: BatchRequest) -> dict[str, Any]:
            batch = super().__getitem__(dataclasses.replace(request, epoch=0))
            batch["epoch"] = request.epoch
            return batch

    return FixedCropDataset


# The run


class _Run:
    """One call of :func:`train`: builds everything, then steps until ``max_steps``."""

    def __init__(self, config: TrainConfig, model: StableDiffusion | None, session: _Session) -> None:
        self.config = config
        self.session = session
        self.device = session.device
        self.output_dir = Path(config.output_dir)
        self.model = model
        self.step = 0
        self.checkpoint_current = False  # whether output_dir's checkpoint is this run as it is now
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self.empty_batches = 0
        self.load_failures: dict[str, str] = {}  # path -> reason, this rank's (all ranks' after a save)
        self.paths: dict[str, Path] = {}
        self.losses: list[float] = []
        self.trained_items: list[list[str]] = []
        self.latent_cache: dict[tuple[int, int, int], Tensor] = {}
        self.consumed = {"epoch": 0, "position": 0}  # the sampler position of the last batch used
        self.samples_enabled = True

    # Setup

    def run(self) -> TrainResult:
        config, session = self.config, self.session
        self._check_output_dir()
        if session.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        self.model = self.model if self.model is not None else _load_model(config.model)
        self._set_up_model()
        self._set_up_data()
        self._set_up_text()
        self._set_up_optimization()
        self._seed_global_generators()
        if config.resume:
            self._resume()
        self.denoiser = self._wrap_for_processes(_Denoiser(self.model.unet, self.hypernetwork))
        try:
            with _RunLog(self.output_dir, self.step, session.is_main, config.tensorboard) as self.run_log:
                self._train_loop()
        finally:
            self.model.unet.eval()  # as models are loaded
            if self.hypernetwork is not None:
                from ..hypernetworks.processors import remove_hypernetworks

                remove_hypernetworks(self.model.unet)
        return self._result()

    def _check_output_dir(self) -> None:
        """Refuse to start over where an earlier run's checkpoint is, unless told to; before anything is
        built or written. (Every rank looks: they all raise, and none waits for another in a collective.)"""
        path = self.output_dir / STATE_FILE
        if self.config.resume or not path.is_file():
            return
        try:
            step: int | None = saved_step(path)
        except Exception:  # unreadable: still an earlier run's file
            step = None
        if not self.config.overwrite:
            raise RunExists(self.output_dir, step)
        if self.session.is_main:
            log.warning(
                "overwrite: starting over; the run at step %s in %s is replaced at this run's first save",
                "?" if step is None else step,
                self.output_dir,
            )

    def _set_up_model(self) -> None:
        config, model = self.config, self.model
        unet = model.unet
        for network in (unet, model.vae, model.text_encoder):
            network.to(self.device)  # not model.to(): a dtype argument, even None, makes diffusers log a warning
        for frozen in (model.vae, model.text_encoder):
            frozen.requires_grad_(False).eval()
        half = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.mixed_precision)
        self.autocast_dtype = half
        if half is not None and self.device.type == "cuda":
            # Frozen networks only ever run forward: half weights halve their memory and time. Not the
            # VAE in fp16: SD's VAE overflows there (NaN latents, black samples); bf16 has the range.
            if half == torch.bfloat16:
                model.vae.to(dtype=half)
            model.text_encoder.to(dtype=half)
            if config.mode == "hypernetwork":
                unet.to(dtype=half)
        self.hypernetwork: Hypernetwork | None = None
        if config.mode == "hypernetwork":
            unet.requires_grad_(False)
            self.hypernetwork = self._new_hypernetwork(unet).to(self.device).train()
            from ..hypernetworks.processors import apply_hypernetworks

            penalized = {min(unet.config.block_out_channels): config.penalty_weight} if config.penalty_weight else {}
            apply_hypernetworks(unet, self.hypernetwork, penalty_weights=penalized)
            self.trainable: nn.Module = self.hypernetwork
        else:
            unet.requires_grad_(True)
            self.trainable = unet
        unet.train()  # no Dropout or BatchNorm in SD's U-Net: this only lets checkpointing engage
        if config.gradient_checkpointing:
            unet.enable_gradient_checkpointing()

    def _new_hypernetwork(self, unet: nn.Module) -> Hypernetwork:
        from ..hypernetworks.modules import Hypernetwork

        config = self.config
        cross = unet.config.cross_attention_dim
        widths = sorted(
            set(unet.config.block_out_channels) | set(cross if isinstance(cross, (list, tuple)) else [cross])
        )
        depth = len(config.hypernetwork_structure)
        dropout = [0.0] + [config.hypernetwork_dropout] * (depth - 2) + [0.0]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed)  # the same initial weights on every rank
            hypernetwork = Hypernetwork(
                widths,
                layer_structure=config.hypernetwork_structure,
                activation=config.activation,
                layer_norm=config.layer_norm,
                dropout_structure=dropout,
            )
        hypernetwork.name = self.output_dir.resolve().name
        hypernetwork.sd_checkpoint_name = self.model.source
        return hypernetwork

    def _set_up_data(self) -> None:
        from torch.utils.data import DataLoader

        from ..data.buckets import assign, scaled_buckets
        from ..data.loading import BucketBatchSampler, BucketDataset
        from ..data.scan import scan

        config, session = self.config, self.session
        folder = Path(config.data) if config.data is not None else self._demo_data()
        # Rank 0 scans first and writes the size cache; the others then read it instead of racing it.
        if session.is_main:
            found = scan(folder, progress=config.progress)
        session.barrier()
        if not session.is_main:
            found = scan(folder)
        self.found = found
        if session.is_main:
            log.info("data: %s in %s", found.summary(), folder)
        model = self.model
        unit = model.size_unit
        self.resolution = config.resolution or model.resolution
        buckets = scaled_buckets(self.resolution, unit)
        bucket_ids = assign(found.sizes, buckets, max_aspect_error=config.max_aspect_error)
        self.pruned = int((bucket_ids < 0).sum())
        self.sampler = BucketBatchSampler(bucket_ids, buckets, config.batch_size, seed=config.seed, sizes=found.sizes)
        dataset_class = _fixed_crop_dataset(BucketDataset) if config.cache_latents else BucketDataset
        dataset = dataset_class(found.root, found.paths, seed=config.seed)
        self.loader = DataLoader(
            dataset,
            sampler=self.sampler,
            batch_size=None,
            num_workers=config.workers,
            pin_memory=self.device.type == "cuda",
            # Its own generator: each new iterator draws a worker seed, which from the global generator
            # would shift the Dropout masks of a resumed run. (Batches never use that seed.)
            generator=torch.Generator().manual_seed(config.seed),
            # A terminal's Ctrl-C and a scheduler's SIGTERM reach the workers too; the main process stops
            # them once it has finished its step and saved.
            worker_init_fn=ignore_stop_signals,
        )

    def _demo_data(self) -> Path:
        """The tiny preset's procedural dataset in ``output_dir/demo-data``, made once (by rank 0,
        in a temporary folder renamed when complete, so an interrupted run never leaves half of it)."""
        if self.config.model != "tiny":
            raise ValueError("data is required: the built-in demo dataset is made for the tiny preset only")
        folder = self.output_dir / DEMO_DATA_DIR
        if self.session.is_main and not folder.is_dir():
            from .demo_data import make_demo_dataset

            partial = folder.with_name(f".{DEMO_DATA_DIR}.tmp-{os.getpid()}")
            make_demo_dataset(partial, count=64, seed=0)
            os.replace(partial, folder)
        self.session.barrier()
        return folder

    def _set_up_text(self) -> None:
        from .captions import CaptionAugmenter, CaptionPolicy
        from ..text.encoder import LongPromptEncoder

        config, model = self.config, self.model
        # No emphasis syntax in training: tags such as "smile (expression)" are literal text. No comma
        # backtrack either: captions are trimmed to 75 * max_chunks tokens, which fit only in full chunks.
        self.encoder = LongPromptEncoder(
            model.tokenizer,
            model.text_encoder,
            clip_skip=config.clip_skip,
            max_chunks=config.max_chunks,
            syntax="none",
            comma_backtrack=0,
        )
        tokenize = functools.partial(model.tokenizer.encode, add_special_tokens=False, verbose=False)
        policy = CaptionPolicy(
            keep_tokens=config.keep_tokens,
            shuffle=config.shuffle_tags,
            dropout=config.caption_dropout,
            min_tokens=min(config.min_caption_tokens, 75 * config.max_chunks),
            max_tokens=75 * config.max_chunks,
        )
        self.captions = CaptionAugmenter(policy, tokenize, seed=config.seed)

    def _set_up_optimization(self) -> None:
        from diffusers.optimization import get_scheduler

        config = self.config
        self.parameters = [p for p in self.trainable.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.parameters, lr=config.lr, weight_decay=config.weight_decay)
        schedule = (
            "constant_with_warmup" if config.lr_schedule == "constant" and config.warmup_steps else config.lr_schedule
        )
        self.lr_scheduler = get_scheduler(
            schedule, self.optimizer, num_warmup_steps=config.warmup_steps, num_training_steps=config.max_steps
        )
        # Loss scaling only where fp16's range needs it; bf16 has float32's range.
        self.scaler = torch.amp.GradScaler(
            self.device.type, enabled=config.mixed_precision == "fp16" and self.device.type == "cuda"
        )
        self.ema = _ExponentialMovingAverage(self.parameters, config.ema_decay) if config.ema else None

    def _seed_global_generators(self) -> None:
        import random

        # Per rank, so Dropout masks differ between ranks; restored on resume.
        seed = self.config.seed * 1000 + self.session.rank
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)

    def _wrap_for_processes(self, denoiser: _Denoiser) -> nn.Module:
        if not self.session.distributed:
            return denoiser
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(denoiser, device_ids=device_ids)  # no buffers to sync in SD's U-Net

    # Resume

    def _check_resumed_widths(self, saved: dict[str, torch.Tensor], path: Path) -> None:
        """A saved hypernetwork for other k/v widths (another model) is refused by its widths."""
        from ..hypernetworks.processors import HypernetworkMismatchError

        widths = sorted({int(key.split(".")[1]) for key in saved if key.startswith("pairs.")})
        if widths != sorted(self.hypernetwork.widths):
            raise HypernetworkMismatchError(
                f"cannot resume from {path}: its hypernetwork has modules for k/v widths "
                f"{', '.join(map(str, widths))}, but this model's attention layers take k/v inputs of widths "
                f"{', '.join(map(str, sorted(self.hypernetwork.widths)))} (resumed with another model?)"
            )

    def _resume(self) -> None:
        path = self.output_dir / STATE_FILE
        if not path.is_file():
            if self.session.is_main:
                log.warning("resume: no %s in %s, starting from step 0", STATE_FILE, self.output_dir)
            return
        state = load_state(path)
        if state.get("format") != _STATE_FORMAT:
            raise ValueError(f"cannot resume from {path}: unknown state format {state.get('format')!r}")
        self._check_resumed_config(json.loads(state["config"]))
        if self.hypernetwork is not None:
            self._check_resumed_widths(state["trainable"], path)
        try:
            self.trainable.load_state_dict(state["trainable"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as error:
            raise ValueError(f"cannot resume from {path}: {error}") from error
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        if state["grad_scaler"]:
            self.scaler.load_state_dict(state["grad_scaler"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        self.sampler.load_state_dict(state["sampler"])
        self.consumed = {"epoch": int(state["sampler"]["epoch"]), "position": int(state["sampler"]["position"])}
        ranks = state["rng"]
        if len(ranks) == self.session.world_size:
            restore_rng_states(ranks[self.session.rank])
        elif self.session.is_main:
            log.warning(
                "resume: saved with %d ranks, running with %d; random states not restored",
                len(ranks),
                self.session.world_size,
            )
        counters = state["counters"]
        self.step = int(state["step"])
        self.checkpoint_current = True
        self.skipped_steps = int(counters["skipped_steps"])
        self.consecutive_skips = int(counters["consecutive_skips"])
        self.empty_batches = int(counters["empty_batches"])
        self.load_failures = dict(counters["load_failures"])
        if self.hypernetwork is not None:
            self.hypernetwork.step = self.step
        if self.session.is_main:
            log.info("resumed from %s at step %d", path, self.step)

    def _check_resumed_config(self, saved: dict[str, Any]) -> None:
        current = json.loads(json.dumps(self.config.to_dict()))  # tuples as lists, as saved
        changed = sorted(key for key in current if key not in _RESUMABLE_CHANGES and saved.get(key) != current[key])
        if changed and self.session.is_main:
            log.warning(
                "resume: options changed since the checkpoint: %s; the run will differ from an uninterrupted one",
                ", ".join(f"{key} {saved.get(key)!r} -> {current[key]!r}" for key in changed),
            )

    # The loop

    def _batches(self) -> Iterator[dict[str, Any]]:
        """Batches forever, epoch after epoch, from the sampler's (possibly restored) position."""
        epoch = self.consumed["epoch"]
        while True:
            self.sampler.set_epoch(epoch)
            for batch in self.loader:
                yield batch
            epoch += 1

    def _train_loop(self) -> None:
        config, session = self.config, self.session
        if self.step >= config.max_steps:
            if session.is_main:
                log.info(
                    "nothing to do: the run in %s is at step %d of max %d (raise --max-steps to train on)",
                    self.output_dir,
                    self.step,
                    config.max_steps,
                )
            return
        from tqdm import tqdm

        bar = tqdm(
            total=config.max_steps,
            initial=self.step,
            desc="train",
            unit="step",
            disable=not (session.is_main and config.progress),
            dynamic_ncols=True,
        )
        batches = self._batches()
        # Files that failed to load so far (every rank knows the same ones after a resume). A file can
        # fail on two ranks in different epochs; the log may count it twice, the result never does.
        skipped_total = len(self.load_failures)
        with bar, StopRequest() as stop:
            while self.step < config.max_steps:
                if stop.received is not None and not session.distributed:
                    self._stop(stop.received)  # alone, it need not wait for the next all-reduce to agree
                started = time.perf_counter()
                mse_sum, penalty_sum, micro_batches, images, items, new_failures = self._accumulate(batches)
                # The step's one all-reduce: losses and counts, and whether any rank was asked to stop.
                totals = session.sum([mse_sum, penalty_sum, micro_batches, images, new_failures, *stop.flags()])
                mse_sum, penalty_sum, micro_batches, images, new_failures = totals[:5]
                stopping = stop.agreed(totals[5:])
                skipped_total += int(new_failures)
                lr = self.optimizer.param_groups[0]["lr"]  # this step's, before the schedule moves on
                if not math.isfinite(mse_sum + penalty_sum):  # NaN/inf on any rank reaches every rank's sum
                    self._skip_step(f"loss {mse_sum + penalty_sum}")
                    stepped = False
                elif not self._optimizer_step():
                    self._skip_step("gradient norm not finite")
                    stepped = False
                else:
                    stepped = True
                    self.consecutive_skips = 0
                    self.step += 1
                    loss = mse_sum / micro_batches
                    self.losses.append(loss)
                    if config.record_items:
                        self.trained_items.append(items)
                    elapsed = time.perf_counter() - started
                    self.run_log.write(
                        step=self.step,
                        epoch=self.consumed["epoch"],
                        loss=loss,
                        penalty=penalty_sum / micro_batches,
                        lr=lr,
                        images_per_s=images / elapsed,
                        skipped=skipped_total,
                        skipped_steps=self.skipped_steps,
                        empty_batches=self.empty_batches,
                    )
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{images / elapsed:.1f}", lr=f"{lr:.2e}")
                if stopping is not None and self.step < config.max_steps:  # at max_steps the run is done
                    self._stop(stopping)
                if stepped:
                    self._periodic_outputs()
        session.barrier()

    def _stop(self, signal_number: int) -> NoReturn:
        """Save a checkpoint at the last completed step, as a periodic save does (every rank takes
        part; rank 0 writes), and raise :class:`TrainingInterrupted` on every rank."""
        if not self.checkpoint_current:  # else a periodic save has just written this very checkpoint
            self._save_checkpoint()
        self.session.barrier()  # no rank leaves (and ends the job under torchrun) before rank 0 has written
        raise TrainingInterrupted(signal_number, self.step, self.output_dir, rank=self.session.rank)

    def _accumulate(self, batches: Iterator[dict[str, Any]]) -> tuple[float, float, int, int, list[str], int]:
        """Forward and backward ``grad_accum`` non-empty batches; their summed losses and counts."""
        config, session = self.config, self.session
        mse_sum = penalty_sum = 0.0
        micro_batches = images = new_failures = 0
        items: list[str] = []
        while micro_batches < config.grad_accum:
            batch = next(batches)
            self.consumed = {"epoch": int(batch["epoch"]), "position": int(batch["position"]) + 1}
            self.checkpoint_current = False
            for path, reason in batch["skipped"]:
                if path not in self.load_failures:
                    self.load_failures[path] = reason
                    new_failures += 1
                    log.warning("skipped %s: %s", path, reason)
            count = len(batch["indices"])
            # Every rank must agree, or one would wait in the backward's all-reduce for ever.
            if session.any(count == 0):
                self.empty_batches += 1
                if session.is_main:
                    log.warning(
                        "skipped an empty batch (epoch %d, position %d): no image of it loaded on some rank",
                        batch["epoch"],
                        batch["position"],
                    )
                continue
            last = micro_batches == config.grad_accum - 1
            synchronise = contextlib.nullcontext() if last or not session.distributed else self.denoiser.no_sync()
            with synchronise:
                mse, penalty = self._losses(batch)
                self.scaler.scale((mse + penalty) / config.grad_accum).backward()
            mse_sum += float(mse.detach())
            penalty_sum += float(penalty.detach())
            micro_batches += 1
            images += count
            if config.record_items:
                items.extend(self.found.paths[i] for i in batch["indices"].tolist())
        return mse_sum, penalty_sum, micro_batches, images, items, new_failures

    def _losses(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """The diffusion loss and the hypernetwork penalty of one batch, with graphs."""
        model, device = self.model, self.device
        scheduler = model.scheduler
        noise_generator = torch.Generator(device).manual_seed(self._noise_seed(batch))
        with torch.no_grad():
            latents = self._latents(batch, noise_generator)
            noise = torch.randn(latents.shape, generator=noise_generator, device=device)
            timesteps = torch.randint(
                0, scheduler.config.num_train_timesteps, (len(latents),), generator=noise_generator, device=device
            )
            noisy = scheduler.add_noise(latents, noise, timesteps)
            target = noise if model.prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, timesteps)
            captions = [
                self.captions(caption, batch["epoch"], item)
                for caption, item in zip(batch["captions"], batch["indices"].tolist())
            ]
            context = self._encode(captions)
        unet_dtype = model.unet.dtype
        autocast = (
            torch.autocast(device.type, dtype=self.autocast_dtype)
            if self.autocast_dtype is not None
            else contextlib.nullcontext()
        )
        with autocast:
            prediction = self.denoiser(noisy.to(unet_dtype), timesteps, context.to(unet_dtype))
        mse = _prediction_loss(prediction.float(), target.float())
        if self.hypernetwork is not None and self.config.penalty_weight:
            from ..hypernetworks.processors import hypernetwork_penalty

            penalty = hypernetwork_penalty(model.unet).float()
        else:
            penalty = torch.zeros((), device=device)
        return mse, penalty

    def _noise_seed(self, batch: dict[str, Any]) -> int:
        where = (0, 0) if self.config.fixed_noise else (int(batch["epoch"]), int(batch["position"]))
        words = np.random.SeedSequence([self.config.seed, self.session.rank, *where, _NOISE_STREAM]).generate_state(2)
        return (int(words[0]) << 31 | int(words[1]) >> 1) & (2**63 - 1)

    def _latents(self, batch: dict[str, Any], generator: torch.Generator) -> Tensor:
        """A sample of each image's VAE posterior, times the VAE's scaling factor."""
        vae = self.model.vae
        pixels = batch["pixels"].to(self.device, vae.dtype, non_blocking=True)
        if self.config.cache_latents:
            height, width = pixels.shape[-2:]
            keys = [(item, height, width) for item in batch["indices"].tolist()]
            missing = [row for row, key in enumerate(keys) if key not in self.latent_cache]
            if missing:
                encoded = vae.encode(pixels[missing]).latent_dist.parameters
                for row, parameters in zip(missing, encoded):
                    self.latent_cache[keys[row]] = parameters.cpu()
            parameters = torch.stack([self.latent_cache[key] for key in keys]).to(self.device)
        else:
            parameters = vae.encode(pixels).latent_dist.parameters
        mean, log_variance = parameters.float().chunk(2, dim=1)
        std = torch.exp(0.5 * log_variance.clamp(-30.0, 20.0))  # diffusers' DiagonalGaussianDistribution
        sample = mean + std * torch.randn(mean.shape, generator=generator, device=self.device)
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (sample - shift) * vae.config.scaling_factor

    def _encode(self, captions: list[str]) -> Tensor:
        """Contexts for ``captions``. The encoder encodes prompts and negatives in one call;
        passing half the captions as "negatives" puts all of them in that call, at no extra cost."""
        half = (len(captions) + 1) // 2
        first, second = captions[:half], captions[half:]
        second = second + [""] * (half - len(second))
        cond, uncond = self.encoder.encode(first, second)
        return torch.cat([cond, uncond])[: len(captions)]

    def _skip_step(self, reason: str) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.skipped_steps += 1
        self.consecutive_skips += 1
        if self.session.is_main:
            log.warning(
                "step %d skipped: %s (%d in a row, %d in all)",
                self.step + 1,
                reason,
                self.consecutive_skips,
                self.skipped_steps,
            )
        if self.consecutive_skips >= self.config.max_consecutive_skips:
            saved = self.output_dir / STATE_FILE
            last = (
                f"the last checkpoint, {saved}, is left as it was" if saved.is_file() else "no checkpoint was written"
            )
            raise TrainingDiverged(
                f"the loss or its gradients were not finite for {self.consecutive_skips} steps in a row (at step {self.step + 1}); "
                f"stopping; {last}. Try a lower learning rate, another mixed precision, or gradient clipping."
            )

    def _optimizer_step(self) -> bool:
        """Unscale, clip and step; False (nothing stepped) when the gradients are not finite."""
        config = self.config
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.optimizer)
        # With clipping off the norm is still taken (a max of inf scales by exactly 1), to catch
        # non-finite gradients of a finite loss; fp16's scaler checks them itself.
        norm = torch.nn.utils.clip_grad_norm_(self.parameters, config.max_grad_norm or math.inf)
        if not self.scaler.is_enabled() and not torch.isfinite(norm):
            return False
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update()
        if self.hypernetwork is not None:
            self.hypernetwork.step = self.step + 1
        return True

    # Outputs

    def _periodic_outputs(self) -> None:
        config, step = self.config, self.step
        last = step == config.max_steps
        if last or (config.save_every and step % config.save_every == 0):
            self._save_checkpoint()
        sample_now = config.sample_every and (last or step % config.sample_every == 0)
        if sample_now and self.samples_enabled and self.session.is_main:
            self._write_samples()

    def _save_checkpoint(self) -> None:
        session = self.session
        self.checkpoint_current = True
        # Every rank's random states and load failures, so a resume restores all of them.
        gathered = session.gather((rng_states(), self.load_failures))
        for _, failures in gathered:
            for path, reason in failures.items():
                self.load_failures.setdefault(path, reason)
        if not session.is_main:
            return
        out = self.output_dir
        if self.hypernetwork is not None:
            for name in HYPERNETWORK_FILES:
                self.paths[name] = atomic_write(out / name, self.hypernetwork.save)
        else:
            unet = self.model.unet
            self.paths[UNET_FILE] = _save_weights(unet.state_dict(), out / UNET_FILE)
            if self.ema is not None:
                names = {id(p): name for name, p in unet.named_parameters()}
                weights = dict(unet.state_dict())
                for parameter, shadow in zip(self.ema.parameters, self.ema.shadow):
                    weights[names[id(parameter)]] = shadow.to(parameter.dtype)
                self.paths[EMA_UNET_FILE] = _save_weights(weights, out / EMA_UNET_FILE)
        state = {
            "format": _STATE_FORMAT,
            "step": self.step,
            "trainable": self.trainable.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "grad_scaler": self.scaler.state_dict(),
            "ema": None if self.ema is None else self.ema.state_dict(),
            "sampler": self.sampler.state_dict(consumed=self.consumed["position"]) | {"epoch": self.consumed["epoch"]},
            "rng": [states for states, _ in gathered],
            "counters": {
                "skipped_steps": self.skipped_steps,
                "consecutive_skips": self.consecutive_skips,
                "empty_batches": self.empty_batches,
                "load_failures": self.load_failures,
            },
            "config": json.dumps(self.config.to_dict()),
        }
        self.paths[STATE_FILE] = save_state(state, out / STATE_FILE)  # last: it commits the checkpoint
        self.run_log.flush()

    def _write_samples(self) -> None:
        prompts = self.config.sample_prompts or (self.found.tags(0) or "",)
        side = max(64, round(self.resolution / 64) * 64)  # txt2img takes multiples of 64
        folder = self.output_dir / SAMPLES_DIR
        for index, prompt in enumerate(prompts):
            path = folder / f"step{self.step:06d}-{index}.png"
            try:
                _render_sample(
                    self.model,
                    prompt,
                    seed=self.config.seed + index,
                    size=side,
                    steps=self.config.sample_steps,
                    clip_skip=self.config.clip_skip,
                    path=path,
                )
            except ImportError as error:  # generate.py is optional to the engine
                log.warning("no sample images: %s", error)
                self.samples_enabled = False
                return
            self.paths[f"{SAMPLES_DIR}/{path.name}"] = path

    def _result(self) -> TrainResult:
        session = self.session
        failures: dict[str, str] = {}
        for rank_failures in session.gather(self.load_failures):
            failures.update(rank_failures)
        skipped = dict(self.found.skipped_counts())
        for reason in failures.values():
            skipped[reason] = skipped.get(reason, 0) + 1
        if self.pruned:
            skipped["pruned_aspect"] = self.pruned
        if session.is_main and skipped:
            log.info("files not trained on: %s", ", ".join(f"{count} {reason}" for reason, count in skipped.items()))
        return TrainResult(
            steps=self.step,
            final_loss=self.losses[-1] if self.losses else None,
            paths=list(self.paths.values()) if session.is_main else [],
            skipped_files=skipped,
            skipped_steps=self.skipped_steps,
            empty_batches=self.empty_batches,
            losses=self.losses,
            hypernetwork=self.hypernetwork,
            trained_items=self.trained_items,
        )


def _load_model(source: str) -> StableDiffusion:
    from ..models.load import load_model

    return load_model(source)


def _prediction_loss(prediction: Tensor, target: Tensor) -> Tensor:
    """The diffusion loss: mean squared error over every element."""
    return torch.nn.functional.mse_loss(prediction, target)


def _save_weights(weights: dict[str, Tensor], path: Path) -> Path:
    import safetensors.torch

    tensors = {name: tensor.detach().to("cpu").contiguous() for name, tensor in weights.items()}
    return atomic_write(path, lambda temporary: safetensors.torch.save_file(tensors, temporary))


def _render_sample(
    model: StableDiffusion, prompt: str, *, seed: int, size: int, steps: int, clip_skip: int, path: Path
) -> None:
    """One sample image through the inference engine, saved with its parameters text."""
    from .generate import no_resolution_warning, save_png, txt2img

    # Sampling must not move the training run's generators; small buckets (tiny preset) are intended.
    with torch.random.fork_rng(devices=[]), no_resolution_warning():
        generated = txt2img(
            model, prompt, width=size, height=size, steps=steps, seed=seed, clip_skip=clip_skip, progress=False
        )[0]
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda temporary: save_png(generated.image, temporary, generated.parameters))


class _RunLog:
    """The CSV log (and TensorBoard, where it imports), written by rank 0 only."""

    def __init__(self, output_dir: Path, start_step: int, active: bool, tensorboard: bool) -> None:
        self.active = active
        self.file = None
        self.writer = None
        self.tensorboard = None
        if not active:
            return
        path = output_dir / LOG_FILE
        kept = _rows_up_to(path, start_step)  # a resumed run rewrites the steps after its checkpoint
        self.file = open(path, "w", newline="", encoding="utf-8")
        self.writer = csv.DictWriter(self.file, fieldnames=LOG_COLUMNS)
        self.writer.writeheader()
        self.writer.writerows(kept)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                pass
            else:
                self.tensorboard = SummaryWriter(str(output_dir / "tensorboard"), purge_step=start_step + 1)

    def __enter__(self) -> _RunLog:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.file is not None:
            self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()

    def write(self, **row: float) -> None:
        if not self.active:
            return
        self.writer.writerow(
            {key: (f"{value:.6g}" if isinstance(value, float) else value) for key, value in row.items()}
        )
        self.file.flush()  # each row as it happens: `tail -f` and monitors see progress
        if self.tensorboard is not None:
            for key in ("loss", "penalty", "lr", "images_per_s"):
                self.tensorboard.add_scalar(f"train/{key}", row[key], row["step"])

    def flush(self) -> None:
        if self.file is not None:
            self.file.flush()


def _rows_up_to(path: Path, step: int) -> list[dict[str, str]]:
    if step == 0 or not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as file:
        return [row for row in csv.DictReader(file) if row.get("step", "").isdigit() and int(row["step"]) <= step]
