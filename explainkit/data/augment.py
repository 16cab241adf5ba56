"""Batched augmentation on the device: one indexing op per batch, no per-image Python loop.

Works on float NCHW batches (what the trainer feeds the model) and on uint8 NHWC batches (what
the store holds). Random numbers come from an explicit `torch.Generator`, so a seeded run
draws the same crops, flips and cutouts on CPU and GPU. A CPU generator may drive a CUDA batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F


def _nchw(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """View x as NCHW; uint8 batches are NHWC by convention."""
    if x.ndim != 4:
        raise ValueError(f"expected a 4-D image batch, got shape {tuple(x.shape)}")
    channels_last = x.dtype == torch.uint8
    return (x.permute(0, 3, 1, 2) if channels_last else x), channels_last


def _randint(high: int, n: int, generator: torch.Generator | None, device) -> torch.Tensor:
    dev = generator.device if generator is not None else device
    return torch.randint(0, high, (n,), generator=generator, device=dev).to(device)


def random_crop(
    x: torch.Tensor, padding: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Zero-pad by `padding` on each side and take a random HxW window per image."""
    if padding <= 0:
        return x
    xc, channels_last = _nchw(x)
    n, _, h, w = xc.shape
    padded = F.pad(xc, (padding, padding, padding, padding))
    oy = _randint(2 * padding + 1, n, generator, x.device)
    ox = _randint(2 * padding + 1, n, generator, x.device)
    rows = oy[:, None] + torch.arange(h, device=x.device)  # (N, H)
    cols = ox[:, None] + torch.arange(w, device=x.device)  # (N, W)
    batch = torch.arange(n, device=x.device)[:, None, None]
    out = padded[batch, :, rows[:, :, None], cols[:, None, :]]  # (N, H, W, C)
    return out.contiguous() if channels_last else out.permute(0, 3, 1, 2).contiguous()


def random_flip(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mirror each image left-right with probability 1/2."""
    _, channels_last = _nchw(x)
    flip = _randint(2, x.shape[0], generator, x.device).bool()[:, None, None, None]
    return torch.where(flip, x.flip(2 if channels_last else 3), x)


def cutout_mask(
    n: int, h: int, w: int, size: int, generator: torch.Generator | None, device
) -> torch.Tensor:
    """(N,H,W) bool: a size x size square per image, centre uniform, clipped at the borders."""
    cy = _randint(h, n, generator, device)
    cx = _randint(w, n, generator, device)
    y0, x0 = cy - size // 2, cx - size // 2
    rows = torch.arange(h, device=device)[None, :]
    cols = torch.arange(w, device=device)[None, :]
    in_rows = (rows >= y0[:, None]) & (rows < (y0 + size)[:, None])  # (N, H)
    in_cols = (cols >= x0[:, None]) & (cols < (x0 + size)[:, None])  # (N, W)
    return in_rows[:, :, None] & in_cols[:, None, :]


def cutout(x: torch.Tensor, size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Zero one square per image (DeVries & Taylor, 2017)."""
    if size <= 0:
        return x
    xc, channels_last = _nchw(x)
    n, _, h, w = xc.shape
    mask = cutout_mask(n, h, w, size, generator, x.device)
    mask = mask[:, :, :, None] if channels_last else mask[:, None, :, :]
    return x.masked_fill(mask, 0)


class Augment:
    """Crop, flip and cutout in that order, configured by numbers; 0 or False disables a step."""

    def __init__(
        self,
        crop_padding: int = 4,
        flip: bool = True,
        cutout: int = 0,
        generator: torch.Generator | None = None,
    ):
        self.crop_padding = int(crop_padding)
        self.flip = bool(flip)
        self.cutout = int(cutout)
        self.generator = generator

    @classmethod
    def from_config(cls, config: Any, generator: torch.Generator | None = None) -> Augment:
        """Build from a mapping or an object with crop_padding / flip / cutout."""
        get = config.get if isinstance(config, Mapping) else lambda k, d: getattr(config, k, d)
        return cls(get("crop_padding", 4), get("flip", True), get("cutout", 0), generator)

    @property
    def enabled(self) -> bool:
        return self.crop_padding > 0 or self.flip or self.cutout > 0

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        gen = generator if generator is not None else self.generator
        x = random_crop(x, self.crop_padding, gen)
        if self.flip:
            x = random_flip(x, gen)
        return cutout(x, self.cutout, gen)

    def __repr__(self) -> str:
        return f"Augment(crop_padding={self.crop_padding}, flip={self.flip}, cutout={self.cutout})"
