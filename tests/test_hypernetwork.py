"""Hypernetworks (nai_fast.hypernetworks.modules and .files): module math, the web UI's layer
layout, weight init, affine maps, and loading/saving every file format, including hand-built web UI and
NovelAI files, refused pickles and malformed files."""

import json
import os
import pickle

import pytest
import safetensors
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn

from nai_fast.hypernetworks.modules import (
    ACTIVATIONS,
    Architecture,
    Hypernetwork,
    HypernetworkFileError,
    HypernetworkModule,
)
from nai_fast.hypernetworks.files import dropout_structure_from_flags

WIDTHS = (8, 16)
# The metadata keys the web UI writes (and reads) besides the int width keys.
WEB_UI_METADATA_KEYS = {
    "name", "step", "layer_structure", "activation_func", "is_layer_norm", "weight_initialization",
    "use_dropout", "dropout_structure", "last_layer_dropout", "activate_output",
    "sd_checkpoint", "sd_checkpoint_name", "optional_info",
}  # fmt: skip


def random_hypernetwork(**options) -> Hypernetwork:
    """A hypernetwork with weights far from the near-identity init, so file bugs show up."""
    torch.manual_seed(0)
    hypernetwork = Hypernetwork(widths=options.pop("widths", WIDTHS), **options)
    with torch.no_grad():
        for parameter in hypernetwork.parameters():
            parameter.normal_(0, 0.5)
    return hypernetwork


def layer_kinds(module: HypernetworkModule) -> list[str]:
    return [type(layer).__name__ for layer in module.net]


def web_ui_state(layout: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    """A plain dict of random tensors with the given key -> shape layout."""
    generator = torch.Generator().manual_seed(seed)
    return {key: torch.randn(*shape, generator=generator) for key, shape in layout.items()}


def assert_same_outputs(first: Hypernetwork, second: Hypernetwork) -> None:
    for width in first.widths:
        context = torch.randn(2, 5, width)
        for a, b in zip(first(context, strength=0.7), second(context, strength=0.7)):
            assert torch.equal(a, b)


# Module math and layout


def test_module_is_residual_and_scales_with_strength():
    module = random_hypernetwork(activation="relu", layer_norm=True).modules_for(16)[0]
    x = torch.randn(3, 7, 16)
    for strength in (0.5, 1.0, 2.0):
        torch.testing.assert_close(module(x, strength), x + strength * module.net(x))
    assert torch.equal(module(x, strength=0.0), x)


def test_defaults_are_novelai_s_sd1_hypernetwork():
    hypernetwork = Hypernetwork()
    assert hypernetwork.widths == (320, 640, 768, 1280) and hypernetwork.architecture == Architecture()
    assert layer_kinds(hypernetwork.modules_for(768)[0]) == ["Linear", "Linear"]
    assert hypernetwork.modules_for(768)[0].net[0].out_features == 1536
    assert hypernetwork.is_affine and not hypernetwork.training


def test_hypernetwork_applies_its_pair_and_passes_other_widths_through():
    hypernetwork = random_hypernetwork()
    context = torch.randn(2, 4, 16)
    k_module, v_module = hypernetwork.modules_for(16)
    k_context, v_context = hypernetwork(context, strength=0.5)
    assert torch.equal(k_context, k_module(context, 0.5)) and torch.equal(v_context, v_module(context, 0.5))
    assert not torch.equal(k_context, v_context)
    other = torch.randn(2, 4, 12)
    assert hypernetwork.modules_for(12) is None
    assert all(result is other for result in hypernetwork(other))
    assert hypernetwork.widths == WIDTHS


# (architecture options, expected layers, expected state-dict indices): the web UI's rules.
LAYOUTS = [
    pytest.param({}, ["Linear", "Linear"], [0, 1], id="linear"),
    pytest.param({"activation": "relu"}, ["Linear", "ReLU", "Linear"], [0, 2], id="relu-not-after-last"),
    pytest.param(
        {"activation": "relu", "activate_output": True}, ["Linear", "ReLU", "Linear", "ReLU"], [0, 2], id="relu-output"
    ),
    pytest.param({"activate_output": True}, ["Linear", "Linear"], [0, 1], id="linear-output-adds-nothing"),
    pytest.param(
        {"activation": "tanh", "layer_norm": True},
        ["Linear", "Tanh", "LayerNorm", "Linear", "LayerNorm"],
        [0, 2, 3, 4],
        id="layernorm-after-activation-and-last",
    ),
    pytest.param(
        {"layer_structure": (1, 2, 2, 1), "activation": "swish", "layer_norm": True,
         "dropout_structure": (0, 0.3, 0.1, 0)},
        ["Linear", "Hardswish", "LayerNorm", "Dropout", "Linear", "Hardswish", "LayerNorm", "Dropout",
         "Linear", "LayerNorm"],
        [0, 2, 4, 6, 8, 9],
        id="dropout-after-layernorm",
    ),
    pytest.param(
        {"layer_structure": (1, 2, 2, 1), "dropout_structure": (0.5, 0.3, 0, 0)},
        ["Linear", "Dropout", "Linear", "Linear"],
        [0, 2, 3],
        id="first-dropout-entry-unused",
    ),
    pytest.param({"layer_structure": (1, 1), "activation": "relu"}, ["Linear"], [0], id="single-linear"),
    pytest.param({"activation": "prelu"}, ["Linear", "PReLU", "Linear"], [0, 1, 2], id="prelu-has-a-weight"),
]


@pytest.mark.parametrize(("options", "kinds", "indices"), LAYOUTS)
def test_layers_follow_the_web_ui_layout(options, kinds, indices):
    module = Hypernetwork(widths=(8,), **options).modules_for(8)[0]
    assert layer_kinds(module) == kinds
    expected_keys = [f"net.{i}.{param}" for i in indices for param in ("weight", "bias")]
    if options.get("activation") == "prelu":
        expected_keys.remove("net.1.bias")
    assert list(module.state_dict()) == expected_keys


def test_layer_widths_follow_layer_structure():
    module = Hypernetwork(widths=(8,), layer_structure=(1, 1.5, 0.5, 1)).modules_for(8)[0]
    assert [(layer.in_features, layer.out_features) for layer in module.net] == [(8, 12), (12, 4), (4, 8)]


@pytest.mark.filterwarnings("ignore:Implicit dimension choice")
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_every_activation_builds_and_runs(activation):
    module = HypernetworkModule(8, Architecture(activation=activation))
    assert layer_kinds(module) == ["Linear", ACTIVATIONS[activation].__name__, "Linear"]
    output = module(torch.randn(2, 3, 8))
    assert output.shape == (2, 3, 8) and torch.isfinite(output).all()


def test_swish_is_hardswish_as_in_the_web_ui():
    assert ACTIVATIONS["swish"] is nn.Hardswish and ACTIVATIONS["gelu"] is nn.GELU and ACTIVATIONS["mish"] is nn.Mish


@pytest.mark.parametrize(
    ("depth", "use_dropout", "last_layer_dropout", "expected"),
    [
        (3, False, True, (0, 0, 0)),
        (3, True, False, (0, 0, 0)),
        (3, True, True, (0, 0.3, 0)),
        (4, True, False, (0, 0.3, 0, 0)),
        (4, True, True, (0, 0.3, 0.3, 0)),
        (5, True, False, (0, 0.3, 0.3, 0, 0)),
        (2, True, True, (0, 0.3)),
    ],
)
def test_dropout_structure_from_old_flags(depth, use_dropout, last_layer_dropout, expected):
    assert dropout_structure_from_flags(depth, use_dropout, last_layer_dropout) == expected


def test_dropout_only_in_training():
    hypernetwork = random_hypernetwork(dropout_structure=(0, 0.5, 0))
    module = hypernetwork.modules_for(16)[0]
    x = torch.randn(4, 16)
    assert not hypernetwork.training  # eval by default, like the web UI
    assert torch.equal(module(x), module(x))
    hypernetwork.train()
    torch.manual_seed(1)
    assert not torch.equal(module(x), module(x))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"layer_structure": (2, 1)}, "start and end with 1"),
        ({"layer_structure": (1, 2)}, "start and end with 1"),
        ({"layer_structure": (1,)}, "at least two"),
        ({"layer_structure": (1, -2, 1)}, "positive"),
        ({"activation": "swishy"}, "unknown activation 'swishy'"),
        ({"activation": "glu"}, "unknown activation 'glu'"),
        ({"dropout_structure": (0, 1.0, 0)}, r"probabilities in \[0, 1\)"),
        ({"dropout_structure": (0, 0.3)}, "3 probabilities"),
        ({"weight_init": "Zeros"}, "unknown weight_init 'Zeros'"),
        ({"widths": (0,)}, "positive integers"),
        ({"widths": ()}, "one or more"),
    ],
)
def test_invalid_options_are_rejected(options, message):
    with pytest.raises(ValueError, match=message):
        Hypernetwork(**{"widths": (8,), **options})


# Weight init


def test_normal_init_matches_the_web_ui():
    module = Hypernetwork(widths=(256,), layer_norm=True).modules_for(256)[0]
    for layer in module.net:  # Linears and LayerNorms alike: N(0, 0.01) weights, zero biases
        assert abs(layer.weight.std().item() - 0.01) < 0.0005 and abs(layer.weight.mean().item()) < 0.0005
        assert torch.count_nonzero(layer.bias) == 0


@pytest.mark.parametrize(
    ("weight_init", "expected_std"),
    [
        ("XavierUniform", lambda fan_in, fan_out: (2 / (fan_in + fan_out)) ** 0.5),
        ("XavierNormal", lambda fan_in, fan_out: (2 / (fan_in + fan_out)) ** 0.5),
        ("KaimingUniform", lambda fan_in, fan_out: (2 / fan_in) ** 0.5),
        ("KaimingNormal", lambda fan_in, fan_out: (2 / fan_in) ** 0.5),
    ],
)
def test_other_inits_have_their_documented_spread(weight_init, expected_std):
    torch.manual_seed(0)
    module = Hypernetwork(widths=(256,), weight_init=weight_init, activation="leakyrelu").modules_for(256)[0]
    for layer in module.net:
        if isinstance(layer, nn.Linear):
            expected = expected_std(layer.in_features, layer.out_features)
            assert layer.weight.std().item() == pytest.approx(expected, rel=0.03)
            assert torch.count_nonzero(layer.bias) == 0


# Affine maps


def test_affine_map_reproduces_net_and_folds_into_a_projection():
    hypernetwork = random_hypernetwork(layer_structure=(1, 2, 1.5, 1), dropout_structure=(0, 0.2, 0.1, 0)).double()
    assert hypernetwork.is_affine  # Dropout is off in eval mode
    module = hypernetwork.modules_for(16)[1]
    matrix, bias = hypernetwork.affine_maps()[16][1]
    x = torch.randn(5, 16, dtype=torch.float64)
    torch.testing.assert_close(x @ matrix.T + bias, module.net(x), rtol=1e-12, atol=1e-12)
    to_v, strength = torch.randn(24, 16, dtype=torch.float64), 0.6
    folded = to_v @ (torch.eye(16, dtype=torch.float64) + strength * matrix)
    torch.testing.assert_close(x @ folded.T + strength * to_v @ bias, module(x, strength) @ to_v.T)


def test_affine_map_refuses_non_affine_modules():
    assert not random_hypernetwork(activation="relu").is_affine
    with pytest.raises(ValueError, match="not an affine map: it has ReLU"):
        random_hypernetwork(activation="relu").affine_maps()
    with pytest.raises(ValueError, match="it has LayerNorm, LayerNorm"):
        random_hypernetwork(layer_norm=True).modules_for(8)[0].affine_map()
    training = random_hypernetwork(dropout_structure=(0, 0.3, 0)).train()
    assert not training.is_affine
    with pytest.raises(ValueError, match="it has Dropout in training mode"):
        training.affine_maps()
    # An activation that only the last Linear would get, without activate_output, leaves no layer.
    assert random_hypernetwork(activation="tanh", layer_structure=(1, 1)).is_affine


# Files: round trips and layouts

ARCHITECTURES = [
    pytest.param({}, id="novelai-like"),
    pytest.param({"activation": "relu", "layer_norm": True}, id="relu-layernorm"),
    pytest.param(
        {"layer_structure": (1, 2, 2, 1), "activation": "mish", "dropout_structure": (0, 0.3, 0.2, 0),
         "activate_output": True},
        id="deep-dropout-activated-output",
    ),
    pytest.param(
        {"layer_structure": (1.0, 1.5, 1.0), "activation": "prelu", "weight_init": "XavierNormal"}, id="prelu-floats"
    ),
]


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
@pytest.mark.parametrize("options", ARCHITECTURES)
def test_round_trip(tmp_path, options, suffix):
    hypernetwork = random_hypernetwork(**options)
    hypernetwork.name, hypernetwork.step = "anime", 1234
    hypernetwork.sd_checkpoint, hypernetwork.sd_checkpoint_name = "925997e9", "animefull-final-pruned"
    path = tmp_path / f"saved{suffix}"
    hypernetwork.save(path)
    loaded = Hypernetwork.load(path)
    assert loaded.architecture == hypernetwork.architecture and loaded.widths == hypernetwork.widths
    assert (loaded.name, loaded.step, loaded.weight_init) == ("anime", 1234, hypernetwork.weight_init)
    assert (loaded.sd_checkpoint, loaded.sd_checkpoint_name) == ("925997e9", "animefull-final-pruned")
    assert not loaded.training
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in loaded.parameters())
    assert_same_outputs(hypernetwork, loaded)


class WebUIModule(nn.Module):
    """The web UI's HypernetworkModule as it builds [1, 2, 1], relu, layer norm, dropout [0, 0.3, 0]
    at width 16: the Sequential is called ``linear``."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Sequential(
            nn.Linear(16, 32), nn.ReLU(), nn.LayerNorm(32), nn.Dropout(0.3), nn.Linear(32, 16), nn.LayerNorm(16)
        )

    def forward(self, x):
        return x + self.linear(x)


def test_saved_pt_is_in_the_web_ui_layout(tmp_path):
    hypernetwork = random_hypernetwork(activation="relu", layer_norm=True, dropout_structure=(0, 0.3, 0))
    hypernetwork.save(tmp_path / "my hypernet.pt")
    checkpoint = torch.load(tmp_path / "my hypernet.pt", weights_only=True)
    assert {key for key in checkpoint if isinstance(key, str)} == WEB_UI_METADATA_KEYS
    assert sorted(key for key in checkpoint if isinstance(key, int)) == list(WIDTHS)
    pair = checkpoint[16]
    assert type(pair) is tuple and len(pair) == 2
    # Linear, ReLU, LayerNorm, Dropout, Linear, LayerNorm
    keys = ["linear.0.weight", "linear.0.bias", "linear.2.weight", "linear.2.bias", "linear.4.weight", "linear.4.bias",
            "linear.5.weight", "linear.5.bias"]  # fmt: skip
    assert list(pair[0]) == keys and list(pair[1]) == keys
    web_ui_module = WebUIModule().eval()
    web_ui_module.load_state_dict(pair[1])  # strict, as the web UI loads
    x = torch.randn(3, 16)
    torch.testing.assert_close(web_ui_module(x), hypernetwork.modules_for(16)[1](x))
    assert checkpoint["name"] == "my hypernet"  # an unnamed network takes the file's name
    assert checkpoint["layer_structure"] == [1, 2, 1] and checkpoint["activation_func"] == "relu"
    assert checkpoint["is_layer_norm"] is True and checkpoint["activate_output"] is False
    assert checkpoint["dropout_structure"] == [0, 0.3, 0]
    assert checkpoint["use_dropout"] is True and checkpoint["last_layer_dropout"] is True


def test_saved_safetensors_layout(tmp_path):
    hypernetwork = random_hypernetwork(activation="relu")
    hypernetwork.save(tmp_path / "net.safetensors")
    with safetensors.safe_open(tmp_path / "net.safetensors", framework="pt") as file:
        names, metadata = set(file.keys()), file.metadata()
    assert names == {
        f"{width}.{role}.net.{index}.{param}"
        for width in WIDTHS
        for role in "kv"
        for index in (0, 2)
        for param in ("weight", "bias")
    }
    assert set(metadata) == WEB_UI_METADATA_KEYS
    assert json.loads(metadata["layer_structure"]) == [1, 2, 1] and json.loads(metadata["activation_func"]) == "relu"


def test_save_needs_a_known_suffix(tmp_path):
    with pytest.raises(ValueError, match=r"\.pt or \.safetensors"):
        random_hypernetwork().save(tmp_path / "net.ckpt")


# Files: hand-built web UI and NovelAI files

RELU_LAYERNORM_8 = {  # [1, 2, 1], relu, layer norm, width 8: Linear, ReLU, LayerNorm, Linear, LayerNorm
    "linear.0.weight": (16, 8), "linear.0.bias": (16,), "linear.2.weight": (16,), "linear.2.bias": (16,),
    "linear.3.weight": (8, 16), "linear.3.bias": (8,), "linear.4.weight": (8,), "linear.4.bias": (8,),
}  # fmt: skip


@pytest.mark.parametrize("pair_type", [tuple, list])
def test_hand_built_web_ui_file(tmp_path, pair_type):
    k_state, v_state = web_ui_state(RELU_LAYERNORM_8, seed=1), web_ui_state(RELU_LAYERNORM_8, seed=2)
    checkpoint = {
        8: pair_type([k_state, v_state]),
        "step": 77, "name": "hand built", "layer_structure": [1, 2, 1], "activation_func": "relu",
        "is_layer_norm": True, "weight_initialization": "Normal", "use_dropout": False,
        "dropout_structure": [0, 0, 0], "last_layer_dropout": False, "activate_output": False,
        "sd_checkpoint": None, "sd_checkpoint_name": None, "optional_info": None,
    }  # fmt: skip
    torch.save(checkpoint, tmp_path / "hand.pt")
    hypernetwork = Hypernetwork.load(tmp_path / "hand.pt")
    assert (hypernetwork.name, hypernetwork.step, hypernetwork.widths) == ("hand built", 77, (8,))
    k_module, v_module = hypernetwork.modules_for(8)
    for module, state in ((k_module, k_state), (v_module, v_state)):
        loaded = {key.replace("net.", "linear.", 1): tensor for key, tensor in module.state_dict().items()}
        assert loaded.keys() == state.keys() and all(torch.equal(loaded[key], state[key]) for key in state)
    x = torch.randn(3, 8)
    s = v_state
    hidden = F.relu(x @ s["linear.0.weight"].T + s["linear.0.bias"])
    hidden = F.layer_norm(hidden, (16,), s["linear.2.weight"], s["linear.2.bias"])
    out = hidden @ s["linear.3.weight"].T + s["linear.3.bias"]
    out = F.layer_norm(out, (8,), s["linear.4.weight"], s["linear.4.bias"])
    torch.testing.assert_close(v_module(x, 0.5), x + 0.5 * out)


def test_old_web_ui_file_without_activate_output_activates_the_output(tmp_path):
    # Older files with an activation lack activate_output; the web UI then reads it as True.
    layout = {"linear.0.weight": (16, 8), "linear.0.bias": (16,), "linear.2.weight": (8, 16), "linear.2.bias": (8,)}
    state = web_ui_state(layout, seed=3)
    torch.save({8: (state, state), "layer_structure": [1, 2, 1], "activation_func": "elu"}, tmp_path / "old.pt")
    hypernetwork = Hypernetwork.load(tmp_path / "old.pt")
    assert hypernetwork.architecture.activate_output
    assert layer_kinds(hypernetwork.modules_for(8)[0]) == ["Linear", "ELU", "Linear", "ELU"]
    assert hypernetwork.name == "old" and hypernetwork.step == 0  # name from the file, step 0


def test_web_ui_saved_state_dicts_load(tmp_path):
    # The web UI saves its modules' own state_dict()s: OrderedDicts carrying _metadata.
    torch.manual_seed(2)
    k_module, v_module = WebUIModule(), WebUIModule()
    checkpoint = {
        16: (k_module.state_dict(), v_module.state_dict()),
        "layer_structure": [1.0, 2.0, 1.0], "activation_func": "relu", "is_layer_norm": True,
        "use_dropout": True, "dropout_structure": [0.0, 0.3, 0.0], "activate_output": False,
    }  # fmt: skip
    torch.save(checkpoint, tmp_path / "webui.pt")
    loaded = Hypernetwork.load(tmp_path / "webui.pt").modules_for(16)
    x = torch.randn(3, 16)
    for web_ui_module, module in zip((k_module.eval(), v_module.eval()), loaded):
        torch.testing.assert_close(module(x), web_ui_module(x))


def test_oldest_web_ui_file_with_no_metadata(tmp_path):
    layout = {"linear.0.weight": (32, 16), "linear.0.bias": (32,), "linear.1.weight": (16, 32), "linear.1.bias": (16,)}
    state = web_ui_state(layout, seed=4)
    torch.save({16: (state, state)}, tmp_path / "oldest.pt")
    hypernetwork = Hypernetwork.load(tmp_path / "oldest.pt")
    # The web UI's defaults: [1, 2, 1], linear, no layer norm, no dropout (activate_output, moot).
    assert hypernetwork.architecture == Architecture(activate_output=True)
    assert torch.equal(hypernetwork.modules_for(16)[1].net[1].weight, state["linear.1.weight"])


@pytest.mark.parametrize(
    ("last_layer_dropout", "indices", "dropout_structure", "kinds"),
    [
        (False, (0, 2, 3), (0, 0.3, 0, 0), ["Linear", "Dropout", "Linear", "Linear"]),
        (True, (0, 2, 4), (0, 0.3, 0.3, 0), ["Linear", "Dropout", "Linear", "Dropout", "Linear"]),
    ],
)
def test_old_web_ui_dropout_flags(tmp_path, last_layer_dropout, indices, dropout_structure, kinds):
    # Files from before dropout_structure say use_dropout (and maybe last_layer_dropout) only.
    shapes = [(16, 8), (16, 16), (8, 16)]  # the three Linears, at the indices the dropouts leave them
    layout = {}
    for index, (out_features, in_features) in zip(indices, shapes):
        layout |= {f"linear.{index}.weight": (out_features, in_features), f"linear.{index}.bias": (out_features,)}
    state = web_ui_state(layout, seed=5)
    checkpoint = {8: (state, state), "layer_structure": [1, 2, 2, 1], "use_dropout": True}
    if last_layer_dropout:
        checkpoint["last_layer_dropout"] = True
    torch.save(checkpoint, tmp_path / "dropout.pt")
    hypernetwork = Hypernetwork.load(tmp_path / "dropout.pt")
    assert hypernetwork.architecture.dropout_structure == dropout_structure
    assert layer_kinds(hypernetwork.modules_for(8)[0]) == kinds


def test_novelai_file(tmp_path):
    # NovelAI's originals: width -> (k, v) with linear1/linear2 (width -> 2 width -> width), nothing else.
    checkpoint, states = {}, {}
    for seed, width in enumerate((8, 16)):
        layout = {"linear1.weight": (2 * width, width), "linear1.bias": (2 * width,),
                  "linear2.weight": (width, 2 * width), "linear2.bias": (width,)}  # fmt: skip
        states[width] = (web_ui_state(layout, seed=10 + seed), web_ui_state(layout, seed=20 + seed))
        checkpoint[width] = states[width]
    torch.save(checkpoint, tmp_path / "aini.pt")
    hypernetwork = Hypernetwork.load(tmp_path / "aini.pt")
    assert hypernetwork.widths == (8, 16) and hypernetwork.is_affine and hypernetwork.name == "aini"
    for width in (8, 16):
        for module, state in zip(hypernetwork.modules_for(width), states[width]):
            x = torch.randn(4, width)
            hidden = x @ state["linear1.weight"].T + state["linear1.bias"]
            torch.testing.assert_close(module(x), x + hidden @ state["linear2.weight"].T + state["linear2.bias"])


def test_half_precision_file_loads_as_float32(tmp_path):
    state = {key: tensor.half() for key, tensor in web_ui_state(RELU_LAYERNORM_8, seed=6).items()}
    torch.save({8: (state, state), **RELU_LAYERNORM_METADATA}, tmp_path / "h.pt")
    module = Hypernetwork.load(tmp_path / "h.pt").modules_for(8)[0]
    assert module.net[0].weight.dtype == torch.float32
    assert torch.equal(module.net[0].weight, state["linear.0.weight"].float())


# Files: refused and malformed

PAYLOAD_RAN = []


def record_payload_ran():
    PAYLOAD_RAN.append(True)


class CodeCarrier:
    """Unpickling this calls a function: what a malicious checkpoint does."""

    def __init__(self, function, *args):
        self.call = (function, args)

    def __reduce__(self):
        return self.call


@pytest.mark.parametrize("legacy_format", [False, True])
def test_pickle_that_runs_code_is_refused_and_not_run(tmp_path, legacy_format):
    marker = tmp_path / "pwned"
    state = web_ui_state(RELU_LAYERNORM_8, seed=7)
    checkpoint = {
        8: (state, state),
        "name": CodeCarrier(record_payload_ran),
        "step": CodeCarrier(os.system, f"touch {marker}"),
    }
    torch.save(checkpoint, tmp_path / "evil.pt", _use_new_zipfile_serialization=not legacy_format)
    with pytest.raises(HypernetworkFileError, match="needs arbitrary code execution.*was not unpickled"):
        Hypernetwork.load(tmp_path / "evil.pt")
    assert not PAYLOAD_RAN and not marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize(
    ("protocol", "message"),
    [(2, "needs arbitrary code execution"), (pickle.HIGHEST_PROTOCOL, "refused by the weights-only unpickler")],
)
def test_raw_pickle_is_refused_and_not_run(tmp_path, protocol, message):
    with open(tmp_path / "evil.pt", "wb") as file:
        pickle.dump({8: CodeCarrier(record_payload_ran)}, file, protocol=protocol)
    with pytest.raises(HypernetworkFileError, match=message):
        Hypernetwork.load(tmp_path / "evil.pt")
    assert not PAYLOAD_RAN


def save_web_ui_file(tmp_path, checkpoint):
    path = tmp_path / "bad.pt"
    torch.save(checkpoint, path)
    return path


def good_pair(seed: int = 8):
    return web_ui_state(RELU_LAYERNORM_8, seed=seed), web_ui_state(RELU_LAYERNORM_8, seed=seed + 1)


RELU_LAYERNORM_METADATA = {"activation_func": "relu", "is_layer_norm": True, "activate_output": False}


def with_tensor(key: str, tensor: torch.Tensor):
    k_state, v_state = good_pair()
    v_state[key] = tensor
    return {8: (k_state, v_state), **RELU_LAYERNORM_METADATA}


@pytest.mark.parametrize(
    ("checkpoint", "message"),
    [
        pytest.param(
            lambda: {8: good_pair()[:1], **RELU_LAYERNORM_METADATA},
            r"width 8 must hold a pair \(k, v\) of state dicts, got a tuple of 1",
            id="half-pair",
        ),
        pytest.param(
            lambda: {8: good_pair()[0], **RELU_LAYERNORM_METADATA}, "width 8 must hold a pair", id="not-a-pair"
        ),
        pytest.param(lambda: dict(RELU_LAYERNORM_METADATA), "no hypernetwork layers", id="no-widths"),
        pytest.param(lambda: [good_pair()], "expected a dict", id="not-a-dict"),
        pytest.param(
            lambda: with_tensor("linear.3.weight", torch.zeros(8, 8)),
            r"width 8 v module: net\.3\.weight has shape \[8, 8\], "
            r"but layer_structure \[1, 2, 1\] at width 8 needs \[8, 16\]",
            id="wrong-shape",
        ),
        pytest.param(
            lambda: {8: good_pair(), "layer_structure": [1, 3, 1], **RELU_LAYERNORM_METADATA},
            r"net\.0\.weight has shape \[16, 8\], but layer_structure \[1, 3, 1\]",
            id="shapes-not-matching-layer-structure",
        ),
        pytest.param(
            lambda: {8: good_pair(), "activation_func": "relu", "activate_output": False},
            r"tensors do not match the declared architecture .*layer_norm False\): unexpected \['net\.3\.weight'",
            id="tensors-of-another-layout",
        ),
        pytest.param(
            lambda: with_tensor("linear.4.weight", torch.full((8,), float("inf"))), "NaN or infinite", id="inf"
        ),
        pytest.param(
            lambda: with_tensor("linear.4.weight", torch.ones(8, dtype=torch.long)), "not a floating-point", id="int"
        ),
        pytest.param(
            lambda: {8: good_pair(), **RELU_LAYERNORM_METADATA, "activation_func": "swishy"},
            "unknown activation 'swishy'",
            id="unknown-activation",
        ),
        pytest.param(
            lambda: {8: good_pair(), **RELU_LAYERNORM_METADATA, "layer_structure": [2, 1]},
            r"must start and end with 1, got \[2, 1\]",
            id="layer-structure-not-from-1",
        ),
        pytest.param(
            lambda: {8: good_pair(), **RELU_LAYERNORM_METADATA, "step": "many"},
            "metadata 'step' must be int",
            id="bad-step",
        ),
    ],
)
def test_malformed_web_ui_files_name_the_problem(tmp_path, checkpoint, message):
    path = save_web_ui_file(tmp_path, checkpoint())
    with pytest.raises(HypernetworkFileError, match=message) as raised:
        Hypernetwork.load(path)
    assert str(path) in str(raised.value)


def test_nan_weights_are_named(tmp_path):
    path = save_web_ui_file(tmp_path, with_tensor("linear.0.bias", torch.full((16,), float("nan"))))
    with pytest.raises(HypernetworkFileError, match=r"width 8 v module: net\.0\.bias contains NaN or infinite values"):
        Hypernetwork.load(path)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_truncated_files(tmp_path, suffix):
    path = tmp_path / f"net{suffix}"
    random_hypernetwork().save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(HypernetworkFileError, match="truncated"):
        Hypernetwork.load(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "the file is empty"),
        (bytes(range(7, 250, 3)) * 20, "corrupt"),
        (b"this is a text file, not a hypernetwork", "corrupt or not a checkpoint"),
        (b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}", "corrupt safetensors"),
    ],
)
def test_garbage_files(tmp_path, content, message):
    (tmp_path / "garbage.pt").write_bytes(content)
    with pytest.raises(HypernetworkFileError, match=message):
        Hypernetwork.load(tmp_path / "garbage.pt")


def test_safetensors_missing_half_of_a_pair(tmp_path):
    path = tmp_path / "net.safetensors"
    random_hypernetwork().save(path)
    kept = {name: tensor for name, tensor in safetensors.torch.load_file(path).items() if not name.startswith("16.v.")}
    safetensors.torch.save_file(kept, path)
    with pytest.raises(HypernetworkFileError, match="width 16 lacks its pair: it has a k module only"):
        Hypernetwork.load(path)


def test_safetensors_foreign_tensor_names(tmp_path):
    safetensors.torch.save_file({"lora_unet_down.weight": torch.zeros(4, 4)}, tmp_path / "lora.safetensors")
    with pytest.raises(HypernetworkFileError, match=r"'lora_unet_down\.weight' is not named \{width\}\.\{k\|v\}"):
        Hypernetwork.load(tmp_path / "lora.safetensors")


def test_safetensors_metadata_must_be_json(tmp_path):
    path = tmp_path / "net.safetensors"
    random_hypernetwork().save(path)
    safetensors.torch.save_file(safetensors.torch.load_file(path), path, metadata={"layer_structure": "[1, 2"})
    with pytest.raises(HypernetworkFileError, match="metadata is not JSON"):
        Hypernetwork.load(path)


def test_missing_file_is_not_a_format_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        Hypernetwork.load(tmp_path / "absent.pt")
