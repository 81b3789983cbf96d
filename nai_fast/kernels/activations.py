"""The web UI's activation names: one table, read by the hypernetwork modules and by ``hyper_kv``.

:data:`ACTIVATIONS` maps each name a web UI hypernetwork file may give (``activation_func``)
to the ``torch.nn`` class the web UI builds for it: its own few, then every torch activation
by lower-case class name. ``"swish"`` is Hardswish there (not SiLU, which is ``"silu"``);
files rely on that. ``"linear"`` (:data:`NO_ACTIVATION`) means none.

:data:`FUSED_ACTIVATIONS` is derived from it: the names whose class the ``hyper_kv`` kernels
compute, each mapped to the kernel's own name for it (the branches of ``hyper_kv._activate``).
"""

from __future__ import annotations

import inspect

from torch import nn

__all__ = ["ACTIVATIONS", "FUSED_ACTIVATIONS", "NO_ACTIVATION"]

NO_ACTIVATION = "linear"

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "leakyrelu": nn.LeakyReLU,
    "elu": nn.ELU,
    "swish": nn.Hardswish,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
}
# The web UI lists these too, but no network can use them: MultiheadAttention and Threshold
# need constructor arguments, and GLU halves the width the next Linear expects.
_UNUSABLE_ACTIVATIONS = {"glu", "multiheadattention", "threshold"}
ACTIVATIONS.update(
    (name.lower(), cls)
    for name, cls in inspect.getmembers(nn.modules.activation, inspect.isclass)
    if cls.__module__ == nn.modules.activation.__name__ and name.lower() not in _UNUSABLE_ACTIVATIONS
)

# The classes the hyper_kv kernels compute (with their default arguments, as the web UI builds
# them), by the kernels' names.
_KERNEL_NAMES: dict[type[nn.Module], str] = {
    nn.ReLU: "relu",
    nn.LeakyReLU: "leakyrelu",
    nn.ELU: "elu",
    nn.GELU: "gelu",
    nn.SiLU: "silu",
    nn.Hardswish: "hardswish",
    nn.Tanh: "tanh",
    nn.Sigmoid: "sigmoid",
}

# Web UI name -> what the kernels compute.
FUSED_ACTIVATIONS: dict[str, str] = {
    NO_ACTIVATION: NO_ACTIVATION,
    **{name: _KERNEL_NAMES[cls] for name, cls in ACTIVATIONS.items() if cls in _KERNEL_NAMES},
}
