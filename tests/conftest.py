"""Fixtures shared by the kernel proofs (tests/kernel_proofs.py holds the machinery)."""

import os

import pytest
from kernel_proofs import triton_workers


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
