"""Fixtures shared by the kernel proofs (tests/kernel_proofs.py holds the machinery), the
`slow` marker, the --proof-seed option, and the cores shared among pytest-xdist workers."""

import os

import kernel_proofs
import pytest
import torch
from gpu_support import DRY_RUN_VAR
from kernel_proofs import triton_workers

# Fixtures whose tests are slow by nature: interpreted Triton kernels, compiles for the GPUs.
_SLOW_FIXTURES = {"interpreter", "compiler"}


def pytest_addoption(parser):
    parser.addoption(
        "--proof-seed",
        type=int,
        metavar="SEED",
        help="seed every kernel proof with SEED instead of a fresh one (to replay a failure's seed)",
    )


def pytest_configure(config):
    kernel_proofs.PINNED_SEED = config.getoption("--proof-seed")
    _share_the_cores()


def _share_the_cores() -> None:
    """Under pytest-xdist (``make test`` runs a worker a core), each worker and every process
    it starts get their share of the cores: torch's OpenMP threads spin while they wait, and
    two workers' pools of threads on the same 2 cores slowed the pretraining test 7-fold."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(config, items):
    """Tests that use the interpreter or compiler workers are ``slow``; ``cuda``-marked tests
    need a CUDA GPU, unless the GPU check's dry run asks for them on the CPU
    (tests/gpu_support.py)."""
    for item in items:
        if _SLOW_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.slow)
    if torch.cuda.is_available() or os.environ.get(DRY_RUN_VAR) == "1":
        return
    skip = pytest.mark.skip(reason=f"needs a CUDA GPU ({DRY_RUN_VAR}=1 runs it on the CPU with tiny shapes)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def interpreter():
    """Worker processes whose kernels run on CPU tensors under Triton's interpreter."""
    pytest.importorskip("triton")
    with triton_workers(interpret=True, processes=min(2, os.cpu_count())) as pool:
        yield pool


@pytest.fixture(scope="module")
def compiler():
    """A worker process whose kernels compile for GPUs."""
    pytest.importorskip("triton")
    with triton_workers(interpret=False) as pool:
        yield pool
