"""What ``nai-fast info`` reports: versions, the GPU, and which kernels dispatch where;
with ``--kernels``, the cost model's figures for the fused ops at SD 1.x shapes.

Everything here reads metadata or asks torch; nothing is downloaded or compiled.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
from typing import Any

__all__ = ["environment", "format_environment", "format_kernel_costs", "kernel_costs"]

_DISTRIBUTIONS = ("torch", "triton", "diffusers", "transformers", "safetensors", "numpy", "pillow", "xformers")


def environment() -> dict[str, Any]:
    """Versions, CUDA devices, the compiled extension and the kernels' dispatch, as a dict."""
    import torch

    from . import __version__
    from .kernels import dispatch_summary, kernel_mode

    versions = {"nai_fast": __version__, "python": platform.python_version()}
    for name in _DISTRIBUTIONS:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    gpus = [
        {
            "name": torch.cuda.get_device_name(index),
            "arch": "sm_{}{}".format(*torch.cuda.get_device_capability(index)),
            "memory_gib": round(torch.cuda.get_device_properties(index).total_memory / 2**30, 1),
        }
        for index in range(torch.cuda.device_count())
    ]
    device = torch.device("cuda" if gpus else "cpu")
    return {
        "versions": versions,
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "gpus": gpus,
        "extension": _extensions(),
        "kernel_mode": kernel_mode(),
        "kernels_on": device.type,
        "kernels": dispatch_summary(device),
    }


def _extensions() -> dict[str, bool]:
    # csrc/<name>.cpp builds into nai_fast._<name>; none has earned a place yet (csrc/README.md).
    from pathlib import Path

    sources = Path(__file__).resolve().parent.parent / "csrc"
    names = sorted(source.stem for source in sources.glob("*.cpp")) if sources.is_dir() else []
    return {name: importlib.util.find_spec(f"nai_fast._{name}") is not None for name in names}


def format_environment(info: dict[str, Any]) -> str:
    lines = [f"{name:<13} {version or 'not installed'}" for name, version in info["versions"].items()]
    lines.append(f"{'CUDA':<13} {info['cuda'] or 'not available'}")
    lines += [f"{'GPU ' + str(i):<13} {gpu['name']} ({gpu['arch']}, {gpu['memory_gib']} GiB)" for i, gpu in enumerate(info["gpus"])]
    built = [name for name, found in info["extension"].items() if found]
    lines.append(f"{'extension':<13} {', '.join(built) if built else 'none (not needed: see csrc/README.md)'}")
    lines.append(f"\nkernels (NAI_FAST_KERNELS={info['kernel_mode']}), for {info['kernels_on']} tensors:")
    lines += [f"  {op:<16} {path}" for op, path in info["kernels"].items()]
    return "\n".join(lines)


def kernel_costs(width: int = 512, height: int = 512, *, chunks: int = 1, images: int = 1) -> list[dict[str, Any]]:
    """The cost model's figures for one call of each fused op at each attention level of the
    SD 1.x U-Net generating ``images`` images of ``width x height`` with classifier-free
    guidance and prompts of ``chunks`` chunks, in float16, forward and backward.

    Each row: ``op``, ``level``, ``calls`` (per U-Net step), ``shape``, ``pass``, ``gflop``,
    ``fused_mb`` / ``eager_mb`` (HBM traffic as the kernels and the eager ops move it), the
    time floors in microseconds on A100 and H100 (``a100_fused_us``, ``a100_eager_us``...)
    and ``a100_auto`` / ``h100_auto`` (whether ``NAI_FAST_KERNELS=auto`` takes the kernel
    there on that GPU class, sm_80 / sm_90: by its measured table where it has one, else the
    cost model's prediction).
    ``hyper_kv`` is a ``[1, 2, 1]`` relu hypernetwork's K and V (two calls of the op's
    projection per layer are one row here: both nets).
    """
    from .kernels.cost import A100, H100_SXM, cross_attention_cost, hyper_kv_cost
    from .kernels.policy import cross_attention_choice, hyper_kv_choice
    from .kernels.shapes import attention_levels

    classes = ((A100, "sm_80"), (H100_SXM, "sm_90"))  # auto's choice: measured where a class was, else predicted
    rows = []
    for level in attention_levels(width, height, images=images, chunks=chunks):
        tokens = level.batch * level.tokens
        attention_shape = (level.batch, level.heads, level.tokens, level.context_tokens, level.head_dim)
        for backward in (False, True):
            hyper = hyper_kv_cost(tokens, level.channels, backward=backward)
            attention = cross_attention_cost(*attention_shape, backward=backward)
            hyper_shape = (tokens, level.channels, 2 * level.channels, level.channels, 2, "relu", backward)
            rows.append(
                _cost_row(
                    "hyper_kv", level, f"{tokens}x{level.channels}", backward, hyper,
                    {gpu: hyper_kv_choice(*hyper_shape, name).fused for gpu, name in classes},
                )
            )  # fmt: skip
            rows.append(
                _cost_row(
                    "cross_attention", level, "B{} H{} Lq{} Lk{} d{}".format(*attention_shape), backward, attention,
                    {gpu: cross_attention_choice(*attention_shape, 2, backward, name).fused for gpu, name in classes},
                )
            )  # fmt: skip
    return rows


def _cost_row(op, level, shape, backward, comparison, auto_on) -> dict[str, Any]:
    implemented, eager = comparison.implemented, comparison.eager
    row = {
        "op": op,
        "level": level.name,
        "calls": level.blocks,
        "shape": shape,
        "pass": "backward" if backward else "forward",
        "gflop": (implemented.flops + implemented.tensor_flops) / 1e9,
        "fused_mb": implemented.bytes / 1e6,
        "eager_mb": eager.bytes / 1e6,
    }
    for device, auto in auto_on.items():
        key = device.name.split()[0].lower()
        row[f"{key}_fused_us"] = implemented.time_floor(device) * 1e6
        row[f"{key}_eager_us"] = eager.time_floor(device) * 1e6
        row[f"{key}_auto"] = auto
    return row


def _choice(fused: bool) -> str:
    return "fused" if fused else "eager"


def format_kernel_costs(rows: list[dict[str, Any]]) -> str:
    """The rows of :func:`kernel_costs` as a text table."""
    header = (
        f"{'op':<16}{'level':<8}{'calls':>5}  {'shape':<26}{'pass':<9}{'GFLOP':>8}{'fused MB':>10}{'eager MB':>10}"
        f"{'A100 us fused/eager':>22}{'H100 us fused/eager':>22}  auto: A100 H100"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(
            f"{row['op']:<16}{row['level']:<8}{row['calls']:>5}  {row['shape']:<26}{row['pass']:<9}"
            f"{row['gflop']:>8.2f}{row['fused_mb']:>10.1f}{row['eager_mb']:>10.1f}"
            f"{row['a100_fused_us']:>11.1f}/{row['a100_eager_us']:<10.1f}"
            f"{row['h100_fused_us']:>11.1f}/{row['h100_eager_us']:<10.1f}"
            f"  {_choice(row['a100_auto'])} {_choice(row['h100_auto'])}"
        )
    return "\n".join(lines)
