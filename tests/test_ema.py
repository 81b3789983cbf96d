import torch

from nai_fast.engine.ema import ExponentialMovingAverage


def test_the_decay_warms_up_from_a_tenth_then_holds_at_the_configured_one():
    weight = torch.nn.Parameter(torch.zeros(3))
    ema = ExponentialMovingAverage([weight], decay=0.5)
    with torch.no_grad():
        weight.fill_(10.0)
    ema.update()  # decay min(0.5, 1/10) = 0.1: the shadow moves 90% of the way
    torch.testing.assert_close(ema.shadow[0], torch.full((3,), 9.0))
    ema.update()  # min(0.5, 2/11) = 2/11
    torch.testing.assert_close(ema.shadow[0], torch.full((3,), 9.0 + (9 / 11) * 1.0))
    for _ in range(20):
        ema.update()
    before = ema.shadow[0].clone()
    with torch.no_grad():
        weight.fill_(20.0)
    ema.update()  # min(0.5, 23/32): the configured decay from here on
    torch.testing.assert_close(ema.shadow[0], 0.5 * before + 0.5 * 20.0)


def test_a_half_precision_parameter_keeps_a_float32_shadow_that_small_steps_move():
    weight = torch.nn.Parameter(torch.ones(4, dtype=torch.float16))
    ema = ExponentialMovingAverage([weight], decay=0.9999)
    ema.updates = 10**6  # past the warm-up
    with torch.no_grad():
        weight.add_(1.0)
    ema.update()
    assert ema.shadow[0].dtype == torch.float32
    torch.testing.assert_close(ema.shadow[0], torch.full((4,), 1.0001))  # lost in float16 (spacing ~0.001)


def test_state_round_trip_restores_the_shadow_and_the_count():
    weight = torch.nn.Parameter(torch.randn(5))
    ema = ExponentialMovingAverage([weight], decay=0.9)
    ema.update()
    restored = ExponentialMovingAverage([weight], decay=0.1)
    restored.load_state_dict(ema.state_dict())
    assert (restored.decay, restored.updates) == (0.9, 1)
    assert torch.equal(restored.shadow[0], ema.shadow[0])
