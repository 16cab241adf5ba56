"""ROAD and Average Drop / Increase in Confidence: the faithfulness figures papers publish.

- **ROAD** (Rong et al. 2022, "A Consistent and Efficient Evaluation Strategy for Attribution
  Methods", arXiv:2202.00449): remove a fraction of the pixels, most relevant first (MoRF) or
  least relevant first (LeRF), and fill them by *noisy linear imputation*: each removed pixel
  becomes the weighted mean of its 8 neighbours (1/6 beside, 1/12 diagonal; neighbours outside
  the image are dropped), solved jointly for all removed pixels, plus N(0, noise^2). Unlike a
  blur or a constant, the filling carries no trace of the removed shape, so the model cannot
  read the mask itself. pytorch-grad-cam and Quantus solve one sparse system per image and
  fraction on the CPU; here all images, fractions and orders are solved at once on the model's
  device by conjugate gradients (the system is symmetric positive definite), with a 3x3
  convolution as the operator.
  Scores per image as pytorch-grad-cam's ``ROADMostRelevantFirstAverage`` (and LeRF, and
  ``ROADCombined``) define them: the mean over fractions of the change in the target's
  probability; Quantus's ROAD curve is the share of images still classified as the target.
- **Average Drop / Increase in Confidence** (Chattopadhay et al. 2018, Grad-CAM++,
  arXiv:1710.11063): ``max(0, Y - O) / Y`` and ``O > Y`` where ``Y`` is the target's
  probability on the image and ``O`` on the image multiplied by the map (torch-cam's
  ``ClassificationMetric``; pytorch-grad-cam's ``DropInConfidence`` omits the division).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from explainkit.errors import AnalyzerError
from explainkit.explain.outputs import scores_of

__all__ = [
    "ROAD_FRACTIONS",
    "RoadCurves",
    "confidence_change",
    "impute_linear",
    "road_curves",
    "summarize_road",
]

ROAD_FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
# The 8 neighbours' weights (Rong et al. 2022): 1/6 beside, 1/12 diagonal; they sum to 1.
_NEIGHBOURS = tuple(
    ((dy, dx), 1 / 12 if dy and dx else 1 / 6) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx
)


def impute_linear(
    images: Tensor,
    removed: Tensor,
    noise: float = 0.01,
    generator: torch.Generator | None = None,
    tol: float = 1e-6,
    max_iter: int | None = None,
) -> Tensor:
    """Noisy linear imputation of the ``removed`` pixels of ``images``, all at once.

    Args:
        images: (B, C, H, W).
        removed: (B, H, W) bool, the pixels to fill (every channel).
        noise: standard deviation of the Gaussian noise added to filled pixels.
        generator: CPU generator of the noise.
        tol: relative residual at which conjugate gradients stop (float32 arithmetic).
        max_iter: iteration cap (default ``8 * max(H, W)``, far above what is needed).

    Each removed pixel ``i`` satisfies ``s_i u_i = sum_j w_ij u_j``, the weighted mean of its
    in-image neighbours, whose values are the image's where kept: a symmetric positive
    definite system whenever each removed region touches a kept pixel.
    """
    b, c, h, w = images.shape
    m = removed[:, None].to(images.dtype)
    dtype = torch.float32 if images.device.type != "mps" else images.dtype
    md = m.to(dtype).expand(b, c, h, w).reshape(b * c, 1, h, w)

    def conv(t: Tensor) -> Tensor:  # the 3x3 stencil as 8 shifted adds (faster than conv2d)
        padded = F.pad(t, (1, 1, 1, 1))
        out = torch.zeros_like(t)
        for (dy, dx), weight in _NEIGHBOURS:
            out += weight * padded[..., 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]
        return out

    flat = images.to(dtype).reshape(b * c, 1, h, w)
    s = conv(torch.ones(1, 1, h, w, device=images.device, dtype=dtype))  # weights in view
    rhs = md * conv(flat * (1 - md))

    def op(u: Tensor) -> Tensor:
        return md * (s * u - conv(u * md))

    # Start from a coarse-to-fine fill of the holes: conjugate gradients then only remove
    # the fine error, in a few times fewer steps than from zero.
    u = md * _pull_push(flat * (1 - md), 1 - md)
    r = rhs - op(u)
    z = r / s
    p = z.clone()
    rz = (r * z).sum((1, 2, 3), keepdim=True)
    norm0 = rhs.square().sum((1, 2, 3), keepdim=True).sqrt().clamp_min(1e-30)
    for i in range(max_iter or 8 * max(h, w)):
        ap = op(p)
        alpha = rz / (p * ap).sum((1, 2, 3), keepdim=True).clamp_min(1e-30)
        u += alpha * p
        r -= alpha * ap
        if i % 8 == 7 and bool(
            (r.square().sum((1, 2, 3), keepdim=True).sqrt() <= tol * norm0).all()
        ):
            break  # checked every 8 steps: each check waits for the device
        z = r / s
        rz_new = (r * z).sum((1, 2, 3), keepdim=True)
        p = z + (rz_new / rz.clamp_min(1e-30)) * p
        rz = rz_new
    filled = u.view(b, c, h, w).to(images.dtype)
    if noise:
        eps = torch.randn(images.shape, generator=generator).to(images.device, images.dtype)
        filled = filled + noise * eps
    return torch.where(m > 0, filled, images)


def _pull_push(values: Tensor, weights: Tensor) -> Tensor:
    """Fill where ``weights`` is 0 from ever coarser averages of the known ``values``."""
    if min(values.shape[-2:]) <= 1:
        total = weights.sum((2, 3), keepdim=True)
        mean = values.sum((2, 3), keepdim=True) / total.clamp_min(1e-12)
        return torch.where(weights > 0, values / weights.clamp_min(1e-12), mean)
    pooled_v = F.avg_pool2d(values, 2, ceil_mode=True)
    pooled_w = F.avg_pool2d(weights, 2, ceil_mode=True)
    coarse = _pull_push(pooled_v, pooled_w)
    up = F.interpolate(coarse, size=values.shape[-2:], mode="bilinear", align_corners=False)
    known = values / weights.clamp_min(1e-12)
    share = weights.clamp(0, 1)
    return share * known + (1 - share) * up


@dataclass
class RoadCurves:
    """Target probabilities after ROAD removal, on the device.

    Attributes:
        fractions: (F,) fractions of pixels removed.
        original: (N,) the target's probability on the intact image.
        morf, lerf: (N, F) the target's probability with the most (least) relevant removed.
        morf_kept, lerf_kept: (N, F) bool, whether the target is still the predicted class
            (Quantus's ROAD curve is ``morf_kept.mean(0)``).
    """

    fractions: Tensor
    original: Tensor
    morf: Tensor
    lerf: Tensor
    morf_kept: Tensor
    lerf_kept: Tensor

    @property
    def morf_score(self) -> Tensor:
        """(N,) mean change of probability, most relevant removed first (lower is better)."""
        return (self.morf - self.original[:, None]).mean(1)

    @property
    def lerf_score(self) -> Tensor:
        """(N,) mean change, least relevant removed first (higher is better)."""
        return (self.lerf - self.original[:, None]).mean(1)

    @property
    def combined(self) -> Tensor:
        """(N,) ``(LeRF - MoRF) / 2``, pytorch-grad-cam's ``ROADCombined`` (higher is better)."""
        return (self.lerf_score - self.morf_score) / 2


def _removed(maps: Tensor, fractions: Tensor, generator: torch.Generator | None) -> Tensor:
    """(N, 2, F, H, W) bool: the top (MoRF) and bottom (LeRF) ``floor(f * H * W)`` pixels
    of each map, ties in seeded random order."""
    n, h, w = maps.shape
    flat = maps.flatten(1)
    noise = torch.rand(flat.shape, generator=generator).to(flat.device)
    shuffle = noise.argsort(1)
    order = shuffle.gather(1, flat.gather(1, shuffle).argsort(dim=1, descending=True, stable=True))
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(h * w, device=maps.device).expand_as(order))
    counts = torch.floor(fractions.double() * h * w).long().to(maps.device)  # as Quantus
    top = ranks[:, None, :] < counts[None, :, None]
    bottom = ranks[:, None, :] >= (h * w - counts)[None, :, None]
    return torch.stack([top, bottom], 1).view(n, 2, len(fractions), h, w)


@torch.no_grad()
def road_curves(
    model: nn.Module,
    images: Tensor,
    maps: Tensor,
    targets: Tensor,
    *,
    fractions: tuple[float, ...] = ROAD_FRACTIONS,
    noise: float = 0.01,
    max_batch: int = 256,
    generator: torch.Generator | None = None,
) -> RoadCurves:
    """ROAD, most and least relevant first, at each of ``fractions`` (Rong et al. 2022).

    Every image gets ``2 * len(fractions)`` imputed versions; those of a chunk of images are
    imputed together and classified in forward passes of at most ``max_batch`` images.
    """
    n, c, h, w = images.shape
    if maps.shape != (n, h, w):
        raise AnalyzerError(f"maps must be (N, H, W) = {(n, h, w)}; got {tuple(maps.shape)}")
    if not fractions or not all(0 < f < 1 for f in fractions):
        raise AnalyzerError(f"ROAD fractions must lie in (0, 1); got {list(fractions)}")
    frac = torch.tensor(fractions, dtype=torch.float64)
    targets = targets.to(images.device)
    removed = _removed(maps, frac, generator)  # (N, 2, F, H, W)
    versions = 2 * len(fractions)
    probs, kept = [], []
    per_chunk = max(1, max_batch // versions)
    for s in range(0, n, per_chunk):
        x = images[s : s + per_chunk]
        m = x.shape[0]
        batch = x[:, None].expand(m, versions, c, h, w).reshape(m * versions, c, h, w)
        imputed = impute_linear(batch, removed[s : s + m].reshape(m * versions, h, w), noise,
                                generator)  # fmt: skip
        out = scores_of(model(imputed)).float()
        t = targets[s : s + m].repeat_interleave(versions)
        probs.append(out.softmax(1).gather(1, t[:, None]).view(m, 2, -1))
        kept.append((out.argmax(1) == t).view(m, 2, -1))
    original = scores_of(model(images)).float().softmax(1).gather(1, targets[:, None])[:, 0]
    p, k = torch.cat(probs), torch.cat(kept)
    return RoadCurves(frac.float(), original, p[:, 0], p[:, 1], k[:, 0], k[:, 1])


@torch.no_grad()
def confidence_change(
    model: nn.Module, images: Tensor, maps: Tensor, targets: Tensor, max_batch: int = 256
) -> tuple[Tensor, Tensor]:
    """(N,) Average Drop terms ``max(0, Y - O) / Y`` and (N,) bool Increase in Confidence
    ``O > Y``: ``Y`` the target's probability on the image, ``O`` on ``image * map``."""
    n, _, h, w = images.shape
    if maps.shape != (n, h, w):
        raise AnalyzerError(f"maps must be (N, H, W) = {(n, h, w)}; got {tuple(maps.shape)}")
    targets = targets.to(images.device)
    drops, increases = [], []
    step = max(1, max_batch // 2)  # each image goes with its masked copy
    for s in range(0, n, step):
        x, t = images[s : s + step], targets[s : s + step]
        both = torch.cat([x, x * maps[s : s + step, None].to(x.dtype)])
        p = scores_of(model(both)).float().softmax(1)
        y = p[: x.shape[0]].gather(1, t[:, None])[:, 0]
        o = p[x.shape[0] :].gather(1, t[:, None])[:, 0]
        drops.append(torch.relu(y - o) / y.clamp_min(1e-12))
        increases.append(o > y)
    return torch.cat(drops), torch.cat(increases)


def summarize_road(roads: dict[str, RoadCurves], seed: int = 0) -> dict[str, dict]:
    """Per method: mean MoRF and LeRF curves with 95% bootstrap CIs per fraction, the share
    still classified as the target (Quantus's curve), and the mean intact probability."""
    import numpy as np

    from explainkit.explain.stats import bootstrap_ci

    out = {}
    for name, r in roads.items():
        entry: dict = {"fractions": r.fractions.cpu().numpy().tolist()}
        for kind in ("morf", "lerf"):
            data = getattr(r, kind).detach().double().cpu().numpy()
            stats = np.array([bootstrap_ci(col, seed=seed)[:3] for col in data.T])
            entry[kind] = {
                "mean": stats[:, 0].tolist(),
                "ci_low": stats[:, 1].tolist(),
                "ci_high": stats[:, 2].tolist(),
            }
            entry[f"{kind}_accuracy"] = getattr(r, f"{kind}_kept").double().mean(0).tolist()
        entry["original"] = float(r.original.double().mean())
        out[name] = entry
    return out
