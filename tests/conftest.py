"""Fixtures shared by the kernel proofs (tests/kernel_proofs.py holds the machinery), the
`slow` marker, and the --proof-seed option."""

import os

import kernel_proofs
import pytest
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


def pytest_collection_modifyitems(items):
    for item in items:
        if _SLOW_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.slow)


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
