"""The CAM template: everything the methods share (torch-cam's design).

Target-layer lookup, the forward hook, eval mode, the target (what scalar per image is
explained: :mod:`explainkit.explain.targets`), one forward and one backward per batch,
upsampling and per-image normalization. Subclasses only say how a map comes from the layer's
activations and gradients (``_weights`` for channel weights, or ``_cam`` for anything else).

Why it is fast: during attribution no parameter requires grad and the forward hook hands the
rest of the network a fresh leaf copy of the target layer's output. Autograd therefore records
nothing before the target layer, and the backward pass runs from the target's scores down to
that layer only, with no parameter gradients. Methods that need no gradient (EigenCAM, FEM,
KPCA-CAM) skip the backward pass.

Layouts (:class:`explainkit.explain.layers.Layout`): a CNN layer (N, C, h, w) as it is, ViT
tokens (N, T, C), Swin (N, H, W, C), and video layers (N, C, T, h, w), whose frames are laid
one above the other so that every method reduces over all of a clip's positions; a video map
is one map per input frame, (N, T, H, W), scaled to [0, 1] per clip.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Sequence
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
from explainkit.explain.outputs import scores_of
from explainkit.explain.targets import Target, as_target

__all__ = ["CAM", "TargetArg"]

TargetArg = str | int | Tensor | Sequence[int] | Target


class CAM:
    """Base class of CAM methods; subclasses override ``_weights`` or ``_cam``.

    The forward hook lives only while a batch is explained: it is registered at the start of
    ``__call__`` and removed in a ``finally`` block, so an exception never leaves the model
    changed. Training flags and ``requires_grad`` flags are saved and restored the same way.
    Using the object as a context manager is supported (``close`` is idempotent).

    Args:
        model: any module; its output is read by the target (a classifier's (N, C) logits
            by default, or whatever a :class:`explainkit.explain.targets.Target` reads).
        layer: a dotted name from ``model.named_modules()`` (``"layer4"``, ``"layer3.1"``), one
            of the model's modules (``model.layer4[-1]``), or None to let
            :func:`explainkit.explain.layers.target_layer` choose (the model's declared default,
            else the last spatial layer the output depends on); the name is :attr:`layer`.
        reshape: how the layer's output becomes maps: ``"auto"`` (5-D: video, 4-D: NCHW,
            3-D: ViT tokens), ``"nchw"``, ``"vit"`` or ``"swin"``. The layout the last call used
            is :attr:`layout`.

    Raises:
        AnalyzerError: ``layer`` is not a module of ``model``, or ``reshape`` is unknown.
    """

    name = "cam"
    uses_gradients = True  # False: the backward pass is skipped (the target is not used)
    needs_hvp = False  # True: the Hessian-vector product H.A is computed too (ShapleyCAM)
    own_pass = False  # True: explains through its own pass, not one layer's (FullGrad)

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
        self._warned_constant = False
        self._checked_tokens = False
        self._size: tuple[int, ...] = (0, 0)
        self._acts: list[Tensor] = []

    def _choose(self, chosen: Any) -> None:
        self.layer, self.module = chosen.name, chosen.module

    def adapt_target(self, target: Target) -> Target:
        """The target this method explains for the user's ``target`` (Finer-CAM changes it)."""
        return target

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
        self.layout = resolve_layout(output, self.reshape, self._size[-2:], self.layer)
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
        target: TargetArg = "predicted",
        true_targets: Tensor | Sequence[int] | None = None,
    ) -> CAMResult:
        """Explain one batch with one forward and one backward pass.

        Args:
            images: float (N, C, H, W), or (N, C, T, H, W) clips, normalized as the model
                expects.
            target: what is explained: a :class:`explainkit.explain.targets.Target`, or for a
                classifier ``"predicted"``, ``"true"`` (uses ``true_targets``), a class index
                for every image, or one index per image.
            true_targets: (N,) labels, needed when ``target="true"``.

        Returns:
            The batch's :class:`CAMResult`, on the model's device.

        Raises:
            AnalyzerError: bad images or targets, or a layer that cannot be explained.
        """
        return self._explain(images, self.adapt_target(as_target(target, true_targets)), [self])[0]

    def _explain(self, images: Tensor, target: Target, methods: Sequence[CAM]) -> list[CAMResult]:
        """One forward and one backward pass; each of ``methods`` turns them into maps."""
        images = self._precheck(images)
        model = self.model
        self._size = tuple(int(s) for s in images.shape[2:])
        self._acts.clear()
        if self.module is None:  # no layer given: locate one on the first batch, and say so
            self._choose(target_layer(model, None, images[:1]))
            warnings.warn(f"no layer given; explaining {self.layer!r}", stacklevel=3)
        gradients = any(m.uses_gradients for m in methods)
        hvp_needed = any(m.needs_hvp for m in methods)
        hvp = None
        with self._frozen():
            self._handles.append(self.module.register_forward_hook(self._hook))
            with torch.inference_mode(False), torch.enable_grad(), _double_backward(hvp_needed):
                output = self._forward(images)
                if not self._acts:
                    raise AnalyzerError(
                        f"layer {self.layer!r} was not used in the forward pass; "
                        "pick a layer the model runs"
                    )
                acts = self._acts[0]
                n = images.shape[0]
                classes = target_classes(target, output, n, gradients).to(acts.device)
                explained, grads, hvp = self._gradients(output, acts, target, gradients, hvp_needed)
            with torch.no_grad():
                # Gradients are taken with respect to the layer's own output (tokens for a
                # transformer), then viewed as (N, C, h, w) exactly as the activations are.
                layout: Layout = self.layout  # type: ignore[assignment]  # set by the hook
                a, g = layout.to_nchw(acts.detach()), layout.to_nchw(grads)
                h = layout.to_nchw(hvp) if hvp is not None else None
                computed = [m.compute_maps(a, g, self._size, layout, h) for m in methods]
                unreached = False
                if layout.kind == "vit" and gradients and not self._checked_tokens:
                    self._checked_tokens = True  # one device sync, on the first call only
                    unreached = not bool(g.any())
        if layout.grid[0] * layout.grid[1] == 1 and not self._warned_unlocalized:
            self._warn_unlocalized(images)
        if self.reshape == "auto" and not self._warned_layout:
            self._warn_channels_last(tuple(acts.shape))  # the layer's own output
        if unreached:
            self._warn_unreached_patches(images)
        logits, predicted = logits_and_predicted(output, explained, n)
        return [
            CAMResult(maps, raw, classes, predicted, logits, explained) for raw, maps in computed
        ]

    @contextlib.contextmanager
    def _frozen(self) -> Any:
        """Eval mode and no parameter gradients while a batch is explained; flags and hooks
        are restored in a ``finally`` block, so an exception never leaves the model changed."""
        training = [m for m in self._all_modules if m.training]
        frozen = [p for p in self._params if p.requires_grad]
        try:
            for p in frozen:
                p.requires_grad_(False)
            if training:
                self.model.eval()
            yield
        finally:
            self.close()
            for p in frozen:
                p.requires_grad_(True)
            for m in training:
                m.training = True

    def _gradients(
        self, output: Any, acts: Tensor, target: Target, gradients: bool, hvp_needed: bool
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """(explained scores (N,), d scores / d acts, H.acts or None)."""
        if not gradients:
            with torch.no_grad():
                scores = _safe_scores(target, output, acts.shape[0], acts.device)
            return scores, torch.zeros_like(acts), None
        tensor, seed = target.objective(output)
        scores = explained_scores(tensor, seed)
        if not tensor.requires_grad:  # e.g. no detection matched: nothing to explain
            if not self._warned_constant:
                self._warned_constant = True
                warnings.warn(
                    "the target's score does not depend on the model here (no detection "
                    "matched, or an empty region), so its maps are zero",
                    stacklevel=4,
                )
            return scores, torch.zeros_like(acts), None
        try:
            (grads,) = torch.autograd.grad(
                tensor, acts, grad_outputs=seed, create_graph=hvp_needed, allow_unused=True
            )
        except RuntimeError as e:
            raise AnalyzerError(
                f"the model's output does not depend on layer {self.layer!r} "
                f"({e}); pick a layer before the head"
            ) from e
        if grads is None:
            raise AnalyzerError(
                f"the target's score does not depend on layer {self.layer!r}; pick a layer "
                "before the head"
            )
        hvp = None
        if hvp_needed:
            if grads.requires_grad:
                try:
                    (hvp,) = torch.autograd.grad(grads, acts, grad_outputs=acts, allow_unused=True)
                except RuntimeError as e:
                    raise AnalyzerError(
                        f"the model has an operation after layer {self.layer!r} without a second "
                        f"derivative, which ShapleyCAM needs ({e}); use another method"
                    ) from e
            hvp = torch.zeros_like(acts) if hvp is None else hvp
            grads = grads.detach()
        return scores, grads, hvp

    def _warn_channels_last(self, shape: tuple[int, ...]) -> None:
        """Once per engine: "auto" reads a 4-D output as NCHW; say so when it looks NHWC."""
        self._warned_layout = True
        if looks_channels_last(shape, *self._size[-2:]):
            h, w = self._size[-2:]
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
        better = None
        if images.dim() == 4:
            better = locate_layer(self.model, images, self.layout.kind if self.layout else "nchw")
        instead = f"an earlier layer such as {better!r}" if better else "an earlier layer"
        h, w = images.shape[-2:]
        warnings.warn(
            f"layer {self.layer!r} gives 1x1 maps for {h}x{w} inputs, which cannot localize "
            f"anything (each map is one number, shown as zero); explain {instead}",
            stacklevel=3,
        )

    def _warn_unreached_patches(self, images: Tensor) -> None:
        """Once per engine: patch tokens the target does not depend on give all-zero maps."""
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

    def _forward(self, images: Tensor) -> Any:
        try:
            return self.model(images)
        except RuntimeError as e:
            if self._copy_output or "leaf Variable that requires grad" not in str(e):
                raise
        self._copy_output = True  # an in-place op follows the layer: hand on a copy
        self._acts.clear()
        return self.model(images)

    def _precheck(self, images: Tensor) -> Tensor:
        if (
            not isinstance(images, Tensor)
            or images.dim() not in (4, 5)
            or not images.is_floating_point()
        ):
            raise AnalyzerError(
                "images must be a float (N, C, H, W) tensor (or (N, C, T, H, W) clips), "
                f"normalized as for training; got {getattr(images, 'dtype', type(images))} "
                f"{tuple(getattr(images, 'shape', ()))}"
            )
        if images.shape[0] == 0:
            raise AnalyzerError("no images to explain; pass at least one")
        if self._params and images.device != self._params[0].device:
            images = images.to(self._params[0].device, non_blocking=True)
        return images

    # -- maps ------------------------------------------------------------------------------
    def compute_maps(
        self,
        acts: Tensor,
        grads: Tensor,
        size: Sequence[int],
        layout: Layout | None = None,
        hvp: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Raw maps (N, h, w) after ReLU, and maps upsampled to ``size`` and normalized.

        A video layout gives (N, T, h, w) raw maps and (N, T_in, H, W) maps.
        """
        acts, grads = acts.float(), grads.float()
        raw = F.relu(self._cam(acts, grads, hvp.float() if hvp is not None else None))
        frames = layout.frames if layout is not None else 0
        if frames:  # frames were stacked along the height: one map per frame again
            raw = raw.unflatten(1, (frames, raw.shape[1] // frames))
            mode = "trilinear"
        else:
            mode = "bilinear"
        up = F.interpolate(raw[:, None], size=tuple(size), mode=mode, align_corners=False)
        return raw, normalize_maps(up[:, 0])

    def _cam(self, acts: Tensor, grads: Tensor, hvp: Tensor | None) -> Tensor:
        """The (N, h, w) map before ReLU: channel weights times activations, summed."""
        weights = self._weights(acts, grads)
        if weights.dim() == 2:  # channel weights (N, C): a batched matrix product, no temporary
            return torch.einsum("nc,nchw->nhw", weights, acts)
        return (weights * acts).sum(1)

    def _weights(self, acts: Tensor, grads: Tensor) -> Tensor:
        """Channel weights (N, C), or map-level weights (N, C, h, w), for (N, C, h, w) inputs."""
        raise NotImplementedError


def _double_backward(needed: bool) -> Any:
    """Attention through its math kernel when a second derivative is needed: the fused
    kernels (flash, memory-efficient) have no double backward."""
    if not needed:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


def explained_scores(tensor: Tensor, seed: Tensor) -> Tensor:
    """The (N,) scores a target's ``(tensor, grad_outputs)`` stands for."""
    with torch.no_grad():
        if tensor.dim() == 1:
            return (tensor * seed).detach()
        return (tensor * seed).flatten(1).sum(1).detach()


def _safe_scores(target: Target, output: Any, n: int, device: torch.device) -> Tensor:
    try:
        return target.scores(output).detach()
    except AnalyzerError:  # a method without gradients does not need the target
        return torch.full((n,), float("nan"), device=device)


def target_classes(target: Target, output: Any, n: int, gradients: bool) -> Tensor:
    try:
        return target.classes(output, n)
    except AnalyzerError:
        if gradients:
            raise
        return torch.full((n,), -1, dtype=torch.int64)  # EigenCAM of a model no target fits


def logits_and_predicted(output: Any, explained: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """A classifier's (N, C) logits and argmax; else the explained scores (N, 1) and -1s."""
    try:
        found = scores_of(output) if not isinstance(output, list) else None
    except AnalyzerError:  # no scores in it (an embedding object): not a classifier
        found = None
    if isinstance(found, Tensor) and found.dim() == 2 and found.is_floating_point():
        logits = found.detach()
        return logits, logits.argmax(1)
    minus = torch.full((n,), -1, dtype=torch.int64, device=explained.device)
    return explained[:, None], minus
