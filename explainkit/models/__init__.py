"""Models: explainkit's CIFAR ResNets; every model a run can use is in the registry.

Models are registered by plugins (the ``register_models`` hook; explainkit's own ResNets,
every torchvision classifier and every timm model come from the built-in plugin
``explainkit.plugins.models``) and looked up in :mod:`explainkit.models.registry`, which
training and checkpoint loading go through. Importing this package imports no torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover - typing only
    from torch import nn

__all__ = ["BUILTIN_MODELS", "MODELS", "build_model"]

# explainkit's own architectures (explainkit.models.resnet), in the order they are registered.
BUILTIN_MODELS = ("resnet18-s8", "resnet18")


def build_model(arch: str, num_classes: int = 10, width: int = 64) -> nn.Module:
    """Build one of explainkit's own untrained ResNets by name (``BUILTIN_MODELS``).

    These are the functions the built-in plugin ``explainkit.plugins.models`` registers for
    ``resnet18-s8`` and ``resnet18``. Any registered model (``torchvision:NAME``, a plugin's)
    is built by :func:`explainkit.models.registry.build_model`, which goes through the plugin
    registry; this module stays below it (the analyzer contract imports it).

    Raises:
        CheckpointError: ``arch`` is not one of explainkit's own models.
    """
    from explainkit.errors import CheckpointError, unknown_name_message

    if arch not in BUILTIN_MODELS:
        raise CheckpointError(
            f"{unknown_name_message('model', arch, BUILTIN_MODELS)}; build any registered "
            "model (torchvision:NAME, a plugin's) with explainkit.models.registry.build_model"
        )
    from explainkit.models.resnet import resnet18, resnet18_s8

    build = resnet18_s8 if arch == "resnet18-s8" else resnet18
    return build(num_classes=num_classes, width=width)


def __getattr__(name: str) -> Any:
    if name == "MODELS":  # the old closed table of explainkit's own models, kept for callers
        from explainkit.models.resnet import resnet18, resnet18_s8

        return {"resnet18-s8": resnet18_s8, "resnet18": resnet18}
    raise AttributeError(f"module 'explainkit.models' has no attribute {name!r}")
