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
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from explainkit.errors import AnalyzerError
from explainkit.explain.gradcam import compute_cam, normalize_maps
from explainkit.explain.layers import target_layer
from explainkit.explain.methods import METHODS, SMOOTHGRAD
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
    smoothgrad_samples: int = 16,
    smoothgrad_noise: float = 0.15,
    **perturbation: Any,
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
        smoothgrad_samples: noisy copies per image of ``smoothgrad:NAME``.
        smoothgrad_noise: their noise's standard deviation, as a fraction of each batch's
            value range (Smilkov et al. 2017 recommend 10-20%).
        perturbation: options of the perturbation methods' classes (``channels``,
            ``samples``, ``masks``, ``mask_budget``, ``max_batch``: by default 256 masked
            inputs per pass on a GPU, 64 on the CPU).
    """
    if name not in METHODS:
        raise AnalyzerError(
            f"unknown attribution method {name!r}; choose from: {', '.join(METHODS)}"
        )
    method = METHODS[name]
    if method.uses_layer and not layer:
        raise AnalyzerError(f"attribution method {name} needs a target layer")
    inner = name[len(SMOOTHGRAD) :] if name.startswith(SMOOTHGRAD) else name
    tunnel = None
    if inner != name:
        tunnel = (smoothgrad_samples, smoothgrad_noise, seed)
    if inner != name and method.source != "captum":
        # Any other method: its maps averaged over noisy copies (SmoothGrad's rule).
        kwargs = dict(layer=layer, seed=seed, ig_steps=ig_steps, reshape=reshape,
                      internal_batch_size=internal_batch_size,
                      occlusion_window=occlusion_window, **perturbation)  # fmt: skip
        raw = _smoothed(attribution_fn(inner, **kwargs), *tunnel)  # type: ignore[arg-type]
    elif method.source == "native":
        raw = _cam_fn(name, layer, reshape)  # type: ignore[arg-type]
    elif method.source == "perturbation":
        options = dict(perturbation)  # max_batch: the engine picks one for the device
        raw = _perturbation_fn(name, layer, reshape, seed, options)
    elif method.source == "baseline":
        raw = _random_fn(seed)
    else:
        raw = _captum_fn(inner, layer, ig_steps, internal_batch_size, occlusion_window, seed,
                         tunnel)  # fmt: skip

    def fn(model: nn.Module, images: Tensor, targets: Tensor) -> Tensor:
        maps = reduce_channels(name, raw(model, images, targets)).detach().float()
        # CAMs and the random baseline are already maps in [0, 1].
        return (
            maps
            if method.source in ("native", "baseline") and inner == name
            else (normalize_maps(maps))
        )

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


def _perturbation_fn(
    method: str, layer: str | None, reshape: str, seed: int, options: dict[str, Any]
) -> AttributionFn:
    """A perturbation CAM (or RISE) of :mod:`explainkit.explain.perturbation`, seeded."""
    from explainkit.explain.perturbation import PERTURBATION_CLASSES as ENGINES

    if method in ("sscam", "rise"):
        options = {"seed": seed, **options}

    last: dict[str, Any] = {}  # the engine of the last model: its fast copy is reused

    def fn(model: nn.Module, images: Tensor, targets: Tensor) -> Tensor:
        if last.get("model") is not model:
            last.update(model=model, engine=ENGINES[method](model, layer, reshape, **options))
        return last["engine"](images, targets).maps

    return fn


def _smoothed(inner: AttributionFn, samples: int, noise: float, seed: int) -> AttributionFn:
    """SmoothGrad of a method Captum does not run: the mean of its maps over noisy copies."""
    if samples < 1:
        raise AnalyzerError(f"smoothgrad samples must be at least 1, got {samples}")

    def fn(model: nn.Module, images: Tensor, targets: Tensor) -> Tensor:
        g = torch.Generator().manual_seed(seed)
        sigma = noise * float(images.max() - images.min())
        total = torch.zeros(images.shape[0], *images.shape[2:], device=images.device)
        for _ in range(samples):
            eps = torch.randn(images.shape, generator=g).to(images.device)
            total += inner(model, images + sigma * eps, targets)
        return total / samples

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
    method: str,
    layer: str | None,
    ig_steps: int,
    internal_batch: int | None,
    window: int,
    seed: int = 0,
    tunnel: tuple[int, float, int] | None = None,
) -> AttributionFn:
    """Raw (N, C, H, W) attributions of one Captum method, memory bounded; ``tunnel``
    ``(samples, noise, seed)`` wraps it in Captum's ``NoiseTunnel`` (SmoothGrad)."""

    def fn(model: nn.Module, images: Tensor, targets: Tensor) -> Tensor:
        import captum.attr as ca

        module = target_layer(model, layer).module if method == "guided_gradcam" else None
        if isinstance(targets, Target):  # Captum explains output 0 of the target's score
            model, targets = TargetModel(model, targets), 0  # type: ignore[assignment]
        model = as_scores_model(model)  # layers are found on the user's model, not the wrapper
        x = images.detach().clone().requires_grad_(True)
        algo, kwargs = _captum_method(ca, method, model, module, x, ig_steps, internal_batch,
                                      window)  # fmt: skip
        if tunnel is not None:
            samples, noise, _ = tunnel
            algo = ca.NoiseTunnel(algo)
            per = max(1, (internal_batch or 64) // max(x.shape[0], 1))
            kwargs.update(nt_type="smoothgrad", nt_samples=samples, nt_samples_batch_size=per,
                          stdevs=noise * float(x.detach().max() - x.detach().min()))  # fmt: skip
        fork = [x.device] if x.device.type == "cuda" else []
        with torch.inference_mode(False), torch.enable_grad(), warnings.catch_warnings(), \
                torch.random.fork_rng(devices=fork):  # fmt: skip
            # Captum warns that it sets requires_grad on inputs and hooks ReLUs: expected.
            warnings.simplefilter("ignore", UserWarning)
            torch.manual_seed(tunnel[2] if tunnel else seed)  # GradientShap, NoiseTunnel draw
            state = np.random.get_state()  # GradientShap also draws from numpy's generator
            np.random.seed(seed)
            try:
                return algo.attribute(x, target=targets, **kwargs)
            except (TypeError, AssertionError, RuntimeError) as e:
                if method == "lrp":
                    raise AnalyzerError(
                        f"captum's LRP rules do not cover this model ({e}); use another method"
                    ) from e
                raise
            finally:
                np.random.set_state(state)

    return fn


def _captum_method(
    ca: Any,
    method: str,
    model: nn.Module,
    module: nn.Module | None,
    x: Tensor,
    ig_steps: int,
    internal_batch: int | None,
    window: int,
) -> tuple[Any, dict[str, Any]]:
    """Captum's attribution object for ``method`` and its ``attribute`` keyword arguments."""
    zeros = torch.zeros_like(x)  # baseline 0 in normalized space: the dataset-mean image
    if method == "saliency":
        return ca.Saliency(model), {"abs": True}
    if method == "integrated_gradients":
        return ca.IntegratedGradients(model), {
            "baselines": zeros, "n_steps": ig_steps, "internal_batch_size": internal_batch,
        }  # fmt: skip
    if method == "guided_gradcam":
        return ca.GuidedGradCam(model, module), {}
    if method == "input_x_gradient":
        return ca.InputXGradient(model), {}
    if method == "guided_backprop":
        return ca.GuidedBackprop(model), {}
    if method == "deeplift":
        return ca.DeepLift(model), {"baselines": zeros}
    if method == "gradient_shap":
        # Expected gradients from the mean image with Gaussian jitter (Lundberg & Lee 2017).
        return ca.GradientShap(model), {"baselines": zeros[:1], "n_samples": 16, "stdevs": 0.1}
    if method == "lrp":
        _check_lrp(model)
        return ca.LRP(model), {}
    side = min(window, x.shape[-1], x.shape[-2])
    per_eval = max(1, (internal_batch or 64) // max(x.shape[0], 1))
    shape = (x.shape[1], side, side)
    return ca.Occlusion(model), {
        "sliding_window_shapes": shape, "strides": shape, "baselines": 0.0,
        "perturbations_per_eval": per_eval,
    }  # fmt: skip


def _check_lrp(model: nn.Module) -> None:
    """Refuse, in one sentence, a model Captum's LRP rules do not cover."""
    from captum.attr._core.lrp import SUPPORTED_LAYERS_WITH_RULES, SUPPORTED_NON_LINEAR_LAYERS

    known = tuple(SUPPORTED_LAYERS_WITH_RULES) + tuple(SUPPORTED_NON_LINEAR_LAYERS)
    leaves = [m for m in model.modules() if not list(m.children())]
    bad = sorted({type(m).__name__ for m in leaves if not isinstance(m, known)})
    if bad:
        raise AnalyzerError(
            f"captum's LRP has no rule for {', '.join(bad)} in this model; use deeplift or "
            "integrated_gradients instead"
        )
