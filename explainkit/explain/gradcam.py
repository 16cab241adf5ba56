"""Native, batched class activation maps: Grad-CAM and its gradient-weighted relatives.

One base class, :class:`CAM`, owns everything the methods share (torch-cam's template):
target-layer lookup, the forward hook, eval mode, target selection, one forward and one
backward per batch, upsampling and per-image normalization. Subclasses only say how channel
weights come from activations and gradients (``_weights``).

Why it is fast: during attribution no parameter requires grad and the forward hook hands the
rest of the network a fresh leaf copy of the target layer's output. Autograd therefore records
nothing before the target layer, and the backward pass runs from the logits down to that layer
only, with no parameter gradients. On a ResNet18 with ``layer4`` as target this costs little
more than plain inference.

Transformers: ``reshape`` says how the layer's output is viewed as (N, C, h, w) maps
(:class:`explainkit.explain.layers.Layout`): ``"nchw"`` as it is, ``"vit"`` (N, tokens, C)
with the class and register tokens dropped and the patch tokens laid out on their grid,
``"swin"`` (N, H, W, C) channels-last, and ``"auto"`` (the default) reads a 4-D output as
NCHW and a 3-D one as ViT tokens. The hook still hands on a leaf of the layer's own output;
activations and their gradients are both viewed the same way before the weights are
computed, so every method works on token layers unchanged. For torchvision's ViT the usual
target is the last block's first LayerNorm (``encoder.layers.encoder_layer_11.ln_1`` for
ViT-B/16): after that block's attention only the class token reaches the logits, so the
patch tokens of the block's output have zero gradient.

Example:
    >>> with GradCAM(model, "layer4") as cam:
    ...     result = cam(images, target="predicted")
    >>> result.maps.shape  # (N, H, W), each map scaled to [0, 1]
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from explainkit.errors import AnalyzerError
from explainkit.explain.cam_result import CAMResult, normalize_maps
from explainkit.explain.layers import (
    RESHAPES,
    Layout,
    locate_layer,
    looks_channels_last,
    resolve_layout,
    target_layer,
)
from explainkit.explain.methods import CAM_METHODS
from explainkit.explain.outputs import scores_of

__all__ = [
    "CAM",
    "METHODS",
    "RESHAPES",
    "CAMResult",
    "GradCAM",
    "GradCAMpp",
    "LayerCAM",
    "XGradCAM",
    "compute_cam",
    "compute_cams",
    "iter_cam",
    "normalize_maps",
]


class CAM:
    """Base class of gradient-weighted CAM methods; subclasses override ``_weights``.

    The forward hook lives only while a batch is explained: it is registered at the start of
    ``__call__`` and removed in a ``finally`` block, so an exception never leaves the model
    changed. Training flags and ``requires_grad`` flags are saved and restored the same way.
    Using the object as a context manager is supported (``close`` is idempotent).

    Args:
        model: a classifier returning (N, C) logits.
        layer: a dotted name from ``model.named_modules()`` (``"layer4"``, ``"layer3.1"``), one
            of the model's modules (``model.layer4[-1]``), or None to let
            :func:`explainkit.explain.layers.target_layer` choose (the model's declared default,
            else the last spatial layer the output depends on); the name is :attr:`layer`.
        reshape: how the layer's output becomes (N, C, h, w) maps: ``"auto"`` (4-D: NCHW,
            3-D: ViT tokens), ``"nchw"``, ``"vit"`` ((N, tokens, C); the leading class and
            register tokens are dropped and the grid is found by
            :func:`explainkit.explain.layers.token_grid`) or ``"swin"`` ((N, H, W, C)). The
            layout the last call used is :attr:`layout`.

    Raises:
        AnalyzerError: ``layer`` is not a module of ``model``, or ``reshape`` is unknown.
    """

    name = "cam"

    def __init__(
        self, model: nn.Module, layer: str | nn.Module | None = None, reshape: str = "auto"
    ) -> None:
        if reshape not in RESHAPES:
            raise AnalyzerError(f"unknown reshape {reshape!r}; use one of {', '.join(RESHAPES)}")
        self.model = model
        self.reshape = reshape
        self.layer: str | None = None
        self.module: nn.Module | None = None
        if layer is not None or hasattr(model, "default_target_layer"):
            self._choose(target_layer(model, layer))
        self.layout: Layout | None = None  # how the last call viewed the layer's output
        # Walking the module tree costs more than a small batch's forward pass on a GPU
        # (launch-bound), so the lists are taken once; the model's structure must not change.
        self._all_modules = list(model.modules())
        self._params = list(model.parameters())
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._copy_output = False
        self._warned_unlocalized = False
        self._warned_layout = False
        self._checked_tokens = False
        self._size: tuple[int, int] = (0, 0)
        self._acts: list[Tensor] = []

    def _choose(self, chosen: Any) -> None:
        self.layer, self.module = chosen.name, chosen.module

    # -- context manager -------------------------------------------------------------------
    def __enter__(self) -> CAM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Remove any hook still registered (normally none is, between calls)."""
        try:
            for handle in self._handles:
                handle.remove()
        finally:
            self._handles.clear()
            self._acts.clear()

    # -- the hook --------------------------------------------------------------------------
    def _hook(self, module: nn.Module, inputs: Any, output: Any) -> Tensor:
        # Checked here, during the forward pass: a wrong layer fails before the rest runs.
        self.layout = resolve_layout(output, self.reshape, self._size, self.layer)
        if self._acts:
            raise AnalyzerError(
                f"layer {self.layer!r} runs more than once per forward pass; "
                "pick a module that is used once, e.g. a stage or a block"
            )
        # A leaf that requires grad: the backward pass stops here. The network goes on with the
        # leaf itself; autograd refuses in-place changes to a leaf, and then ``__call__`` runs
        # the batch again handing on a copy (``_copy_output``) that in-place ops may change.
        leaf = output.detach().requires_grad_(True)
        self._acts.append(leaf)
        return leaf.clone() if self._copy_output else leaf

    # -- template --------------------------------------------------------------------------
    def __call__(
        self,
        images: Tensor,
        target: str | int | Tensor | Sequence[int] = "predicted",
        true_targets: Tensor | Sequence[int] | None = None,
    ) -> CAMResult:
        """Explain one batch with one forward and one backward pass.

        Args:
            images: float (N, C, H, W), normalized as the model expects.
            target: ``"predicted"``, ``"true"`` (uses ``true_targets``), a class index for
                every image, or one index per image.
            true_targets: (N,) labels, needed when ``target="true"``.

        Returns:
            The batch's :class:`CAMResult`, on the model's device.

        Raises:
            AnalyzerError: bad images or targets, or a layer that cannot be explained.
        """
        return self._explain(images, target, true_targets, [self])[0]

    def _explain(
        self,
        images: Tensor,
        target: str | int | Tensor | Sequence[int],
        true_targets: Tensor | Sequence[int] | None,
        methods: Sequence[CAM],
    ) -> list[CAMResult]:
        """One forward and one backward pass; each of ``methods`` turns them into maps."""
        images = self._precheck(images)
        model = self.model
        self._size = (int(images.shape[-2]), int(images.shape[-1]))
        training = [m for m in self._all_modules if m.training]
        frozen = [p for p in self._params if p.requires_grad]
        self._acts.clear()
        if self.module is None:  # no layer given: locate one on the first batch, and say so
            self._choose(target_layer(model, None, images[:1]))
            warnings.warn(f"no layer given; explaining {self.layer!r}", stacklevel=3)
        self._handles.append(self.module.register_forward_hook(self._hook))
        try:
            for p in frozen:
                p.requires_grad_(False)
            if training:
                model.eval()
            with torch.inference_mode(False), torch.enable_grad():
                logits = self._forward(images)
                if not self._acts:
                    raise AnalyzerError(
                        f"layer {self.layer!r} was not used in the forward pass; "
                        "pick a layer the model runs"
                    )
                acts = self._acts[0]
                if logits.dim() != 2:
                    raise AnalyzerError("the model must return (N, C) logits to explain")
                predicted = logits.detach().argmax(1)
                targets = self._targets(target, true_targets, predicted, logits.shape[1])
                # d(sum_n logits[n, t_n]) / d acts, as Captum computes it, without the
                # gather/sum nodes: the one-hot matrix is the gradient of the logits.
                onehot = torch.zeros_like(logits).scatter_(1, targets[:, None], 1.0)
                try:
                    (grads,) = torch.autograd.grad(logits, acts, grad_outputs=onehot)
                except RuntimeError as e:
                    raise AnalyzerError(
                        f"the model's output does not depend on layer {self.layer!r} "
                        f"({e}); pick a layer before the classifier head"
                    ) from e
            with torch.no_grad():
                # Gradients are taken with respect to the layer's own output (tokens for a
                # transformer), then viewed as (N, C, h, w) exactly as the activations are.
                layout: Layout = self.layout  # type: ignore[assignment]  # set by the hook
                a, g = layout.to_nchw(acts.detach()), layout.to_nchw(grads)
                computed = [method.compute_maps(a, g, self._size) for method in methods]
                unreached = False
                if layout.kind == "vit" and not self._checked_tokens:
                    self._checked_tokens = True  # one device sync, on the first call only
                    unreached = not bool(g.any())
        finally:
            self.close()
            for p in frozen:
                p.requires_grad_(True)
            for m in training:
                m.training = True
        if a.shape[-2:].numel() == 1 and not self._warned_unlocalized:
            self._warn_unlocalized(images)
        if self.reshape == "auto" and not self._warned_layout:
            self._warn_channels_last(tuple(acts.shape))  # the layer's own output
        if unreached:
            self._warn_unreached_patches(images)
        logits = logits.detach()
        return [CAMResult(maps, raw, targets, predicted, logits) for raw, maps in computed]

    def _warn_channels_last(self, shape: tuple[int, ...]) -> None:
        """Once per engine: "auto" reads a 4-D output as NCHW; say so when it looks NHWC."""
        self._warned_layout = True
        if looks_channels_last(shape, *self._size):
            h, w = self._size
            warnings.warn(
                f"layer {self.layer!r} outputs {shape}, which looks channels-last (N, H, W, C) "
                f"for {h}x{w} inputs, as a Swin stage does, but reshape 'auto' reads 4-D "
                "outputs as (N, C, H, W); pass reshape 'swin' if it is channels-last, or "
                "'nchw' to keep this reading",
                stacklevel=3,
            )

    def _warn_unlocalized(self, images: Tensor) -> None:
        """Once per engine: a 1x1 layer's maps are constant, so say which layer would work."""
        self._warned_unlocalized = True
        better = locate_layer(self.model, images, self.layout.kind if self.layout else "nchw")
        instead = f"an earlier layer such as {better!r}" if better else "an earlier layer"
        h, w = images.shape[-2:]
        warnings.warn(
            f"layer {self.layer!r} gives 1x1 maps for {h}x{w} inputs, which cannot localize "
            f"anything (each map is one number, shown as zero); explain {instead}",
            stacklevel=3,
        )

    def _warn_unreached_patches(self, images: Tensor) -> None:
        """Once per engine: patch tokens the logits do not depend on give all-zero maps."""
        better = locate_layer(self.model, images, "vit")
        if better in (None, self.layer):  # no token layer reaches the logits at all
            warnings.warn(
                f"the patch tokens of layer {self.layer!r} get no gradient, so every map is "
                "zero; a classifier head of zeros (torchvision's ViT before training) sends "
                "no gradient anywhere: load trained weights",
                stacklevel=3,
            )
            return
        warnings.warn(
            f"the logits do not depend on the patch tokens of layer {self.layer!r} (a ViT reads "
            "only the class token after the last block's attention), so every map is zero; "
            f"explain an earlier token layer such as {better!r} (the last block's first norm)",
            stacklevel=3,
        )

    def _forward(self, images: Tensor) -> Tensor:
        try:
            return scores_of(self.model(images))
        except RuntimeError as e:
            if self._copy_output or "leaf Variable that requires grad" not in str(e):
                raise
        self._copy_output = True  # an in-place op follows the layer: hand on a copy
        self._acts.clear()
        return scores_of(self.model(images))

    def _precheck(self, images: Tensor) -> Tensor:
        if not isinstance(images, Tensor) or images.dim() != 4 or not images.is_floating_point():
            raise AnalyzerError(
                "images must be a float (N, C, H, W) tensor, normalized as for training; "
                f"got {getattr(images, 'dtype', type(images))} "
                f"{tuple(getattr(images, 'shape', ()))}"
            )
        if images.shape[0] == 0:
            raise AnalyzerError("no images to explain; pass at least one")
        if self._params and images.device != self._params[0].device:
            images = images.to(self._params[0].device, non_blocking=True)
        return images

    def _targets(
        self,
        target: str | int | Tensor | Sequence[int],
        true_targets: Tensor | Sequence[int] | None,
        predicted: Tensor,
        num_classes: int,
    ) -> Tensor:
        n, device = predicted.shape[0], predicted.device
        if isinstance(target, str):
            if target == "predicted":
                return predicted
            if target != "true":
                raise AnalyzerError(
                    f"unknown target {target!r}; use 'predicted', 'true', a class index "
                    "or one index per image"
                )
            if true_targets is None:
                raise AnalyzerError("target='true' needs true_targets (one label per image)")
            target = true_targets
        if isinstance(target, bool):
            raise AnalyzerError(f"target must be a class index, not {target!r}")
        if isinstance(target, int):
            if not 0 <= target < num_classes:
                raise AnalyzerError(f"target class {target} is not in [0, {num_classes})")
            return torch.full((n,), target, dtype=torch.int64, device=device)
        t = torch.as_tensor(target)
        if t.dim() != 1 or t.shape[0] != n or t.is_floating_point() or t.dtype == torch.bool:
            raise AnalyzerError(
                f"targets must be {n} integer class indices, one per image; "
                f"got {t.dtype} {tuple(t.shape)}"
            )
        # Checked only on the CPU: a check on the device would cost a sync per batch.
        if t.device.type == "cpu" and ((t < 0) | (t >= num_classes)).any():
            raise AnalyzerError(f"targets must lie in [0, {num_classes})")
        return t.to(device=device, dtype=torch.int64, non_blocking=True)

    def compute_maps(
        self, acts: Tensor, grads: Tensor, size: Sequence[int]
    ) -> tuple[Tensor, Tensor]:
        """Raw maps (N, h, w) after ReLU, and maps upsampled to ``size`` and normalized."""
        acts, grads = acts.float(), grads.float()
        weights = self._weights(acts, grads)
        if weights.dim() == 2:  # channel weights (N, C): a batched matrix product, no temporary
            raw = F.relu(torch.einsum("nc,nchw->nhw", weights, acts))
        else:
            raw = F.relu((weights * acts).sum(1))
        up = F.interpolate(raw[:, None], size=tuple(size), mode="bilinear", align_corners=False)
        return raw, normalize_maps(up[:, 0])

    def _weights(self, acts: Tensor, grads: Tensor) -> Tensor:
        """Channel weights (N, C), or map-level weights (N, C, h, w), for (N, C, h, w) inputs."""
        raise NotImplementedError


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


METHODS: dict[str, type[CAM]] = {cls.name: cls for cls in (GradCAM, GradCAMpp, XGradCAM, LayerCAM)}
assert tuple(METHODS) == CAM_METHODS, "explain/methods.py lists the native CAMs"


def _method(method: str) -> type[CAM]:
    if method not in METHODS:
        raise AnalyzerError(
            f"unknown CAM method {method!r}; available: {', '.join(sorted(METHODS))}"
        )
    return METHODS[method]


def iter_cam(
    model: nn.Module,
    images: Tensor,
    layer: str | nn.Module | None = None,
    method: str = "gradcam",
    target: str | int | Tensor | Sequence[int] = "predicted",
    batch_size: int | None = None,
    true_targets: Tensor | Sequence[int] | None = None,
    reshape: str = "auto",
) -> Iterator[CAMResult]:
    """Yield one :class:`CAMResult` per batch of ``batch_size`` images (all when None)."""
    batches = _batches(images, target, batch_size, true_targets)
    with _method(method)(model, layer, reshape) as cam:
        if not batches:
            cam._precheck(images)  # raises the usual error
        for x, batch_target, true in batches:
            yield cam(x, target=batch_target, true_targets=true)


def _batches(
    images: Tensor,
    target: str | int | Tensor | Sequence[int],
    batch_size: int | None,
    true_targets: Tensor | Sequence[int] | None,
) -> list[tuple[Tensor, Any, Tensor | None]]:
    """(images, target, true targets) of each batch of ``batch_size`` images (all when None);
    per-image targets are cut with their images. Empty for no images."""
    n = images.shape[0] if isinstance(images, Tensor) else 0
    step = batch_size or max(n, 1)
    if step < 1:
        raise AnalyzerError(f"batch_size must be positive, got {batch_size}")
    per_image = not isinstance(target, (str, int))
    target_t = torch.as_tensor(target) if per_image else None
    true_t = torch.as_tensor(true_targets) if true_targets is not None else None
    return [
        (
            images[start : start + step],
            target_t[start : start + step] if per_image else target,  # type: ignore[index]
            true_t[start : start + step] if true_t is not None else None,
        )
        for start in range(0, n, step)
    ]


def compute_cams(
    model: nn.Module,
    images: Tensor,
    layer: str | nn.Module | None = None,
    methods: Sequence[str] = ("gradcam",),
    target: str | int | Tensor | Sequence[int] = "predicted",
    batch_size: int | None = None,
    true_targets: Tensor | Sequence[int] | None = None,
    reshape: str = "auto",
) -> dict[str, CAMResult]:
    """Several CAM methods of one layer from one forward and one backward pass per batch.

    Every method weighs the same activations and gradients, so explaining ``images`` with
    Grad-CAM and Grad-CAM++ together costs what one of them costs. Arguments as
    :func:`compute_cam`; returns method name -> joined :class:`CAMResult`.
    """
    if not methods:
        raise AnalyzerError("no CAM methods to compute; name at least one")
    engines = [_method(name)(model, layer, reshape) for name in methods]
    batches = _batches(images, target, batch_size, true_targets)
    first = engines[0]
    if not batches:
        first._precheck(images)  # raises the usual error
    with first:
        results = [first._explain(x, t, true, engines) for x, t, true in batches]
    return {name: CAMResult.cat([batch[i] for batch in results]) for i, name in enumerate(methods)}


def compute_cam(
    model: nn.Module,
    images: Tensor,
    layer: str | nn.Module | None = None,
    method: str = "gradcam",
    target: str | int | Tensor | Sequence[int] = "predicted",
    batch_size: int | None = None,
    true_targets: Tensor | Sequence[int] | None = None,
    reshape: str = "auto",
) -> CAMResult:
    """Explain ``images`` in batches and return one joined :class:`CAMResult`.

    Args:
        model: a classifier returning (N, C) logits.
        images: float (N, C, H, W), normalized as the model expects.
        layer: a dotted module name (``"layer4"``), a module of the model, or None to let
            :func:`explainkit.explain.layers.target_layer` choose.
        method: a key of :data:`METHODS`.
        target: see :meth:`CAM.__call__`.
        batch_size: images per forward/backward pass; None does all at once.
        true_targets: labels for ``target="true"``.
        reshape: how the layer's output becomes maps: see :class:`CAM`.

    Returns:
        Maps and metadata for all images, on the model's device.
    """
    return CAMResult.cat(
        list(iter_cam(model, images, layer, method, target, batch_size, true_targets, reshape))
    )
