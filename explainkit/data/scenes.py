"""Synthetic scenes: several shapes per image with every kind of ground truth, from a seed.

Each image holds one to :data:`MAX_OBJECTS` shapes (the outlines of :mod:`explainkit.data.shapes`)
that do not overlap, on a textured background. The split carries boxes, instance masks, a
per-pixel class mask and multi-hot labels (:class:`explainkit.data.tasks.Annotations`), so
detection, segmentation and multi-label models train and are judged offline. ``targets`` is the
class of each image's largest shape and ``masks`` the union of its shapes, so classification
analyzers read a scenes run too.

Image ``i`` of a split is drawn from its own generator (seed, split, i): ``limit`` keeps exactly
the first images of the full split, and a split is as cheap as the images it keeps.
"""

from __future__ import annotations

import numpy as np

from explainkit.data import Dataset
from explainkit.data.shapes import outline
from explainkit.data.tasks import Annotations, Detection, boxes_of

# The shapes scenes use, with their outline in explainkit.data.shapes.
SHAPES = {"circle": 0, "square": 1, "triangle": 2, "cross": 3, "ring": 4, "diamond": 6}
CLASSES = list(SHAPES)
SIZES = {"train": 2000, "eval": 500}
MAX_OBJECTS = 3
_SPLIT_KEY = {"train": 0, "eval": 1}


def _draw(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One scene: the image (H, W, 3) uint8, instance masks (n, H, W) bool, classes (n,)."""
    s = float(size)
    grid = np.arange(size, dtype=np.float32) + 0.5
    background = rng.uniform(0.0, 1.0, 3)
    fx, fy, phase, amp = rng.uniform(0.0, 1.0, 4) * np.array([0.5, 0.5, 2 * np.pi, 0.15])
    texture = amp * np.sin(fx * grid[None, :] + fy * grid[:, None] + phase)
    image = (background[None, None, :] + texture[..., None]).astype(np.float32)
    wanted = int(rng.integers(1, MAX_OBJECTS + 1))
    placed: list[tuple[float, float, float]] = []
    masks, labels = [], []
    for _ in range(wanted):
        label = int(rng.integers(len(CLASSES)))
        radius = rng.uniform(0.13, 0.22) * s
        angle = rng.uniform(-0.35, 0.35)
        colour = (background + rng.uniform(0.3, 0.7, 3)) % 1.0
        for _try in range(12):  # a free spot, or the shape is left out
            cx, cy = rng.uniform(radius, s - radius, 2)
            if all(np.hypot(cx - x, cy - y) > (radius + r) * 1.05 for x, y, r in placed):
                break
        else:
            continue
        placed.append((cx, cy, radius))
        dx, dy = grid[None, :] - cx, grid[:, None] - cy
        cos, sin = np.cos(angle), np.sin(angle)
        mask = outline(
            SHAPES[CLASSES[label]], (dx * cos + dy * sin) / radius, (dy * cos - dx * sin) / radius
        )
        if not mask.any():
            continue
        image[mask] = colour
        masks.append(mask)
        labels.append(label)
    image += 0.05 * rng.standard_normal(image.shape).astype(np.float32)
    pixels = (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return pixels, np.asarray(masks, bool).reshape(-1, size, size), np.asarray(labels, np.int64)


def make_scenes(
    split: str = "train",
    image_size: int = 64,
    seed: int = 0,
    limit: int | None = None,
    size: int | None = None,
) -> Dataset:
    """Draw a split of scenes at ``image_size`` (the first ``limit`` of ``size`` images)."""
    total = size or SIZES[split]
    n = min(total, limit) if limit else total
    images = np.empty((n, image_size, image_size, 3), np.uint8)
    segmentation = np.zeros((n, image_size, image_size), np.uint8)
    targets = np.zeros(n, np.int64)
    detections, instances = [], []
    for i in range(n):
        rng = np.random.default_rng([seed, _SPLIT_KEY[split], i, 0x5CE4E])
        images[i], masks, labels = _draw(rng, image_size)
        for mask, label in zip(masks, labels, strict=True):
            segmentation[i][mask] = label + 1
        areas = masks.reshape(len(masks), -1).sum(1)
        targets[i] = labels[int(np.argmax(areas))]
        detections.append(Detection(boxes_of(masks), labels))
        instances.append(masks.astype(np.uint8))
    return Dataset(
        images=images,
        targets=targets,
        classes=list(CLASSES),
        index=np.arange(n, dtype=np.int64),
        masks=(segmentation > 0).astype(np.uint8),
        name="scenes",
        annotations=Annotations(
            detections=detections,
            instances=instances,
            segmentation=segmentation,
            num_classes=len(CLASSES),
        ),
    )
