"""Native, batched class activation maps: the public module of the CAM engine.

The engine is a package (:mod:`explainkit.explain.cams`): one template, :class:`CAM`
(:mod:`~explainkit.explain.cams.base`), owns the hook, eval mode, the target, one forward and
one backward per batch, upsampling and normalization; each method is a small subclass
(:mod:`~explainkit.explain.cams.gradient`: Grad-CAM, Grad-CAM++, XGrad-CAM, LayerCAM,
HiResCAM, element-wise Grad-CAM, ShapleyCAM, Finer-CAM; :mod:`~explainkit.explain.cams.fullgrad`:
FullGrad, every bias layer's gradient in its own pass;
:mod:`~explainkit.explain.cams.smooth`: Smooth Grad-CAM++; :mod:`~explainkit.explain.cams.legrad`:
LeGrad for vision transformers; :mod:`~explainkit.explain.cams.factorization`: Deep Feature
Factorization;
:mod:`~explainkit.explain.cams.projection`: Eigen-CAM, EigenGrad-CAM, KPCA-CAM, FEM and the
random baseline). This module re-exports them and runs them over many images.

What is explained is a target (:mod:`explainkit.explain.targets`): a class of a classifier by
default, or a detection, a segmentation region, a multi-label label, a regression output or
an embedding's similarity.

Transformers: ``reshape`` says how the layer's output is viewed as (N, C, h, w) maps
(:class:`explainkit.explain.layers.Layout`): ``"nchw"`` as it is, ``"vit"`` (N, tokens, C)
with the class and register tokens dropped and the patch tokens laid out on their grid,
``"swin"`` (N, H, W, C) channels-last, and ``"auto"`` (the default) reads a 5-D output as a
video layer, 4-D as NCHW and 3-D as ViT tokens. For torchvision's ViT the usual target is the
last block's first LayerNorm (``encoder.layers.encoder_layer_11.ln_1`` for ViT-B/16): after
that block's attention only the class token reaches the logits.

Example:
    >>> with GradCAM(model, "layer4") as cam:
    ...     result = cam(images, target="predicted")
    >>> result.maps.shape  # (N, H, W), each map scaled to [0, 1]
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from explainkit.errors import AnalyzerError
from explainkit.explain.cam_result import CAMResult, normalize_maps
from explainkit.explain.cams.base import CAM, TargetArg
from explainkit.explain.cams.factorization import DFF, Concepts, deep_feature_factorization
from explainkit.explain.cams.fullgrad import FullGrad
from explainkit.explain.cams.gradient import (
    FinerCAM,
    GradCAM,
    GradCAMElementWise,
    GradCAMpp,
    HiResCAM,
    LayerCAM,
    ShapleyCAM,
    XGradCAM,
)
from explainkit.explain.cams.legrad import LeGrad
from explainkit.explain.cams.projection import FEM, KPCACAM, EigenCAM, EigenGradCAM, RandomCAM
from explainkit.explain.cams.smooth import SmoothGradCAMpp
from explainkit.explain.layers import RESHAPES
from explainkit.explain.methods import CAM_METHODS
from explainkit.explain.targets import Target, as_target

__all__ = [
    "CAM",
    "FEM",
    "KPCACAM",
    "CAM_CLASSES",
    "RESHAPES",
    "CAMResult",
    "DFF",
    "Concepts",
    "EigenCAM",
    "EigenGradCAM",
    "FinerCAM",
    "FullGrad",
    "GradCAM",
    "GradCAMElementWise",
    "GradCAMpp",
    "HiResCAM",
    "LayerCAM",
    "LeGrad",
    "RandomCAM",
    "ShapleyCAM",
    "SmoothGradCAMpp",
    "XGradCAM",
    "compute_cam",
    "compute_cams",
    "deep_feature_factorization",
    "iter_cam",
    "normalize_maps",
]

CAM_CLASSES: dict[str, type[CAM]] = {
    cls.name: cls
    for cls in (
        GradCAM,
        GradCAMpp,
        XGradCAM,
        LayerCAM,
        HiResCAM,
        GradCAMElementWise,
        EigenCAM,
        EigenGradCAM,
        KPCACAM,
        FEM,
        ShapleyCAM,
        FinerCAM,
        FullGrad,
        RandomCAM,
        SmoothGradCAMpp,
        LeGrad,
        DFF,
    )
}
assert set(CAM_CLASSES) <= set(CAM_METHODS), "explain/methods.py lists every native CAM"


def _method(method: str) -> type[CAM]:
    if method not in CAM_CLASSES:
        raise AnalyzerError(
            f"unknown CAM method {method!r}; available: {', '.join(sorted(CAM_CLASSES))}"
        )
    return CAM_CLASSES[method]


def iter_cam(
    model: nn.Module,
    images: Tensor,
    layer: str | nn.Module | None = None,
    method: str = "gradcam",
    target: TargetArg = "predicted",
    batch_size: int | None = None,
    true_targets: Tensor | Sequence[int] | None = None,
    reshape: str = "auto",
) -> Iterator[CAMResult]:
    """Yield one :class:`CAMResult` per batch of ``batch_size`` images (all when None)."""
    with _method(method)(model, layer, reshape) as cam:
        resolved = cam.adapt_target(as_target(target, true_targets))
        batches = _batches(images, resolved, batch_size)
        if not batches:
            cam._precheck(images)  # raises the usual error
        for x, batch_target in batches:
            yield cam._explain(x, batch_target, [cam])[0]


def _batches(images: Tensor, target: Target, batch_size: int | None) -> list[tuple[Tensor, Any]]:
    """(images, target) of each batch of ``batch_size`` images (all when None); per-image
    target data is cut with its images. Empty for no images."""
    n = images.shape[0] if isinstance(images, Tensor) else 0
    step = batch_size or max(n, 1)
    if step < 1:
        raise AnalyzerError(f"batch_size must be positive, got {batch_size}")
    _check_count(target, n)
    if step >= n:
        return [(images, target)] if n else []
    return [
        (images[start : start + step], target.take(torch.arange(start, min(start + step, n))))
        for start in range(0, n, step)
    ]


def _check_count(target: Target, n: int) -> None:
    """One entry per image in each of the target's per-image fields."""
    for name in target.per_image:
        value = getattr(target, name)
        if isinstance(value, list) or (isinstance(value, Tensor) and value.dim() > 0):
            if len(value) != n:
                raise AnalyzerError(
                    f"the target holds {len(value)} {name} for {n} images; give one per image"
                )


def compute_cams(
    model: nn.Module,
    images: Tensor,
    layer: str | nn.Module | None = None,
    methods: Sequence[str] = ("gradcam",),
    target: TargetArg = "predicted",
    batch_size: int | None = None,
    true_targets: Tensor | Sequence[int] | None = None,
    reshape: str = "auto",
) -> dict[str, CAMResult]:
    """Several CAM methods of one layer from one forward and one backward pass per batch.

    Every method weighs the same activations and gradients, so explaining ``images`` with
    Grad-CAM and Grad-CAM++ together costs what one of them costs (a method that explains its
    own target, Finer-CAM, or no single layer, FullGrad, takes its own pass). Arguments as
    :func:`compute_cam`; returns method name -> joined :class:`CAMResult`.
    """
    if not methods:
        raise AnalyzerError("no CAM methods to compute; name at least one")
    engines = [_method(name)(model, layer, reshape) for name in methods]
    resolved = as_target(target, true_targets)
    groups: dict[int, tuple[Target, list[int]]] = {}
    for i, engine in enumerate(engines):
        own = engine.adapt_target(resolved)
        key = id(engine) if engine.own_pass else id(own) if own is not resolved else 0
        groups.setdefault(key, (own, []))[1].append(i)
    out: dict[int, CAMResult] = {}
    for own, members in groups.values():
        first = engines[members[0]]
        batches = _batches(images, own, batch_size)
        if not batches:
            first._precheck(images)  # raises the usual error
        with first:
            results = [first._explain(x, t, [engines[i] for i in members]) for x, t in batches]
        for k, i in enumerate(members):
            out[i] = CAMResult.cat([batch[k] for batch in results])
    return {name: out[i] for i, name in enumerate(methods)}


def compute_cam(
    model: nn.Module,
    images: Tensor,
    layer: str | nn.Module | None = None,
    method: str = "gradcam",
    target: TargetArg = "predicted",
    batch_size: int | None = None,
    true_targets: Tensor | Sequence[int] | None = None,
    reshape: str = "auto",
) -> CAMResult:
    """Explain ``images`` in batches and return one joined :class:`CAMResult`.

    Args:
        model: a classifier returning (N, C) logits, or any model a ``target`` reads (a
            detector, a segmenter, an embedding model).
        images: float (N, C, H, W), or (N, C, T, H, W) clips, normalized as the model expects.
        layer: a dotted module name (``"layer4"``), a module of the model, or None to let
            :func:`explainkit.explain.layers.target_layer` choose.
        method: a key of :data:`CAM_CLASSES`.
        target: a :class:`explainkit.explain.targets.Target`, or see :meth:`CAM.__call__`.
        batch_size: images per forward/backward pass; None does all at once.
        true_targets: labels for ``target="true"``.
        reshape: how the layer's output becomes maps: see :class:`CAM`.

    Returns:
        Maps and metadata for all images, on the model's device.
    """
    return CAMResult.cat(
        list(iter_cam(model, images, layer, method, target, batch_size, true_targets, reshape))
    )
