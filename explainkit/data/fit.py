"""How an image of any shape becomes the square a model takes, and which images a limit keeps.

Three policies (``--fit``), because a photo is rarely square and what is lost must be a choice:

* ``crop`` (torchvision's Resize + CenterCrop): the shorter side is resized to ``resize``
  (default ``size``), then the centre ``size`` square is kept. A tall photo loses its top and
  bottom, a wide one its sides.
* ``pad``: the longer side is resized to ``size`` and the rest is filled with black, so the
  whole image is explained (letterboxing).
* ``stretch``: resized to ``size`` x ``size``, the aspect ratio not kept.

:func:`balanced_subset` is what ``--limit-train``/``--limit-eval`` keep: the same number of
images from every class, drawn with the run's seed, so a limit never keeps the first class
alone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from explainkit.errors import DataError

if TYPE_CHECKING:  # pragma: no cover - typing only
    import numpy as np

__all__ = [
    "FITS",
    "balanced_subset",
    "describe_fit",
    "fit_image",
    "fit_images",
    "subset_note",
]

FITS = ("crop", "pad", "stretch")


def fit_image(
    img: Any, size: int, fit: str = "crop", resize: int | None = None, nearest: bool = False
) -> Any:
    """A PIL image made a ``size`` square by ``fit`` (see the module docstring); ``resize`` is
    the shorter side before a ``crop`` (torchvision's 256 for a 224 crop); ``nearest`` for
    masks, bilinear otherwise."""
    from PIL import Image

    if fit not in FITS:
        raise DataError(f"fit must be one of {', '.join(FITS)}, got {fit!r}")
    resample = Image.NEAREST if nearest else Image.BILINEAR
    w, h = img.size
    if fit == "stretch":
        return img.resize((size, size), resample) if (w, h) != (size, size) else img
    if fit == "pad":
        scale = size / max(w, h)
        rw, rh = max(1, round(w * scale)), max(1, round(h * scale))
        inner = img.resize((rw, rh), resample) if (rw, rh) != (w, h) else img
        if (rw, rh) == (size, size):
            return inner
        out = Image.new(img.mode, (size, size))  # black (0) around the image
        out.paste(inner, ((size - rw) // 2, (size - rh) // 2))
        return out
    side = max(size, resize or size)
    scale = side / min(w, h)
    rw, rh = max(side, round(w * scale)), max(side, round(h * scale))
    if (rw, rh) != (w, h):
        img = img.resize((rw, rh), resample)
    left, top = (rw - size) // 2, (rh - size) // 2
    return img.crop((left, top, left + size, top + size))


def fit_images(
    images: np.ndarray,
    size: int,
    nearest: bool = False,
    fit: str = "crop",
    resize: int | None = None,
) -> np.ndarray:
    """uint8 images (N, H, W, C), or masks (N, H, W), made ``size`` squares by ``fit``
    (bilinear for images, nearest for masks)."""
    import numpy as np
    from PIL import Image

    out = np.empty((len(images), size, size, *images.shape[3:]), dtype=images.dtype)
    for i, pixels in enumerate(images):
        squeeze = pixels.ndim == 3 and pixels.shape[-1] == 1
        img = Image.fromarray(pixels[..., 0] if squeeze else pixels)
        fitted = np.asarray(fit_image(img, size, fit, resize, nearest))
        out[i] = fitted[..., None] if squeeze else fitted
    return out


def describe_fit(size: int, fit: str, resize: int | None = None) -> str:
    """``shorter side resized to 256, centre 224 px cropped``: what ``fit`` does, in words,
    for the line ``evaluate`` prints and the run records."""
    if fit == "pad":
        return f"the whole image, its longer side resized to {size} px and padded to a square"
    if fit == "stretch":
        return f"the whole image stretched to {size} x {size} px (aspect ratio not kept)"
    side = max(size, resize or size)
    return (
        f"shorter side resized to {side} px, centre {size} px cropped "
        "(--fit pad keeps the whole image)"
    )


def balanced_subset(targets: np.ndarray, limit: int, seed: int = 0) -> np.ndarray:
    """Positions of ``limit`` images, as many from each class as it can give, drawn with
    ``seed`` (the same positions for the same seed), sorted.

    Each class gets ``limit // K`` (the first ``limit % K`` classes in a seeded order one
    more); what a small class cannot give goes to the classes that have more.
    """
    import numpy as np

    targets = np.asarray(targets)
    if limit >= len(targets):
        return np.arange(len(targets))
    rng = np.random.default_rng(seed)
    order = np.argsort(targets, kind="stable")  # one sort, not a pass per class
    classes, starts, counts = np.unique(targets[order], return_index=True, return_counts=True)
    members = {
        c: rng.permutation(order[start : start + count])
        for c, start, count in zip(classes.tolist(), starts, counts, strict=True)
    }
    classes = np.asarray(classes)
    quota = dict.fromkeys(classes, 0)
    left = limit
    open_classes = list(rng.permutation(classes))
    while left > 0 and open_classes:
        share = max(1, left // len(open_classes))
        for c in list(open_classes):
            if left == 0:
                break
            give = min(share, len(members[c]) - quota[c], left)
            quota[c] += give
            left -= give
            if quota[c] == len(members[c]):
                open_classes.remove(c)
    chosen = np.concatenate([members[c][: quota[c]] for c in classes])
    return np.sort(chosen).astype(np.int64)


def subset_note(kept: int, total: int, seed: int, classes: int) -> str:
    """``a seeded class-balanced subset: 500 of 10,000 images (seed 0)``, or '' for all."""
    if kept >= total:
        return ""
    return (
        f"a seeded class-balanced subset: {kept:,} of {total:,} images from {classes} classes "
        f"(seed {seed})"
    )
