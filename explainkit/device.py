"""Device choice shared by training and analysis."""

from __future__ import annotations

from typing import Any

import torch

from explainkit.errors import ExplainkitError


def resolve_device(name: Any) -> torch.device:
    """``auto`` (or None) picks CUDA when available, else the CPU; an unusable device is an
    ExplainkitError naming it, so the CLI says one sentence instead of failing mid-run."""
    if isinstance(name, torch.device):
        return name
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise ExplainkitError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ExplainkitError(f"device {name} was asked for but CUDA is not available; use cpu")
    return device
