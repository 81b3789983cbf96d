"""What the ``cuda``-marked tests share (``tests/test_gpu_*.py``, run by the GPU check).

On a CUDA machine they run the Triton kernels on the GPU. Without one they are skipped
(tests/conftest.py), unless ``NAI_FAST_GPU_DRY_RUN=1``: then they run on the CPU with tiny
shapes and the eager reference in the kernels' place, so the GPU check's dry run proves
the tests themselves still run (not the kernels: the interpreter tests do that).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Sequence

import torch
from kernel_proofs import ERROR_FLOOR, assert_as_accurate_as_eager, relative_error

DRY_RUN_VAR = "NAI_FAST_GPU_DRY_RUN"
DRY_RUN = os.environ.get(DRY_RUN_VAR) == "1" and not torch.cuda.is_available()
DEVICE = torch.device("cpu" if DRY_RUN else "cuda")
# NAI_FAST_KERNELS for the side under test: the kernels on the GPU; the reference in the dry run
# (CPU tensors reach the kernels only under the interpreter, which the other tests cover).
KERNEL_MODE = "reference" if DRY_RUN else "triton"


def kernel_op(op_name: str) -> Callable:
    """The Triton op itself (not the dispatcher), or its reference in the dry run."""
    module = importlib.import_module(f"nai_fast.kernels.{op_name}")
    return getattr(module, f"{op_name}_reference" if DRY_RUN else op_name)


def on_device(inputs: dict) -> dict:
    """A test input dict with its tensors on :data:`DEVICE`."""
    return {name: value.to(DEVICE) if isinstance(value, torch.Tensor) else value for name, value in inputs.items()}


def check_results(
    record_property, names: Sequence[str], kernel: Sequence[torch.Tensor], eager: Sequence[torch.Tensor],
    exact: Sequence[torch.Tensor],
) -> None:  # fmt: skip
    """Each named result is within twice the eager error (plus the dtype's floor) of the
    float64 result, the interpreter tests' rule; both errors are recorded as test
    properties (the GPU check's report shows the worst)."""
    worst: dict = {}
    for name, kernel_result, eager_result, exact_result in zip(names, kernel, eager, exact, strict=True):
        kernel_error, eager_error = relative_error(kernel_result, exact_result), relative_error(
            eager_result, exact_result
        )
        bound = 2 * eager_error + ERROR_FLOOR[kernel_result.dtype]
        share = kernel_error / bound  # NaN where the kernel gave NaN
        kept = worst.get("share_of_bound")
        if not worst or (kept == kept and not share <= kept):  # the largest share; a NaN stays
            worst = {"result": name, "kernel_error": kernel_error, "eager_error": eager_error, "share_of_bound": share}
    record_property("accuracy", worst)
    for name, kernel_result, eager_result, exact_result in zip(names, kernel, eager, exact):
        assert kernel_result.dtype == eager_result.dtype, name
        assert_as_accurate_as_eager(name, kernel_result, eager_result, exact_result)
