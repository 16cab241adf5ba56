"""An exponential moving average (EMA) of a model's weights, updated after every step.

With ``--ema`` the average, not the last step's weights, is what is evaluated and stored: it
is smoother and usually a little more accurate (docs/training.md). The raw weights keep
training; the checkpoint holds both (``state_dict`` and ``state_dict_ema``).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class EMA:
    """``module`` is a frozen copy of ``model`` that follows it as a moving average.

    Floating-point buffers (BatchNorm running mean and variance) are averaged like the weights,
    so the averaged weights are evaluated with matching statistics; integer buffers (the batch
    counter) are copied.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.module = copy.deepcopy(model).requires_grad_(False)
        self.updates = 0
        floats = [b.is_floating_point() for b in model.buffers()]

        def split(net: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
            buffers = list(zip(net.buffers(), floats, strict=True))
            averaged = list(net.parameters()) + [b for b, f in buffers if f]
            return averaged, [b for b, f in buffers if not f]

        # Matching lists (the copy's tensors, the model's), so one fused kernel updates all.
        (self._ema_avg, self._ema_copy), (self._avg, self._copy) = split(self.module), split(model)

    @torch.no_grad()
    def update(self) -> None:
        """ema = decay * ema + (1 - decay) * weights, with a warm-up so early EMA is not stale."""
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self._ema_avg, self._avg, 1 - decay)
        if self._copy:  # a model without BatchNorm (a plugin's, say) has no integer buffers
            torch._foreach_copy_(self._ema_copy, self._copy)

    def state_dict(self) -> dict[str, Any]:
        """The averaged weights, as a plain model state_dict (loadable into the bare model)."""
        return self.module.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any], updates: int) -> None:
        """Restore the average and its update count (which sets the warm-up's decay)."""
        self.module.load_state_dict(state_dict)
        self.updates = int(updates)
