"""Example explainkit plugin: the model ``stripes-cnn`` and the dataset ``stripes``.

A third party adds models and datasets the way explainkit adds its own: hook implementations
that hand :class:`explainkit.ModelEntry` and :class:`explainkit.DatasetEntry` objects to
``register``. Heavy imports (torch) wait until a model is built.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from explainkit import Dataset, DatasetEntry, ModelEntry, hookimpl

CLASSES = ["horizontal", "vertical", "diagonal"]
SPLIT_SIZES = {"train": 600, "eval": 120}


@hookimpl
def register_models(register: Any) -> None:
    register(
        ModelEntry(
            "stripes-cnn",
            build_stripes_cnn,
            default_layer="blocks.3",
            reshape="nchw",
            summary="A small four-block CNN for small images (takes --width).",
        )
    )


@hookimpl
def register_datasets(register: Any) -> None:
    register(
        DatasetEntry(
            "stripes",
            load_stripes,
            summary="Horizontal, vertical and diagonal stripes with object masks, drawn from "
            "--seed at any --image-size.",
        )
    )


def build_stripes_cnn(num_classes: int, width: int = 16) -> Any:
    """Four conv blocks (the last at 1/8 of the input side), global pooling, a linear head."""
    from collections import OrderedDict

    from torch import nn

    def block(cin: int, cout: int, stride: int) -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )

    widths = [width, 2 * width, 4 * width, 4 * width]
    blocks = [block(3, widths[0], 1)] + [block(widths[i], widths[i + 1], 2) for i in range(3)]
    return nn.Sequential(
        OrderedDict(
            blocks=nn.Sequential(*blocks),
            pool=nn.AdaptiveAvgPool2d(1),
            flatten=nn.Flatten(),
            head=nn.Linear(widths[-1], num_classes),
        )
    )


def load_stripes(split: str, image_size: int, seed: int, limit: int | None) -> Dataset:
    """Stripes in a random rectangle over noise; class = stripe direction; mask = rectangle.

    Train and eval draw from different seeds, so the splits never share an image.
    """
    count = SPLIT_SIZES[split] if limit is None else min(limit, SPLIT_SIZES[split])
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    size = image_size
    yy, xx = np.mgrid[0:size, 0:size]
    images = rng.integers(0, 90, (count, size, size, 3), dtype=np.uint8)
    masks = np.zeros((count, size, size), np.uint8)
    targets = rng.integers(0, len(CLASSES), count)
    for i, target in enumerate(targets):
        period = rng.uniform(size / 8, size / 4)
        phase = (yy, xx, xx + yy)[target] / period
        stripes = (np.sin(2 * np.pi * phase) > 0)[..., None] * rng.integers(120, 255, 3)
        h, w = rng.integers(size // 3, size // 2 + 1, 2)
        top, left = rng.integers(0, size - h + 1), rng.integers(0, size - w + 1)
        box = (slice(top, top + h), slice(left, left + w))
        images[i][box] = np.maximum(images[i][box], stripes[box]).astype(np.uint8)
        masks[i][box] = 1
    return Dataset(
        images=images,
        targets=targets.astype(np.int64),
        classes=list(CLASSES),
        index=np.arange(count, dtype=np.int64),
        masks=masks,
        name="stripes",
    )
