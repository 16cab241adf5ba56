"""FullGrad (Srinivas & Fleuret 2019, arXiv:1905.00780): the input-gradient and every layer's
bias-gradient, on the shared template's frozen, eval-mode pass.

The full-gradient decomposition writes a ReLU network's output as
``f(x) = <grad_x f, x> + sum_layers <grad_b f, b>``; the saliency map (the paper's Eq. 6) is

    ``S(x) = psi(grad_x f * x) + sum_l sum_c psi((grad_z f * b)_lc)``

where ``z`` is the output of a layer with bias ``b`` (every convolution with a bias, and
every batch norm with its eval-mode bias ``beta - mean * gamma / sqrt(var + eps)``) and
``psi`` takes the absolute value, rescales each channel's map to [0, 1] and upsamples it
bilinearly to the input. pytorch-grad-cam's ``FullGrad`` computes the same (test:
tests/test_cam_methods.py). The authors' own code rescales each layer as a whole instead of
each channel; the paper's equation is followed here.

Why it costs one ordinary backward pass: a forward hook on each bias layer registers a
tensor hook on its output, which receives ``grad_z f`` during the one backward pass to the
input and immediately reduces it to an (N, h, w) map at the layer's resolution (scaling is
per channel, and upsampling is linear, so channels are summed before upsampling). No layer's
gradient is kept, so memory stays that of one backward pass.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from explainkit.errors import AnalyzerError
from explainkit.explain.cam_result import CAMResult, normalize_maps
from explainkit.explain.cams.base import (
    CAM,
    explained_scores,
    logits_and_predicted,
    target_classes,
)
from explainkit.explain.layers import RESHAPES, Layout
from explainkit.explain.targets import Target

__all__ = ["FullGrad", "bias_layers", "effective_bias"]

_EPS = 1e-7  # as pytorch-grad-cam's per-map scaling


def effective_bias(module: nn.Module) -> Tensor | None:
    """The (C,) bias a layer adds to its output in eval mode, or None when it has none.

    A convolution's own bias; a batch norm's ``beta - mean * gamma / sqrt(var + eps)``
    (``gamma`` 1 and ``beta`` 0 when not affine). A batch norm without running statistics
    normalizes with each batch's statistics even in eval mode, so it has no fixed bias.
    """
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.bias.detach() if module.bias is not None else None
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        if module.running_mean is None or module.running_var is None:
            return None
        scale = torch.rsqrt(module.running_var.detach() + module.eps)
        if module.weight is not None:
            scale = scale * module.weight.detach()
        bias = -module.running_mean.detach() * scale
        return bias + module.bias.detach() if module.bias is not None else bias
    return None


def bias_layers(model: nn.Module) -> list[nn.Module]:
    """The convolutions and batch norms of ``model`` that add a bias."""
    return [m for m in model.modules() if effective_bias(m) is not None]


def _channel_scaled_sum(x: Tensor) -> Tensor:
    """(N, C, *S) -> (N, *S): ``|x|`` scaled to [0, 1] per (image, channel), channels summed."""
    x = x.abs().float()
    flat = x.flatten(2)
    low, high = torch.aminmax(flat, dim=2, keepdim=True)
    return ((flat - low) / (high - low + _EPS)).sum(1).view(x.shape[0], *x.shape[2:])


class FullGrad(CAM):
    """FullGrad: ``|input-gradient * input|`` plus every bias layer's ``|gradient * bias|``.

    The layer argument is ignored (every bias layer is used, as the method defines); the map
    is at the input's resolution, so ``raw`` is the un-normalized sum there. Works on images
    (N, C, H, W) and clips (N, C, T, H, W): layers whose output has the input's number of
    dimensions count (a transformer's token layers do not; of a ViT only the patch
    embedding's convolution does, so there the map is mostly the input-gradient term).
    """

    name = "fullgrad"
    own_pass = True

    def __init__(
        self, model: nn.Module, layer: str | nn.Module | None = None, reshape: str = "auto"
    ) -> None:
        if reshape not in RESHAPES:
            raise AnalyzerError(f"unknown reshape {reshape!r}; use one of {', '.join(RESHAPES)}")
        super().__init__(model, None, "auto")
        self.layer = self.module = None  # every bias layer, not one
        self._biased = bias_layers(model)
        if not self._biased:
            raise AnalyzerError(
                "the fullgrad method needs convolution or batch-norm layers with biases, and this "
                "model has none; use another method"
            )
        self._sum: Tensor | None = None

    def _explain(self, images: Tensor, target: Target, methods: Sequence[CAM]) -> list[CAMResult]:
        if list(methods) != [self]:
            raise AnalyzerError("fullgrad explains through its own pass; compute it alone")
        images = self._precheck(images)
        n, size = images.shape[0], tuple(int(s) for s in images.shape[2:])
        self._size = size
        self._sum = torch.zeros(n, *size, device=images.device)
        with self._frozen():
            for module in self._biased:
                self._handles.append(module.register_forward_hook(self._watch))
            with torch.inference_mode(False), torch.enable_grad():
                x = images.detach().requires_grad_(True)
                output = self.model(x)
                classes = target_classes(target, output, n, True).to(images.device)
                tensor, seed = target.objective(output)
                scores = explained_scores(tensor, seed)
                if tensor.requires_grad:
                    (grad_x,) = torch.autograd.grad(tensor, x, grad_outputs=seed)
                else:  # e.g. no detection matched: nothing to explain
                    warnings.warn(
                        "the target's score does not depend on the model here, so its "
                        "FullGrad maps are zero",
                        stacklevel=3,
                    )
                    grad_x = None
            with torch.no_grad():
                raw = self._sum
                if grad_x is None:
                    raw.zero_()
                else:
                    raw += _channel_scaled_sum(grad_x * images)
        self._sum = None
        video = len(size) == 3  # the input's own grid: (T, H, W) for clips
        self.layout = Layout("video", 0, size[1:], size[0]) if video else Layout("nchw", 0, size)
        logits, predicted = logits_and_predicted(output, scores, n)
        return [CAMResult(normalize_maps(raw), raw, classes, predicted, logits, scores)]

    def _watch(self, module: nn.Module, inputs: Any, output: Any) -> None:
        """Forward hook of a bias layer: reduce its output's gradient when it arrives."""
        acc = self._sum
        if not isinstance(output, Tensor) or acc is None or not output.requires_grad:
            return
        if output.dim() != acc.dim() + 1:  # not spatial like the input (tokens, vectors)
            return
        bias = effective_bias(module)
        shape = (1, -1) + (1,) * (output.dim() - 2)

        def reduce(grad: Tensor) -> None:
            with torch.no_grad():
                term = _channel_scaled_sum(grad * bias.view(shape).to(grad.dtype))
                mode = "trilinear" if term.dim() == 4 else "bilinear"
                up = F.interpolate(term[:, None], size=acc.shape[1:], mode=mode,
                                   align_corners=False)  # fmt: skip
                acc.add_(up[:, 0])

        # A hook on the tensor, registered before any in-place op that follows the layer
        # (an in-place ReLU), receives the gradient with respect to the layer's own output.
        output.register_hook(reduce)
