"""Statistics shared by every analyzer: ranks, Spearman correlation, bootstrap intervals.

One rule for a constant map (an all-zero CAM, say): it ranks nothing, so it agrees with no
ranking and its rank correlation with any map is 0, in every table and figure alike.
Ranks and correlations run in torch, batched, on whatever device the maps are on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["average_ranks", "bootstrap_ci", "mean_spearman_matrix", "spearman", "summarize"]


def average_ranks(x: Tensor) -> Tensor:
    """Ranks (from 0) along dim 1 of a 2-D tensor; ties get their average rank, as scipy's."""
    n, p = x.shape
    values, order = x.sort(1)
    new = torch.ones_like(values, dtype=torch.bool)
    new[:, 1:] = values[:, 1:] != values[:, :-1]
    group = new.long().cumsum(1) - 1 + torch.arange(n, device=x.device)[:, None] * p
    pos = torch.arange(p, device=x.device, dtype=torch.float64).expand(n, p).reshape(-1)
    sums = torch.zeros(n * p, device=x.device, dtype=torch.float64)
    sums.scatter_add_(0, group.reshape(-1), pos)
    cnt = torch.zeros(n * p, device=x.device, dtype=torch.float64)
    cnt.scatter_add_(0, group.reshape(-1), torch.ones_like(pos))
    ranks_sorted = (sums / cnt.clamp_min(1))[group]
    return torch.empty_like(ranks_sorted).scatter_(1, order, ranks_sorted)


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman rank correlation per image of two (N, ...) stacks of maps, in float64.

    Returns (N,) values; 0 where either map is constant (it ranks nothing).
    """
    ra = average_ranks(a.flatten(1).double())
    rb = average_ranks(b.flatten(1).double())
    ra = ra - ra.mean(1, keepdim=True)
    rb = rb - rb.mean(1, keepdim=True)
    denom = (ra.square().sum(1) * rb.square().sum(1)).sqrt()
    return torch.where(denom > 0, (ra * rb).sum(1) / denom.clamp_min(1e-300), 0.0)


def mean_spearman_matrix(maps: Any) -> np.ndarray:
    """(M methods, N images, ...) maps -> (M, M) mean over images of per-image Spearman rho.

    The diagonal is exactly 1 and the matrix exactly symmetric.
    """
    t = torch.as_tensor(np.asarray(maps))
    m = t.shape[0]
    out = np.eye(m)
    for i in range(m):
        for j in range(i + 1, m):
            out[i, j] = out[j, i] = float(spearman(t[i], t[j]).mean())
    return out


def bootstrap_ci(
    values: np.ndarray | Tensor | Sequence[float],
    *,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float, int]:
    """Mean and percentile bootstrap confidence interval of the mean, NaNs left out.

    Returns:
        ``(mean, ci_low, ci_high, n)`` with ``n`` the values that counted; NaNs when none
        did, a zero-width interval for one.
    """
    if isinstance(values, Tensor):
        values = values.detach().double().cpu().numpy()
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[~np.isnan(v)]
    n = int(v.size)
    if n == 0:
        return math.nan, math.nan, math.nan, 0
    mean = float(v.mean())
    if n == 1:
        return mean, mean, mean, 1
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, n, size=(n_resamples, n))].mean(1)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return mean, float(min(low, mean)), float(max(high, mean)), n


def summarize(values: np.ndarray | Tensor | Sequence[float], seed: int = 0) -> dict[str, Any]:
    """``{"mean", "ci_low", "ci_high", "n"}``: a table row's numbers for per-image values."""
    mean, low, high, n = bootstrap_ci(values, seed=seed)
    return {"mean": mean, "ci_low": low, "ci_high": high, "n": n}


def curve_summary(curves: Any, seed: int) -> dict[str, Any]:
    """Deletion and insertion curves' mean with a pointwise bootstrap CI, and their AUCs
    summarized: what the quality analyzers' JSON and figures show."""
    out: dict[str, Any] = {"fractions": curves.fractions.cpu().numpy().tolist()}
    for kind in ("deletion", "insertion"):
        data = getattr(curves, kind).detach().double().cpu().numpy()
        stats = np.array([bootstrap_ci(data[:, k], seed=seed)[:3] for k in range(data.shape[1])])
        out[kind] = {"mean": stats[:, 0].tolist(), "ci_low": stats[:, 1].tolist(),
                     "ci_high": stats[:, 2].tolist()}  # fmt: skip
        out[f"{kind}_auc"] = summarize(getattr(curves, f"{kind}_auc"), seed)
    return out
