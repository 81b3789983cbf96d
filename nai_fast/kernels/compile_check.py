"""Compile Triton kernels for real GPUs on any machine, and read what the compiler made.

``triton.compile`` builds PTX and cubin for a target such as ``GPUTarget("cuda", 80, 32)``
without a GPU or a CUDA driver, and the Triton wheel ships ``cuobjdump``. This module turns
one kernel launch (the arguments a ``kernel[grid](...)`` call would take) into the
:class:`Binary` a GPU would run, and reads its registers, spills and shared memory, or its
SASS instructions (tensor-core ones: ``HMMA`` on sm_80, ``HGMMA`` on sm_90). The tests use it
to prove every launch configuration compiles; a ``nai-fast info --kernels`` could use it on a
user's machine. Kernels must run compiled, not under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.compiler.compiler import make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

__all__ = [
    "TARGETS",
    "Binary",
    "ResourceUsage",
    "compile_launch",
    "compile_source",
    "disassemble",
    "launch_source",
    "resource_usage",
    "sass_mnemonics",
]

TARGETS = {"sm_80": GPUTarget("cuda", 80, 32), "sm_90": GPUTarget("cuda", 90, 32)}  # A100, H100


@dataclass(frozen=True)
class Binary:
    """A compiled kernel: plain data, so it pickles across processes."""

    name: str
    cubin: bytes
    ptx: str
    shared: int  # bytes of shared memory per block the launch requests
    num_warps: int


@dataclass(frozen=True)
class ResourceUsage:
    """What a compiled kernel needs of a streaming multiprocessor."""

    registers: int  # per thread
    stack: int  # bytes per thread; non-zero means registers spilled
    local: int  # bytes per thread of local memory, idem
    static_shared: int  # bytes per block declared in the cubin
    shared: int  # bytes per block the launch requests (Triton's reduction scratch included)

    @property
    def spills(self) -> bool:
        return self.stack > 0 or self.local > 0


def launch_source(kernel: JITFunction, args: tuple, kwargs: dict[str, Any], target: GPUTarget):
    """What ``kernel[grid](*args, **kwargs)`` would compile for ``target``: (ASTSource, options).

    The arguments are specialised the way a launch specialises them (pointer dtypes, 16-byte
    alignment, integers divisible by 16, constexprs); keyword arguments that are not kernel
    parameters are compiler options (``num_warps``, ``num_stages``). Tensors may live on any
    device: only their dtypes and addresses matter.
    """
    backend = make_backend(target)
    bind = create_function_from_signature(kernel.signature, kernel.params, backend)
    _, specialization, options = bind(*args, **kwargs)
    signature, constexprs, attrs = {}, {}, {}
    for param, (kind, detail) in zip(kernel.params, specialization):
        signature[param.name] = kind
        if kind == "constexpr":
            constexprs[(param.num,)] = detail
        elif isinstance(detail, str):  # "D": divisible by 16; None: not specialised
            attrs[(param.num,)] = backend.parse_attr(detail)
    return ASTSource(kernel, signature, constexprs, attrs), options


def compile_source(source: ASTSource, options: dict[str, Any], target: GPUTarget) -> Binary:
    compiled = triton.compile(source, target=target, options=options)
    metadata = compiled.metadata
    return Binary(compiled.name, compiled.asm["cubin"], compiled.asm["ptx"], metadata.shared, metadata.num_warps)


def compile_launch(kernel: JITFunction, args: tuple, kwargs: dict[str, Any], target: GPUTarget) -> Binary:
    """Compile ``kernel`` for ``target`` as ``kernel[grid](*args, **kwargs)`` would."""
    return compile_source(*launch_source(kernel, args, kwargs, target), target)


def resource_usage(binary: Binary) -> ResourceUsage:
    """Registers, spills and shared memory, as ``cuobjdump`` reads them from the cubin."""
    report = _cuobjdump(binary, "--dump-resource-usage")
    function = re.search(rf"Function {re.escape(binary.name)}:\s*(.*)", report)
    if function is None:
        raise RuntimeError(f"cuobjdump reported no function {binary.name}:\n{report}")
    fields = {key: int(value) for key, value in re.findall(r"(\w+):(\d+)", function.group(1))}
    return ResourceUsage(fields["REG"], fields["STACK"], fields["LOCAL"], fields["SHARED"], binary.shared)


def disassemble(binary: Binary) -> str:
    """The kernel's SASS, as ``cuobjdump --dump-sass`` prints it."""
    return _cuobjdump(binary, "--dump-sass")


def sass_mnemonics(binary: Binary) -> set[str]:
    """The SASS instructions the kernel uses, without modifiers (``HMMA``, ``LDG``, ``STG``...)."""
    return set(re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", disassemble(binary)))


def _cuobjdump(binary: Binary, option: str) -> str:
    with tempfile.TemporaryDirectory() as directory:
        cubin = Path(directory) / f"{binary.name}.cubin"
        cubin.write_bytes(binary.cubin)
        tool = triton.knobs.nvidia.cuobjdump.path
        return subprocess.run([tool, option, str(cubin)], check=True, capture_output=True, text=True).stdout
