"""What a part of the check found, written as it goes.

Each part runs in a process of its own (``python -m gpu.<part> --record FILE --deadline T``)
and keeps its findings in a :class:`Recorder`, which rewrites the part's JSON file
atomically after every record: a part killed at its time limit, or one that crashes, still
leaves everything it measured before. The driver (:mod:`gpu.check`) reads these files.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["Recorder", "part_arguments", "read_part", "run_part", "write_json"]


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` to ``path`` atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as file:
            json.dump(data, file, indent=1, default=_plain, allow_nan=False)
            file.write("\n")
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy and torch scalars
        return value.item()
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity: they become None (and a record says why elsewhere)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def read_part(path: Path) -> dict[str, Any] | None:
    """A part's file as its recorder last wrote it; None if it never wrote one."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class Recorder:
    """Records of one part: ``add`` appends one and rewrites the file."""

    def __init__(self, path: Path, part: str, *, deadline: float, dry_run: bool) -> None:
        self.path, self.deadline, self.dry_run = Path(path), deadline, dry_run
        self.data: dict[str, Any] = {"part": part, "dry_run": dry_run, "started": time.time(), "finished": False}
        self.data |= {"info": {}, "records": [], "errors": []}
        self._flush()

    def time_left(self) -> float:
        """Seconds until this part's deadline."""
        return self.deadline - time.time()

    def out_of_time(self, what: str, needed: float) -> bool:
        """Whether fewer than ``needed`` seconds remain for ``what``; if so it is recorded as
        skipped and the caller leaves it out."""
        if self.time_left() >= needed:
            return False
        self.skip(what, f"out of time: {self.time_left():.0f} s left, about {needed:.0f} s needed")
        return True

    def info(self, **values: Any) -> None:
        """Facts about the part as a whole (the card, versions, the ceilings)."""
        self.data["info"] |= _finite(values)
        self._flush()

    def add(self, **record: Any) -> dict[str, Any]:
        self.data["records"].append(_finite(record))
        self._flush()
        return record

    def skip(self, what: str, reason: str) -> None:
        self.add(kind="skipped", what=what, reason=reason)

    def error(self, what: str, error: BaseException) -> None:
        """A failure of one measurement: recorded with the last lines of its traceback; the
        part goes on with the next one."""
        lines = traceback.format_exception(type(error), error, error.__traceback__)
        self.data["errors"].append({"what": what, "error": f"{type(error).__name__}: {error}"[:2000],
                                    "traceback": "".join(lines)[-4000:]})  # fmt: skip
        self._flush()
        print(f"[{self.data['part']}] {what} failed: {type(error).__name__}: {error}", file=sys.stderr, flush=True)

    @contextmanager
    def attempt(self, what: str) -> Iterator[None]:
        """Run the block; an exception in it is recorded (:meth:`error`), not raised."""
        try:
            yield
        except Exception as error:  # noqa: BLE001 - one failed measurement must not end the part
            self.error(what, error)

    def finish(self, *, completed: bool = True) -> None:
        """The part is over: ``completed`` if it ran to its end (not if it raised)."""
        self.data["finished"] = completed
        self.data["seconds"] = time.time() - self.data["started"]
        self._flush()

    def _flush(self) -> None:
        write_json(self.path, self.data)


def part_arguments(description: str) -> argparse.ArgumentParser:
    """The command line every part takes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--record", type=Path, required=True, help="the part's JSON file")
    parser.add_argument("--deadline", type=float, default=math.inf, help="Unix time by which to be done")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, the reference path")
    parser.add_argument("--ceilings", type=Path, help="the ceilings part's JSON file (measured rates)")
    return parser


def run_part(
    name: str, body: Callable[[Recorder, argparse.Namespace], None], arguments: argparse.Namespace | None = None
) -> None:
    """A part's ``main``: run ``body`` with a recorder (``arguments``: the parsed command
    line, by default :func:`part_arguments`'), then mark the part done."""
    if arguments is None:
        arguments = part_arguments(f"the GPU check's {name} part").parse_args()
    recorder = Recorder(arguments.record, name, deadline=arguments.deadline, dry_run=arguments.dry_run)
    try:
        body(recorder, arguments)
    except BaseException as error:  # recorded for the report, then the part fails
        recorder.error(name, error)
        recorder.finish(completed=False)
        raise
    recorder.finish()
