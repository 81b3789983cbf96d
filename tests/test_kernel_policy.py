"""Where NAI_FAST_KERNELS=auto takes the fused kernels on a GPU: the cost model's predictions,
and the measured tables that override them for the GPU classes they cover."""

import pytest
import torch

from nai_fast.kernels import measured
from nai_fast.kernels.cost import A100, H100_SXM, cross_attention_cost, hyper_kv_cost
from nai_fast.kernels.policy import (
    cross_attention_choice,
    cross_attention_pays,
    gpu_class_name,
    hyper_kv_choice,
    hyper_kv_pays,
    use_cross_attention,
    use_hyper_kv,
)
from nai_fast.kernels.shapes import attention_levels

LEVELS = {level.channels: level for level in attention_levels(512, 768)}  # 320, 640, 1280


def sd_hyper_kv(width, backward, gpu):
    level = LEVELS[width]
    return hyper_kv_pays(level.batch * level.tokens, width, 2 * width, width, 2, "relu", backward, gpu)


@pytest.mark.parametrize("gpu", [A100, H100_SXM], ids=lambda gpu: gpu.name)
@pytest.mark.parametrize("backward", [False, True])
def test_hyper_kv_runs_fused_where_the_model_predicts_a_win(gpu, backward):
    assert sd_hyper_kv(320, backward, gpu), "the first level, most tokens: fused"
    assert not sd_hyper_kv(1280, backward, gpu), "the deepest: the fold costs as much as the op"
    assert sd_hyper_kv(640, backward, gpu) == (gpu is H100_SXM)


def test_hyper_kv_decision_is_the_cost_models():
    level = LEVELS[640]
    tokens = level.batch * level.tokens
    forward = hyper_kv_cost(tokens, 640, activation="relu")
    backward = hyper_kv_cost(tokens, 640, activation="relu", backward=True)
    fused = forward.implemented.time_floor(H100_SXM) + backward.implemented.time_floor(H100_SXM)
    eager = forward.eager.time_floor(H100_SXM) + backward.eager.time_floor(H100_SXM)
    assert hyper_kv_pays(tokens, 640, 1280, 640, 2, "relu", True, H100_SXM) == (fused <= eager)


@pytest.mark.parametrize("gpu", [A100, H100_SXM], ids=lambda gpu: gpu.name)
def test_cross_attention_forward_always_backward_where_not_slower(gpu):
    for level in LEVELS.values():
        shape = (level.batch, level.heads, level.tokens, level.context_tokens, level.head_dim)
        assert cross_attention_pays(*shape, 2, False, gpu)
        predicted = cross_attention_cost(*shape, backward=True).predicted_speedup(gpu)
        assert cross_attention_pays(*shape, 2, True, gpu) == (predicted >= 1)
    head_dim_160 = LEVELS[1280]
    assert not cross_attention_pays(2, 8, head_dim_160.tokens, 231, 160, 2, True, gpu), "its backward loses"


# -- measured tables ------------------------------------------------------------------------

SD_ATTENTION = (2, 8, 4096, 231, 40)  # batch, heads, Lq, Lk, head dim: SD 1.x's first level at 512x512


def synthetic_table(**classes) -> measured.MeasuredTable:
    """A table in measured.json's format: class -> list of (op, backward, shape, fused, baseline) ms."""
    return measured.MeasuredTable.from_json(
        {
            "format": measured.FORMAT,
            "classes": {
                name: {"card": f"test card {name}", "timings": [
                    {"op": op, "backward": backward, "shape": shape, "fused_ms": fused, "baseline_ms": baseline,
                     "baseline": "sdpa" if op == "cross_attention" else "eager"}
                    for op, backward, shape, fused, baseline in timings
                ]}
                for name, timings in classes.items()
            },
        }
    )  # fmt: skip


def attention_timing(backward, fused, baseline, queries=8192, key_length=231, head_dim=40):
    shape = dict(queries=queries, key_length=key_length, heads=8, head_dim=head_dim, dtype_bytes=2)
    return ("cross_attention", backward, shape, fused, baseline)


def hyper_timing(backward, fused, baseline, tokens=8192, width=320):
    shape = dict(tokens=tokens, width=width, hidden_width=2 * width, out_width=width, dtype_bytes=2)
    return ("hyper_kv", backward, shape, fused, baseline)


def test_the_shipped_table_loads():
    table = measured.MeasuredTable.load(measured.TABLE_FILE)
    for gpu_class, timings in table.timings.items():
        assert gpu_class.startswith("sm_") and all(t.op in measured.SHAPE_KEYS for t in timings)


@pytest.mark.parametrize("gpu_class, rates", [("sm_80", A100), ("sm_86", A100), ("sm_90", H100_SXM), ("sm_100", H100_SXM)])
def test_a_class_never_measured_takes_the_prediction(gpu_class, rates):
    table = synthetic_table(sm_120=[attention_timing(False, 2.0, 1.0)])
    for backward in (False, True):
        choice = cross_attention_choice(*SD_ATTENTION, 2, backward, gpu_class, table)
        assert choice.fused == cross_attention_pays(*SD_ATTENTION, 2, backward, rates)
        assert choice.grounds.startswith(f"predicted ({rates.name} rates")
        level = LEVELS[640]
        tokens = level.batch * level.tokens
        hyper = hyper_kv_choice(tokens, 640, 1280, 640, 2, "relu", backward, gpu_class, table)
        assert hyper.fused == hyper_kv_pays(tokens, 640, 1280, 640, 2, "relu", backward, rates)


def test_an_empty_table_changes_nothing():
    table = measured.MeasuredTable.from_json({"format": measured.FORMAT, "classes": {}})
    for level in LEVELS.values():
        tokens = level.batch * level.tokens
        for backward in (False, True):
            assert hyper_kv_choice(tokens, level.channels, 2 * level.channels, level.channels, 2, "relu", backward,
                                   "sm_90", table).fused == sd_hyper_kv(level.channels, backward, H100_SXM)  # fmt: skip


def test_a_measured_class_follows_its_table_not_the_model():
    """The model predicts the forward always fused; measured slower than SDPA, it is not."""
    table = synthetic_table(sm_90=[attention_timing(False, 0.05, 0.04), attention_timing(True, 0.10, 0.20)])
    assert cross_attention_pays(*SD_ATTENTION, 2, False, H100_SXM)
    forward = cross_attention_choice(*SD_ATTENTION, 2, False, "sm_90", table)
    assert not forward.fused and forward.grounds.startswith("measured on sm_90 (test card sm_90): 50.0 vs 40.0 us (sdpa)")
    assert cross_attention_choice(*SD_ATTENTION, 2, True, "sm_90", table).fused
    assert cross_attention_choice(*SD_ATTENTION, 2, False, "sm_80", table).grounds.startswith("predicted (A100")


def test_the_nearest_timed_shape_decides():
    """Same head dim and heads; the queries and keys nearest in ratio, within a factor of 8."""
    table = synthetic_table(sm_90=[
        attention_timing(False, 1.0, 2.0, queries=8192, key_length=77),  # fused wins
        attention_timing(False, 2.0, 1.0, queries=128, key_length=77),  # SDPA wins
    ])  # fmt: skip
    assert cross_attention_choice(2, 8, 3000, 77, 40, 2, False, "sm_90", table).fused  # 6000 queries: near 8192
    assert not cross_attention_choice(2, 8, 100, 77, 40, 2, False, "sm_90", table).fused  # 200 queries: near 128
    far = cross_attention_choice(2, 8, 2**16, 77, 40, 2, False, "sm_90", table)  # 16x the largest timed
    assert not far.fused and far.grounds.startswith("not measured near this shape on sm_90")
    other_head = cross_attention_choice(2, 8, 4096, 77, 80, 2, False, "sm_90", table)
    assert not other_head.fused and "not measured" in other_head.grounds


def test_hyper_kv_measured_wins_and_losses():
    table = synthetic_table(sm_90=[
        hyper_timing(False, 0.02, 0.03), hyper_timing(True, 0.09, 0.06),
        hyper_timing(False, 0.02, 0.01, tokens=1024, width=1280),
    ])  # fmt: skip
    assert hyper_kv_choice(8192, 320, 640, 320, 2, "relu", False, "sm_90", table).fused
    assert not hyper_kv_choice(8192, 320, 640, 320, 2, "relu", True, "sm_90", table).fused
    assert not hyper_kv_choice(1024, 1280, 2560, 1280, 2, "gelu", False, "sm_90", table).fused
    # Never timed at width 640 on sm_90: the replaced path, though the model predicts a win there.
    assert sd_hyper_kv(640, False, H100_SXM)
    assert not hyper_kv_choice(LEVELS[640].batch * LEVELS[640].tokens, 640, 1280, 640, 2, "relu", False, "sm_90", table).fused


def test_the_table_in_use_comes_from_the_environment(monkeypatch, tmp_path):
    path = tmp_path / "measured.json"
    path.write_text('{"format": 1, "classes": {"sm_90": {"card": "elsewhere", "timings": []}}}')
    monkeypatch.setenv(measured.ENV_VAR, str(path))
    measured.table.cache_clear()
    try:
        assert measured.table().sources["sm_90"]["card"] == "elsewhere"
        assert not measured.table().measured("sm_90")  # no timings: still never measured
    finally:
        monkeypatch.delenv(measured.ENV_VAR)
        measured.table.cache_clear()
    with pytest.raises(ValueError, match="format"):
        measured.MeasuredTable.from_json({"format": 99})


def test_a_device_is_decided_by_its_class(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    device = torch.device("cuda")
    assert gpu_class_name(device) == "sm_90"
    level = LEVELS[640]
    tokens = level.batch * level.tokens
    for backward in (False, True):
        expected = hyper_kv_choice(tokens, 640, 1280, 640, 2, "relu", backward, "sm_90").fused
        assert use_hyper_kv(tokens, 640, 1280, 640, 2, "relu", backward, device) == expected
        expected = cross_attention_choice(*SD_ATTENTION, 2, backward, "sm_90").fused
        assert use_cross_attention(*SD_ATTENTION, 2, backward, device) == expected
