"""The training log: ``training_log.csv``, a row per step, and TensorBoard scalars where
``torch.utils.tensorboard`` imports; written by rank 0 only.

Each row is flushed as it is written, so ``tail -f`` and monitors see progress. A resumed run
keeps the rows up to its checkpoint's step and rewrites the ones after it (TensorBoard purges
them), so the log reads as one run's.
"""

from __future__ import annotations

import csv
from pathlib import Path

__all__ = ["LOG_COLUMNS", "LOG_FILE", "TrainingLog"]

LOG_FILE = "training_log.csv"
LOG_COLUMNS = ("step", "epoch", "loss", "penalty", "lr", "images_per_s", "skipped", "skipped_steps", "empty_batches")


class TrainingLog:
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

    def __enter__(self) -> TrainingLog:
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
