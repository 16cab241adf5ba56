"""Attribution dispatch: one place that runs a named method and turns it into a map.

Every method, native CAM, Captum or the random baseline, becomes the same function
``fn(model, images, targets) -> (N, H, W)`` maps scaled per image to [0, 1], so analyzers and
metrics treat them alike; each method's reduction of channels to one map is applied here.

Which methods exist (names, labels, reductions) is :mod:`explainkit.explain.methods`, which
imports no torch so that analyzers can offer the names as option choices.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn

from explainkit.errors import AnalyzerError
from explainkit.explain.gradcam import compute_cam, normalize_maps
from explainkit.explain.layers import target_layer
from explainkit.explain.methods import METHODS
from explainkit.explain.outputs import as_scores_model
from explainkit.explain.targets import Target, TargetModel

__all__ = ["AttributionFn", "attribute", "attribution_fn", "reduce_channels"]

# fn(model, images, targets): targets are class indices (N,) or a Target (targets.py).
AttributionFn = Callable[[nn.Module, Tensor, "Tensor | Target"], Tensor]


def reduce_channels(name: str, attributions: Tensor) -> Tensor:
    """(N, C, H, W) attributions of method ``name`` -> (N, H, W), by its one rule."""
    rule = METHODS[name].reduction
    if rule == "map" or attributions.dim() == 3:
        return attributions
    if rule == "max_abs":
        return attributions.abs().amax(1)
    return attributions.abs().sum(1)


def attribution_fn(
    name: str,
    *,
    layer: str | None = None,
    seed: int = 0,
    ig_steps: int = 16,
    internal_batch_size: int | None = 256,
    occlusion_window: int = 4,
    reshape: str = "auto",
) -> AttributionFn:
    """The method ``name`` as ``fn(model, images, targets) -> (N, H, W)`` maps in [0, 1].

    Args:
        name: A key of :data:`METHODS`.
        layer: Target layer of the methods that use one (CAMs, Guided Grad-CAM).
        reshape: How the native CAMs view ``layer``'s output (``AnalysisContext.layer_reshape``
            gives the run's).
        seed: Seed of the ``random`` baseline.
        ig_steps: Riemann steps of Integrated Gradients.
        internal_batch_size: Largest batch Integrated Gradients and Occlusion run at once.
        occlusion_window: Occlusion patch side in pixels (the stride equals the window).
    """
    if name not in METHODS:
        raise AnalyzerError(
            f"unknown attribution method {name!r}; choose from: {', '.join(METHODS)}"
        )
    method = METHODS[name]
    if method.uses_layer and not layer:
        raise AnalyzerError(f"attribution method {name} needs a target layer")
    if method.source == "native":
        raw = _cam_fn(name, layer, reshape)  # type: ignore[arg-type]
    elif method.source == "baseline":
        raw = _random_fn(seed)
    else:
        raw = _captum_fn(name, layer, ig_steps, internal_batch_size, occlusion_window)

    def fn(model: nn.Module, images: Tensor, targets: Tensor) -> Tensor:
        maps = reduce_channels(name, raw(model, images, targets)).detach().float()
        # CAMs and the random baseline are already maps in [0, 1].
        return normalize_maps(maps) if method.source == "captum" else maps

    fn.__name__ = name
    return fn


def attribute(
    fn: AttributionFn,
    model: nn.Module,
    images: Tensor,
    targets: Tensor | Target,
    batch_size: int = 64,
) -> Tensor:
    """Maps (N, H, W) for all ``images``, ``batch_size`` at a time, on the model's device.

    ``targets``: one class per image, or a :class:`explainkit.explain.targets.Target` (a
    detection, a segmentation region...), cut with its images."""
    if images.shape[0] == 0:
        raise AnalyzerError("no images to explain; pass at least one")
    if isinstance(targets, Target):
        n = images.shape[0]
        return torch.cat(
            [
                fn(
                    model,
                    images[s : s + batch_size],
                    targets.take(torch.arange(s, min(n, s + batch_size))),
                )
                for s in range(0, n, batch_size)
            ]
        )
    targets = targets.to(images.device)
    return torch.cat(
        [
            fn(model, images[s : s + batch_size], targets[s : s + batch_size])
            for s in range(0, images.shape[0], batch_size)
        ]
    )


def _cam_fn(method: str, layer: str, reshape: str) -> AttributionFn:
    def fn(model: nn.Module, images: Tensor, targets: Tensor) -> Tensor:
        return compute_cam(model, images, layer, method, target=targets, reshape=reshape).maps

    return fn


def _random_fn(seed: int) -> AttributionFn:
    """A model-independent pseudo-random map, a deterministic function of the image.

    Because the same image always gets the same map, whatever the weights, the random baseline
    fails the randomization check (as any model-independent map should), while its pixel
    order is as good as random for deletion/insertion and the pointing game.
    """

    def fn(model: nn.Module, images: Tensor, targets: Tensor) -> Tensor:
        n, c, h, w = images.shape
        g = torch.Generator().manual_seed(seed)
        field = (torch.rand(h, w, generator=g, dtype=torch.float64) * 1000).to(images.device)
        coef = (torch.rand(c, generator=g, dtype=torch.float64) * 100 + 10).to(images.device)
        x = (images.double() * coef.view(1, c, 1, 1)).sum(1) + field
        v = torch.sin(x) * 43758.5453
        return (v - v.floor()).float()

    return fn


def _captum_fn(
    method: str, layer: str | None, ig_steps: int, internal_batch: int | None, window: int
) -> AttributionFn:
    """Raw (N, C, H, W) attributions of one Captum method, memory bounded."""

    def fn(model: nn.Module, images: Tensor, targets: Tensor) -> Tensor:
        import captum.attr as ca

        module = target_layer(model, layer).module if method == "guided_gradcam" else None
        if isinstance(targets, Target):  # Captum explains output 0 of the target's score
            model, targets = TargetModel(model, targets), 0  # type: ignore[assignment]
        model = as_scores_model(model)  # layers are found on the user's model, not the wrapper
        x = images.detach().clone().requires_grad_(True)
        with torch.inference_mode(False), torch.enable_grad(), warnings.catch_warnings():
            # Captum warns that it sets requires_grad on inputs and hooks ReLUs: expected.
            warnings.simplefilter("ignore", UserWarning)
            if method == "saliency":
                return ca.Saliency(model).attribute(x, target=targets, abs=True)
            if method == "integrated_gradients":
                # Baseline 0 in normalized space is the dataset-mean image.
                return ca.IntegratedGradients(model).attribute(
                    x, baselines=torch.zeros_like(x), target=targets, n_steps=ig_steps,
                    internal_batch_size=internal_batch,
                )  # fmt: skip
            if method == "guided_gradcam":
                return ca.GuidedGradCam(model, module).attribute(x, target=targets)
            if method == "input_x_gradient":
                return ca.InputXGradient(model).attribute(x, target=targets)
            if method == "guided_backprop":
                return ca.GuidedBackprop(model).attribute(x, target=targets)
            side = min(window, x.shape[-1], x.shape[-2])
            per_eval = max(1, (internal_batch or 64) // max(x.shape[0], 1))
            shape = (x.shape[1], side, side)
            return ca.Occlusion(model).attribute(
                x, target=targets, sliding_window_shapes=shape, strides=shape, baselines=0.0,
                perturbations_per_eval=per_eval,
            )  # fmt: skip

    return fn
