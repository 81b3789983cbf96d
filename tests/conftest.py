"""Fixtures shared by the kernel proofs (tests/kernel_proofs.py holds the machinery), the
`slow` marker, and the --proof-seed option."""

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
