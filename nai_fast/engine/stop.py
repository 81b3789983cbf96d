"""Stopping a run cleanly when the process is asked to: SIGINT (Ctrl-C) or SIGTERM (what job
schedulers send before they kill a job).

:class:`StopRequest` is a context manager. While it is active, the first of these signals is
recorded instead of raising, and a loop reads the request where stopping is safe (the training
loop: at the end of a step, which it then finishes and checkpoints). A second signal raises
:class:`Aborted` at once, wherever the process is. Leaving the context restores the handlers
that were there before.

Several processes agree on stopping by adding :meth:`StopRequest.flags` to a sum they all-reduce
anyway; :meth:`StopRequest.agreed` reads the sum, so every rank stops after the same step even
when only one of them was signalled.

Signal handlers can only be set from the main thread: elsewhere the context does nothing and
signals keep their usual effect. No torch here, so the command line can import this cheaply.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Sequence
from types import FrameType
from typing import Any

__all__ = ["STOP_SIGNALS", "Aborted", "StopRequest", "exit_code", "ignore_stop_signals"]

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def exit_code(signal_number: int) -> int:
    """The shell's exit status of a process ended by a signal: 130 for SIGINT, 143 for SIGTERM."""
    return 128 + int(signal_number)


class Aborted(KeyboardInterrupt):
    """A second stop signal: the process stops at once, without finishing or saving anything.

    A KeyboardInterrupt, so code that cleans up after Ctrl-C (``except BaseException``, ``finally``)
    does so; an atomic write in progress removes its temporary file and keeps the previous file.
    """

    def __init__(self, signal_number: int) -> None:
        self.signal = signal.Signals(signal_number)
        super().__init__(f"stopped at once by a second {self.signal.name}; files already written are kept")

    @property
    def exit_code(self) -> int:
        return exit_code(self.signal)


class StopRequest:
    """Records the first stop signal while active (see the module doc); ``received`` is it, or None."""

    def __init__(self, signals: Sequence[int] = STOP_SIGNALS) -> None:
        self.signals = tuple(signal.Signals(number) for number in signals)
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for number in self.signals:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for number, previous in self._previous.items():
            # None: the previous handler was not set from Python; the default is the closest we can restore.
            signal.signal(number, signal.SIG_DFL if previous is None else previous)
        self._previous.clear()

    def _handle(self, number: int, frame: FrameType | None) -> None:
        if self.received is not None:
            raise Aborted(number)
        self.received = signal.Signals(number)
        again = "Ctrl-C again" if number == signal.SIGINT else f"{self.received.name} again"
        log.warning(
            "%s: finishing this step, then saving a checkpoint and stopping (%s stops at once)",
            self.received.name,
            again,
        )

    def flags(self) -> list[float]:
        """One number per handled signal, 1.0 for the one received here: add them to a sum over ranks."""
        return [float(self.received == number) for number in self.signals]

    def agreed(self, summed_flags: Sequence[float]) -> signal.Signals | None:
        """The signal to stop for, given :meth:`flags` summed over all ranks (so every rank gets the
        same answer), or None to go on."""
        return next((number for number, count in zip(self.signals, summed_flags, strict=True) if count > 0), None)


def ignore_stop_signals(worker_id: int | None = None) -> None:
    """Make this process ignore the stop signals: for helper processes (DataLoader workers), which a
    terminal's Ctrl-C or a scheduler's SIGTERM reaches too, and which the main process shuts down
    itself once it has stopped. Its argument lets it serve as a ``worker_init_fn``."""
    for number in STOP_SIGNALS:
        signal.signal(number, signal.SIG_IGN)
