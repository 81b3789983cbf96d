"""hyper_kv, proven without a GPU: the Triton kernels against the float64 reference (under
Triton's interpreter), their compilation for sm_80 and sm_90, the dispatcher, the structure
check, the cost model."""

from __future__ import annotations

import importlib
import os

import pytest
import torch
from kernel_proofs import (
    assert_fits_the_target,
    assert_results_as_accurate_as_eager,
    compile_distinct,
    fresh_seed,
    poisoned_allocations,
    recorded_launches,
    result_of,
    submit_cases,
)

import nai_fast.kernels as kernels
from nai_fast.hypernetworks.modules import ACTIVATIONS
from nai_fast.kernels.cost import A100, H100_SXM, hyper_kv_cost, measure_eager
from nai_fast.kernels.hyper_kv import (
    FUSED_ACTIVATIONS,
    MLP,
    LaunchConfig,
    hyper_kv_reference,
    not_supported_reasons,
    structure_not_supported_reasons,
)

MODULE = "nai_fast.kernels.hyper_kv"
# Shared memory a block may use: 163 KiB on A100, 227 KiB on H100.
PARAMETERS = ("k_weight", "v_weight", "k_w1", "k_b1", "k_w2", "k_b2", "v_w1", "v_b1", "v_w2", "v_b2")


def op_module():
    """The kernel module (the package attribute of its name is the dispatching function)."""
    return importlib.import_module(MODULE)


# -- inputs -----------------------------------------------------------------------------------


def random_inputs(
    tokens: tuple[int, ...], width: int, hidden: int, out_width: int, dtype: torch.dtype, bias: bool = False
) -> dict[str, torch.Tensor]:
    """Fresh x, parameters and output gradients, representable in ``dtype``, held in float64.

    Weights are scaled by 1/sqrt(fan-in) and biases are sizeable, so that pre-activations
    spread over every activation's curve and s net(x) is as large as x.
    """

    def normal(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, dtype=torch.float64) * scale

    tensors = dict(x=normal(*tokens, width), grad_key=normal(*tokens, out_width), grad_value=normal(*tokens, out_width))
    for role in ("k", "v"):
        tensors[f"{role}_weight"] = normal(out_width, width, scale=width**-0.5)
        tensors[f"{role}_w1"], tensors[f"{role}_b1"] = normal(hidden, width, scale=width**-0.5), normal(hidden, scale=0.5)
        tensors[f"{role}_w2"], tensors[f"{role}_b2"] = normal(width, hidden, scale=hidden**-0.5), normal(width, scale=0.5)
        if bias:
            tensors[f"{role}_bias"] = normal(out_width, scale=0.3)
    return {name: tensor.to(dtype).double() for name, tensor in tensors.items()}


# Where an activation's derivative jumps (by the kernels' names): there a pre-activation's last
# rounding decides which side's slope the backward takes, and the float64 reference and any
# float32 accumulation can disagree about it for |pre - kink| ~ 1e-7, turning one element's
# gradient into the other slope's (seen: relu, fp16, 1000 tokens, one flip, grad w1 10x eager's).
KINKS = {"relu": (0.0,), "leakyrelu": (0.0,), "hardswish": (-3.0, 3.0)}
KINK_MARGIN = 1e-4  # pre-activations are O(1); float32 accumulation errs by ~1e-7


def keep_away_from_kinks(inputs: dict, activation: str, dtype: torch.dtype) -> dict:
    """Redraw the tokens (rows of x) whose pre-activation in either module lies within
    KINK_MARGIN of a point where the activation's derivative jumps."""
    kinks = torch.tensor(KINKS.get(FUSED_ACTIVATIONS[activation], ()), dtype=torch.float64)
    if not len(kinks):
        return inputs
    x = inputs["x"].reshape(-1, inputs["x"].shape[-1]).clone()
    for _ in range(100):
        pre = torch.cat([x @ inputs[f"{role}_w1"].T + inputs[f"{role}_b1"] for role in ("k", "v")], dim=-1)
        near = ((pre[..., None] - kinks).abs() < KINK_MARGIN).flatten(1).any(dim=1)
        if not near.any():
            return inputs | {"x": x.reshape(inputs["x"].shape)}
        x[near] = torch.randn(int(near.sum()), x.shape[-1], dtype=torch.float64).to(dtype).double()
    raise AssertionError("could not draw tokens away from the activation's kinks")


def run(op, inputs: dict, dtype: torch.dtype, activation: str, strength: float) -> list[torch.Tensor]:
    """[key, value, grad x, grad of every parameter (and bias)] of ``op`` in ``dtype``."""
    leaves = {
        name: tensor.to(dtype, copy=True).requires_grad_()
        for name, tensor in inputs.items()
        if not name.startswith("grad_")
    }
    mlps = [MLP(*(leaves[f"{role}_{name}"] for name in MLP._fields)) for role in ("k", "v")]
    key, value = op(
        leaves["x"], leaves["k_weight"], leaves["v_weight"], *mlps, activation, strength,
        leaves.get("k_bias"), leaves.get("v_bias"),
    )  # fmt: skip
    torch.autograd.backward([key, value], [inputs["grad_key"].to(dtype), inputs["grad_value"].to(dtype)])
    return [key.detach(), value.detach(), *(leaf.grad for leaf in leaves.values())]


def result_names(inputs: dict) -> tuple[str, ...]:
    return ("key", "value", *(f"grad {name}" for name in inputs if not name.startswith("grad_")))


# -- numerics (jobs run in interpreter workers) ----------------------------------------------

# (token shape, width, hidden, out width), dtype, activation, strength, projection bias.
# Every activation and dtype; 1, 33, 77 and 1000 tokens (odd, and in leading dims); SD's
# widths 320, 640, 768 (the context, projected to 320 or 640 in cross-attention) and 1280,
# large ones with few tokens (the interpreter is slow); one small odd width for the masks.
CASES = [
    (((1000,), 320, 640, 320), torch.float16, "relu", 1.0, False),
    (((1000,), 320, 640, 320), torch.bfloat16, "hardswish", 0.8, False),
    (((2, 77), 768, 1536, 320), torch.bfloat16, "swish", 0.7, False),
    (((77,), 1280, 2560, 1280), torch.float16, "silu", 1.0, False),
    (((1,), 320, 640, 320), torch.float32, "gelu", 1.0, False),
    (((1,), 640, 1280, 640), torch.bfloat16, "gelu", 1.0, False),
    (((77,), 640, 1280, 640), torch.float16, "elu", 1.0, True),
    (((1, 77), 320, 640, 320), torch.float32, "tanh", 0.5, True),
    (((33,), 320, 640, 320), torch.bfloat16, "sigmoid", 1.0, False),
    (((77,), 768, 1536, 640), torch.float32, "linear", 1.0, False),
    (((5, 3), 100, 150, 72), torch.float32, "leakyrelu", 0.3, True),
    (((5, 3), 100, 150, 72), torch.float16, "leakyrelu", 0.3, True),
]


def case_id(case) -> str:
    (tokens, width, hidden, out_width), dtype, activation, strength, bias = case
    notes = ("" if strength == 1.0 else f"-s{strength}") + ("-bias" if bias else "")
    shape = "x".join(map(str, tokens))
    return f"M{shape}-C{width}-H{hidden}-N{out_width}-{str(dtype).removeprefix('torch.')}-{activation}{notes}"


def numerics_job(case, seed: int) -> None:
    """Keys, values and every gradient against the float64 reference, as close as eager in
    the same dtype."""
    torch.manual_seed(seed)
    sizes, dtype, activation, strength, bias = case
    inputs = keep_away_from_kinks(random_inputs(*sizes, dtype, bias), activation, dtype)
    exact = run(hyper_kv_reference, inputs, torch.float64, activation, strength)
    eager = run(hyper_kv_reference, inputs, dtype, activation, strength)
    with poisoned_allocations():
        kernel = run(op_module().hyper_kv, inputs, dtype, activation, strength)
    assert_results_as_accurate_as_eager(result_names(inputs), kernel, eager, exact)


@pytest.fixture(scope="module")
def numerics(interpreter):
    """Every case, sent to the workers at once: id -> (seed, pending result)."""
    return submit_cases(interpreter, numerics_job, CASES, case_id)


def test_cases_cover_every_activation_and_dtype():
    assert {case[2] for case in CASES} == set(FUSED_ACTIVATIONS)
    assert {case[1] for case in CASES} == {torch.float32, torch.float16, torch.bfloat16}


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_reference(numerics, case):
    """See numerics_job; a failure reports the seed that reproduces it."""
    seed, job = numerics[case_id(case)]
    result_of(job, seed)


def frozen_projection_job(seed: int) -> None:
    """Hypernetwork training: x and the projections need no gradient; the nets get theirs."""
    torch.manual_seed(seed)
    inputs = random_inputs((9,), 32, 64, 16, torch.float32)
    tensors = {name: tensor.float() for name, tensor in inputs.items()}
    grads = {}
    for name, op in (("kernel", op_module().hyper_kv), ("reference", hyper_kv_reference)):
        mlps = [MLP(*(tensors[f"{r}_{n}"].clone().requires_grad_() for n in MLP._fields)) for r in ("k", "v")]
        key, value = op(tensors["x"], tensors["k_weight"], tensors["v_weight"], *mlps, "relu", 0.6)
        torch.autograd.backward([key, value], [tensors["grad_key"], tensors["grad_value"]])
        grads[name] = [parameter.grad for mlp in mlps for parameter in mlp]
    torch.testing.assert_close(grads["kernel"], grads["reference"])


def mismatched_inputs_job() -> None:
    op = op_module().hyper_kv
    x, weight = torch.randn(3, 8), torch.randn(4, 8)
    mlp = MLP(torch.randn(16, 8), torch.randn(16), torch.randn(8, 16), torch.randn(8))
    with pytest.raises(ValueError, match=r"k_mlp.w2 must have shape \(8, 16\) for x of width 8, got \(8, 15\)"):
        op(x, weight, weight, mlp._replace(w2=torch.randn(8, 15)), mlp, "relu")
    with pytest.raises(ValueError, match=r"v_bias must have shape \(4,\)"):
        op(x, weight, weight, mlp, mlp, "relu", 1.0, None, torch.randn(5))
    with pytest.raises(ValueError, match="v_weight is torch.float16, x is torch.float32"):
        op(x, weight, weight.half(), mlp, mlp, "relu")
    with pytest.raises(ValueError, match="activation 'mish' is not one of"):
        op(x, weight, weight, mlp, mlp, "mish")


def test_frozen_projections_and_input(interpreter):
    seed = fresh_seed()
    result_of(interpreter.apply_async(frozen_projection_job, (seed,)), seed)


def test_mismatched_inputs_raise(interpreter):
    result_of(interpreter.apply_async(mismatched_inputs_job))


# -- the reference is the web UI's modules ----------------------------------------------------


@pytest.mark.parametrize("activation", sorted(FUSED_ACTIVATIONS))
def test_reference_activations_are_the_web_ui_modules(activation):
    """The reference's activation for each name is the module the web UI's files mean by it
    (``swish`` is Hardswish), derivatives included."""
    pre = torch.linspace(-5, 5, 1001, dtype=torch.float64, requires_grad=True)
    module = torch.nn.Identity() if activation == "linear" else ACTIVATIONS[activation]()
    expected = module(pre)
    (expected_grad,) = torch.autograd.grad(expected.sum(), pre)
    eye, zero = torch.eye(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    identity_net = MLP(eye, zero, eye, zero)  # net(x) = act(x), projections the identity
    key, _ = hyper_kv_reference(pre[:, None], eye, eye, identity_net, identity_net, activation)
    (grad,) = torch.autograd.grad(key.sum(), pre)
    torch.testing.assert_close(key[:, 0], pre + expected)
    torch.testing.assert_close(grad, 1 + expected_grad)


def test_reference_is_a_hypernetwork_module_then_the_projection():
    from nai_fast.hypernetworks.modules import Architecture, HypernetworkModule

    architecture = Architecture(activation="elu")
    modules = [HypernetworkModule(40, architecture) for _ in range(2)]
    for module in modules:
        module.reset_parameters("XavierNormal")
    x, k_weight, v_weight = torch.randn(2, 7, 40), torch.randn(24, 40), torch.randn(24, 40)
    mlps = [MLP(m.net[0].weight, m.net[0].bias, m.net[2].weight, m.net[2].bias) for m in modules]
    key, value = hyper_kv_reference(x, k_weight, v_weight, *mlps, "elu", 0.7)
    torch.testing.assert_close(key, modules[0](x, 0.7) @ k_weight.T)
    torch.testing.assert_close(value, modules[1](x, 0.7) @ v_weight.T)


# -- which structures fuse --------------------------------------------------------------------


def test_the_usual_structures_fuse():
    for activation in FUSED_ACTIVATIONS:
        assert structure_not_supported_reasons(activation, 2) == []
    assert structure_not_supported_reasons("linear", 2, activate_output=True) == []  # nothing to apply


def test_other_structures_are_explained():
    reasons = structure_not_supported_reasons(
        "mish", 3, layer_norm=True, dropout_active=True, activate_output=True
    )
    assert reasons == [
        "activation 'mish' has no fused kernel",
        "3 Linears: the op fuses exactly two",
        "LayerNorm after the Linears is not fused",
        "Dropout in training mode is not fused",
        "an activation after the last Linear is not fused",
    ]
    assert structure_not_supported_reasons("relu", 1) == [
        "one Linear is an affine map: fold it into the projection instead"
    ]


def test_every_fused_activation_is_a_web_ui_activation():
    assert set(FUSED_ACTIVATIONS) - {"linear"} <= set(ACTIVATIONS)


# -- compiles for real targets (a job run in a compiling worker) ------------------------------

# Every LaunchConfig (one per dtype, forward and backward) with gelu on sm_80 and sm_90, then
# every other activation's hidden kernels in float16 on sm_80 (registers and spills; the
# activation is the epilogue alone). SD's widths are multiples of ALIGNMENT.
COMPILE_VARIANTS = [(320, dtype, "gelu") for dtype in (torch.float16, torch.bfloat16, torch.float32)]
ACTIVATION_VARIANTS = [(320, torch.float16, act) for act in sorted(set(FUSED_ACTIVATIONS.values()) - {"gelu"})]


def compile_job() -> list:
    """Forward and backward launches of the variants, compiled."""
    from nai_fast.kernels.compile_check import TARGETS

    compiled = []
    for variants, targets in ((COMPILE_VARIANTS, TARGETS), (ACTIVATION_VARIANTS, {"sm_80": TARGETS["sm_80"]})):
        with recorded_launches(op_module()) as launches:
            for width, dtype, activation in variants:
                inputs = random_inputs((3,), width, 2 * width, width, dtype)
                run(op_module().hyper_kv, inputs, dtype, activation, 1.0)
        if variants is ACTIVATION_VARIANTS:  # the projection kernel has no activation
            launches = [launch for launch in launches if launch.kernel.__name__ == "_hidden_kernel"]
        compiled += compile_distinct(launches, targets)
    return compiled


@pytest.fixture(scope="module")
def compiled(compiler):
    return result_of(compiler.apply_async(compile_job))


def configs(dtypes) -> set[LaunchConfig]:
    return {LaunchConfig.for_dtype(dtype, backward=backward) for dtype in dtypes for backward in (False, True)}


def test_compile_variants_reach_every_config():
    assert configs(op_module().SUPPORTED_DTYPES) == configs({dtype for _, dtype, _ in COMPILE_VARIANTS})


@pytest.mark.parametrize("target", ["sm_80", "sm_90"])
def test_compiles_without_spills(compiled, target, record_property):
    results = [result for result in compiled if result.target == target]
    # The projection kernel per dtype; the hidden kernel, forward and backward, per dtype and
    # activation.
    activations = len(ACTIVATION_VARIANTS) if target == "sm_80" else 0
    assert len(results) == 3 * len(COMPILE_VARIANTS) + 2 * activations
    for result in results:
        assert_fits_the_target(result, record_property)


@pytest.mark.parametrize("target", ["sm_80", "sm_90"])
def test_half_precision_dots_run_on_tensor_cores(compiled, target):
    """HMMA on sm_80; HMMA or the warpgroup HGMMA (wgmma) on sm_90; float32 products on CUDA
    cores (exact, not TF32)."""
    from nai_fast.kernels.compile_check import sass_mnemonics

    tensor_core = {"HMMA"} if target == "sm_80" else {"HMMA", "HGMMA"}
    results = [r for r in compiled if r.target == target]
    for result in results:
        mnemonics = sass_mnemonics(result.binary)
        assert "STG" in mnemonics and {"LDG", "LDGSTS"} & mnemonics  # the disassembly is real
        if "fp32" in result.description:
            assert not {"HMMA", "HGMMA"} & mnemonics, result.description
        else:
            assert tensor_core & mnemonics, f"{result.description} on {target}: no tensor-core instruction"


# -- dispatch ---------------------------------------------------------------------------------


def small_args(dtype: torch.dtype = torch.float32, width: int = 16, hidden: int = 32) -> tuple:
    """Weights scaled by 1/sqrt(fan-in): outputs of order 1, where assert_close's default
    tolerances mean float32 rounding (unscaled, outputs of ~30 failed them by one element's
    cancellation, 1 draw in many)."""
    x, weight = torch.randn(2, 5, width, dtype=dtype), torch.randn(4, width, dtype=dtype) * width**-0.5
    mlp = MLP(torch.randn(hidden, width, dtype=dtype) * width**-0.5, torch.randn(hidden, dtype=dtype),
              torch.randn(width, hidden, dtype=dtype) * hidden**-0.5, torch.randn(width, dtype=dtype))  # fmt: skip
    return x, weight, weight, mlp, mlp, "gelu"


def triton_mode_job(args: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    os.environ[kernels.ENV_VAR] = "triton"
    try:
        return kernels.hyper_kv(*args, 0.5)
    finally:
        del os.environ[kernels.ENV_VAR]


def test_triton_mode_runs_the_kernels_on_cpu_under_the_interpreter(interpreter):
    args = small_args()
    with_triton = result_of(interpreter.apply_async(triton_mode_job, (args,)))
    torch.testing.assert_close(with_triton, hyper_kv_reference(*args, 0.5))


def test_triton_mode_on_cpu_without_the_interpreter_is_explained(compiler):
    with pytest.raises(AssertionError, match="RuntimeError: NAI_FAST_KERNELS=triton, but .*TRITON_INTERPRET=1"):
        result_of(compiler.apply_async(triton_mode_job, (small_args(),)))


def test_unsupported_inputs_are_explained():
    x, weight, _, mlp, _, _ = small_args(torch.float64)
    reasons = not_supported_reasons(x, weight, weight.float(), mlp, mlp._replace(b2=mlp.b2.float()))
    assert "x is torch.float64, not float32, float16 or bfloat16" in reasons
    assert "k_mlp.w1 is torch.float64, not float32, float16 or bfloat16" in reasons
    assert not any(reason.startswith(("v_weight", "v_mlp.b2")) for reason in reasons)

    def width_reasons(args):
        return [reason for reason in not_supported_reasons(*args[:5]) if "multiple" in reason]

    assert width_reasons(small_args()) == []
    assert width_reasons(small_args(width=24, hidden=40)) == [
        "width 24 is no multiple of 16 (rows load without vectors, and registers spill)",
        "k hidden width 40 is no multiple of 16 (rows load without vectors, and registers spill)",
        "v hidden width 40 is no multiple of 16 (rows load without vectors, and registers spill)",
    ]


# -- cost model -------------------------------------------------------------------------------


def test_cost_by_hand_for_sd_self_attention():
    """SD 1.x at 512 x 512, first down block's self-attention: 2 x 4096 tokens of width 320,
    [1, 2, 1] nets (640 hidden), float16."""
    tokens, width, hidden = 8192, 320, 640
    cost = hyper_kv_cost(tokens, width)
    x, h = tokens * width * 2, tokens * hidden * 2  # 5,242,880 and 10,485,760 bytes; K, V like x
    weights = 320 * 320 * 2 + 2 * 640 * 320 * 2 + (640 + 320) * 2  # Wk, W1, W2, b1, b2 per net
    assert cost.minimal.bytes == x + 2 * (weights + x) == 17_780_480
    net_flops = 2 * tokens * (320 * 640 + 640 * 320 + 320 * 320)  # two Linears and the projection
    assert cost.minimal.tensor_flops == 2 * net_flops == 16_777_216_000
    # Per net: fold (G 320 x 640, c), h written by one kernel and read by the other, x read twice.
    fold = (320 * 320 + 640 * 320 + 320 * 640) * 2 + (320 * 320 + 320 + 320) * 2
    kernels_bytes = (x + 640 * 320 * 2 + 640 * 2 + h) + (x + h + 320 * 320 * 2 + 320 * 640 * 2 + 320 * 2 + x)
    assert cost.implemented.bytes == 2 * (2 + fold + kernels_bytes)  # and a zero (2 bytes) to add to c
    # Tiles: 128 x 128 (the output's 320 columns padded to 384); the fold's product besides.
    padded = 2 * 8192 * 640 * 320 + 2 * 8192 * 384 * (320 + 640)
    assert cost.implemented.tensor_flops == 2 * (padded + 2 * 320 * 320 * 640)
    # Eager per net: h written, read and written by the activation, read; x read twice,
    # net written, read and written by the scaling, both read by the sum, which writes r.
    assert cost.eager.bytes == 2 * (weights + 9 * x + 4 * h) == 180_309_760
    assert (cost.implemented.launches, cost.eager.launches) == (10, 12)
    assert cost.byte_ratio() > 2.3
    assert cost.predicted_speedup(A100) > 1.4 and cost.predicted_speedup(H100_SXM) > 2


@pytest.mark.parametrize("activation", ["relu", "linear"])
@pytest.mark.parametrize("input_grad", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_eager_model_matches_measured_traffic(activation, input_grad, dtype):
    tokens, width, hidden, out_width = 14, 8, 12, 6
    inputs = random_inputs((tokens,), width, hidden, out_width, torch.float32)
    x = inputs["x"].to(dtype).requires_grad_(input_grad)
    weights = {name: inputs[name].to(dtype) for name in ("k_weight", "v_weight")}
    mlps = [MLP(*(inputs[f"{r}_{n}"].to(dtype).requires_grad_() for n in MLP._fields)) for r in ("k", "v")]
    outputs = []
    forward = measure_eager(
        lambda: outputs.extend(hyper_kv_reference(x, weights["k_weight"], weights["v_weight"], *mlps, activation, 0.5))
    )
    grads = [inputs[name].to(dtype) for name in ("grad_key", "grad_value")]
    backward = measure_eager(lambda: torch.autograd.backward(outputs, grads))
    shape = dict(dtype_bytes=dtype.itemsize, activation=activation, input_grad=input_grad)
    model = [hyper_kv_cost(tokens, width, hidden, out_width, **shape, backward=flag).eager for flag in (False, True)]
    assert (forward.bytes, backward.bytes) == (model[0].bytes, model[1].bytes)
    assert (forward.launches, backward.launches) == (model[0].launches, model[1].launches)


def test_fused_moves_fewer_bytes_than_eager_where_tokens_outnumber_weights():
    """SD 1.x self-attention at 512 x 512, first two levels. At the deepest (512 tokens of
    width 1280) the weights outweigh the tokens and the fold's traffic makes the fused op
    move about as much as eager (the model says so: see the benchmark's notes)."""
    for tokens, width in ((8192, 320), (2048, 640)):
        for backward in (False, True):
            cost = hyper_kv_cost(tokens, width, backward=backward)
            assert cost.minimal.bytes <= cost.implemented.bytes < cost.eager.bytes
            assert cost.implemented.launches < cost.eager.launches
