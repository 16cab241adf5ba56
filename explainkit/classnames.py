"""Readable class names for ImageNet-1k label sets, offline (public API).

An ImageNet folder is laid out by WordNet id (``n01440764/`` ...) or by class index
(``0/`` ... ``999/``), and a run that keeps those as its class names says "predicted 713"
where it should say "photocopier". torchvision ships the 1,000 ImageNet-1k category names in
its weights' metadata, in the order of the models' outputs, without downloading anything;
:func:`readable_classes` puts them in place of such ids, and leaves any other names alone.

The id layouts are recognised strictly (exactly 1,000 classes; indices 0..999 in order, or
the sorted WordNet ids of ImageNet-1k, first ``n01440764`` and last ``n15075141``), so a
folder with names of its own is never renamed.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

__all__ = ["IMAGENET_WEIGHTS", "imagenet_classes", "weights_categories", "readable_classes"]

IMAGENET_WEIGHTS = "ResNet50_Weights.IMAGENET1K_V2"  # any ImageNet-1k weights share the list
_FIRST_WNID, _LAST_WNID = "n01440764", "n15075141"  # ImageNet-1k's first and last, sorted
_WNID = re.compile(r"n\d{8}")


def weights_categories(name: str) -> list[str] | None:
    """The category names of torchvision weights ``Enum.VALUE`` (e.g.
    ``"ViT_B_16_Weights.IMAGENET1K_V1"``) from their metadata, no download; None when
    torchvision or the weights or their categories are unknown."""
    try:
        from torchvision.models import get_weight
    except ImportError:
        return None
    try:
        categories = get_weight(name).meta.get("categories")
    except (KeyError, ValueError, AttributeError):
        return None
    return [str(c) for c in categories] if categories else None


@functools.cache
def _imagenet() -> tuple[str, ...] | None:
    names = weights_categories(IMAGENET_WEIGHTS)
    return tuple(names) if names and len(names) == 1000 else None


def imagenet_classes() -> list[str] | None:
    """The 1,000 ImageNet-1k category names in the models' output order (``tench``,
    ``goldfish``, ...), from torchvision's weights metadata; None without torchvision."""
    names = _imagenet()
    return list(names) if names else None


def _is_imagenet_ids(classes: Sequence[str]) -> bool:
    if len(classes) != 1000:
        return False
    names = [str(c).strip() for c in classes]
    if all(n.isdigit() and int(n) == i for i, n in enumerate(names)):
        return True
    return (
        all(_WNID.fullmatch(n) for n in names)
        and names[0] == _FIRST_WNID
        and names[-1] == _LAST_WNID
        and names == sorted(names)
    )


def readable_classes(classes: Sequence[str]) -> list[str]:
    """``classes`` with ImageNet-1k ids replaced by their names; other names unchanged.

    A name that two ids share is told apart by its index (``crane (134)``), so names stay
    unique.
    """
    names = _imagenet() if _is_imagenet_ids(classes) else None
    if names is None:
        return [str(c) for c in classes]
    seen: dict[str, int] = {}
    for name in names:
        seen[name] = seen.get(name, 0) + 1
    return [name if seen[name] == 1 else f"{name} ({i})" for i, name in enumerate(names)]
