"""Datasets as plain numpy arrays: one in-memory shape for CIFAR-10, synthetic shapes and folders.

Everything here imports numpy only; readers and torch-based augmentation load lazily so that
`explainkit --help` stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from explainkit.errors import DataError

DATASETS = ("cifar10", "shapes", "folder")
SPLITS = ("train", "eval")

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


@dataclass
class Dataset:
    """A whole split in memory; small enough for CIFAR-sized data and simple to hand to torch."""

    images: np.ndarray  # uint8 (N,H,W,3)
    targets: np.ndarray  # int64 (N,)
    classes: list[str]
    index: np.ndarray  # int64 (N,) position of each image in its source split
    masks: np.ndarray | None = None  # uint8 (N,H,W), 1 = object (shapes dataset)
    sizes: np.ndarray | None = None  # int64 (N,2) original (H,W) of each image, before resizing
    name: str = ""
    paths: list[str] | None = None  # source file of each image, relative to the data folder

    def __len__(self) -> int:
        return len(self.targets)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def take(self, limit: int | None) -> Dataset:
        """Keep the first `limit` images so that small runs see a fixed, reproducible subset."""
        if limit is None or limit >= len(self):
            return self
        if limit < 1:
            raise DataError(f"limit must be a positive number of images, got {limit}")
        return Dataset(
            images=self.images[:limit],
            targets=self.targets[:limit],
            classes=self.classes,
            index=self.index[:limit],
            masks=None if self.masks is None else self.masks[:limit],
            sizes=None if self.sizes is None else self.sizes[:limit],
            name=self.name,
            paths=None if self.paths is None else self.paths[:limit],
        )


def load_dataset(
    name: str,
    split: str,
    data_dir: str | Path | None = None,
    image_size: int = 32,
    seed: int = 0,
    limit: int | None = None,
    download: bool = True,
) -> Dataset:
    """Load one split of a named dataset; `limit` keeps the first `limit` images."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose 'train' or 'eval'")
    if image_size < 8:
        raise DataError(f"image_size must be at least 8 pixels, got {image_size}")
    if limit is not None and limit < 1:
        raise DataError(f"limit must be a positive number of images, got {limit}")
    if name == "cifar10":
        from explainkit.data.cifar10 import load_cifar10

        ds = _with_sizes(load_cifar10(split, data_dir, download=download).take(limit))
        if image_size != ds.images.shape[1]:
            ds.images = resize_images(ds.images, image_size)
        return ds
    if name == "shapes":
        from explainkit.data.shapes import make_shapes

        return _with_sizes(make_shapes(split, image_size=image_size, seed=seed, limit=limit))
    from explainkit.data.folder import load_folder

    if data_dir is None:
        raise DataError("the folder dataset needs --data-dir pointing at an ImageFolder tree")
    return load_folder(split, data_dir, image_size=image_size, seed=seed, limit=limit)


def _with_sizes(ds: Dataset) -> Dataset:
    """``ds`` with ``sizes`` recorded: its images' own (H, W), for datasets of one size."""
    if ds.sizes is None:
        ds.sizes = np.tile(np.asarray(ds.images.shape[1:3], np.int64), (len(ds), 1))
    return ds


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std in [0,1] units, accumulated in float64 chunk by chunk."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or len(images) == 0:
        raise DataError(f"channel_stats expects non-empty (N,H,W,3) images, got {images.shape}")
    total = np.zeros(3)
    squares = np.zeros(3)
    for start in range(0, len(images), 4096):
        chunk = images[start : start + 4096].reshape(-1, 3).astype(np.float64) / 255.0
        total += chunk.sum(0)
        squares += np.square(chunk).sum(0)
    count = images.size // 3
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean**2, 0.0))
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """Resize uint8 NHWC images to size x size (bilinear, PIL) for --image-size."""
    from PIL import Image

    out = np.empty((len(images), size, size, 3), dtype=np.uint8)
    for i, img in enumerate(images):
        out[i] = np.asarray(Image.fromarray(img).resize((size, size), Image.BILINEAR))
    return out


__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "DATASETS",
    "Dataset",
    "channel_stats",
    "load_dataset",
    "resize_images",
]
