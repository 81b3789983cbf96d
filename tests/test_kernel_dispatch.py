"""The dispatching ops of nai_fast.kernels: the reference for CPU tensors under auto and
reference (whatever the case and spaces of the mode), Triton when forced, one error for an
unknown mode. One test for the three ops; each kernel's own file proves its numerics."""

import importlib

import pytest
import test_kernel_chunk_concat
import test_kernel_cross_attention
import test_kernel_hyper_kv

import nai_fast.kernels as kernels

# op name -> arguments of a small call on CPU tensors
SMALL_ARGS = {
    "chunk_concat": test_kernel_chunk_concat.small_args,
    "cross_attention": test_kernel_cross_attention.small_args,
    "hyper_kv": test_kernel_hyper_kv.small_args,
}


@pytest.fixture(params=sorted(SMALL_ARGS))
def op(request, monkeypatch):
    """An op's name, its two targets replaced by functions that say which one ran."""
    name = request.param
    module = importlib.import_module(f"nai_fast.kernels.{name}")
    monkeypatch.setattr(module, name, lambda *args, **kwargs: "triton")
    monkeypatch.setattr(module, f"{name}_reference", lambda *args, **kwargs: "reference")
    return name


def call(name: str):
    return getattr(kernels, name)(*SMALL_ARGS[name]())


@pytest.mark.parametrize("mode", [None, "auto", " Auto ", "reference", "REFERENCE"])
def test_cpu_tensors_get_the_reference(op, monkeypatch, mode):
    if mode is None:
        monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    else:
        monkeypatch.setenv(kernels.ENV_VAR, mode)
    assert call(op) == "reference"


def test_triton_mode_picks_triton(op, monkeypatch):
    monkeypatch.setenv(kernels.ENV_VAR, "triton")
    monkeypatch.setattr(importlib.import_module(f"nai_fast.kernels.{op}"), "not_supported_reasons", lambda *a: [])
    assert call(op) == "triton"


def test_invalid_mode_is_an_error(op, monkeypatch):
    monkeypatch.setenv(kernels.ENV_VAR, "fast")
    with pytest.raises(ValueError, match="NAI_FAST_KERNELS='fast' is not one of auto, triton, reference"):
        call(op)
