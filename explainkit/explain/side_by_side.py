"""Several attribution methods' maps of the same images, side by side.

Comparing methods is how a practitioner chooses one, and a comparison only means something
on the same images, layer and explained class: :func:`compare_maps` runs each method through
:func:`explainkit.explain.attribution.attribution_fn` on one batch of images and targets, and
:func:`side_by_side_figure` draws a row per image and a column per method (the gradcam
analyzer's ``--gradcam-compare``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from explainkit.errors import AnalyzerError
from explainkit.explain.attribution import attribute, attribution_fn
from explainkit.explain.methods import METHODS

__all__ = ["compare_maps", "side_by_side_figure"]


def compare_maps(
    model: nn.Module,
    images: Tensor,
    targets: Any,
    methods: Sequence[str],
    *,
    layer: str | None,
    reshape: str = "auto",
    seed: int = 0,
    batch_size: int = 64,
) -> tuple[dict[str, np.ndarray], dict[str, float], dict[str, str]]:
    """Each method's (N, H, W) maps in [0, 1] of ``images`` for ``targets`` (class indices
    or a :class:`explainkit.explain.targets.Target`).

    Returns:
        maps by method, milliseconds per image by method, and the sentence of each method
        that could not explain this model (left out of the maps, not raised: the others
        are still worth drawing).
    """
    maps: dict[str, np.ndarray] = {}
    ms: dict[str, float] = {}
    failed: dict[str, str] = {}
    sync = torch.cuda.synchronize if images.device.type == "cuda" else (lambda: None)
    for name in methods:
        try:
            fn = attribution_fn(name, layer=layer, seed=seed, reshape=reshape)
            sync()
            start = time.perf_counter()
            out = attribute(fn, model, images, targets, max(1, batch_size))
            sync()
            ms[name] = 1000 * (time.perf_counter() - start) / images.shape[0]
        except AnalyzerError as e:
            failed[name] = str(e)
            continue
        maps[name] = out.detach().float().cpu().numpy()
    return maps, ms, failed


def side_by_side_figure(
    images: np.ndarray,
    maps: Sequence[np.ndarray],
    names: Sequence[str],
    ms: dict[str, float],
    captions: Sequence[str],
    cmap: Any,
    alpha: float,
    title: str,
) -> Any:
    """A row per image: the image (its caption above), then one overlay per method, each
    column headed by the method and its milliseconds per image.

    Args:
        images: uint8 (N, H, W, 3), what a person sees.
        maps: one (N, H, W) array in [0, 1] per method, in ``names``' order.
    """
    from explainkit.figures import grid_figure, overlay

    n, cols = len(images), 1 + len(names)
    tiles = np.empty((n, cols, *images.shape[1:3], 3), np.uint8)
    tiles[:, 0] = images[..., :3]
    for j, m in enumerate(maps):
        tiles[:, j + 1] = overlay(images, m, cmap, alpha)
    texts = []
    for i in range(n):
        texts.append(captions[i].split("\n")[0])
        for name in names:
            texts.append(f"{METHODS[name].short}\n{ms[name]:.1f} ms/image" if i == 0 else "")
    return grid_figure(
        tiles.reshape(n * cols, *tiles.shape[2:]),
        cols,
        captions=texts,
        title=title,
        caption_lines=2,
        font_size=8.5,
    )
