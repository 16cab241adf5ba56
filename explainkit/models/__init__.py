"""Model registry: architecture name -> factory. Checkpoints store (arch, width, classes)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from explainkit.errors import CheckpointError
from explainkit.models.resnet import resnet18, resnet18_s8

MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet18-s8": resnet18_s8,
    "resnet18": resnet18,
}

__all__ = ["MODELS", "build_model", "default_target_layer"]


def build_model(arch: str, num_classes: int = 10, width: int = 64) -> nn.Module:
    """Build an untrained model by name."""
    if arch not in MODELS:
        raise CheckpointError(f"unknown model {arch!r}; known models: {', '.join(sorted(MODELS))}")
    return MODELS[arch](num_classes=num_classes, width=width)


def default_target_layer(model: nn.Module) -> str:
    """The layer Grad-CAM uses when none is given: the model's last stage."""
    return getattr(model, "default_target_layer", "layer4")
