"""Machinery for proving Triton kernels without a GPU (DESIGN.md, "A kernel file").

Processes
    Triton decides whether ``@triton.jit`` interprets or compiles when a function is
    decorated, its own ``triton.language`` helpers (``tl.sum``...) included, so
    ``TRITON_INTERPRET`` must be set before Triton is first imported, and interpreted and
    compiled kernels cannot share a process. :func:`triton_workers` spawns fresh worker
    processes of either kind; tests send them module-level functions, whatever this pytest
    process imported before.

Numerics
    :func:`poisoned_allocations` fills every ``torch.empty`` with NaN, so an element a kernel
    forgets to write cannot pass; :func:`assert_as_accurate_as_eager` holds a kernel to the
    error the eager reference itself makes in the same precision. Workers start with
    identical RNG states: give each job a :func:`fresh_seed` and report it.

Compilation
    :func:`recorded_launches` notes every ``kernel[grid](...)`` an op makes instead of
    running it; :func:`compile_distinct` compiles each distinct launch for each target (in
    threads: compilation releases the GIL) and reads its resources with ``cuobjdump``.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import secrets
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.pool import AsyncResult, Pool
from types import ModuleType
from typing import Any

import pytest
import torch

# -- processes ------------------------------------------------------------------------------


@contextmanager
def triton_workers(*, interpret: bool, processes: int = 1) -> Iterator[Pool]:
    """A pool of fresh Python processes whose Triton interprets (or compiles) kernels.

    Jobs must be importable functions (a test module's own are: workers get this process's
    ``sys.path``). Each worker runs torch on one thread, so parallel workers do not compete.
    """
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITON_INTERPRET", "1" if interpret else "0")
        pool = multiprocessing.get_context("spawn").Pool(processes, initializer=torch.set_num_threads, initargs=(1,))
    try:
        yield pool
    finally:
        pool.terminate()
        pool.join()


PINNED_SEED: int | None = None  # pytest --proof-seed SEED sets it (tests/conftest.py)


def fresh_seed() -> int:
    """A new random seed for a proof, or the one pinned from the command line."""
    return secrets.randbits(63) if PINNED_SEED is None else PINNED_SEED


def submit_cases(pool: Pool, job, cases: list, case_id) -> dict[str, tuple[int, AsyncResult]]:
    """Send ``job(case, seed)`` for every case at once, so that workers run side by side,
    each with a fresh seed: ``case_id(case) -> (seed, pending result)``."""
    pending = {}
    for case in cases:
        seed = fresh_seed()
        pending[case_id(case)] = seed, pool.apply_async(job, (case, seed))
    return pending


def result_of(job: AsyncResult, seed: int | None = None, timeout: float = 600) -> Any:
    """A worker job's return value; its failure, re-raised here with the seed it ran with."""
    try:
        return job.get(timeout)
    except Exception as error:
        seed_note = "" if seed is None else f" (seed {seed})"
        raise AssertionError(f"{type(error).__name__}: {error}{seed_note}") from error


# -- numerics -------------------------------------------------------------------------------

# How far a kernel may be from the float64 reference: twice the error of the eager reference
# run in the same dtype, plus this floor, both relative to the largest exact value. In half
# precision the floor is one ulp: two roundings to the dtype, an operand rounded before a
# product (the probabilities, their gradients) and the result. Eager rounds both as well, but
# one draw of its error can come out as small as the last rounding alone, and half an ulp
# failed 1 draw in ~30 of a bfloat16 grad q with a single query row (CI, 2026-11-30).
# In float32, a few ulp.
ERROR_FLOOR = {torch.float32: 1e-6, torch.float16: 2**-10, torch.bfloat16: 2**-7}


@contextmanager
def poisoned_allocations() -> Iterator[None]:
    """Within the block, floating-point ``torch.empty``, ``empty_like`` and ``new_empty``
    tensors start as NaN (integer ones are left alone: a poisoned index would crash)."""

    def poisoned(allocate):
        @functools.wraps(allocate)
        def allocate_poisoned(*args, **kwargs):
            tensor = allocate(*args, **kwargs)
            return tensor.fill_(float("nan")) if tensor.is_floating_point() else tensor

        return allocate_poisoned

    with pytest.MonkeyPatch.context() as patch:
        for owner, name in ((torch, "empty"), (torch, "empty_like"), (torch.Tensor, "new_empty")):
            patch.setattr(owner, name, poisoned(getattr(owner, name)))
        yield


def relative_error(actual: torch.Tensor, exact: torch.Tensor) -> float:
    """Largest absolute difference over the largest exact magnitude (NaN if either has NaN)."""
    return ((actual.double() - exact).abs().max() / exact.abs().max()).item()


def assert_as_accurate_as_eager(
    what: str, kernel: torch.Tensor, eager: torch.Tensor, exact: torch.Tensor, floor: float = 0.0
) -> None:
    """The kernel's result is finite and within 2x the eager error (plus a floor: the dtype's
    ERROR_FLOOR, or ``floor`` where that is larger) of ``exact``."""
    assert torch.isfinite(exact).all(), f"{what}: the float64 reference is not finite; ill-posed inputs"
    assert exact.any(), f"{what}: the float64 reference is zero, so no error is relative to it; ill-posed inputs"
    assert torch.isfinite(kernel).all(), f"{what}: the kernel's result has non-finite values"
    kernel_error, eager_error = relative_error(kernel, exact), relative_error(eager, exact)
    floor = max(ERROR_FLOOR[kernel.dtype], floor)
    assert (
        kernel_error <= 2 * eager_error + floor
    ), f"{what}: kernel error {kernel_error:.3g} exceeds 2 x eager error {eager_error:.3g} + {floor:g}"


def assert_results_as_accurate_as_eager(
    names: tuple[str, ...],
    kernel: list[torch.Tensor],
    eager: list[torch.Tensor],
    exact: list[torch.Tensor],
    floor: float = 0.0,
) -> None:
    """Each named result (output, gradients) of the kernel keeps the eager result's dtype
    and is as accurate as it (see :func:`assert_as_accurate_as_eager`)."""
    for what, kernel_result, eager_result, exact_result in zip(names, kernel, eager, exact, strict=True):
        assert kernel_result.dtype == eager_result.dtype, what
        assert_as_accurate_as_eager(what, kernel_result, eager_result, exact_result, floor)


# -- compilation ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Launch:
    """One ``kernel[grid](*args, **kwargs)`` call."""

    kernel: Any
    grid: tuple
    args: tuple
    kwargs: dict[str, Any]


@dataclass(frozen=True)
class CompiledLaunch:
    """A distinct launch compiled for one target (plain data: it pickles out of a worker)."""

    description: str
    target: str
    binary: Any  # nai_fast.kernels.compile_check.Binary
    usage: Any  # nai_fast.kernels.compile_check.ResourceUsage


@contextmanager
def recorded_launches(module: ModuleType) -> Iterator[list[Launch]]:
    """Within the block the module's kernels note their launches and compute nothing, so an
    op's outputs stay as allocated; yields the list the launches go to."""
    from triton.runtime.jit import KernelInterface

    launches: list[Launch] = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append(Launch(self.kernel, grid, args, kwargs))

    with pytest.MonkeyPatch.context() as patch:
        for name, value in list(vars(module).items()):
            if isinstance(value, KernelInterface):
                patch.setattr(module, name, Recorder(value))
        yield launches


# Shared memory a block may use (the opt-in maximum): A100 (sm_80) and H100 (sm_90).
MAX_SHARED = {"sm_80": 163 * 1024, "sm_90": 227 * 1024}


def assert_fits_the_target(result: CompiledLaunch, record_property) -> None:
    """No spills, at most 255 registers and the target's shared memory; the figures are
    recorded as test properties and printed (``pytest -s``)."""
    usage, target = result.usage, result.target
    record_property(result.description, f"{usage.registers} registers, {usage.shared} B shared")
    print(f"{target} {result.description}: {usage.registers} registers, {usage.shared} B shared")
    assert not usage.spills, f"{result.description} spills on {target}: {usage}"
    assert usage.registers <= 255, result.description
    assert usage.shared <= MAX_SHARED[target], f"{result.description} needs {usage.shared} B shared"


def compile_distinct(launches: list[Launch], targets: dict[str, Any]) -> list[CompiledLaunch]:
    """Compile every distinct (specialised) launch once per target, in parallel threads."""
    from nai_fast.kernels.compile_check import launch_source

    jobs = {}
    for launch in launches:
        for target_name, target in targets.items():
            source, options = launch_source(launch.kernel, launch.args, launch.kwargs, target)
            key = (source.hash(), tuple(sorted(options.items())), target_name)
            jobs.setdefault(key, (launch.kernel, source, options, target_name, target))
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        return list(pool.map(lambda job: _compile(*job), jobs.values()))


def _compile(kernel, source, options, target_name, target) -> CompiledLaunch:
    from nai_fast.kernels.compile_check import compile_source, resource_usage

    binary = compile_source(source, options, target)
    return CompiledLaunch(_describe(kernel, source, options), target_name, binary, resource_usage(binary))


def _describe(kernel, source, options) -> str:
    """e.g. ``_forward_kernel(*fp16, width%16=0, RESTORE_MEAN=True, BLOCK_ROWS=4, num_warps=8)``."""
    names = kernel.arg_names
    dtypes = sorted({kind for kind in source.signature.values() if kind.startswith("*")})
    specialized = [names[index] for (index,), attrs in source.attrs.items() if attrs]
    divisible = [f"{name}%16=0" for name in specialized if not source.signature[name].startswith("*")]
    constants = [f"{names[index]}={value}" for (index,), value in source.constants.items() if value is not None]
    settings = [f"{key}={value}" for key, value in sorted(options.items())]
    return f"{kernel.__name__}({', '.join([*dtypes, *divisible, *constants, *settings])})"
