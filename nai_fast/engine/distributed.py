"""The training session of one process: its device, rank and world size, the process group under
``torchrun``, and the few collectives the trainer makes.

:meth:`Session.start` initialises the process group from the environment when ``WORLD_SIZE > 1``
(NCCL on CUDA, gloo on CPU) and destroys it on :meth:`Session.close` (or on leaving the session as
a context manager); a group someone else initialised is used and left alone. Alone, every
collective is a no-op, so a single process never needs torch.distributed. Rank and world size are
asked once, here: the trainer hands them to what needs them (the batch sampler).
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .stop import StopRequest

__all__ = ["Session"]


@dataclass
class Session:
    """This process's place in the run: rank, world size, device, and the collectives used."""

    world_size: int
    rank: int
    device: torch.device
    owns_process_group: bool

    @classmethod
    def start(cls, device_name: str | None) -> Session:
        """The device (``None``: this rank's GPU if there is one, else the CPU), and the process
        group when the environment (``torchrun``) asks for several processes."""
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

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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

    def sum_and_stop(self, values: Sequence[float], stop: StopRequest) -> tuple[list[float], signal.Signals | None]:
        """:meth:`sum` of ``values``, and the signal every rank stops for (None: go on), in one
        all-reduce: the stop requests travel with the sums a step makes anyway."""
        totals = self.sum([*values, *stop.flags()])
        return totals[: len(values)], stop.agreed(totals[len(values) :])

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

    def wrap(self, module: nn.Module) -> nn.Module:
        """``module`` in DistributedDataParallel when there are several processes (it averages the
        gradients of the parameters that require them), else ``module`` itself."""
        if not self.distributed:
            return module
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=device_ids)  # no buffers to sync in SD's U-Net

    def synchronising(self, module: nn.Module, synchronise: bool) -> contextlib.AbstractContextManager[Any]:
        """Where a backward of the :meth:`wrap` ped ``module`` reduces gradients only when ``synchronise``:
        gradient accumulation's micro-batches before the last need no all-reduce."""
        if synchronise or not self.distributed:
            return contextlib.nullcontext()
        return module.no_sync()

    def close(self) -> None:
        if self.owns_process_group:
            torch.distributed.destroy_process_group()
            self.owns_process_group = False
