"""Smooth Grad-CAM++ (Omeiza et al. 2019, arXiv:1908.01224): Grad-CAM++ whose gradient terms
are averaged over noisy copies of the input (SmoothGrad's noise, Grad-CAM++'s weights).

With ``g_m`` the layer gradient of the target for the m-th of ``n`` noisy copies
``x + eps_m`` (``eps_m ~ N(0, std^2)`` per input element) and ``A`` the activations of the
image itself:

    ``G_p = mean_m(g_m^p)`` (p = 1, 2, 3),
    ``alpha = G_2 / (2 G_2 + sum_ab A(a, b) G_3)`` (0 where the denominator is 0),
    ``w_c = sum_ij alpha_cij relu(G_1)_cij``,   ``map = relu(sum_c w_c A_c)``.

This is torch-cam's formula (its ``alpha`` numerator is ``G_2`` where the paper prints
``G_1``: Grad-CAM++'s closed form has ``g^2`` there, so ``G_2`` is kept). Where torch-cam
differs, the paper's equations decide: torch-cam weighs the activations of the *last noisy
copy*, takes ``relu`` of the last copy's gradient instead of ``G_1``, and writes the
denominator's sum as ``sum_ab A(a, b) g^3(a, b)`` (as its Grad-CAM++). The three coincide
with the paper's when every copy sees the same noise and the gradient is uniform over
positions (a pooled head): tests/test_cam_methods_more.py compares there.

Cost: one clean pass plus ``num_samples`` noisy passes, each forward and backward to the
layer only; memory is that of one pass (the moments are (N, C, h, w) sums).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from explainkit.errors import AnalyzerError
from explainkit.explain.cam_result import CAMResult
from explainkit.explain.cams.base import CAM
from explainkit.explain.layers import Layout
from explainkit.explain.targets import Target

__all__ = ["SmoothGradCAMpp"]


class SmoothGradCAMpp(CAM):
    """Smooth Grad-CAM++: Grad-CAM++ with gradient moments averaged over ``num_samples``
    copies of the input with Gaussian noise of standard deviation ``std`` (in the units of
    the normalized input; torch-cam's defaults, 4 and 0.3).

    The class explained for "predicted" is the clean image's prediction for every copy.
    ``seed`` makes the noise repeatable: a fresh engine draws the same noise; each call draws
    new noise. Explained through its own passes (not shared with other methods).
    """

    name = "smoothgradcampp"
    own_pass = True
    num_samples = 4
    std = 0.3
    seed = 0

    def __init__(self, model: Any, layer: Any = None, reshape: str = "auto") -> None:
        super().__init__(model, layer, reshape)
        self._phase = "clean"
        self._clean: Tensor | None = None
        self._moments: list[Tensor] = []
        self._generator: torch.Generator | None = None

    def _noise(self, images: Tensor) -> Iterator[Tensor]:
        """The noise added to ``images`` for each copy (drawn on the CPU: the same numbers on
        every device)."""
        if self._generator is None:
            self._generator = torch.Generator().manual_seed(self.seed)
        for _ in range(self.num_samples):
            eps = torch.randn(images.shape, generator=self._generator) * self.std
            yield eps.to(images.device, images.dtype)

    def _explain(self, images: Tensor, target: Target, methods: Sequence[CAM]) -> list[CAMResult]:
        if list(methods) != [self]:
            raise AnalyzerError("smoothgradcampp explains through its own passes; compute it alone")
        if self.num_samples < 1 or self.std < 0:
            raise AnalyzerError(
                f"smoothgradcampp needs num_samples >= 1 and std >= 0, got "
                f"{self.num_samples} and {self.std}"
            )
        images = self._precheck(images)
        try:
            self._phase, self._moments = "clean", []
            self.uses_gradients = False  # the clean pass needs activations and classes only
            clean = super()._explain(images, target, [self])[0]
            self.uses_gradients = True
            fixed = _fixed(target, clean.targets)
            self._phase = "noisy"
            for eps in self._noise(images):
                super()._explain(images + eps, fixed, [self])
            self._phase = "final"
            with torch.no_grad():
                raw, maps = CAM.compute_maps(self, self._clean, self._clean, self._size,
                                             self.layout)  # fmt: skip
        finally:
            self._phase, self._clean, self._moments = "clean", None, []
            self.uses_gradients = True
        return [CAMResult(maps, raw, clean.targets, clean.predicted, clean.logits, clean.scores)]

    def compute_maps(
        self,
        acts: Tensor,
        grads: Tensor,
        size: Sequence[int],
        layout: Layout | None = None,
        hvp: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """The clean pass keeps the activations, each noisy pass adds its gradient's powers;
        the maps come once all passes are done (placeholders are returned until then)."""
        if self._phase == "clean":
            self._clean = acts.float()
        else:
            g = grads.float()
            powers = (g, g * g, g * g * g)
            if not self._moments:
                self._moments = [p.clone() for p in powers]
            else:
                for total, p in zip(self._moments, powers, strict=True):
                    total += p
        empty = acts.new_zeros(acts.shape[0], 1, 1)
        return empty, empty

    def _cam(self, acts: Tensor, grads: Tensor, hvp: Tensor | None) -> Tensor:
        g1, g2, g3 = (m / self.num_samples for m in self._moments)
        denom = 2 * g2 + acts.sum((2, 3), keepdim=True) * g3
        alpha = torch.where(denom != 0, g2 / torch.where(denom != 0, denom, 1.0), 0.0)
        weights = (alpha * F.relu(g1)).sum((2, 3))
        return torch.einsum("nc,nchw->nhw", weights, acts)


def _fixed(target: Target, classes: Tensor) -> Target:
    """``target`` with "predicted" replaced by the clean images' classes, so that a noisy copy
    explains the class of its image, not its own prediction."""
    if isinstance(getattr(target, "index", None), str) and classes.ge(0).all():
        fixed = copy.copy(target)
        fixed.index = classes  # type: ignore[attr-defined]
        return fixed
    return target
