"""Built-in models of the tasks beyond classification (explainkit.models.tasks).

``fcn-s8`` segments and ``fcos-s8`` detects, both on explainkit's ResNet18 trunk and both
taking ``--width``; ``explainkit train --task segmentation|detection`` picks them by default
(docs/tasks.md). Registered through ``register_models`` as a third party's would be.
"""

from __future__ import annotations

from typing import Any

from explainkit import hookimpl
from explainkit.hookspecs import ModelEntry

__all__ = ["build_fcn_s8", "build_fcos_s8", "register_models"]


@hookimpl
def register_models(register: Any) -> None:
    register(
        ModelEntry(
            "fcn-s8",
            build_fcn_s8,
            default_layer="backbone.layer4",
            reshape="nchw",
            summary="Segmenter: resnet18-s8 trunk with an FCN head, logits per pixel "
            "(takes --width; --task segmentation).",
            task="segmentation",
        )
    )
    register(
        ModelEntry(
            "fcos-s8",
            build_fcos_s8,
            default_layer="backbone.body.layer4",
            reshape="nchw",
            summary="Detector: torchvision FCOS on the resnet18-s8 trunk "
            "(takes --width; --task detection).",
            task="detection",
        )
    )


def build_fcn_s8(num_classes: int, width: int = 64) -> Any:
    """The segmenter for ``num_classes`` classes, background included."""
    from explainkit.models.tasks import segmentation_net

    return segmentation_net(num_classes, width)


def build_fcos_s8(num_classes: int, width: int = 64, image_size: int = 64) -> Any:
    """The detector for ``num_classes`` object classes (its background class is added)."""
    from explainkit.models.tasks import fcos_net

    return fcos_net(num_classes, width, image_size)
