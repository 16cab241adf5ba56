"""CAMs built from the layer's activations themselves: principal components, feature
statistics and random weights. Batched in torch; no gradient needed except EigenGrad-CAM.

The sign of a principal component is arbitrary (SVD returns ``v`` or ``-v``). Here it is fixed
so that the entry of largest magnitude is positive (Seg-Eigen-CAM's correction, Chung & Ying
2025, Eq. 13, and scikit-learn's ``svd_flip``): the salient region is the positive one. A
peer that keeps NumPy's sign (pytorch-grad-cam's EigenCAM) shows the ReLU of the opposite
side on some images.
"""

from __future__ import annotations

import torch
from torch import Tensor

from explainkit.explain.cams.base import CAM

__all__ = ["FEM", "EigenCAM", "EigenGradCAM", "KPCACAM", "RandomCAM", "first_component"]


def _positions(x: Tensor) -> Tensor:
    """(N, C, h, w) -> (N, h*w, C), each channel centered over the positions."""
    flat = x.flatten(2).transpose(1, 2)
    return flat - flat.mean(1, keepdim=True)


def _signed(projection: Tensor) -> Tensor:
    """Flip each (N, P) row whose entry of largest magnitude is negative."""
    low, high = torch.aminmax(projection, dim=1)
    sign = torch.where(low.abs() > high.abs(), -1.0, 1.0).to(projection.dtype)
    return projection * sign[:, None]


def first_component(x: Tensor) -> Tensor:
    """(N, C, h, w) -> (N, h, w): each position projected on the first principal component of
    the channels (over positions), sign-corrected. The C x C covariance is decomposed in
    float64: cheaper than an SVD of the (h*w, C) matrix, and as accurate."""
    centered = _positions(x).double()
    cov = centered.transpose(1, 2) @ centered
    _, vectors = torch.linalg.eigh(cov)  # ascending: the last is the first component
    projection = (centered @ vectors[:, :, -1:])[..., 0]
    return _signed(projection).to(x.dtype).view(x.shape[0], *x.shape[2:])


class EigenCAM(CAM):
    """Eigen-CAM (Muhammad & Yeasin 2020, arXiv:2008.00299): the activations' first principal
    component. Class-agnostic: no gradient and no target."""

    name = "eigencam"
    uses_gradients = False

    def _cam(self, acts: Tensor, grads: Tensor, hvp: Tensor | None) -> Tensor:
        return first_component(acts)


class EigenGradCAM(CAM):
    """EigenGrad-CAM (pytorch-grad-cam): the first principal component of ``g * A``, a
    class-discriminative Eigen-CAM."""

    name = "eigengradcam"

    def _cam(self, acts: Tensor, grads: Tensor, hvp: Tensor | None) -> Tensor:
        return first_component(grads * acts)


class KPCACAM(CAM):
    """KPCA-CAM (Karmani et al. 2024, arXiv:2410.00267): Eigen-CAM with kernel PCA.

    The positions' kernel matrix ``K = tanh(gamma <a_i, a_j> + coef0)`` (a sigmoid kernel,
    ``gamma`` 1/C by default, as scikit-learn's ``KernelPCA``) is centered in feature space,
    and each position's map value is its coordinate on the first kernel component
    (eigenvector times the square root of its eigenvalue). Costs (h*w)^3 per image: meant for
    late layers (14x14 and smaller).
    """

    name = "kpcacam"
    uses_gradients = False
    gamma: float | None = None
    coef0 = 1.0

    def _cam(self, acts: Tensor, grads: Tensor, hvp: Tensor | None) -> Tensor:
        # One image at a time: a batch of (h*w)^2 float64 kernels would not stay bounded.
        return torch.cat([self._one(a[None]) for a in acts]).to(acts.dtype)

    def _one(self, acts: Tensor) -> Tensor:
        x = _positions(acts).double()
        gamma = self.gamma if self.gamma is not None else 1.0 / x.shape[-1]
        k = torch.tanh(gamma * (x @ x.transpose(1, 2)) + self.coef0)
        k = k - k.mean(1, keepdim=True) - k.mean(2, keepdim=True) + k.mean((1, 2), keepdim=True)
        values, vectors = torch.linalg.eigh(k)
        projection = vectors[:, :, -1] * values[:, -1:].clamp_min(0).sqrt()
        return _signed(projection).view(1, *acts.shape[2:])


class FEM(CAM):
    """FEM, the feature explanation method (Fuad et al. 2020, IPTA): class-agnostic.

    A channel's weight is the fraction of positions where it fires above ``mean + k std``
    (its own statistics over the positions, ``k = 2``): channels with sharp, rare peaks.
    """

    name = "fem"
    uses_gradients = False
    k = 2.0

    def _weights(self, acts: Tensor, grads: Tensor) -> Tensor:
        flat = acts.flatten(2)
        std, mean = torch.std_mean(flat, dim=2, correction=0, keepdim=True)
        return (flat > mean + self.k * std).float().mean(2)


class RandomCAM(CAM):
    """Random channel weights, uniform in [-1, 1]: a sanity baseline (pytorch-grad-cam's
    RandomCAM). ``seed`` makes it repeatable; each call draws new weights."""

    name = "randomcam"
    uses_gradients = False
    seed = 0

    def _weights(self, acts: Tensor, grads: Tensor) -> Tensor:
        if not hasattr(self, "_generator"):
            self._generator = torch.Generator().manual_seed(self.seed)
        w = torch.rand(acts.shape[:2], generator=self._generator) * 2 - 1
        return w.to(acts.device, acts.dtype)
