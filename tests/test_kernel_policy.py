"""Where NAI_FAST_KERNELS=auto takes the fused kernels on a GPU: the cost model's predictions."""

import pytest

from nai_fast.kernels.cost import A100, H100_SXM, cross_attention_cost, hyper_kv_cost
from nai_fast.kernels.policy import cross_attention_pays, hyper_kv_pays
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
