"""Fixtures shared by the kernel proofs (tests/kernel_proofs.py holds the machinery)."""

import os

import pytest
import torch
from gpu_support import DRY_RUN_VAR
from kernel_proofs import triton_workers


def pytest_collection_modifyitems(config, items):
    """``cuda``-marked tests need a CUDA GPU, unless the GPU check's dry run asks for them on
    the CPU (tests/gpu_support.py)."""
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
