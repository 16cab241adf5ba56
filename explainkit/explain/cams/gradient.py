"""Gradient-weighted CAMs: each a small subclass of the template in :mod:`.base`.

Shapes: ``acts`` and ``grads`` are (N, C, h, w) (token and video layers are viewed so by the
template); ``_weights`` returns channel weights (N, C) or element weights (N, C, h, w), and
``_cam`` returns the map before ReLU when a method is not a weighted sum of channels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from explainkit.explain.cams.base import CAM
from explainkit.explain.targets import ClassLogit, FinerContrast, Target

__all__ = [
    "FinerCAM",
    "GradCAM",
    "GradCAMElementWise",
    "GradCAMpp",
    "HiResCAM",
    "LayerCAM",
    "ShapleyCAM",
    "XGradCAM",
]


class GradCAM(CAM):
    """Grad-CAM (Selvaraju et al. 2017, arXiv:1610.02391): weights are mean gradients.

    ``map = relu(sum_c mean_ij(dy/dA_cij) * A_c)``; equals Captum's ``LayerGradCam`` with
    ``relu_attributions=True``.
    """

    name = "gradcam"

    def _weights(self, acts: Tensor, grads: Tensor) -> Tensor:
        return grads.mean((2, 3))


class GradCAMpp(CAM):
    """Grad-CAM++ (Chattopadhyay et al. 2018, arXiv:1710.11063), exp-free closed form.

    ``alpha = g^2 / (2 g^2 + sum_ij(A) g^3)`` (0 where g = 0) and
    ``w_c = sum_ij(alpha * relu(g))``, as in common implementations.
    """

    name = "gradcampp"

    def _weights(self, acts: Tensor, grads: Tensor) -> Tensor:
        g2 = grads.pow(2)
        denom = 2 * g2 + acts.sum((2, 3), keepdim=True) * g2 * grads
        alpha = torch.where(denom != 0, g2 / torch.where(denom != 0, denom, 1.0), 0.0)
        return (alpha * F.relu(grads)).sum((2, 3))


class XGradCAM(CAM):
    """XGrad-CAM (Fu et al. 2020, arXiv:2008.02312): ``w_c = sum(g * A) / sum(A)``."""

    name = "xgradcam"

    def _weights(self, acts: Tensor, grads: Tensor) -> Tensor:
        return (grads * acts).sum((2, 3)) / (acts.sum((2, 3)) + 1e-7)


class LayerCAM(CAM):
    """LayerCAM (Jiang et al. 2021, IEEE TIP): element-wise ``relu(g)`` weights each location.

    ``map = relu(sum_c relu(g_c) * A_c)``; works on early layers where Grad-CAM blurs.
    """

    name = "layercam"

    def _weights(self, acts: Tensor, grads: Tensor) -> Tensor:
        return F.relu(grads)


class HiResCAM(CAM):
    """HiResCAM (Draelos & Carin 2020, arXiv:2011.08891): ``relu(sum_c g_c * A_c)``.

    The gradient weighs each location instead of being averaged first, so for a model whose
    head is one linear layer after global pooling the map sums exactly to the score.
    """

    name = "hirescam"

    def _weights(self, acts: Tensor, grads: Tensor) -> Tensor:
        return grads


class GradCAMElementWise(CAM):
    """Element-wise Grad-CAM (pytorch-grad-cam's variant): ``sum_c relu(g_c * A_c)``.

    Like HiResCAM, but negative products are dropped before the channels are summed.
    """

    name = "gradcam_elementwise"

    def _cam(self, acts: Tensor, grads: Tensor, hvp: Tensor | None) -> Tensor:
        return F.relu(grads * acts).sum(1)


class ShapleyCAM(CAM):
    """ShapleyCAM (Cai 2025, arXiv:2501.06261): channel weights ``mean_ij(g - H A / 2)``.

    A second-order Taylor estimate of each channel's Shapley value: the gradient corrected
    by half the Hessian-vector product with the activations. For a head that is piecewise
    linear in the layer (ReLU, pooling, linear) on logits the Hessian is zero and this is
    Grad-CAM; it differs for a softmax probability target or smooth activations (GELU).
    """

    name = "shapleycam"
    needs_hvp = True

    def _cam(self, acts: Tensor, grads: Tensor, hvp: Tensor | None) -> Tensor:
        corrected = grads if hvp is None else grads - 0.5 * hvp
        return torch.einsum("nc,nchw->nhw", corrected.mean((2, 3)), acts)


class FinerCAM(GradCAM):
    """Finer-CAM (Zhang et al. 2025, arXiv:2501.11309): Grad-CAM of a class contrasted with
    the classes whose logits are closest to it (:class:`explainkit.explain.targets.FinerContrast`),
    so the map keeps what tells the class from its look-alikes.

    A class target (predicted, a class, one per image) becomes the contrast for that class;
    other targets are explained as they are.
    """

    name = "finercam"
    alpha = 1.0
    comparisons = (1, 2, 3)

    def adapt_target(self, target: Target) -> Target:
        if type(target) is ClassLogit:
            return FinerContrast(target.index, self.alpha, self.comparisons)
        return target
