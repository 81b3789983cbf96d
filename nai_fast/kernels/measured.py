"""Kernel times measured on GPUs, per GPU class: what ``NAI_FAST_KERNELS=auto`` decides by
where a class was measured.

``measured.json`` beside this file holds, per class (``"sm_90"``: the compute capability, so
an H200's table serves H100s too), the median times the GPU check (``benchmarks/gpu/``)
took of each fused op and of the path it replaces in nai_fast's processors (SDPA for
``cross_attention``, the eager modules and projections for ``hyper_kv``), forward and
forward+backward, at SD 1.x's shapes. ``benchmarks/gpu/publish.py`` writes it from a run's
results. ``NAI_FAST_MEASURED_KERNELS`` names another table (a user's own measurements).

A call's shape rarely equals a timed one: :meth:`MeasuredTable.nearest` takes the timing
with the same fixed sizes (widths, heads, head dim, element size) whose scaled sizes (tokens,
queries, keys) are nearest in ratio, within :data:`MAX_SCALE_RATIO` of each.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

__all__ = ["ENV_VAR", "MAX_SCALE_RATIO", "SHAPE_KEYS", "TABLE_FILE", "MeasuredTable", "Timing", "table"]

TABLE_FILE = Path(__file__).with_name("measured.json")
ENV_VAR = "NAI_FAST_MEASURED_KERNELS"
FORMAT = 1
# op -> (sizes that must match, sizes matched by nearest ratio). Shapes in the table hold both.
SHAPE_KEYS: Mapping[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "hyper_kv": (("width", "hidden_width", "out_width", "dtype_bytes"), ("tokens",)),
    "cross_attention": (("heads", "head_dim", "dtype_bytes"), ("queries", "key_length")),
}
# A timing stands for calls up to this factor larger or smaller in each scaled size.
MAX_SCALE_RATIO = 8.0


@dataclass(frozen=True)
class Timing:
    """One op at one shape on one GPU class: the fused op's time and the replaced path's."""

    op: str
    backward: bool  # forward+backward (training) rather than forward alone
    shape: tuple[tuple[str, int], ...]  # sorted (size name, value) pairs
    fused_ms: float
    baseline_ms: float
    baseline: str  # what the op replaces: "sdpa", "eager"

    @property
    def fused_wins(self) -> bool:
        return self.fused_ms <= self.baseline_ms

    def size(self, name: str) -> int:
        return dict(self.shape)[name]


@dataclass(frozen=True, eq=False)  # compared (and cached on) by identity
class MeasuredTable:
    """Timings per GPU class, and where each class's came from."""

    timings: Mapping[str, tuple[Timing, ...]]
    sources: Mapping[str, Mapping[str, Any]]  # class -> card, date, commit, results file

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> MeasuredTable:
        if data.get("format") != FORMAT:
            raise ValueError(f"measured kernel table of format {data.get('format')!r}, expected {FORMAT}")
        timings, sources = {}, {}
        for name, entry in data.get("classes", {}).items():
            timings[name] = tuple(
                Timing(
                    op=item["op"], backward=bool(item["backward"]), shape=tuple(sorted(item["shape"].items())),
                    fused_ms=float(item["fused_ms"]), baseline_ms=float(item["baseline_ms"]), baseline=item["baseline"],
                )  # fmt: skip
                for item in entry.get("timings", [])
            )
            sources[name] = {key: value for key, value in entry.items() if key != "timings"}
        return cls(timings, sources)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> MeasuredTable:
        return cls.from_json(json.loads(Path(path).read_text()))

    def measured(self, gpu_class: str) -> bool:
        """Whether this class was measured (then ``auto`` decides by the table alone)."""
        return bool(self.timings.get(gpu_class))

    def nearest(self, gpu_class: str, op: str, backward: bool, sizes: Mapping[str, int]) -> Timing | None:
        """The timing of ``op`` that stands for a call of these ``sizes`` on ``gpu_class``:
        the fixed sizes equal, the scaled ones nearest in ratio (within MAX_SCALE_RATIO)."""
        fixed, scaled = SHAPE_KEYS[op]
        best, best_distance = None, math.inf
        for timing in self.timings.get(gpu_class, ()):
            if timing.op != op or timing.backward != backward:
                continue
            if any(timing.size(name) != sizes[name] for name in fixed):
                continue
            ratios = [abs(math.log(sizes[name] / timing.size(name))) for name in scaled]
            if max(ratios) > math.log(MAX_SCALE_RATIO):
                continue
            if sum(ratios) < best_distance:
                best, best_distance = timing, sum(ratios)
        return best


@cache
def table() -> MeasuredTable:
    """The table in use: ``$NAI_FAST_MEASURED_KERNELS`` or the one shipped with the package
    (read once per process; ``table.cache_clear()`` to read again)."""
    return MeasuredTable.load(os.environ.get(ENV_VAR) or TABLE_FILE)
