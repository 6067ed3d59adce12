"""Exponential moving average of a model's weights, updated every ``every`` optimizer steps.

Paper: decay 0.99 every 100 steps. Official script: 0.9999 every step. Both average over roughly the last
10k steps; the paper's costs 100x fewer updates, so it is our default (see ``TrainConfig``).
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """Holds a frozen copy of the model; ``update`` moves it towards the live weights.

    shadow <- decay * shadow + (1 - decay) * param, for floating parameters; buffers are copied.
    The shadow starts equal to the model's initial weights, as in the official script.
    """

    def __init__(self, model: nn.Module, decay: float, every: int = 1) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay {decay} must be in [0, 1]")
        if every < 1:
            raise ValueError(f"EMA interval {every} must be >= 1")
        self.decay = decay
        self.every = every
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> bool:
        """Apply one EMA update if ``step`` (counted from 1) is on the interval; returns whether it did."""
        if step % self.every:
            return False
        shadow = [p for p in self.model.parameters() if p.is_floating_point()]
        live = [p.detach() for p in model.parameters() if p.is_floating_point()]
        # lerp(shadow, live, 1 - decay) == decay * shadow + (1 - decay) * live, in one fused pass.
        torch._foreach_lerp_(shadow, live, 1.0 - self.decay)
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)
        return True

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state, strict=True)
