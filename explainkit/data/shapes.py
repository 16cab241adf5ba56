"""Synthetic 10-class shapes with ground-truth object masks, made with numpy from a seed.

The masks let analyzers measure whether an explanation points at the object. Colours,
positions and backgrounds are drawn independently of the class, so only the outline tells the
classes apart: a small network learns it in a few CPU epochs, but not from a colour shortcut.
"""

from __future__ import annotations

import numpy as np

from explainkit.data import Dataset

CLASSES = [
    "circle",
    "square",
    "triangle",
    "cross",
    "ring",
    "bars",
    "diamond",
    "star",
    "ellipse",
    "L-shape",
]
SIZES = {"train": 5000, "eval": 1000}
_SPLIT_KEY = {"train": 0, "eval": 1}


def outline(label: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean mask of class `label` in object coordinates (u, v), roughly within [-1, 1]."""
    au, av = np.abs(u), np.abs(v)
    rho = np.hypot(u, v)
    if label == 0:  # circle
        return rho <= 0.9
    if label == 1:  # square
        return np.maximum(au, av) <= 0.75
    if label == 2:  # triangle pointing up: three half-planes of an equilateral triangle
        return (v <= 0.5) & (0.866 * u - 0.5 * v <= 0.5) & (-0.866 * u - 0.5 * v <= 0.5)
    if label == 3:  # cross
        return ((au <= 0.28) & (av <= 1.0)) | ((av <= 0.28) & (au <= 1.0))
    if label == 4:  # ring
        return (rho <= 1.0) & (rho >= 0.55)
    if label == 5:  # three horizontal bars
        return (au <= 0.9) & (av <= 1.0) & ((av <= 0.2) | (av >= 0.6))
    if label == 6:  # diamond (a tall rhombus, so it is not a rotated square)
        return au / 0.7 + av <= 1.0
    if label == 7:  # five-pointed star
        phi = np.arctan2(v, u) + np.pi / 2
        return rho <= 0.45 + 0.6 * ((np.cos(5 * phi) + 1) / 2) ** 2
    if label == 8:  # ellipse, 2:1
        return (u / 1.0) ** 2 + (v / 0.5) ** 2 <= 1.0
    # L-shape: a vertical bar and a bottom bar
    return ((u >= -0.9) & (u <= -0.4) & (av <= 1.0)) | ((v >= 0.5) & (v <= 1.0) & (au <= 0.9))


def make_shapes(
    split: str = "train",
    image_size: int = 32,
    seed: int = 0,
    limit: int | None = None,
    size: int | None = None,
) -> Dataset:
    """Generate a split; train and eval use different seeds derived from `seed`.

    Every per-image parameter is drawn for the full split first, so `limit` keeps exactly the
    first `limit` images of the full split.
    """
    total = size or SIZES[split]
    n = min(total, limit) if limit else total
    params_seed, noise_seed = np.random.SeedSequence([seed, _SPLIT_KEY[split], 0x5A4E]).spawn(2)
    rng = np.random.default_rng(params_seed)
    s = float(image_size)

    # Per-image parameters for the whole split (cheap), then trimmed to n.
    labels = rng.permutation(np.arange(total) % len(CLASSES))
    radius = rng.uniform(0.22, 0.36, total) * s
    cx = rng.uniform(0.0, 1.0, total) * (s - 2 * radius) + radius
    cy = rng.uniform(0.0, 1.0, total) * (s - 2 * radius) + radius
    angle = rng.uniform(-0.35, 0.35, total)  # +-20 degrees keeps square and diamond apart
    background = rng.uniform(0.0, 1.0, (total, 3))
    # Object colour differs from the background by 0.3..0.7 per channel (mod 1): always visible.
    colour = (background + rng.uniform(0.3, 0.7, (total, 3))) % 1.0
    wave = rng.uniform(0.0, 1.0, (total, 4)) * np.array([0.5, 0.5, 2 * np.pi, 0.15])
    labels, radius, cx, cy, angle = labels[:n], radius[:n], cx[:n], cy[:n], angle[:n]
    background, colour, wave = background[:n], colour[:n], wave[:n]

    # Object coordinates for every pixel of every image: (n, H, W) float32.
    grid = np.arange(image_size, dtype=np.float32) + 0.5
    dx = grid[None, None, :] - cx[:, None, None].astype(np.float32)
    dy = grid[None, :, None] - cy[:, None, None].astype(np.float32)
    cos = np.cos(angle).astype(np.float32)[:, None, None]
    sin = np.sin(angle).astype(np.float32)[:, None, None]
    r = radius.astype(np.float32)[:, None, None]
    u = (dx * cos + dy * sin) / r
    v = (dy * cos - dx * sin) / r
    masks = np.zeros((n, image_size, image_size), dtype=bool)
    for label in range(len(CLASSES)):
        sel = np.flatnonzero(labels == label)
        if len(sel):
            masks[sel] = outline(label, u[sel], v[sel])

    # Background: base colour plus a random low-frequency wave (texture), then pixel noise.
    fx, fy, phase, amp = (wave[:, i, None, None].astype(np.float32) for i in range(4))
    texture = amp * np.sin(fx * grid[None, None, :] + fy * grid[None, :, None] + phase)
    background = background.astype(np.float32)[:, None, None, :] + texture[..., None]
    image = np.where(masks[..., None], colour.astype(np.float32)[:, None, None, :], background)
    # Normals are drawn in sequence, so the first n images get the same noise for any limit.
    image += 0.05 * np.random.default_rng(noise_seed).standard_normal(image.shape, np.float32)
    images = (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return Dataset(
        images=images,
        targets=labels.astype(np.int64),
        classes=list(CLASSES),
        index=np.arange(n, dtype=np.int64),
        masks=masks.astype(np.uint8),
        name="shapes",
    )
