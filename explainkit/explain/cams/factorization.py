"""Deep Feature Factorization (Collins et al. 2018, arXiv:1806.10206): non-negative matrix
factorization of a layer's activations into ``k`` concepts.

The (C, positions) activations, each channel shifted by its minimum so they are
non-negative, are factorized as ``V ~ W H``: ``W`` (C, k) holds each concept's direction in
channel space (plus the shift: the concept's embedding) and ``H`` (k, positions) where each
concept is present: its heatmap. The embedding fed to the classifier head gives the
concept's class scores.

The solver is scikit-learn's ``NMF(init="random", solver="cd", random_state=seed)`` (the one
pytorch-grad-cam's ``DeepFeatureFactorization`` calls): the same random start (NumPy's
generator, ``|N(0, 1)| * sqrt(mean(V) / k)``), the same cyclic coordinate descent
(Cichocki & Phan 2009) and the same stopping rule (projected-gradient violation at most
``tol`` of the first iteration's, or ``max_iter`` iterations), written in batched torch
(float64) so that many images are factorized at once on any device.

Two ways in: :func:`deep_feature_factorization` factorizes a set of images jointly (the
paper's use: concepts shared across the images) and returns every concept;
:class:`DFF`, the CAM method ``dff``, factorizes each image alone (its map does not depend
on the batch) and shows the concept that contributes most to the target, measured to first
order as ``sum_positions <gradient, W_j> H_j`` (the target's change along that concept's
part of the activations).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from explainkit.errors import AnalyzerError
from explainkit.explain.cam_result import normalize_maps
from explainkit.explain.cams.base import CAM

__all__ = ["DFF", "Concepts", "deep_feature_factorization", "nmf"]


def nmf(
    x: Tensor, k: int, seed: int = 0, max_iter: int = 200, tol: float = 1e-4
) -> tuple[Tensor, Tensor]:
    """Factorize each non-negative (m, n) matrix of ``x`` (B, m, n) as ``W H``, W (B, m, k)
    and H (B, k, n), in float64: scikit-learn's random init and coordinate descent, each
    matrix stopping on its own."""
    if k < 1:
        raise AnalyzerError(f"the number of concepts must be at least 1, got {k}")
    b, m, n = x.shape
    x = x.double()
    rng = np.random.RandomState(seed)
    h0 = torch.from_numpy(np.abs(rng.standard_normal((k, n)))).to(x.device)
    w0 = torch.from_numpy(np.abs(rng.standard_normal((m, k)))).to(x.device)
    avg = (x.mean((1, 2)) / k).sqrt()[:, None, None]
    w, ht = avg * w0, (avg * h0).transpose(1, 2).contiguous()
    active = torch.ones(b, dtype=torch.bool, device=x.device)
    first = None
    xt = x.transpose(1, 2)
    for it in range(max_iter):
        violation = _sweep(x, w, ht, active) + _sweep(xt, ht, w, active)
        if first is None:
            first = violation
        done = (first == 0) | (violation <= tol * first)
        active &= ~done
        if it % 10 == 9 and not bool(active.any()):  # a device sync every tenth iteration
            break
    return w, ht.transpose(1, 2)


def _sweep(x: Tensor, w: Tensor, ht: Tensor, active: Tensor) -> Tensor:
    """One coordinate-descent pass over the columns of ``w`` (in place); returns the summed
    absolute projected gradient (B,) (scikit-learn's ``_update_cdnmf_fast``)."""
    hht = ht.transpose(1, 2) @ ht  # (B, k, k)
    xht = x @ ht  # (B, m, k)
    hess = torch.diagonal(hht, dim1=1, dim2=2)  # (B, k)
    inverse = 1.0 / torch.where(hess != 0, hess, 1.0)
    update = active[:, None] & (hess != 0)
    violation = []
    for t in range(w.shape[2]):
        grad = torch.baddbmm(xht[:, :, t : t + 1], w, hht[:, :, t : t + 1], alpha=1, beta=-1)
        grad, col = grad[..., 0], w[:, :, t]
        violation.append(torch.where(col == 0, grad.clamp(max=0), grad).abs().sum(1))
        step = torch.addcmul(col, grad, inverse[:, t : t + 1], value=-1).clamp_(min=0)
        w[:, :, t] = torch.where(update[:, t : t + 1], step, col)
    return torch.where(active, torch.stack(violation).sum(0), 0.0)


def _factorize(acts: Tensor, k: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """(B, C, P) activations -> W (B, C, k), H (B, k, P), the channels' shift (B, C)."""
    acts = torch.nan_to_num(acts.double())
    offset = acts.amin(2)
    w, h = nmf(acts - offset[..., None], k, seed)
    return w, h, offset


class DFF(CAM):
    """Deep Feature Factorization as a CAM: each image's activations are factorized into
    ``k`` concepts (5 by default) and the map is the heatmap of the concept whose part of the
    activations raises the target most (first order: gradient times the concept's part).
    ``seed`` fixes the solver's random start."""

    name = "dff"
    k = 5
    seed = 0

    def _cam(self, acts: Tensor, grads: Tensor, hvp: Tensor | None) -> Tensor:
        n, c, h, w = acts.shape
        concepts, heat, _ = _factorize(acts.flatten(2), self.k, self.seed)
        # contribution_j = sum_p <g_p, W_j> H_jp: (N, P, C) @ (N, C, k) -> (N, P, k)
        along = grads.flatten(2).transpose(1, 2).double() @ concepts
        contribution = (along * heat.transpose(1, 2)).sum(1)  # (N, k)
        best = contribution.argmax(1)
        chosen = heat[torch.arange(n, device=acts.device), best]
        return chosen.view(n, h, w).to(acts.dtype)


@dataclass
class Concepts:
    """The concepts :func:`deep_feature_factorization` found in a set of images.

    Attributes:
        embeddings: (k, C) each concept's vector in the layer's channel space (``W`` plus the
            channels' shift, as the paper and pytorch-grad-cam feed it to a classifier).
        heatmaps: (N, k, H, W) where each concept is in each image, upsampled to the input
            and scaled to [0, 1] per map.
        raw: (N, k, h, w) the factorization's loadings ``H`` at the layer's resolution.
        scores: (k, classes) the head's output for each embedding, or None without a head.
    """

    embeddings: Tensor
    heatmaps: Tensor
    raw: Tensor
    scores: Tensor | None = None


class _Collect(CAM):
    """Keeps the layer's activations (as (N, C, h, w)) instead of making maps."""

    uses_gradients = False

    def compute_maps(self, acts: Tensor, grads: Tensor, size: Any, layout: Any = None,
                     hvp: Any = None) -> tuple[Tensor, Tensor]:  # fmt: skip
        self.kept = acts.detach().clone()
        empty = acts.new_zeros(acts.shape[0], 1, 1)
        return empty, empty


def deep_feature_factorization(
    model: nn.Module,
    images: Tensor,
    layer: str | nn.Module | None = None,
    k: int = 5,
    head: Callable[[Tensor], Tensor] | None = None,
    reshape: str = "auto",
    seed: int = 0,
) -> Concepts:
    """Factorize the activations of ``layer`` over all ``images`` jointly into ``k`` concepts.

    Args:
        model: any model whose ``layer`` gives (N, C, h, w) maps or transformer tokens.
        images: float (N, C, H, W), normalized as the model expects. The factorization holds
            every image's activations at once ((C, N*h*w) float64): meant for a handful of
            images; for maps of many images use the ``dff`` method, which factorizes each
            image alone.
        layer: as for :func:`explainkit.explain.gradcam.compute_cam`.
        k: the number of concepts.
        head: maps (k, C) embeddings to class scores (a classifier's last linear layer,
            ``model.fc``); None leaves :attr:`Concepts.scores` empty.
        reshape: how the layer's output is viewed: see :class:`explainkit.explain.gradcam.CAM`.
        seed: the solver's random start (scikit-learn's ``random_state``).

    Raises:
        AnalyzerError: a bad layer, images or ``k``.
    """
    with _Collect(model, layer, reshape) as collect:
        collect._explain(images, _NoTarget(), [collect])
        acts = collect.kept.float()
    n, c, h, w = acts.shape
    flat = acts.transpose(0, 1).reshape(1, c, n * h * w)  # every image's positions side by side
    concepts, heat, offset = _factorize(flat, k, seed)
    embeddings = (concepts[0] + offset[0][:, None]).T.float()
    raw = heat[0].view(k, n, h, w).transpose(0, 1).float()
    size = tuple(int(s) for s in images.shape[-2:])
    up = F.interpolate(raw.reshape(n * k, 1, h, w), size=size, mode="bilinear",
                       align_corners=False)  # fmt: skip
    heatmaps = normalize_maps(up[:, 0]).view(n, k, *size)
    scores = None
    if head is not None:
        with torch.no_grad():
            scores = head(embeddings).float()
    return Concepts(embeddings, heatmaps, raw, scores)


class _NoTarget:
    """No target: only the activations are read."""

    per_image = ()

    def scores(self, output: Any) -> Tensor:
        raise AnalyzerError("no target")

    def classes(self, output: Any, n: int) -> Tensor:
        return torch.full((n,), -1, dtype=torch.int64)
