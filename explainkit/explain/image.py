"""One call from a photo and a model to a drawn explanation: the notebook path.

::

    import explainkit, torchvision
    weights = torchvision.models.ResNet50_Weights.DEFAULT
    model = torchvision.models.resnet50(weights=weights)
    explainkit.explain_image(model, "cat.jpg", target="tabby", weights=weights)

:func:`explain_image` reads the image (a file, a PIL image, an array or a tensor), fits it to
the model's input (:mod:`explainkit.data.fit`), normalizes it, computes the CAM and returns a
:class:`~explainkit.explain.cam_result.CAMResult` that carries the image and the class names,
so it draws itself (image | heatmap | overlay) as the last expression of a cell.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from explainkit.errors import AnalyzerError, did_you_mean
from explainkit.explain.cam_result import CAMResult

__all__ = ["explain_image", "load_image", "transformer_layer"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_image(image: Any) -> np.ndarray:
    """``image`` as uint8 RGB (H, W, 3): a path, a PIL image, an array (H, W), (H, W, 1),
    (H, W, 3) or (H, W, 4), uint8 or floats in [0, 1], or a (C, H, W) tensor in [0, 1]."""
    from PIL import Image

    if isinstance(image, str | Path):
        try:
            with Image.open(Path(image).expanduser()) as img:
                return np.asarray(img.convert("RGB"), dtype=np.uint8)
        except (OSError, SyntaxError, ValueError) as e:
            raise AnalyzerError(f"cannot read image {image} ({e}); give an image file") from e
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.ndim == 4 and t.shape[0] == 1:
            t = t[0]
        if t.ndim != 3 or t.shape[0] not in (1, 3):
            raise AnalyzerError(f"a tensor image must be (C, H, W), got {list(image.shape)}")
        image = t.permute(1, 2, 0).numpy()
    pixels = np.asarray(image)
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    if pixels.ndim != 3 or pixels.shape[-1] not in (1, 3, 4):
        raise AnalyzerError(
            f"an image must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {pixels.shape}"
        )
    if pixels.dtype != np.uint8:
        if not np.issubdtype(pixels.dtype, np.floating):
            raise AnalyzerError(
                f"image pixels must be uint8 or floats in [0, 1], got {pixels.dtype}"
            )
        pixels = (np.clip(pixels, 0, 1) * 255).round().astype(np.uint8)
    if pixels.shape[-1] == 1:
        pixels = np.repeat(pixels, 3, axis=-1)
    return np.ascontiguousarray(pixels[..., :3])


def explain_image(
    model: nn.Module,
    image: Any,
    target: int | str | None = None,
    layer: str | nn.Module | None = None,
    *,
    method: str = "gradcam",
    weights: Any = None,
    classes: Sequence[str] | None = None,
    size: int | None = None,
    fit: str = "crop",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> CAMResult:
    """Explain one image: resize, normalize, CAM and overlay in one call.

    Args:
        model: Any classifier (its output a tensor, a HuggingFace output or a dict/tuple of
            scores); a one-channel model gets the image in gray.
        image: A file path, a PIL image, a numpy array or a (C, H, W) tensor.
        target: The class explained: None (the predicted one), an index, or a class name.
        layer: A module of ``model`` (``model.layer4[-1]``), its dotted name, or None (the
            model's last spatial layer).
        method: ``gradcam``, ``gradcampp``, ``xgradcam`` or ``layercam``.
        weights: torchvision weights (``ResNet50_Weights.DEFAULT``): their transforms give
            the size, resize and normalization, their metadata the class names.
        classes: Class names (default: the weights' categories, or a HuggingFace model's
            ``config.id2label``).
        size: The model's input side (default: the weights', a HuggingFace config's, else 224).
        fit: ``crop`` (the centre, as torchvision), ``pad`` or ``stretch`` (the whole image).
        mean, std: The normalization (default: the weights', else ImageNet's).

    Returns:
        A :class:`CAMResult` of one map that draws itself in a notebook (``.show()`` gives
        the matplotlib figure).
    """
    from explainkit.data.fit import fit_image
    from explainkit.explain.gradcam import compute_cam
    from explainkit.explain.inputs import accept_rgb

    if not isinstance(model, nn.Module):
        raise AnalyzerError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    preset = _preset(weights, model)
    size = size or preset.get("size") or 224
    resize = preset.get("resize") if size == preset.get("size") else None
    mean = tuple(mean or preset.get("mean") or IMAGENET_MEAN)
    std = tuple(std or preset.get("std") or IMAGENET_STD)
    names = list(classes) if classes is not None else preset.get("classes")
    from PIL import Image

    pixels = np.array(fit_image(Image.fromarray(load_image(image)), size, fit, resize))
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    x = torch.from_numpy(pixels).permute(2, 0, 1)[None].float().div(255).to(device)
    m = torch.tensor(_rgb(mean, "mean"), device=device).view(1, 3, 1, 1)
    s = torch.tensor(_rgb(std, "std"), device=device).view(1, 3, 1, 1)
    reshape = "auto"
    if layer is None and not hasattr(model, "default_target_layer"):
        found, layout = transformer_layer(model)  # a token layer locate_layer would miss
        if found is not None:
            layer, reshape = found, layout or "auto"
    was_training = model.training
    accept_rgb(model).eval()
    try:
        result = compute_cam(
            model, (x - m) / s, layer, method, _target(target, names), reshape=reshape
        )
    finally:
        model.train(was_training)
    result.images = pixels[None]
    result.classes = names
    return result


def _rgb(values: tuple[float, ...], what: str) -> tuple[float, ...]:
    if len(values) == 1:
        return values * 3
    if len(values) != 3:
        raise AnalyzerError(f"{what} must hold 3 numbers (or 1 for gray), got {len(values)}")
    return values


def _target(target: int | str | None, names: list[str] | None) -> int | str:
    """``predicted``, an index, or the index of a class name (one sentence when unknown)."""
    if target is None:
        return "predicted"
    if isinstance(target, str):
        if not names:
            raise AnalyzerError(
                f"target {target!r} is a class name, but the class names are unknown; pass "
                "classes=[...] (or weights=... whose metadata has them) or a class index"
            )
        if target in names:
            return names.index(target)
        lowered = [n.lower() for n in names]
        if target.lower() in lowered:
            return lowered.index(target.lower())
        close = did_you_mean(target, names, n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise AnalyzerError(f"no class named {target!r} among the {len(names)} classes{hint}")
    if isinstance(target, bool) or not isinstance(target, int):
        raise AnalyzerError(f"target must be None, a class index or a class name, got {target!r}")
    return target


def _preset(weights: Any, model: nn.Module) -> dict[str, Any]:
    """size, resize, mean, std and classes from torchvision weights (offline metadata) or a
    HuggingFace model's config; empty when neither says."""
    found: dict[str, Any] = {}
    if weights is not None:
        try:
            transforms = weights.transforms()
            found["size"] = int(transforms.crop_size[0])
            found["resize"] = int(transforms.resize_size[0])
            found["mean"], found["std"] = tuple(transforms.mean), tuple(transforms.std)
        except (AttributeError, TypeError, IndexError) as e:
            raise AnalyzerError(
                f"weights= must be torchvision weights such as ResNet50_Weights.DEFAULT, got "
                f"{type(weights).__name__}"
            ) from e
        categories = getattr(weights, "meta", {}).get("categories")
        if categories:
            found["classes"] = [str(c) for c in categories]
        return found
    config = getattr(model, "config", None)
    id2label = getattr(config, "id2label", None)
    if isinstance(id2label, dict) and id2label:
        found["classes"] = [str(id2label[i]) for i in sorted(id2label)]
    image_size = getattr(config, "image_size", None)
    if isinstance(image_size, int):
        found["size"] = image_size
    return found


def transformer_layer(model: nn.Module) -> tuple[str | None, str | None]:
    """(layer, reshape) of a HuggingFace transformers classifier: a ViT's last block's first
    LayerNorm (``"vit"`` tokens: after that block only the class token reaches the logits), a
    staged CNN's last stage (``"nchw"``); (None, None) for anything else."""
    import re

    names = [name for name, _ in model.named_modules()]
    base = getattr(model, getattr(model, "base_model_prefix", "") or "", None)
    embeddings = getattr(base, "embeddings", None)
    blocks = [n for n in names if re.fullmatch(r".*\.layers?\.\d+", n)]
    if blocks and hasattr(embeddings, "cls_token"):
        last = max(blocks, key=lambda n: int(n.rsplit(".", 1)[1]))
        for child, module in model.get_submodule(last).named_children():
            if isinstance(module, nn.LayerNorm):
                return f"{last}.{child}", "vit"
    stages = [n for n in names if re.fullmatch(r".*\.stages\.\d+", n)]
    if stages and getattr(model, "config", None) is not None:
        return max(stages, key=lambda n: int(n.rsplit(".", 1)[1])), "nchw"
    return None, None
