"""Part 1: the card, the versions, and the two ceilings every later figure is a fraction of.

Measured in a few seconds (METHOD.md, "Two numbers first"): the device-to-device copy
bandwidth (a 2 GiB ``copy_``, bytes read plus bytes written) and the rate of a large bf16
matrix product (8192^3 on random data, never zeros), each the median of many CUDA-event
timings after a warm-up that also brings the clocks up. fp16's product rate is noted too
(the engine runs in fp16). The dry run measures the CPU's with small sizes.

:func:`measured_device` turns the part's file into the :class:`~nai_fast.kernels.cost.Device`
the later parts take their floors from (the class's datasheet rates where none was measured).
"""

from __future__ import annotations

import importlib.metadata
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Any

import torch

from gpu.record import Recorder, read_part, run_part
from gpu.timing import median_ms

PACKAGES = ("torch", "triton", "transformers", "diffusers", "numpy", "safetensors", "huggingface-hub", "pytest")


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    found["cuda"] = torch.version.cuda
    found["cudnn"] = str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else None
    import nai_fast

    found["nai_fast"] = nai_fast.__version__
    return found


def card(device: torch.device) -> dict[str, Any]:
    if device.type != "cuda":
        return {
            "name": f"CPU ({platform.processor() or platform.machine()})",
            "arch": "cpu",
            "threads": torch.get_num_threads(),
        }
    properties = torch.cuda.get_device_properties(device)
    found = {
        "name": properties.name,
        "arch": f"sm_{properties.major}{properties.minor}",
        "multiprocessors": properties.multi_processor_count,
        "memory_gib": round(properties.total_memory / 2**30, 1),
        "l2_mib": round(getattr(properties, "L2_cache_size", 0) / 2**20, 1) or None,
    }
    if shutil.which("nvidia-smi"):  # read-only queries; the card's settings stay as found
        query = "driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.limit,temperature.gpu"
        result = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True, text=True, timeout=20
        )
        if result.returncode == 0:
            found["nvidia_smi"] = dict(
                zip(query.split(","), (value.strip() for value in result.stdout.splitlines()[0].split(",")))
            )
    return found


def copy_bandwidth(device: torch.device, size_bytes: int, repeats: int) -> dict[str, float]:
    """Bytes read plus bytes written per second of ``dst.copy_(src)``."""
    source = torch.randint(0, 255, (size_bytes,), dtype=torch.uint8, device=device)
    destination = torch.empty_like(source)
    ms = median_ms(lambda _: destination.copy_(source), device, warmup=5, repeats=repeats)
    return {"bytes": 2 * size_bytes, "ms": ms, "bytes_per_s": 2 * size_bytes / (ms * 1e-3)}


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int, repeats: int) -> dict[str, float]:
    """FLOP/s of an n x n x n product of random values."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in "ab")
    out = torch.empty(n, n, device=device, dtype=dtype)
    ms = median_ms(lambda _: torch.matmul(a, b, out=out), device, warmup=max(3, repeats // 2), repeats=repeats)
    return {"n": n, "ms": ms, "flop_per_s": 2 * n**3 / (ms * 1e-3)}


def body(recorder: Recorder, arguments) -> None:
    device = torch.device("cpu" if arguments.dry_run else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("no CUDA device: run with --dry-run on a machine without a GPU")
    recorder.info(card=card(device), versions=versions())
    dry = arguments.dry_run
    copy = copy_bandwidth(device, (64 << 20) if dry else (2 << 30), repeats=5 if dry else 30)
    recorder.add(kind="ceiling", name="copy", **copy)
    recorder.info(bandwidth=copy["bytes_per_s"])
    dtype = torch.float32 if dry else torch.bfloat16  # the CPU's bf16 products are no ceiling
    product = matmul_rate(device, dtype, 256 if dry else 8192, repeats=5 if dry else 30)
    recorder.add(kind="ceiling", name=f"matmul {str(dtype).removeprefix('torch.')}", **product)
    recorder.info(tensor_flops=product["flop_per_s"])
    if not dry:
        recorder.add(kind="ceiling", name="matmul float16", **matmul_rate(device, torch.float16, 8192, repeats=20))


def measured_device(path: Path | None, fallback_device: torch.device | None = None):
    """The ceilings as a cost-model Device: measured bandwidth and matrix rate; CUDA-core
    rate from the GPU class's datasheet (not measured). Without a measurement: the class's
    datasheet rates (A100 figures for sm_8x, H100 for sm_9x), or A100's on the CPU."""
    from dataclasses import replace

    from nai_fast.kernels.cost import A100
    from nai_fast.kernels.policy import gpu_class

    base = gpu_class(fallback_device) if fallback_device is not None and fallback_device.type == "cuda" else A100
    part = read_part(path) if path is not None else None
    info = (part or {}).get("info", {})
    if "bandwidth" not in info or "tensor_flops" not in info:
        return replace(base, name=f"{base.name} (datasheet)")
    return replace(base, name="measured", bandwidth=info["bandwidth"], tensor_flops=info["tensor_flops"])


if __name__ == "__main__":
    run_part("ceilings", body)
