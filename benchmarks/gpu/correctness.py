"""Part 2: correctness on the GPU, the ``cuda``-marked tests (``tests/test_gpu_*.py``).

Every kernel forward and backward in float16, bfloat16 and float32 against its float64
reference by the 2x-the-eager-error rule, U-Net training steps (tiny and SD 1.x) and a
txt2img with ``NAI_FAST_KERNELS=triton`` against ``reference``. pytest runs in this
process (spread over xdist workers where pytest-xdist is installed: compiling the kernels'
variants dominates); :mod:`gpu.pytest_plugin` records each test as it ends and skips what
would start past the deadline. The dry run sets ``NAI_FAST_GPU_DRY_RUN=1``: tiny cases on
the CPU, the references in the kernels' place.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from gpu.pytest_plugin import DEADLINE_VAR, Recording
from gpu.record import Recorder, run_part

REPO = Path(__file__).resolve().parents[2]
# The engine's tests first: the longest (model builds, U-Net steps, txt2img), they start first.
TEST_FILES = ("tests/test_gpu_engine.py", "tests/test_gpu_kernels.py")
DRY_RUN_VAR = "NAI_FAST_GPU_DRY_RUN"  # tests/gpu_support.py reads it
# xdist workers: the kernels' variants compile in parallel; each worker's CPU work (float64
# inputs, model builds: each worker builds its own) keeps 2 cores.
MAX_WORKERS = 8


def pytest_arguments(dry_run: bool) -> list[str]:
    arguments = [*(str(REPO / name) for name in TEST_FILES), "-m", "cuda", "-p", "gpu.pytest_plugin"]
    arguments += ["-p", "no:cacheprovider", "-q", "-ra", "--rootdir", str(REPO), "-c", str(REPO / "pyproject.toml")]
    arguments += ["-W", "ignore::pytest.PytestAssertRewriteWarning"]  # the plugin is this process's own import
    if not dry_run and importlib.util.find_spec("xdist") is not None:
        arguments += ["-n", str(workers())]
    return arguments


def workers() -> int:
    return max(1, min(MAX_WORKERS, os.cpu_count() or 1))


def body(recorder: Recorder, arguments) -> None:
    import pytest

    os.environ[DEADLINE_VAR] = str(arguments.deadline)
    # Workers share the cores: OpenMP threads beyond them spin against each other (the float64
    # references and the model builds run on the CPU).
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers())))
    if arguments.dry_run:
        os.environ[DRY_RUN_VAR] = "1"
    command = pytest_arguments(arguments.dry_run)
    recorder.info(pytest_arguments=command)
    exit_code = pytest.main(command, plugins=[Recording(recorder)])
    recorder.info(exit_code=int(exit_code))


if __name__ == "__main__":
    run_part("correctness", body)
