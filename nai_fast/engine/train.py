"""The training engine: hypernetwork training (default) or U-Net fine-tuning on a folder of tagged images.

Long because the run's setup, loop and step math read as one story; the config, distributed
session, denoiser, EMA, checkpoint, log, captions and stop handling are their own modules. The
next cut would be the data setup (scan, buckets, latent cache) into a module of its own.

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
all of it (:mod:`nai_fast.engine.checkpoint`), so N steps, a resume and M more give the same
weights as N+M steps in one run (bit for bit on CPU). Keep ``max_steps`` when resuming: the
cosine and linear schedules span it.

**Files** (rank 0 only, each written atomically; see :mod:`nai_fast.engine.train_state`):
``hypernetwork.safetensors`` and ``hypernetwork.pt`` (the web UI's format), or
``unet.safetensors`` (diffusers key names; ``unet_ema.safetensors`` with EMA);
``training_state.pt`` last, so it never refers to weights newer than the files beside
it (:mod:`nai_fast.engine.checkpoint`); ``training_log.csv`` and ``tensorboard/`` when
``torch.utils.tensorboard`` can be imported (:mod:`nai_fast.engine.train_log`);
``samples/step{step:06d}-{i}.png``.

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

**Several processes.** Under ``torchrun`` (``WORLD_SIZE > 1``) the session
(:mod:`nai_fast.engine.distributed`) initialises the process group from the environment (NCCL
on CUDA, gloo on CPU), and the sampler, given its rank and world size, gives each rank a
disjoint shard. Gradients are averaged by ``DistributedDataParallel`` wrapped around
:class:`~nai_fast.engine.denoiser.Denoiser` (which says why that module), overlapping the
all-reduce with the backward pass. Only rank 0 writes; all ranks end together.

**Latent caching** (``cache_latents``) keeps each image's VAE posterior (mean and
log-variance) per resolution in memory and samples from it every step, skipping the VAE
encoder. A cached latent freezes its crop, so with caching on, crops are seeded by
``(seed, item)`` alone (the dataset's ``fixed_crops``): each image keeps one crop per bucket for the whole run instead
of a new one every epoch (less augmentation, much less compute), and a resumed run
rebuilds the same cache.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np
import torch
from torch import Tensor, nn

from .checkpoint import STATE_FILE, Progress, Resumable, restore_checkpoint, save_checkpoint
from .config import DEFAULT_TRAIN_OUTPUT, LR_SCHEDULES, MIXED_PRECISION, MODES, TrainConfig
from .denoiser import Denoiser
from .distributed import Session
from .ema import ExponentialMovingAverage
from .stop import StopRequest, exit_code, ignore_stop_signals
from .train_log import TrainingLog
from .train_state import atomic_write, saved_step

if TYPE_CHECKING:
    from ..data.scan import ScanResult
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

SAMPLES_DIR = "samples"
DEMO_DATA_DIR = "demo-data-hue-shift"  # named by its style: a folder in another style is never reused

_NOISE_STREAM = 0x6E6F6973  # "nois": keeps noise seeds apart from other (seed, ...) streams


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
    with Session.start(config.device) as session:
        return _Run(config, model, session).run()


@dataclass
class _Sums:
    """One rank's sums over a step's micro-batches."""

    mse: float = 0.0
    penalty: float = 0.0
    micro_batches: int = 0
    images: int = 0
    new_failures: int = 0  # files that failed to load for the first time
    items: list[str] = field(default_factory=list)  # the files trained on (record_items)


# The run


class _Run:
    """One call of :func:`train`: builds everything, then steps until ``max_steps``."""

    def __init__(self, config: TrainConfig, model: StableDiffusion | None, session: Session) -> None:
        self.config = config
        self.session = session
        self.device = session.device
        self.output_dir = Path(config.output_dir)
        self.model = model
        self.progress = Progress()  # its load failures: this rank's (all ranks' after a save)
        self.checkpoint_current = False  # whether output_dir's checkpoint is this run as it is now
        self.paths: dict[str, Path] = {}
        self.files_skipped = 0  # files that failed to load, as the log counts them
        self.losses: list[float] = []
        self.trained_items: list[list[str]] = []
        self.latent_cache: dict[tuple[int, int, int], Tensor] = {}
        self.samples_enabled = True

    @property
    def step(self) -> int:
        """Optimizer steps done, resumed ones included."""
        return self.progress.step

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
        self.denoiser = session.wrap(Denoiser(self.model.unet, self.hypernetwork))
        try:
            with TrainingLog(self.output_dir, self.step, session.is_main, config.tensorboard) as self.run_log:
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

        config, session = self.config, self.session
        self.found = found = self._scan()
        model = self.model
        unit = model.size_unit
        self.resolution = config.resolution or model.resolution
        buckets = scaled_buckets(self.resolution, unit)
        bucket_ids = assign(found.sizes, buckets, max_aspect_error=config.max_aspect_error)
        self.pruned = int((bucket_ids < 0).sum())
        self.sampler = BucketBatchSampler(
            bucket_ids,
            buckets,
            config.batch_size,
            seed=config.seed,
            world_size=session.world_size,
            rank=session.rank,
            sizes=found.sizes,
        )
        # A cached latent freezes its crop: the dataset must load that crop in every epoch.
        dataset = BucketDataset(found.root, found.paths, seed=config.seed, fixed_crops=config.cache_latents)
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

    def _scan(self) -> ScanResult:
        from ..data.scan import scan

        config, session = self.config, self.session
        folder = Path(config.data) if config.data is not None else self._demo_data()
        # Rank 0 scans first and writes the size cache; the others then read it instead of racing it.
        if session.is_main:
            found = scan(folder, progress=config.progress)
        session.barrier()
        if not session.is_main:
            found = scan(folder)
        if session.is_main:
            log.info("data: %s in %s", found.summary(), folder)
        return found

    def _demo_data(self) -> Path:
        """The tiny preset's procedural dataset in ``output_dir/demo-data``, made once (by rank 0,
        in a temporary folder renamed when complete, so an interrupted run never leaves half of it)."""
        if not self.config.model.startswith("tiny"):
            raise ValueError("data is required: the built-in demo dataset is made for the tiny preset only")
        folder = self.output_dir / DEMO_DATA_DIR
        if self.session.is_main and not folder.is_dir():
            from .demo_data import make_demo_dataset

            partial = folder.with_name(f".{DEMO_DATA_DIR}.tmp-{os.getpid()}")
            # In the hue-shift style, which the tiny model never saw: the demo's hypernetwork learns it.
            make_demo_dataset(partial, count=64, seed=0, hue_shift=True)
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
        self.ema = ExponentialMovingAverage(self.parameters, config.ema_decay) if config.ema else None

    def _seed_global_generators(self) -> None:
        import random

        # Per rank, so Dropout masks differ between ranks; restored on resume.
        seed = self.config.seed * 1000 + self.session.rank
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)

    # Checkpoints

    def _resumable(self) -> Resumable:
        return Resumable(
            self.trainable, self.optimizer, self.lr_scheduler, self.scaler, self.ema, self.sampler, self.hypernetwork
        )

    def _resume(self) -> None:
        restored = restore_checkpoint(self.session, self.output_dir, self._resumable(), self.config.to_dict())
        if restored is not None:
            self.progress, self.checkpoint_current = restored, True

    def _save_checkpoint(self) -> None:
        """Every rank takes part (random states and load failures are gathered); rank 0 writes."""
        self.checkpoint_current = True
        paths = save_checkpoint(self.session, self.output_dir, self._resumable(), self.progress, self.config.to_dict())
        if paths:
            self.paths.update(paths)
            self.run_log.flush()

    # The loop

    def _batches(self) -> Iterator[dict[str, Any]]:
        """Batches forever, epoch after epoch, from the sampler's (possibly restored) position."""
        epoch = self.progress.epoch
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
        batches = self._batches()
        # Files that failed to load so far (every rank knows the same ones after a resume). A file can
        # fail on two ranks in different epochs; the log may count it twice, the result never does.
        self.files_skipped = len(self.progress.load_failures)
        with self._progress_bar() as self.bar, StopRequest() as stop:
            while self.step < config.max_steps:
                if stop.received is not None and not session.distributed:
                    self._stop(stop.received)  # alone, it need not wait for the next all-reduce to agree
                stepped, stopping = self._train_step(batches, stop)
                if stopping is not None and self.step < config.max_steps:  # at max_steps the run is done
                    self._stop(stopping)
                if stepped:
                    self._periodic_outputs()
        session.barrier()

    def _progress_bar(self) -> Any:
        from tqdm import tqdm

        return tqdm(
            total=self.config.max_steps,
            initial=self.step,
            desc="train",
            unit="step",
            disable=not (self.session.is_main and self.config.progress),
            dynamic_ncols=True,
        )

    def _stop(self, signal_number: int) -> NoReturn:
        """Save a checkpoint at the last completed step, as a periodic save does (every rank takes
        part; rank 0 writes), and raise :class:`TrainingInterrupted` on every rank."""
        if not self.checkpoint_current:  # else a periodic save has just written this very checkpoint
            self._save_checkpoint()
        self.session.barrier()  # no rank leaves (and ends the job under torchrun) before rank 0 has written
        raise TrainingInterrupted(signal_number, self.step, self.output_dir, rank=self.session.rank)

    def _train_step(self, batches: Iterator[dict[str, Any]], stop: StopRequest) -> tuple[bool, signal.Signals | None]:
        """One optimizer step, or a skipped one: whether it stepped, and the signal all ranks stop for."""
        started = time.perf_counter()
        sums = self._accumulate(batches)
        # The step's one all-reduce: losses and counts, and whether any rank was asked to stop.
        totals, stopping = self.session.sum_and_stop(
            [sums.mse, sums.penalty, sums.micro_batches, sums.images, sums.new_failures], stop
        )
        mse, penalty, micro_batches, images, new_failures = totals
        self.files_skipped += int(new_failures)
        lr = self.optimizer.param_groups[0]["lr"]  # this step's, before the schedule moves on
        if not math.isfinite(mse + penalty):  # NaN/inf on any rank reaches every rank's sum
            self._skip_step(f"loss {mse + penalty}")
            return False, stopping
        if not self._optimizer_step():
            self._skip_step("gradient norm not finite")
            return False, stopping
        self.progress.consecutive_skips = 0
        self.progress.step += 1
        loss = mse / micro_batches
        self.losses.append(loss)
        if self.config.record_items:
            self.trained_items.append(sums.items)
        self._log_step(loss, penalty / micro_batches, lr, images / (time.perf_counter() - started))
        return True, stopping

    def _skip_step(self, reason: str) -> None:
        progress = self.progress
        self.optimizer.zero_grad(set_to_none=True)
        progress.skipped_steps += 1
        progress.consecutive_skips += 1
        if self.session.is_main:
            log.warning(
                "step %d skipped: %s (%d in a row, %d in all)",
                self.step + 1,
                reason,
                progress.consecutive_skips,
                progress.skipped_steps,
            )
        if progress.consecutive_skips >= self.config.max_consecutive_skips:
            saved = self.output_dir / STATE_FILE
            last = (
                f"the last checkpoint, {saved}, is left as it was" if saved.is_file() else "no checkpoint was written"
            )
            raise TrainingDiverged(
                f"the loss or its gradients were not finite for {progress.consecutive_skips} steps in a row "
                f"(at step {self.step + 1}); stopping; {last}. Try a lower learning rate, another mixed precision, "
                "or gradient clipping."
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

    def _log_step(self, loss: float, penalty: float, lr: float, images_per_s: float) -> None:
        progress = self.progress
        self.run_log.write(
            step=progress.step,
            epoch=progress.epoch,
            loss=loss,
            penalty=penalty,
            lr=lr,
            images_per_s=images_per_s,
            skipped=self.files_skipped,
            skipped_steps=progress.skipped_steps,
            empty_batches=progress.empty_batches,
        )
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{images_per_s:.1f}", lr=f"{lr:.2e}")

    # A step's batches

    def _accumulate(self, batches: Iterator[dict[str, Any]]) -> _Sums:
        """Forward and backward ``grad_accum`` non-empty batches; their summed losses and counts."""
        config = self.config
        sums = _Sums()
        while sums.micro_batches < config.grad_accum:
            batch = next(batches)
            sums.new_failures += self._take(batch)
            # Every rank must agree, or one would wait in the backward's all-reduce for ever.
            if self.session.any(len(batch["indices"]) == 0):
                self._skip_empty_batch(batch)
                continue
            last = sums.micro_batches == config.grad_accum - 1
            with self.session.synchronising(self.denoiser, last):
                mse, penalty = self._losses(batch)
                self.scaler.scale((mse + penalty) / config.grad_accum).backward()
            sums.mse += float(mse.detach())
            sums.penalty += float(penalty.detach())
            sums.micro_batches += 1
            sums.images += len(batch["indices"])
            if config.record_items:
                sums.items.extend(self.found.paths[i] for i in batch["indices"].tolist())
        return sums

    def _take(self, batch: dict[str, Any]) -> int:
        """Count ``batch`` as used (its sampler position) and note its load failures; the new ones' count."""
        progress = self.progress
        progress.epoch, progress.position = int(batch["epoch"]), int(batch["position"]) + 1
        self.checkpoint_current = False
        new = 0
        for path, reason in batch["skipped"]:
            if path not in progress.load_failures:
                progress.load_failures[path] = reason
                new += 1
                log.warning("skipped %s: %s", path, reason)
        return new

    def _skip_empty_batch(self, batch: dict[str, Any]) -> None:
        self.progress.empty_batches += 1
        if self.session.is_main:
            log.warning(
                "skipped an empty batch (epoch %d, position %d): no image of it loaded on some rank",
                batch["epoch"],
                batch["position"],
            )

    def _losses(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """The diffusion loss and the hypernetwork penalty of one batch, with graphs."""
        model, device = self.model, self.device
        scheduler = model.scheduler
        noise_generator = torch.Generator(device).manual_seed(self._noise_seed(batch))
        with torch.no_grad():
            latents = self._latents(batch, noise_generator)
            noise = torch.randn(latents.shape, generator=noise_generator, device=device)
            if self.config.noise_offset:  # one shift per image and channel: the noise's mean is no longer ~0
                offset = torch.randn((*latents.shape[:2], 1, 1), generator=noise_generator, device=device)
                noise = noise + self.config.noise_offset * offset
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

    # Outputs

    def _periodic_outputs(self) -> None:
        config, step = self.config, self.step
        last = step == config.max_steps
        if last or (config.save_every and step % config.save_every == 0):
            self._save_checkpoint()
        sample_now = config.sample_every and (last or step % config.sample_every == 0)
        if sample_now and self.samples_enabled and self.session.is_main:
            self._write_samples()

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
        for rank_failures in session.gather(self.progress.load_failures):
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
            skipped_steps=self.progress.skipped_steps,
            empty_batches=self.progress.empty_batches,
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
