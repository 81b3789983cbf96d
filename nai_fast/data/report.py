"""Figures about a bucketed dataset, for people: a dict for ``--json``, a
text table, and an optional chart. NumPy only (matplotlib when plotting)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .buckets import EpochPlan, assign_with_errors, crop_fractions


def describe(
    sizes: np.ndarray,
    buckets: np.ndarray,
    *,
    batch_size: int,
    world_size: int = 1,
    max_aspect_error: float | None = None,
    metric: str = "log",
    seed: int = 0,
) -> dict[str, Any]:
    """How ``sizes`` fall into ``buckets``, and what one epoch looks like.

    Aspect errors are in the metric's units (log: ``|log(w/h) - log(bw/bh)|``);
    crops are fractions of each image's pixels that scale-to-cover removes.
    The epoch figures are rank 0's (every rank has as many batches).
    """
    ids, errors = assign_with_errors(sizes, buckets, max_aspect_error, metric)
    assigned = ids >= 0
    counts = np.bincount(ids[assigned], minlength=len(buckets))
    crops = crop_fractions(sizes, buckets, ids)
    figures: dict[str, Any] = {
        "images": len(sizes),
        "assigned": int(assigned.sum()),
        "pruned_aspect": int((~assigned).sum()),
        "metric": metric,
        "max_aspect_error": max_aspect_error,
        "mean_aspect_error": _mean(errors[assigned]),
        "mean_crop": _mean(crops[assigned]),
        "buckets": [
            {
                "width": int(w),
                "height": int(h),
                "aspect": round(w / h, 4),
                "images": int(count),
                "share": round(count / max(assigned.sum(), 1), 6),
                "mean_crop": _mean(crops[ids == k]),
            }
            for k, ((w, h), count) in enumerate(zip(buckets.tolist(), counts))
        ],
        "batch_size": batch_size,
        "world_size": world_size,
    }
    if assigned.sum() >= batch_size * world_size:
        plan = EpochPlan(ids, buckets, batch_size, world_size, 0, seed, sizes=sizes, metric=metric)
        figures["batches_per_epoch"] = len(plan)
        figures["trimmed_per_epoch"] = len(plan.trimmed(0))
        figures.update(plan.catchall_summary(0))
    else:
        figures["batches_per_epoch"] = 0
    return figures


def format_table(figures: dict[str, Any]) -> str:
    """The figures as a fixed-width text table with a summary below it."""
    lines = [f"{'bucket':>11} {'aspect':>7} {'images':>9} {'share':>7} {'crop':>6}"]
    for row in sorted(figures["buckets"], key=lambda row: row["aspect"]):
        crop = "-" if row["mean_crop"] is None else f"{row['mean_crop']:.1%}"
        lines.append(
            f"{row['width']:>5}x{row['height']:<5} {row['aspect']:>7.3f} {row['images']:>9,} {row['share']:>7.1%} {crop:>6}"
        )
    rows: list[tuple[str, str]] = []
    if "files" in figures:
        rows.append(("files found", f"{figures['files']:,}"))
        rows += [(f"  skipped: {reason}", f"{count:,}") for reason, count in figures["unreadable"].items()]
    pruning = "" if figures["max_aspect_error"] is None else f"  (error >= {figures['max_aspect_error']:g})"
    rows += [
        ("images", f"{figures['images']:,}"),
        ("assigned", f"{figures['assigned']:,}"),
        ("pruned for aspect", f"{figures['pruned_aspect']:,}{pruning}"),
        ("mean aspect error", f"{_fmt(figures['mean_aspect_error'], '.4f')} ({figures['metric']})"),
        ("mean pixels cropped", _fmt(figures["mean_crop"], ".1%")),
        (
            "batches per epoch",
            f"{figures['batches_per_epoch']:,} per rank (batch {figures['batch_size']}, {figures['world_size']} rank(s))",
        ),
    ]
    if figures.get("catchall_batches"):
        rows.append(
            (
                "catch-all batches",
                f"{figures['catchall_batches']:,}: {_fmt(figures['catchall_mean_crop'], '.1%')} cropped at their "
                f"nearest bucket vs {_fmt(figures['catchall_mean_crop_square'], '.1%')} forced square",
            )
        )
    if figures.get("trimmed_per_epoch") is not None:
        rows.append(("trimmed per epoch", f"{figures['trimmed_per_epoch']:,}"))
    width = max(len(label) for label, _ in rows) + 2
    lines.append("")
    lines += [f"{label:<{width}}{value}" for label, value in rows]
    return "\n".join(lines)


def plot(figures: dict[str, Any], path: str | Path) -> None:
    """Bar chart of images per bucket, ordered by aspect ratio."""
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("--plot needs matplotlib: pip install 'nai_fast[plot]'") from None
    matplotlib.use("Agg")
    from matplotlib import pyplot

    rows = sorted(figures["buckets"], key=lambda row: row["aspect"])
    figure, axes = pyplot.subplots(figsize=(max(6.0, 0.45 * len(rows)), 4.0), layout="constrained")
    axes.bar([f"{r['width']}x{r['height']}" for r in rows], [r["images"] for r in rows], color="#4c72b0")
    axes.set_xlabel("bucket (width x height), portrait to landscape")
    axes.set_ylabel("images")
    axes.set_title(
        f"{figures['assigned']:,} images in {sum(r['images'] > 0 for r in rows)} buckets, "
        f"{figures['pruned_aspect']:,} pruned, {_fmt(figures['mean_crop'], '.1%')} mean crop"
    )
    axes.tick_params(axis="x", labelrotation=60)
    figure.savefig(path, dpi=120)
    pyplot.close(figure)


def _mean(values: np.ndarray) -> float | None:
    return float(values.mean()) if len(values) else None


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)
