"""What ``evaluate`` explains: the evaluation images, fitted to the model's expected input.

:func:`model_input` says which input a model expects (``--image-size``, else its registry
entry's, read from torchvision's or timm's pretrained-weights metadata); :func:`eval_data`
turns what ``explainkit.evaluate`` was given (a dataset name, a Dataset, or arrays, grayscale
included) into the evaluation split.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from explainkit.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover - typing only
    import numpy as np

    from explainkit.data import Dataset
    from explainkit.registries import Registries

__all__ = ["ARRAYS", "eval_data", "model_input", "read_line", "three_values"]

ARRAYS = "arrays"  # the dataset name a run records for images handed over as arrays


def model_input(
    entry: Any, image_size: int | None, resize_size: int | None = None
) -> tuple[int, int | None, str]:
    """(side, shorter side before a centre crop, where they come from in words) of the input
    a model expects: ``image_size`` when given, else its entry's ``input_size`` and
    ``resize_size`` (a torchvision or timm model's pretrained-weights metadata), else 224."""
    if image_size:
        return image_size, resize_size, "--image-size"
    if entry is not None and entry.input_size:
        resize = resize_size or entry.resize_size
        return entry.input_size, resize, f"what {entry.name} expects"
    return 224, resize_size, f"{getattr(entry, 'name', 'the model')} declares no input size"


def read_line(ds: Dataset, dataset: str, limit: int | None = None) -> str:
    """``read 21 images of 3 classes: every image of photos (...)``: what evaluate read."""
    where = ds.note or f"the eval split of {dataset}"
    line = f"read {len(ds):,} images of {ds.num_classes:,} classes: {where}"
    return line + (f"; {ds.subset}" if ds.subset else "")


def rounded(values: Any) -> str:
    """``(0.485, 0.456, 0.406)``: numbers as a short tuple, for messages."""
    return "(" + ", ".join(f"{float(v):.3f}" for v in values) + ")"


def eval_data(
    data: Any,
    classes: Sequence[str] | None,
    data_dir: str | Path | None,
    image_size: int | None,
    limit_eval: int | None,
    entry: Any,
    registries: Registries,
    fit: str = "crop",
    seed: int = 0,
) -> tuple[Dataset, str, int, int | None]:
    """(the eval split, the dataset name to record, the image side, the shorter side before
    a centre crop) of what ``data`` is."""
    import numpy as np

    from explainkit.data import Dataset, fit_images, load_dataset
    from explainkit.data.fit import FITS

    if fit not in FITS:
        raise ConfigError(f"fit must be one of {', '.join(FITS)}, got {fit!r}")
    resize = None
    if isinstance(data, Dataset):
        ds = data.take(limit_eval, seed)
        size = int(ds.images.shape[1])
        name = ds.name or ARRAYS
    elif isinstance(data, str):
        size, resize, _ = model_input(entry, image_size)
        ds = load_dataset(
            data, "eval", data_dir, size, seed, limit_eval, registries=registries,
            holdout=False, fit=fit, resize=resize,
        )  # fmt: skip
        name = data
    elif isinstance(data, tuple) and len(data) == 2:
        if classes is None:
            raise ConfigError("classes= is needed with (images, targets): one name per class")
        ds = _array_dataset(np.asarray(data[0]), np.asarray(data[1]), classes)
        ds = ds.take(limit_eval, seed)
        height, width = ds.images.shape[1:3]
        if image_size or height != width:  # fitted as --fit says, like a folder's files
            size = image_size or max(height, width)
            ds.images = fit_images(ds.images, size, False, fit)
        return ds, ARRAYS, int(ds.images.shape[1]), None
    else:
        raise ConfigError(
            "data must be a registered dataset name, an explainkit.data.Dataset or a tuple "
            "(images, targets)"
        )
    if classes is not None:
        if len(classes) != len(ds.classes):
            raise ConfigError(
                f"classes names {len(classes)} classes but {name} has {len(ds.classes)}"
            )
        ds.classes = [str(c) for c in classes]
    if ds.images.shape[1] != ds.images.shape[2]:
        raise ConfigError(f"images must be square, got {ds.images.shape[1]}x{ds.images.shape[2]}")
    return ds, name, size, resize


def _array_dataset(images: np.ndarray, targets: np.ndarray, classes: Sequence[str]) -> Dataset:
    """Arrays as a Dataset: grayscale (N, H, W) or (N, H, W, 1) images get their one channel
    repeated into RGB (what the store and figures hold; a 1-channel model averages it back)."""
    import numpy as np

    from explainkit.data import Dataset

    if images.dtype == np.uint8 and images.ndim == 3:
        images = images[..., None]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ConfigError(
            f"images must be uint8 (N, H, W, 3) or grayscale (N, H, W, 1), got {images.dtype} "
            f"{images.shape}"
        )
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    if not np.issubdtype(targets.dtype, np.integer) or targets.shape != (len(images),):
        raise ConfigError(f"targets must hold one class index per image ({len(images)})")
    targets = targets.astype(np.int64)
    if len(targets) and (targets.min() < 0 or targets.max() >= len(classes)):
        raise ConfigError(f"targets must be class indices from 0 to {len(classes) - 1}")
    names = [str(c) for c in classes]
    sizes = np.tile(np.asarray(images.shape[1:3], np.int64), (len(images), 1))
    return Dataset(
        images, targets, names, np.arange(len(targets)), sizes=sizes, name=ARRAYS,
        note="the (images, targets) arrays given",
    )  # fmt: skip


def three_values(what: str, values: Any) -> tuple[float, ...]:
    """``mean``/``std`` as three numbers: one value (a grayscale model's) is repeated."""
    try:
        numbers = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be numbers, one per channel, got {values!r:.60}") from None
    if len(numbers) == 1:
        numbers *= 3
    if len(numbers) != 3:
        raise ConfigError(f"{what} must hold 3 numbers (RGB) or 1 (grayscale), got {len(numbers)}")
    if what == "std" and min(numbers) <= 0:
        raise ConfigError(f"std must be positive, got {numbers}")
    return numbers
