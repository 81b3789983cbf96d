"""Part 3: each kernel against its baselines, forward and forward+backward, timed with CUDA events.

- ``cross_attention`` at SD 1.x's cross-attention shapes (512x512 and 512x768, batch 2 with
  guidance, 8 heads, 1 to 3 prompt chunks): nai_fast's Triton op against the eager
  reference and every SDPA backend that runs (PyTorch's own choice, flash, efficient, cudnn,
  math); the attention processors' alternative, hence the policy's baseline, is ``sdpa``.
- ``hyper_kv`` at SD 1.x's self-attention k/v inputs (batch 2, widths 320/640/1280), a
  ``[1, 2, 1]`` relu hypernetwork: the Triton op against the eager modules and projections.
- ``chunk_concat`` for 1 and 4 images' 3-chunk prompts and negatives (768 wide).

float16; the median of many CUDA-event timings after a warm-up, rotating through input sets
larger than L2: what a call costs in eager PyTorch, where the policy weighs the kernels.
Also its two parts: the device's time (on the GPU: the calls captured in a CUDA graph and
replayed) and the host's (the calls issued with no wait); where the eager time is the
host's, the kernel's speed is in the device time. Each provider's time is also given as
TFLOP/s and GB/s of the op's minimal work (:mod:`nai_fast.kernels.cost`: each tensor read
or written once) and as the fraction of the floor on the measured ceilings (:func:`gpu.ceilings.measured_device`). One record per
op, shape and pass, written as it is measured. The dry run: tiny shapes on the CPU, the
eager reference standing in for nai_fast, wall-clock timing.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from gpu.ceilings import measured_device
from gpu.record import Recorder, run_part
from gpu.timing import graph_ms, host_ms, median_ms, rotations_for

DTYPE = torch.float16
SIZES = ((512, 512), (512, 768))
CHUNKS = (1, 2, 3)
PASSES = ("forward", "forward+backward")
SDPA_BACKENDS = {"sdpa_flash": "FLASH_ATTENTION", "sdpa_efficient": "EFFICIENT_ATTENTION",
                 "sdpa_cudnn": "CUDNN_ATTENTION", "sdpa_math": "MATH"}  # fmt: skip
# The path each op replaces in nai_fast's processors: what kernels/policy.py weighs it against.
POLICY_BASELINE = {"cross_attention": "sdpa", "hyper_kv": "eager", "chunk_concat": "eager"}
HYPERNETWORK_ACTIVATION = "relu"


@dataclass(frozen=True)
class Settings:
    device: torch.device
    warmup: int
    repeats: int
    rotate: bool

    @classmethod
    def for_run(cls, dry_run: bool) -> Settings:
        if dry_run:
            return cls(torch.device("cpu"), warmup=1, repeats=3, rotate=False)
        return cls(torch.device("cuda"), warmup=10, repeats=50, rotate=True)

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"


def nai_fast_op(op_name: str, dry_run: bool) -> Callable:
    """The Triton op itself; in the dry run the dispatcher, which the run sets to ``reference``."""
    if dry_run:
        return getattr(importlib.import_module("nai_fast.kernels"), op_name)
    return getattr(importlib.import_module(f"nai_fast.kernels.{op_name}"), op_name)


# -- shapes ---------------------------------------------------------------------------------


def attention_shapes(dry_run: bool) -> list[tuple[int, int, int, int, int]]:
    """(batch, heads, Lq, Lk, head_dim) of SD 1.x's distinct cross-attention calls."""
    if dry_run:
        return [(2, 2, 64, 77, 8), (1, 2, 16, 154, 40)]
    from nai_fast.kernels.shapes import attention_levels

    shapes = {
        (level.batch, level.heads, level.tokens, level.context_tokens, level.head_dim)
        for width, height in SIZES
        for chunks in CHUNKS
        for level in attention_levels(width, height, chunks=chunks)
    }
    return sorted(shapes, key=lambda shape: (-shape[2], shape[3]))


def hyper_kv_shapes(dry_run: bool) -> list[tuple[int, int]]:
    """(tokens, width) of SD 1.x's distinct self-attention k/v inputs (batch 2)."""
    if dry_run:
        return [(77, 16)]
    from nai_fast.kernels.shapes import attention_levels

    shapes = {
        (level.batch * level.tokens, level.channels)
        for width, height in SIZES
        for level in attention_levels(width, height)
    }
    return sorted(shapes, reverse=True)


def chunk_concat_shapes(dry_run: bool) -> list[tuple[int, int]]:
    """(images, width): each image's prompt and negative prompt of 3 chunks."""
    return [(1, 16)] if dry_run else [(1, 768), (4, 768)]


# -- providers ------------------------------------------------------------------------------


def sdpa_backend(backend_name: str) -> Callable:
    """SDPA restricted to one backend (an error where it cannot take the inputs)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, backend_name)

    def attend(q, k, v):
        with sdpa_kernel(backend):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    return attend


def attention_providers(dry_run: bool) -> dict[str, Callable]:
    from nai_fast.kernels import cross_attention_reference

    found = {
        "nai_fast": nai_fast_op("cross_attention", dry_run),
        "eager": cross_attention_reference,
        "sdpa": torch.nn.functional.scaled_dot_product_attention,
    }
    found |= {name: sdpa_backend(backend) for name, backend in SDPA_BACKENDS.items() if hasattr(_backends(), backend)}
    if importlib.util.find_spec("xformers") is not None:
        found["xformers"] = _xformers_attention
    return found


def _backends():
    from torch.nn.attention import SDPBackend

    return SDPBackend


def _xformers_attention(q, k, v):
    import xformers.ops  # (batch, length, heads, head_dim)

    return xformers.ops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(
        1, 2
    )


# -- timing one op at one shape ---------------------------------------------------------------


def drawn(*shape: int, device: torch.device) -> torch.Tensor:
    """Standard normal DTYPE values drawn by the CPU's generator: a failed CUDA graph capture
    leaves the CUDA generator mid-capture, refusing every later draw in the process (seen on
    the H200, 2026-11-30: chunk_concat's capture failed, then every later shape's inputs)."""
    return torch.randn(*shape).to(device, DTYPE)


@dataclass
class Timings:
    """Per provider, median ms: eager calls (``ms``), and on the GPU the device's and the
    host's parts; ``errors``: why a provider, or one of its parts, could not be timed."""

    ms: dict[str, float] = field(default_factory=dict)
    device_ms: dict[str, float] = field(default_factory=dict)
    host_ms: dict[str, float] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)


def first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__


def time_providers(
    providers: dict[str, Callable], make_set: Callable[[], tuple], run: Callable, set_bytes: float, settings: Settings
) -> Timings:
    """Median ms of ``run(provider, *input_set)`` per provider, rotating through input sets."""
    rotations = rotations_for(set_bytes) if settings.rotate else 1
    sets = [make_set() for _ in range(rotations)]
    found = Timings()
    for name, provider in providers.items():
        call = lambda i, provider=provider: run(provider, *sets[i % rotations])  # noqa: E731
        try:
            with warnings.catch_warnings():  # a backend refusing the inputs warns, then raises
                warnings.simplefilter("ignore")
                call(0)  # compiles, and says whether this backend takes these inputs
            found.ms[name] = median_ms(call, settings.device, warmup=settings.warmup, repeats=settings.repeats)
        except (RuntimeError, NotImplementedError, ValueError) as error:
            found.errors[name] = first_line(error)
            continue
        found.host_ms[name] = host_ms(call, settings.device, repeats=settings.repeats)
        if settings.on_gpu:
            try:
                found.device_ms[name] = graph_ms(call, settings.device, calls=max(rotations, 8), replays=20)
            except (RuntimeError, NotImplementedError, ValueError) as error:
                found.errors[f"{name} (CUDA graph)"] = first_line(error)
    return found


def forward_or_both(backward: bool, outputs_of: Callable[..., Any]) -> Callable:
    """A runner: forward only, or forward and the gradients of the leaves (no accumulation)."""

    def run(provider, inputs, leaves, grads):
        outputs = outputs_of(provider, inputs)
        if backward:
            outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
            torch.autograd.grad(outputs, leaves, grads)

    return run


def figures(timings: Timings, minimal, device) -> dict[str, dict[str, float]]:
    """Per provider: ms, its device and host parts, and TFLOP/s, GB/s and fraction of the
    floor of the minimal work, on the device's time where measured (else the eager time)."""
    floor_ms = minimal.time_floor(device) * 1e3
    found = {}
    for name, ms in timings.ms.items():
        device_ms = timings.device_ms.get(name)
        seconds = (device_ms or ms) * 1e-3
        found[name] = {
            "ms": ms,
            "device_ms": device_ms,
            "host_ms": timings.host_ms.get(name),
            "tflops": (minimal.tensor_flops + minimal.flops) / seconds / 1e12,
            "gbps": minimal.bytes / seconds / 1e9,
            "floor_fraction": floor_ms * 1e-3 / seconds,
            "tensor_fraction": minimal.tensor_flops / seconds / device.tensor_flops,
            "bandwidth_fraction": minimal.bytes / seconds / device.bandwidth,
        }
    return found


def speedup(times: dict[str, float], baseline: str | None) -> float | None:
    fused = times.get("nai_fast")
    return times[baseline] / fused if fused and baseline in times else None


def record_op(recorder: Recorder, op: str, shape: dict, passes: str, timings: Timings, minimal, device) -> None:
    baseline = POLICY_BASELINE[op]
    others = {name: ms for name, ms in timings.ms.items() if name != "nai_fast"}
    best = min(others, key=others.get) if others else None
    recorder.add(
        kind="kernel", op=op, shape=shape, passes=passes, dtype=str(DTYPE).removeprefix("torch."),
        providers=figures(timings, minimal, device), unavailable=timings.errors, baseline=baseline,
        speedup_vs_baseline=speedup(timings.ms, baseline), best_other=best, speedup_vs_best=speedup(timings.ms, best),
        device_speedup_vs_baseline=speedup(timings.device_ms, baseline),
        floor_ms=minimal.time_floor(device) * 1e3,
    )  # fmt: skip


# -- the ops --------------------------------------------------------------------------------


def measure_cross_attention(recorder: Recorder, settings: Settings, device_rates, dry_run: bool) -> None:
    from nai_fast.kernels.cost import cross_attention_cost

    providers = attention_providers(dry_run)
    for batch, heads, query_length, key_length, head_dim in attention_shapes(dry_run):
        shape = dict(batch=batch, heads=heads, query_length=query_length, key_length=key_length, head_dim=head_dim)
        for passes in PASSES:
            backward = passes != "forward"
            what = f"cross_attention {passes} {shape}"
            if recorder.out_of_time(what, needed=4):
                return

            def make_set():
                q, k, v, grad = (
                    drawn(batch, heads, length, head_dim, device=settings.device).requires_grad_(backward)
                    for length in (query_length, key_length, key_length, query_length)
                )
                return (q, k, v), (q, k, v), grad.detach()

            run = forward_or_both(backward, lambda provider, inputs: provider(*inputs))
            costs = [
                cross_attention_cost(*shape.values(), backward=pass_backward) for pass_backward in {False, backward}
            ]
            minimal = sum((cost.minimal for cost in costs[1:]), costs[0].minimal)
            with recorder.attempt(what):
                timings = time_providers(providers, make_set, run, costs[0].minimal.bytes, settings)
                record_op(recorder, "cross_attention", shape, passes, timings, minimal, device_rates)


def measure_hyper_kv(recorder: Recorder, settings: Settings, device_rates, dry_run: bool) -> None:
    from bench_hyper_kv import make_inputs

    from nai_fast.kernels import hyper_kv_reference
    from nai_fast.kernels.cost import hyper_kv_cost

    providers = {"nai_fast": nai_fast_op("hyper_kv", dry_run), "eager": hyper_kv_reference}
    for tokens, width in hyper_kv_shapes(dry_run):
        shape = dict(tokens=tokens, width=width, hidden_width=2 * width, out_width=width)
        for passes in PASSES:
            backward = passes != "forward"
            what = f"hyper_kv {passes} {shape}"
            if recorder.out_of_time(what, needed=3):
                return

            def make_set():
                x, k_weight, v_weight, k_mlp, v_mlp = make_inputs(tokens, width, settings.device.type, DTYPE, backward)
                grads = [drawn(tokens, width, device=settings.device) for _ in "kv"]
                return (x, k_weight, v_weight, k_mlp, v_mlp), [x, *k_mlp, *v_mlp], grads

            run = forward_or_both(backward, lambda provider, inputs: provider(*inputs, HYPERNETWORK_ACTIVATION, 1.0))
            costs = [
                hyper_kv_cost(tokens, width, activation=HYPERNETWORK_ACTIVATION, backward=b) for b in {False, backward}
            ]
            minimal = sum((cost.minimal for cost in costs[1:]), costs[0].minimal)
            with recorder.attempt(what):
                timings = time_providers(providers, make_set, run, costs[0].minimal.bytes, settings)
                record_op(recorder, "hyper_kv", shape, passes, timings, minimal, device_rates)


def measure_chunk_concat(recorder: Recorder, settings: Settings, device_rates, dry_run: bool) -> None:
    from bench_chunk_concat import CHUNKS_PER_PROMPT, LENGTH, compact_destination

    from nai_fast.kernels import chunk_concat_reference
    from nai_fast.kernels.cost import chunk_concat_cost

    providers = {"nai_fast": nai_fast_op("chunk_concat", dry_run), "eager": chunk_concat_reference}
    for images, width in chunk_concat_shapes(dry_run):
        prompts = 2 * images
        chunks = prompts * CHUNKS_PER_PROMPT
        destination, num_rows = compact_destination(prompts)
        destination = destination.to(settings.device)
        shape = dict(chunks=chunks, length=LENGTH, width=width, num_rows=num_rows)
        for passes in PASSES:
            backward = passes != "forward"
            what = f"chunk_concat {passes} {shape}"
            if recorder.out_of_time(what, needed=3):
                return

            def make_set():
                device = settings.device
                hidden = drawn(chunks, LENGTH, width, device=device).requires_grad_(backward)
                weight = (1 + 0.1 * drawn(width, device=device)).requires_grad_(backward)
                bias = (0.3 + 0.1 * drawn(width, device=device)).requires_grad_(backward)
                multipliers = (torch.rand(chunks, LENGTH) + 0.5).to(device)
                grad = drawn(num_rows, width, device=device)
                inputs = (hidden, weight, bias, 1e-5, multipliers, destination, num_rows)
                return inputs, (hidden, weight, bias), grad

            run = forward_or_both(backward, lambda provider, inputs: provider(*inputs))
            costs = [chunk_concat_cost(chunks, LENGTH, width, num_rows, backward=b) for b in {False, backward}]
            minimal = sum((cost.minimal for cost in costs[1:]), costs[0].minimal)
            with recorder.attempt(what):
                timings = time_providers(providers, make_set, run, costs[0].minimal.bytes, settings)
                record_op(recorder, "chunk_concat", shape, passes, timings, minimal, device_rates)


def body(recorder: Recorder, arguments) -> None:
    dry_run = arguments.dry_run
    if dry_run:
        os.environ["NAI_FAST_KERNELS"] = "reference"
    settings = Settings.for_run(dry_run)
    device_rates = measured_device(arguments.ceilings, settings.device)
    recorder.info(device=device_rates.name, bandwidth=device_rates.bandwidth, tensor_flops=device_rates.tensor_flops,
                  vector_flops=device_rates.vector_flops, dtype=str(DTYPE), warmup=settings.warmup,
                  repeats=settings.repeats)  # fmt: skip
    torch.manual_seed(0)
    if settings.on_gpu:
        from gpu.launch_probe import launch_host_us

        with recorder.attempt("launch host time"):
            for launched, host_us in launch_host_us(settings.device).items():
                recorder.add(kind="launch", launched=launched, host_us=host_us)
    for measure in (measure_cross_attention, measure_hyper_kv, measure_chunk_concat):
        measure(recorder, settings, device_rates, dry_run)


if __name__ == "__main__":
    run_part("kernels", body)
