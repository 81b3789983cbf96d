"""Hypernetworks as attention processors (nai_fast.hypernetworks.processors): equivalence with stock
diffusers and with the definition, composition and strengths, the work done once (module
calls per forward, K/V per generation, folding) and everything that must invalidate it,
training gradients and the shallow-layer penalty.

The definition the processors are checked against is written here independently: stock
diffusers processors, with forward pre-hooks on every ``to_k``/``to_v`` that rewrite its
input as the web UI does (``h2(h1(x))``, module pair chosen by the input's width).
"""

import copy
import inspect
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import pytest
import torch
from diffusers import UNet2DConditionModel
from torch import nn

from nai_fast.hypernetworks.processors import (
    STRENGTH_KWARG,
    HypernetworkAttnProcessor,
    HypernetworkMismatchError,
    apply_hypernetworks,
    attention_widths,
    hypernetwork_penalty,
    installed_hypernetworks,
    remove_hypernetworks,
)
from nai_fast.hypernetworks.modules import Hypernetwork

# Self-attention widths 32 and 64, cross-attention width 48: every kind of layer gets its own modules.
TINY_UNET = dict(
    sample_size=8,
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=1,
    cross_attention_dim=48,
    attention_head_dim=8,
    norm_num_groups=8,
)
SELF_WIDTHS, CROSS_WIDTH = (32, 64), 48
ALL_WIDTHS = (32, 48, 64)
SD1_UNET = dict(
    sample_size=64,
    block_out_channels=(320, 640, 1280, 1280),
    cross_attention_dim=768,
    attention_head_dim=8,
    layers_per_block=2,
)
TIMESTEP = 500
TOLERANCE = dict(rtol=1e-5, atol=1e-5)  # float32, reassociated sums (folding)
EXACT = dict(rtol=0, atol=0)

ARCHITECTURES = {
    "linear": dict(),
    "linear, dropout (eval)": dict(dropout_structure=(0, 0.3, 0)),
    "relu": dict(activation="relu"),
    "relu, layer norm, dropout (eval)": dict(activation="relu", layer_norm=True, dropout_structure=(0, 0.3, 0)),
    "tanh, deep, activated output": dict(activation="tanh", layer_structure=(1, 1.5, 0.5, 1), activate_output=True),
}


# -- helpers ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(**TINY_UNET).eval().requires_grad_(False)


@pytest.fixture
def unet(tiny_unet: UNet2DConditionModel) -> Iterator[UNet2DConditionModel]:
    """The tiny U-Net, with stock processors back after the test."""
    yield tiny_unet
    remove_hypernetworks(tiny_unet)
    tiny_unet.disable_gradient_checkpointing()


@pytest.fixture
def latents() -> torch.Tensor:
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def context() -> torch.Tensor:
    """A classifier-free guidance batch: negative and positive prompt contexts."""
    return torch.randn(2, 10, CROSS_WIDTH, generator=torch.Generator().manual_seed(2))


def random_hypernetwork(seed: int, widths: Sequence[int] = ALL_WIDTHS, **architecture) -> Hypernetwork:
    """Weights far from the near-identity init, so a wrong module or order shows."""
    torch.manual_seed(seed)
    hypernetwork = Hypernetwork(widths=widths, **architecture)
    with torch.no_grad():
        for parameter in hypernetwork.parameters():
            parameter.normal_(0, 0.2)
    return hypernetwork


def attention_layers(unet: UNet2DConditionModel) -> list[nn.Module]:
    return [module for name, module in unet.named_modules() if name.endswith((".attn1", ".attn2"))]


def forward(unet: UNet2DConditionModel, latents: torch.Tensor, context: torch.Tensor, **kwargs) -> torch.Tensor:
    return unet(latents, TIMESTEP, encoder_hidden_states=context, **kwargs).sample


@contextmanager
def defined_hypernetworks(
    unet: UNet2DConditionModel, hypernetworks: Sequence[Hypernetwork], strengths: Sequence[float]
) -> Iterator[None]:
    """The definition, on stock processors: every to_k / to_v input x becomes h_n(...h_1(x))."""

    def rewrite(role: int):
        def hook(module: nn.Module, args: tuple[torch.Tensor]) -> tuple[torch.Tensor]:
            (x,) = args
            for hypernetwork, strength in zip(hypernetworks, strengths):
                pair = hypernetwork.modules_for(x.shape[-1])
                if pair is not None:
                    x = pair[role](x, strength)
            return (x,)

        return hook

    handles = [
        projection.register_forward_pre_hook(rewrite(role))
        for attn in attention_layers(unet)
        for role, projection in enumerate((attn.to_k, attn.to_v))
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def defined_output(unet, latents, context, hypernetworks, strengths, grad: bool = False) -> torch.Tensor:
    assert not any(isinstance(p, HypernetworkAttnProcessor) for p in unet.attn_processors.values()), "stock only"
    with defined_hypernetworks(unet, hypernetworks, strengths), torch.set_grad_enabled(grad):
        return forward(unet, latents, context)


class ModuleCalls:
    """Counts calls of each module's network, by (width, "k"/"v"), over all given hypernetworks."""

    def __init__(self, *hypernetworks: Hypernetwork) -> None:
        self.counts: Counter[tuple[int, str]] = Counter()
        for hypernetwork in hypernetworks:
            for width in hypernetwork.widths:
                for role, module in zip("kv", hypernetwork.modules_for(width)):
                    module.net.register_forward_hook(lambda *_, key=(width, role): self.counts.update([key]))

    def __getitem__(self, width: int) -> int:
        """Calls at ``width``; k and v are always called together."""
        assert self.counts[width, "k"] == self.counts[width, "v"]
        return self.counts[width, "k"]


def self_attention_layers_per_width(unet: UNet2DConditionModel) -> Counter[int]:
    return Counter(attn.to_k.in_features for attn in attention_layers(unet) if not attn.is_cross_attention)


# -- installing ------------------------------------------------------------------


def test_apply_installs_processors_and_remove_restores_the_originals(unet):
    originals = unet.attn_processors
    apply_hypernetworks(unet, random_hypernetwork(0))
    assert len(unet.attn_processors) == 14
    assert all(isinstance(p, HypernetworkAttnProcessor) for p in unet.attn_processors.values())
    apply_hypernetworks(unet, random_hypernetwork(1))  # replaces, keeps the true originals
    remove_hypernetworks(unet)
    assert all(unet.attn_processors[name] is processor for name, processor in originals.items())
    remove_hypernetworks(unet)  # a no-op now
    assert STRENGTH_KWARG in inspect.signature(HypernetworkAttnProcessor.__call__).parameters, (
        "diffusers forwards only the cross_attention_kwargs a processor's signature names"
    )


def test_invalid_arguments(unet, latents, context):
    with pytest.raises(TypeError):
        apply_hypernetworks(unet, [nn.Linear(2, 2)])
    with pytest.raises(ValueError, match="2 strengths given for 1"):
        apply_hypernetworks(unet, random_hypernetwork(0), strengths=[1.0, 2.0])
    with pytest.raises(ValueError, match="finite"):
        apply_hypernetworks(unet, random_hypernetwork(0), strengths=float("nan"))
    with pytest.raises(ValueError, match="penalty weights"):
        apply_hypernetworks(unet, random_hypernetwork(0), penalty_weights={32: -1.0})
    with pytest.raises(ValueError, match="no hypernetworks"):
        hypernetwork_penalty(unet)
    apply_hypernetworks(unet, random_hypernetwork(0))
    with pytest.raises(ValueError, match="3 strengths given for 1"), torch.no_grad():
        forward(unet, latents, context, cross_attention_kwargs={STRENGTH_KWARG: [1, 2, 3]})


def test_a_hypernetwork_for_another_model_is_refused(unet, tmp_path):
    """Widths 320/640/768/1280 (SD 1.x) on a U-Net whose k/v widths are 32/48/64: nothing would
    change, so it is an error naming both sets of widths and the hypernetwork."""
    assert attention_widths(unet) == ALL_WIDTHS
    random_hypernetwork(0, widths=(320, 640, 768, 1280)).save(tmp_path / "sd1-anime.pt")
    loaded = Hypernetwork.load(tmp_path / "sd1-anime.pt")
    originals = unet.attn_processors
    with pytest.raises(HypernetworkMismatchError) as error:
        apply_hypernetworks(unet, [random_hypernetwork(1), loaded])
    message = str(error.value)
    assert isinstance(error.value, ValueError)
    assert "'sd1-anime'" in message and str(tmp_path / "sd1-anime.pt") in message
    assert "320, 640, 768, 1280" in message and "32, 48, 64" in message
    assert all(unet.attn_processors[name] is processor for name, processor in originals.items())


def test_a_partly_matching_hypernetwork_applies_and_warns_naming_the_unused_widths(unet, latents, context, caplog):
    hypernetwork = random_hypernetwork(0, widths=(32, 64, 320, 768))
    hypernetwork.name = "half-fit"
    expected = defined_output(unet, latents, context, [hypernetwork], [1.0])
    with caplog.at_level("WARNING", logger="nai_fast.hypernetworks.processors"):
        apply_hypernetworks(unet, hypernetwork)
    (record,) = caplog.records
    assert "hypernetwork 'half-fit'" in record.getMessage() and "width 320, 768" in record.getMessage()
    assert "the ones for 32, 64 apply" in record.getMessage()
    assert installed_hypernetworks(unet) == [(hypernetwork, 1.0)]
    with torch.no_grad():  # the matching modules apply, the others are left out
        torch.testing.assert_close(forward(unet, latents, context), expected, **TOLERANCE)
    caplog.clear()
    with caplog.at_level("WARNING", logger="nai_fast.hypernetworks.processors"):
        apply_hypernetworks(unet, random_hypernetwork(0))  # every width used: no warning
    assert not caplog.records


# -- what it computes ------------------------------------------------------------


@pytest.mark.parametrize("grad", [False, True], ids=["inference", "grad"])
@pytest.mark.parametrize(
    "setup",
    ["no hypernetwork", "strength 0", "strength 0 per call"],
)
def test_equals_stock_diffusers_when_nothing_applies(unet, latents, context, setup, grad):
    with torch.set_grad_enabled(grad):
        stock = forward(unet, latents, context)
    hypernetwork, call_kwargs = random_hypernetwork(0), {}
    if setup == "no hypernetwork":
        apply_hypernetworks(unet, [])
    elif setup == "strength 0":
        apply_hypernetworks(unet, hypernetwork, strengths=0.0)
    else:
        apply_hypernetworks(unet, hypernetwork)
        call_kwargs = {"cross_attention_kwargs": {STRENGTH_KWARG: 0.0}}
    with torch.set_grad_enabled(grad):
        for _ in range(2):  # at inference, the second forward reuses what the first cached
            torch.testing.assert_close(forward(unet, latents, context, **call_kwargs), stock, **EXACT)


@pytest.mark.parametrize("grad", [False, True], ids=["inference", "grad"])
@pytest.mark.parametrize("architecture", ARCHITECTURES.values(), ids=ARCHITECTURES.keys())
def test_matches_the_definition(unet, latents, context, architecture, grad):
    hypernetwork = random_hypernetwork(3, **architecture)
    expected = defined_output(unet, latents, context, [hypernetwork], [0.7], grad)
    assert not torch.allclose(expected, defined_output(unet, latents, context, [], [])), "the hypernetwork matters"
    apply_hypernetworks(unet, hypernetwork, strengths=0.7)
    with torch.set_grad_enabled(grad):
        for _ in range(2):
            torch.testing.assert_close(forward(unet, latents, context), expected, **TOLERANCE)


def test_a_width_the_hypernetwork_lacks_leaves_those_layers_alone(unet, latents, context):
    hypernetwork = random_hypernetwork(4, widths=(32, CROSS_WIDTH), activation="relu")
    expected = defined_output(unet, latents, context, [hypernetwork], [1.0])
    apply_hypernetworks(unet, hypernetwork)
    with torch.no_grad():
        torch.testing.assert_close(forward(unet, latents, context), expected, **TOLERANCE)


@pytest.mark.parametrize("grad", [False, True], ids=["inference", "grad"])
@pytest.mark.parametrize("kinds", [("relu", "linear"), ("linear", "linear")], ids=["relu then linear", "two linear"])
def test_several_hypernetworks_compose_in_order_with_their_own_strengths(unet, latents, context, kinds, grad):
    first = random_hypernetwork(5, activation=kinds[0])
    second = random_hypernetwork(6, activation=kinds[1])
    strengths = (0.6, 1.3)
    expected = defined_output(unet, latents, context, [first, second], strengths, grad)
    swapped = defined_output(unet, latents, context, [second, first], strengths[::-1], grad)
    apply_hypernetworks(unet, [first, second], strengths=strengths)
    with torch.set_grad_enabled(grad):
        output = forward(unet, latents, context)
    torch.testing.assert_close(output, expected, **TOLERANCE)
    assert not torch.allclose(output, swapped, **TOLERANCE), "the order matters"


def test_strength_per_call_through_cross_attention_kwargs(unet, latents, context):
    first, second = random_hypernetwork(7, activation="relu"), random_hypernetwork(8)
    expected = {
        strengths: defined_output(unet, latents, context, [first, second], strengths)
        for strengths in [(1.0, 2.0), (0.3, 0.8), (0.5, 0.5)]
    }
    apply_hypernetworks(unet, [first, second], strengths=(1.0, 2.0))
    with torch.no_grad():
        calls = [(None, (1.0, 2.0)), ([0.3, 0.8], (0.3, 0.8)), (0.5, (0.5, 0.5)), (None, (1.0, 2.0))]
        for requested, strengths in calls:
            kwargs = {} if requested is None else {"cross_attention_kwargs": {STRENGTH_KWARG: requested}}
            torch.testing.assert_close(forward(unet, latents, context, **kwargs), expected[strengths], **TOLERANCE)


# -- work done once --------------------------------------------------------------


def test_cross_attention_modules_run_once_per_forward_also_in_training(unet, latents, context):
    hypernetwork = random_hypernetwork(9, activation="relu").train()
    calls = ModuleCalls(hypernetwork)
    apply_hypernetworks(unet, hypernetwork)
    for forwards in (1, 2):
        forward(unet, latents, context)
        assert calls[CROSS_WIDTH] == forwards, "one call for all cross-attention layers, none reused across forwards"
        for width, layers in self_attention_layers_per_width(unet).items():
            assert calls[width] == forwards * layers


@pytest.mark.parametrize("context_each_step", ["same tensor", "new tensor, same values"])
def test_cross_attention_key_values_computed_once_per_generation(unet, latents, context, context_each_step):
    hypernetwork = random_hypernetwork(10, activation="relu")
    expected = defined_output(unet, latents, context, [hypernetwork], [1.0])
    calls = ModuleCalls(hypernetwork)
    apply_hypernetworks(unet, hypernetwork)
    negative, positive = context.split(1)
    with torch.no_grad():
        for step in range(1, 4):
            step_context = context if context_each_step == "same tensor" else torch.cat([negative, positive])
            torch.testing.assert_close(forward(unet, latents, step_context), expected, **TOLERANCE)
            assert calls[CROSS_WIDTH] == 1
            assert calls[SELF_WIDTHS[0]] == step * self_attention_layers_per_width(unet)[SELF_WIDTHS[0]]


def _new_values(unet, hypernetwork, context):
    return context + 1, {}


def _in_place(unet, hypernetwork, context):
    return context.mul_(-1), {}


def _weights(unet, hypernetwork, context):
    with torch.no_grad():
        hypernetwork.modules_for(CROSS_WIDTH)[1].net[0].weight.mul_(2)
    return context, {}


def _strength(unet, hypernetwork, context):
    return context, {"cross_attention_kwargs": {STRENGTH_KWARG: 0.4}}


def _apply_again(unet, hypernetwork, context):
    apply_hypernetworks(unet, hypernetwork)
    return context, {}


def _clone(unet, hypernetwork, context):
    return context.clone(), {}


@pytest.mark.parametrize(
    ("change", "recomputes"),
    [
        (_new_values, True),
        (_in_place, True),
        (_weights, True),
        (_strength, True),
        (_apply_again, True),
        (_clone, False),
    ],
    ids=["new context values", "context changed in place", "hypernetwork weights", "strength", "apply again", "clone"],
)
def test_cached_key_values_are_invalidated(unet, latents, context, change, recomputes):
    hypernetwork = random_hypernetwork(11, activation="relu")
    calls = ModuleCalls(hypernetwork)
    apply_hypernetworks(unet, hypernetwork)
    with torch.no_grad():
        forward(unet, latents, context)
        context, kwargs = change(unet, hypernetwork, context)
        output = forward(unet, latents, context, **kwargs)
    assert calls[CROSS_WIDTH] == (2 if recomputes else 1)
    strength = kwargs.get("cross_attention_kwargs", {}).get(STRENGTH_KWARG, 1.0)
    remove_hypernetworks(unet)
    torch.testing.assert_close(output, defined_output(unet, latents, context, [hypernetwork], [strength]), **TOLERANCE)


@pytest.mark.parametrize("mode", ["grad enabled", "hypernetwork in train mode (dropout on)"])
def test_nothing_is_reused_across_forwards_while_training(unet, latents, context, mode):
    hypernetwork = random_hypernetwork(12, dropout_structure=(0, 0.3, 0))  # affine, so foldable in eval mode
    calls = ModuleCalls(hypernetwork)
    apply_hypernetworks(unet, hypernetwork)
    hypernetwork.train(mode != "grad enabled")
    with torch.set_grad_enabled(mode == "grad enabled"):
        outputs = [forward(unet, latents, context) for _ in range(2)]
    assert calls[CROSS_WIDTH] == 2
    assert calls[SELF_WIDTHS[0]] == 2 * self_attention_layers_per_width(unet)[SELF_WIDTHS[0]], "not folded"
    if mode != "grad enabled":
        assert not torch.equal(outputs[0], outputs[1]), "dropout draws anew at every forward"


# -- folding ---------------------------------------------------------------------


@pytest.mark.parametrize("count", [1, 2], ids=["one", "two composed"])
def test_affine_hypernetworks_fold_into_self_attention_projections(unet, latents, context, count):
    hypernetworks = [random_hypernetwork(13 + seed, dropout_structure=(0, 0.3, 0)) for seed in range(count)]
    strengths = [0.6, 1.3][:count]
    expected = defined_output(unet, latents, context, hypernetworks, strengths)
    calls = ModuleCalls(*hypernetworks)
    apply_hypernetworks(unet, hypernetworks, strengths=strengths)
    with torch.no_grad():
        torch.testing.assert_close(forward(unet, latents, context), expected, **TOLERANCE)
    assert all(calls[width] == 0 for width in SELF_WIDTHS), "folded: self-attention never runs the modules"
    assert calls[CROSS_WIDTH] == count, "cross-attention runs each module once"


def test_folding_follows_strengths_and_never_writes_the_unet_weights(unet, latents, context):
    hypernetwork = random_hypernetwork(14)
    weights = {name: tensor.clone() for name, tensor in unet.state_dict().items()}
    expected = {s: defined_output(unet, latents, context, [hypernetwork], [s]) for s in (1.0, 0.4, -0.5)}
    apply_hypernetworks(unet, hypernetwork)
    with torch.no_grad():
        for strength in (1.0, 0.4, -0.5, 1.0):
            kwargs = {"cross_attention_kwargs": {STRENGTH_KWARG: strength}}
            torch.testing.assert_close(forward(unet, latents, context, **kwargs), expected[strength], **TOLERANCE)
    remove_hypernetworks(unet)
    assert all(torch.equal(tensor, weights[name]) for name, tensor in unet.state_dict().items())
    with torch.no_grad():
        stock = forward(unet, latents, context)
    torch.testing.assert_close(stock, defined_output(unet, latents, context, [], []), **EXACT)


def test_folding_keeps_a_projection_bias(unet, latents, context):
    hypernetwork = random_hypernetwork(15)
    attn = next(attn for attn in attention_layers(unet) if not attn.is_cross_attention)
    originals = attn.to_k, attn.to_v
    try:
        for name, original in zip(("to_k", "to_v"), originals):
            biased = nn.Linear(original.in_features, original.out_features).requires_grad_(False)
            biased.weight.copy_(original.weight)
            setattr(attn, name, biased)
        expected = defined_output(unet, latents, context, [hypernetwork], [0.8])
        apply_hypernetworks(unet, hypernetwork, strengths=0.8)
        with torch.no_grad():
            torch.testing.assert_close(forward(unet, latents, context), expected, **TOLERANCE)
    finally:
        attn.to_k, attn.to_v = originals


def test_a_changed_projection_weight_refolds(unet, latents, context):
    hypernetwork = random_hypernetwork(16)
    attn = next(attn for attn in attention_layers(unet) if not attn.is_cross_attention)
    apply_hypernetworks(unet, hypernetwork)
    with torch.no_grad():
        forward(unet, latents, context)
        attn.to_k.weight.mul_(1.5)  # e.g. a LoRA fused in place
        try:
            output = forward(unet, latents, context)
            remove_hypernetworks(unet)
            expected = defined_output(unet, latents, context, [hypernetwork], [1.0])
            torch.testing.assert_close(output, expected, **TOLERANCE)
        finally:
            attn.to_k.weight.div_(1.5)


def test_half_precision_unet_with_float32_hypernetwork(unet, latents, context):
    hypernetworks = [random_hypernetwork(17), random_hypernetwork(18, activation="relu")]
    expected = defined_output(unet, latents, context, hypernetworks, [1.0, 1.0])
    half = copy.deepcopy(unet).to(torch.bfloat16)
    apply_hypernetworks(half, hypernetworks)
    with torch.no_grad():
        output = forward(half, latents.bfloat16(), context.bfloat16())
    assert output.dtype == torch.bfloat16
    torch.testing.assert_close(output.float(), expected, rtol=0.1, atol=0.1 * expected.abs().max().item())


# -- training --------------------------------------------------------------------


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient checkpointing"])
def test_training_gradients_match_the_definition(unet, latents, context, checkpointing):
    hypernetwork = random_hypernetwork(19, activation="relu", layer_norm=True).train().requires_grad_(True)
    if checkpointing:
        unet.enable_gradient_checkpointing()

    def gradients() -> dict[str, torch.Tensor]:
        hypernetwork.zero_grad()
        forward(unet, latents, context).square().mean().backward()
        return {name: parameter.grad.clone() for name, parameter in hypernetwork.named_parameters()}

    with defined_hypernetworks(unet, [hypernetwork], [0.9]):
        expected = gradients()
    apply_hypernetworks(unet, hypernetwork, strengths=0.9)
    actual = gradients()
    assert all(gradient.abs().sum() > 0 for gradient in actual.values()), "every module learns"
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-4, atol=1e-7)
    assert not any(parameter.requires_grad for parameter in unet.parameters()), "the U-Net stays frozen"


@pytest.mark.parametrize("penalty_weights", [{32: 1.0}, {48: 2.0, 64: 0.5}], ids=["width 32", "widths 48 and 64"])
def test_penalty_gradient_reaches_only_the_penalised_widths(unet, latents, context, penalty_weights):
    hypernetwork = random_hypernetwork(20, activation="relu").train().requires_grad_(True)
    apply_hypernetworks(unet, hypernetwork, penalty_weights=penalty_weights)
    forward(unet, latents, context)
    first = hypernetwork_penalty(unet)
    forward(unet, latents, context)
    penalty = hypernetwork_penalty(unet)
    torch.testing.assert_close(penalty, first, msg="each forward starts the penalty anew")
    penalty.backward()
    for width in ALL_WIDTHS:
        gradients = [parameter.grad for module in hypernetwork.modules_for(width) for parameter in module.parameters()]
        if width in penalty_weights:
            assert all(gradient is not None and gradient.abs().sum() > 0 for gradient in gradients)
        else:
            assert all(gradient is None or not gradient.any() for gradient in gradients)
    with torch.no_grad():
        forward(unet, latents, context)
    assert hypernetwork_penalty(unet).item() == 0, "a training quantity: zero without gradients"


def test_penalty_defaults_to_the_shallowest_sd1_width(unet, latents, context):
    apply_hypernetworks(unet, random_hypernetwork(21))
    forward(unet, latents, context)
    assert hypernetwork_penalty(unet).item() == 0, "the tiny U-Net has no width 320"


# -- the real SD 1.x layout ------------------------------------------------------


def test_sd1_unet_layers_get_the_modules_of_their_width():
    """The real SD 1.x U-Net (on the meta device: shapes only, no arithmetic, so it costs no
    memory or time), 8x8 latents, batch 1: which module pair serves which layer."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD1_UNET)
        hypernetwork = Hypernetwork(widths=(320, 640, 768, 1280), activation="relu")
    layers = attention_layers(unet)
    widths = Counter((attn.is_cross_attention, attn.to_k.in_features) for attn in layers)
    assert widths == {(False, 320): 5, (False, 640): 5, (False, 1280): 6, (True, 768): 16}
    calls = ModuleCalls(hypernetwork)
    apply_hypernetworks(unet, hypernetwork)
    assert len(unet.attn_processors) == 32
    with torch.device("meta"), torch.no_grad():
        output = forward(unet, torch.empty(1, 4, 8, 8), torch.empty(1, 77, 768))
    assert output.shape == (1, 4, 8, 8)
    assert {width: calls[width] for width in hypernetwork.widths} == {320: 5, 640: 5, 768: 1, 1280: 6}
