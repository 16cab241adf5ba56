"""Layers worth explaining, and how their outputs become (N, C, h, w) maps.

:func:`target_layer` is the one place a layer to explain is chosen, whoever asks (the CAM
engine, the analyzers, training and ``evaluate`` recording a run's default): a name, a module
object (``model.layer4[-1]``, as pytorch-grad-cam users pass it), the model's declared default,
or a located layer.

A CAM of a layer whose output is 1x1 is one number stretched over the image: it cannot
localize anything. :func:`locate_layer` runs one example through the model with a forward
hook on every module and picks the last module, in execution order, whose output is a map
larger than 1x1 and on which the logits depend (as torch-cam locates candidate layers, with
the dependence checked by autograd).

Transformers output tokens, not (N, C, H, W) maps. A :class:`Layout` says how a layer's
output is viewed as maps (``reshape``):

- ``"nchw"``: (N, C, H, W), a convolutional layer's output, used as it is;
- ``"vit"``: (N, T, C) tokens, ``k`` leading class or register tokens then ``h*w`` patch
  tokens in row-major order: the leading tokens are dropped and the patches laid out as an
  h x w grid (:func:`token_grid` finds ``k``, ``h`` and ``w``);
- ``"swin"``: (N, H, W, C), channels-last maps (Swin stages), permuted to channels-first;
- ``"auto"``: a 4-D output is ``"nchw"``, a 3-D output is ``"vit"``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor, nn

from explainkit.errors import AnalyzerError, did_you_mean
from explainkit.explain.outputs import scores_of

__all__ = [
    "MAX_LEADING_TOKENS",
    "RESHAPES",
    "Layout",
    "TargetLayer",
    "grid_fits",
    "locate_layer",
    "looks_channels_last",
    "resolve_layout",
    "run_default_layer",
    "suggest_reshape",
    "target_layer",
    "token_grid",
]

RESHAPES = ("auto", "nchw", "vit", "swin")
# Class token, distillation token, register tokens: at most this many before the patches.
MAX_LEADING_TOKENS = 8


@dataclass(frozen=True)
class Layout:
    """How one layer's output is viewed as (N, C, h, w) maps.

    Attributes:
        kind: ``"nchw"``, ``"vit"``, ``"swin"`` or ``"video"`` ((N, C, T, h, w), from a 5-D
            output with ``"auto"`` or ``"nchw"``); never ``"auto"``: that is resolved.
        leading: ``"vit"`` only: class and register tokens before the patch tokens.
        grid: (h, w) of the maps.
        frames: ``"video"`` only: the layer's T.
    """

    kind: str
    leading: int
    grid: tuple[int, int]
    frames: int = 0

    def to_nchw(self, t: Tensor) -> Tensor:
        """The layer's output (or its gradient) as (N, C, h, w); a view, no copy.

        A video layer's (N, C, T, h, w) becomes (N, C, T*h, w): its frames stacked along the
        height, so every method reduces over all positions of a clip.
        """
        if self.kind == "video":
            return t.flatten(2, 3)
        if self.kind == "vit":
            return t[:, self.leading :].transpose(1, 2).unflatten(2, self.grid)
        if self.kind == "swin":
            return t.permute(0, 3, 1, 2)
        return t


def grid_fits(h: int, w: int, height: int, width: int) -> bool:
    """Whether an h x w grid can tile a height x width input: one patch size gives both.

    A patch size ``p`` gives ``n`` cells along ``size`` pixels when ``n`` is ``size / p``
    rounded down (a strided convolution: ``size/(n+1) < p <= size/n``) or rounded up
    (padding: ``size/n <= p < size/(n-1)``). The grid fits when one ``p`` gives both sides
    with the same rounding.
    """
    if min(h, w, height, width) < 1:
        return False
    down = max(height / (h + 1), width / (w + 1)) < min(height / h, width / w)
    if down or height * w == width * h:  # p = size/n exactly counts as both roundings
        return True
    up_h = height / (h - 1) if h > 1 else math.inf
    up_w = width / (w - 1) if w > 1 else math.inf
    return max(height / h, width / w) < min(up_h, up_w)


@lru_cache(maxsize=256)
def token_grid(tokens: int, height: int, width: int) -> tuple[int, int, int] | None:
    """``(leading, h, w)`` for ``tokens`` = leading + h*w tokens of a height x width input.

    The rule: ``leading`` is 0 to :data:`MAX_LEADING_TOKENS`. A square input needs a square
    grid (``tokens - leading`` a perfect square); any other input needs an h x w grid that
    :func:`grid_fits` it (its aspect ratio). Among the candidates (two exist only for grids
    of 4x4 or smaller) the preferred is: ``leading == 1`` (a class token, as in ViT), then a
    patch size that divides the input exactly, then the most leading tokens. None when no
    grid fits.
    """
    best: tuple[tuple, tuple[int, int, int]] | None = None
    for leading in range(min(MAX_LEADING_TOKENS, tokens - 1) + 1):
        patches = tokens - leading
        if height == width:
            side = math.isqrt(patches)
            grids = [(side, side)] if side * side == patches else []
        else:
            divisors = [d for d in range(1, math.isqrt(patches) + 1) if patches % d == 0]
            pairs = {(d, patches // d) for d in divisors} | {(patches // d, d) for d in divisors}
            grids = [(h, w) for h, w in sorted(pairs) if grid_fits(h, w, height, width)]
        for h, w in grids:
            exact = height % h == 0 and width % w == 0 and height // h == width // w
            aspect = abs(math.log(h * width / (w * height)))
            key = (leading == 1, exact, leading, -aspect)
            if best is None or key > best[0]:
                best = key, (leading, h, w)
    return None if best is None else best[1]


def looks_channels_last(shape: tuple[int, ...], height: int, width: int) -> bool:
    """Whether a 4-D (N, a, b, c) output is (N, H, W, C) rather than (N, C, H, W).

    True when (a, b) is a grid of the input and (b, c) is not; a tie counts as channels-first.
    """
    if len(shape) != 4:
        return False
    _, a, b, c = shape
    return grid_fits(a, b, height, width) and not grid_fits(b, c, height, width)


def _describe(output: object) -> str:
    if isinstance(output, Tensor):
        return f"a {output.dim()}-D tensor {tuple(output.shape)}"
    return f"a {type(output).__name__}, not a tensor"


def resolve_layout(output: object, reshape: str, size: tuple[int, int], layer: str) -> Layout:
    """The :class:`Layout` of ``layer``'s ``output`` for ``reshape`` and an input of ``size``.

    Raises:
        AnalyzerError: ``output`` does not have the shape ``reshape`` expects, or no grid of
            patches fits its token count.
    """
    if reshape not in RESHAPES:
        raise AnalyzerError(f"unknown reshape {reshape!r}; use one of {', '.join(RESHAPES)}")
    dim = output.dim() if isinstance(output, Tensor) else -1
    what = _describe(output)
    if dim == 5 and reshape in ("auto", "nchw"):  # a 3-D convolution's (N, C, T, h, w)
        return Layout("video", 0, tuple(output.shape[-2:]), int(output.shape[2]))
    if reshape == "auto":
        if dim not in (3, 4):
            raise AnalyzerError(
                f"layer {layer!r} outputs {what}, neither an (N, C, H, W) map, an "
                "(N, C, T, H, W) video map nor (N, tokens, C) tokens; pick a convolutional "
                "stage such as 'layer4' or a transformer block's layer"
            )
        reshape = "nchw" if dim == 4 else "vit"
    if reshape == "nchw":
        if dim != 4:
            raise AnalyzerError(
                f"layer {layer!r} outputs {what}, not an (N, C, H, W) map; pick a "
                "convolutional layer or stage such as 'layer4', or use reshape 'vit' for a "
                "transformer's (N, tokens, C) layer"
            )
        return Layout("nchw", 0, tuple(output.shape[-2:]))
    if reshape == "swin":
        if dim != 4:
            raise AnalyzerError(
                f"layer {layer!r} outputs {what}, not (N, H, W, C) channels-last maps as "
                "reshape 'swin' expects; use reshape 'vit' for (N, tokens, C) tokens"
            )
        h, w = output.shape[1:3]
        if not grid_fits(h, w, *size):
            raise AnalyzerError(
                f"layer {layer!r} outputs {what}, whose dimensions 1 and 2 ({h}x{w}) are no "
                f"grid of the {size[0]}x{size[1]} input, so it is not channels-last; use "
                "reshape 'nchw' for an (N, C, H, W) layer"
            )
        return Layout("swin", 0, (h, w))
    if dim != 3:
        raise AnalyzerError(
            f"layer {layer!r} outputs {what}, not (N, tokens, C) tokens as reshape 'vit' "
            "expects; use reshape 'nchw' (or 'auto') for an (N, C, H, W) layer"
        )
    found = token_grid(int(output.shape[1]), int(size[0]), int(size[1]))
    if found is None:
        raise AnalyzerError(
            f"layer {layer!r} outputs {output.shape[1]} tokens, which no grid of patches of "
            f"the {size[0]}x{size[1]} input fits after 0 to {MAX_LEADING_TOKENS} class or "
            "register tokens; pick a layer whose tokens are the image's patches (a "
            "transformer block or its norm)"
        )
    leading, h, w = found
    return Layout("vit", leading, (h, w))


def suggest_reshape(model: nn.Module, layer: str, example: Tensor) -> str:
    """The ``reshape`` that views ``layer``'s output as maps: "nchw", "vit" or "swin".

    One forward pass of ``example`` (N, C, H, W) without gradients. 3-D outputs are tokens
    ("vit"); a 4-D output is "swin" when :func:`looks_channels_last`, else "nchw".

    Raises:
        AnalyzerError: ``layer`` is unknown, unused, or outputs neither 3-D nor 4-D tensors.
    """
    modules = dict(model.named_modules())
    if layer not in modules or not layer:
        raise AnalyzerError(
            f"unknown target layer {layer!r}; pass a name from model.named_modules()"
        )
    seen: list[object] = []
    handle = modules[layer].register_forward_hook(lambda m, i, out: seen.append(out))
    training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example[:1])
    finally:
        handle.remove()
        model.train(training)
    if not seen:
        raise AnalyzerError(
            f"layer {layer!r} was not used in the forward pass; pick a layer the model runs"
        )
    layout = resolve_layout(seen[0], "auto", tuple(example.shape[-2:]), layer)
    shape = tuple(seen[0].shape)  # type: ignore[attr-defined]
    if layout.kind == "nchw" and looks_channels_last(shape, *example.shape[-2:]):
        return "swin"
    return layout.kind


def _candidate(output: object, reshape: str, size: tuple[int, int]) -> Layout | None:
    """The layout of a map larger than 1x1 that ``reshape`` sees in ``output``, else None."""
    if not isinstance(output, Tensor) or output.dim() not in (3, 4):
        return None
    kind = reshape
    if kind == "auto":
        kind = "nchw" if output.dim() == 4 else "vit"
    if kind == "swin" and not looks_channels_last(tuple(output.shape), *size):
        return None
    try:
        layout = resolve_layout(output, kind, size, "")
    except AnalyzerError:
        return None
    return layout if layout.grid[0] * layout.grid[1] > 1 else None


def locate_layer(model: nn.Module, example: Tensor, reshape: str = "nchw") -> str | None:
    """The name of the last spatial (>1x1) layer the logits depend on, or None.

    Args:
        model: A classifier returning (N, C) logits.
        example: One or a few normalized input images (N, C, H, W) on the model's device.
        reshape: Which outputs count (see :data:`RESHAPES`): "nchw" (N, C, H, W) maps;
            "vit" (N, tokens, C) outputs whose token count fits a grid (:func:`token_grid`);
            "swin" (N, H, W, C) outputs (:func:`looks_channels_last`); "auto" both 4-D
            (N, C, H, W) and 3-D token outputs.

    The logits must depend on the map part of the output (a nonzero gradient there): the
    logits of a ViT read only the class token, so after the last block's attention the patch
    tokens no longer reach them, and the last block's output is passed over for its ``ln_1``.
    """
    if reshape not in RESHAPES:
        raise AnalyzerError(f"unknown reshape {reshape!r}; use one of {', '.join(RESHAPES)}")
    size = tuple(example.shape[-2:])
    outputs: list[tuple[str, Tensor, Layout]] = []
    handles = []

    def keep(name: str):
        def hook(module: nn.Module, inputs: object, output: object) -> None:
            layout = _candidate(output, reshape, size)
            if layout is not None:
                outputs.append((name, output, layout))  # type: ignore[arg-type]

        return hook

    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_hook(keep(name)))
    training = model.training
    try:
        model.eval()
        x = example[:1].detach().clone().requires_grad_(True)
        with torch.inference_mode(False), torch.enable_grad():
            logits = scores_of(model(x))
            candidates = [c for c in outputs if c[1].requires_grad]
            if not candidates:
                return None
            grads = torch.autograd.grad(logits.sum(), [c[1] for c in candidates], allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
        model.train(training)
    used = [
        name
        for (name, _, layout), g in zip(candidates, grads, strict=True)
        if g is not None and bool(layout.to_nchw(g).abs().amax() > 0)
    ]
    return used[-1] if used else None


@dataclass(frozen=True)
class TargetLayer:
    """The layer a method explains.

    Attributes:
        name: Its dotted name in ``model.named_modules()``.
        module: The module itself.
        reshape: How its output becomes maps when that was decided here (a located layer:
            ``"nchw"``), else ``"auto"`` (see :data:`RESHAPES`).
    """

    name: str
    module: nn.Module
    reshape: str = "auto"


def target_layer(
    model: nn.Module,
    layer: str | nn.Module | None = None,
    example: Tensor | None = None,
) -> TargetLayer:
    """The layer to explain, as torch-cam's ``locate_candidate_layer`` chooses one.

    In this order: ``layer`` as given (a dotted name from ``model.named_modules()`` or one of
    the model's modules); the model's declared default (its ``default_target_layer``
    attribute, as explainkit's ResNets and rebuilt runs have); the last spatial layer the
    output depends on for ``example`` (:func:`locate_layer`); the model's last child.

    Raises:
        AnalyzerError: ``layer`` is not a name or module of ``model`` (one sentence with the
            closest names, never the module's repr), or nothing can be chosen.
    """
    modules = dict(model.named_modules())
    if layer is None:
        declared = getattr(model, "default_target_layer", None)
        if isinstance(declared, str) and declared in modules and declared:
            return TargetLayer(declared, modules[declared])
        found = locate_layer(model, example) if example is not None else None
        if found is not None:
            return TargetLayer(found, modules[found], "nchw")
        children = [name for name, _ in model.named_children()]
        if not children:
            raise AnalyzerError(
                f"{type(model).__name__} has no submodules to explain; pass a model whose "
                "layers are modules"
            )
        return TargetLayer(children[-1], modules[children[-1]])
    if isinstance(layer, nn.Module):
        for name, module in modules.items():
            if module is layer and name:
                return TargetLayer(name, module)
        raise AnalyzerError(
            f"the {type(layer).__name__} given as the layer is not one of the model's modules; "
            "pass one of them (e.g. model.layer4[-1]) or a name such as "
            f"{_layer_choices(model)[-1]!r}"
        )
    if isinstance(layer, str) and layer in modules and layer:
        return TargetLayer(layer, modules[layer])
    if not isinstance(layer, str):
        raise AnalyzerError(
            "the layer must be a name from model.named_modules() or one of the model's "
            f"modules, got {type(layer).__name__}"
        )
    close = did_you_mean(layer, [name for name in modules if name], n=3)
    hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
    shown = repr(layer) if len(layer) <= 60 else repr(layer[:59]) + "…"
    raise AnalyzerError(
        f"unknown target layer {shown}; {hint}valid layers include: "
        f"{', '.join(_layer_choices(model))} (any name from model.named_modules())"
    )


def run_default_layer(model: nn.Module, entry: object, example: Tensor) -> tuple[str, str]:
    """``(default_layer, reshape)`` a new run records: its registered entry's
    (``ModelEntry.default_layer`` and ``reshape``) when it names one, else
    :func:`target_layer`'s choice for ``example``, one input of the run's size."""
    declared = getattr(entry, "default_layer", None)
    if declared is not None:
        return declared, getattr(entry, "reshape", None) or "auto"
    chosen = target_layer(model, None, example)
    return chosen.name, chosen.reshape


def _layer_choices(model: nn.Module, limit: int = 20) -> list[str]:
    """Top-level and block-level module names (``layer4``, ``layer4.1``): what users pick,
    the last ``limit`` of them (the layers worth explaining are late)."""
    names = [name for name, _ in model.named_modules() if name and name.count(".") <= 1]
    return names[-limit:]
