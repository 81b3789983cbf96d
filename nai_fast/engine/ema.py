"""An exponential moving average of the trained weights, which usually draws better than the last step's.

Kept in float32 whatever the parameters' dtype, so that the small ``(1 - decay)`` updates of a
half-precision run are not rounded away. Its state travels in ``training_state.pt``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["ExponentialMovingAverage"]


class ExponentialMovingAverage:
    """A float32 shadow of parameters: ``shadow += (1 - decay) * (param - shadow)`` per step,
    the decay warming up as ``min(decay, (1 + n) / (10 + n))`` for the ``n``-th update from 0
    (diffusers' EMAModel rule from its second update on; its first copies the weights outright)."""

    def __init__(self, parameters: Sequence[nn.Parameter], decay: float) -> None:
        self.parameters = list(parameters)
        self.decay = decay
        self.updates = 0
        self.shadow = [p.detach().float().clone() for p in self.parameters]

    @torch.no_grad()
    def update(self) -> None:
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.parameters], 1.0 - decay)
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay, self.updates = float(state["decay"]), int(state["updates"])
        self.shadow = [saved.to(p.device) for saved, p in zip(state["shadow"], self.parameters, strict=True)]
