"""Grayscale models take the same RGB batches as every other model.

explainkit keeps every image as RGB (a grayscale file or a (N, H, W, 1) array has its one
channel repeated), so the store, the figures and every analyzer see one layout. A model whose
first convolution takes one channel gets a forward pre-hook that averages the three equal
channels back into one: the model computes on exactly the grayscale image, its layer names and
state_dict unchanged, and gradients reach the input as usual.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["accept_rgb", "input_channels"]

_HOOKED = "_explainkit_rgb_hook"


def input_channels(model: nn.Module) -> int | None:
    """The channels the model's first convolution takes (a HuggingFace model's
    ``config.num_channels``), or None when it has none to tell."""
    config = getattr(model, "config", None)
    channels = getattr(config, "num_channels", None)
    if isinstance(channels, int) and not isinstance(channels, bool):
        return channels
    for module in model.modules():
        if isinstance(module, nn.Conv2d | nn.Conv1d | nn.Conv3d):
            return int(module.in_channels)
    return None


def _to_gray(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    x = args[0] if args else None
    if isinstance(x, torch.Tensor) and x.ndim == 4 and x.shape[1] == 3:
        return (x.mean(dim=1, keepdim=True), *args[1:])
    return None


def accept_rgb(model: nn.Module) -> nn.Module:
    """``model``, made to take RGB batches when its first convolution takes one channel (a
    forward pre-hook, added once); any other model is returned as it is."""
    if input_channels(model) == 1 and not getattr(model, _HOOKED, False):
        model.register_forward_pre_hook(_to_gray)
        setattr(model, _HOOKED, True)
    return model
