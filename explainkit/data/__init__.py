"""Datasets as numpy arrays (or lazily decoded images), one shape for every dataset, by name.

Datasets are registered by plugins through the ``register_datasets`` hook as
:class:`DatasetEntry` objects; explainkit's own (cifar10, shapes, folder) come from the
built-in plugin ``explainkit.plugins.default_datasets``, registered exactly as a third party's
would be.
:func:`load_dataset` looks a name up in the registries the host built, checks what the
dataset returned, keeps a seeded class-balanced ``limit`` of its images and fits them to
``image_size`` squares (:mod:`explainkit.data.fit`: crop, pad or stretch).

A split too large for memory (an ImageFolder of 224-px images) keeps its images as a lazy
array-like (:mod:`explainkit.data.lazy`): decoded only when indexed. :func:`iter_batches` reads
any split a batch at a time, by slicing or through DataLoader workers.

Importing this package imports neither numpy nor torch (plugins import it to register their
datasets); readers and torch-based augmentation load lazily so `explainkit --help` stays fast.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from explainkit.data.fit import fit_images  # public here: analyzers and plugins fit images
from explainkit.errors import DataError
from explainkit.hookspecs import DatasetEntry

if TYPE_CHECKING:  # pragma: no cover - typing only
    from collections.abc import Iterator

    import numpy as np
    import torch

    from explainkit.data.lazy import LazyImages
    from explainkit.data.tasks import Annotations
    from explainkit.registries import Registries

# explainkit's own datasets, in the order the built-in plugin registers them.
DATASETS = ("cifar10", "shapes", "scenes", "folder")
SPLITS = ("train", "eval")

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


@dataclass
class Dataset:
    """One split: its images (in memory, or lazy when too large), labels and provenance."""

    images: np.ndarray | LazyImages  # uint8 (N,H,W,3), decoded on demand when lazy
    targets: np.ndarray  # int64 (N,)
    classes: list[str]
    index: np.ndarray  # int64 (N,) position of each image in its source split
    masks: np.ndarray | None = None  # uint8 (N,H,W), 1 = object (shapes dataset)
    sizes: np.ndarray | None = None  # int64 (N,2) original (H,W) of each image, before resizing
    name: str = ""
    paths: list[str] | None = None  # source file of each image, relative to the data folder
    annotations: Annotations | None = None  # boxes, class masks, labels (data/tasks.py)
    clips: np.ndarray | None = None  # uint8 (N,T,H,W,3) video clips; images: middle frames

    def __len__(self) -> int:
        return len(self.targets)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    note: str = ""  # what was read, in words (``photos/val``), for the line evaluate prints
    subset: str = ""  # which images a limit kept, in words ('' when all were kept)

    def take(self, limit: int | None, seed: int = 0) -> Dataset:
        """Keep ``limit`` images: a seeded, class-balanced subset in dataset order (the same
        images for the same seed), so a limit on a class-ordered folder keeps every class."""
        if limit is None or limit >= len(self):
            return self
        if limit < 1:
            raise DataError(f"limit must be a positive number of images, got {limit}")
        from explainkit.data.fit import balanced_subset, subset_note
        from explainkit.data.lazy import is_lazy

        rows = balanced_subset(self.targets, limit, seed)
        images = self.images
        return Dataset(
            images=images.select(rows) if is_lazy(images) else images[rows],
            targets=self.targets[rows],
            classes=self.classes,
            index=self.index[rows],
            masks=None if self.masks is None else self.masks[rows],
            sizes=None if self.sizes is None else self.sizes[rows],
            name=self.name,
            paths=None if self.paths is None else [self.paths[i] for i in rows],
            annotations=None if self.annotations is None else self.annotations.take(rows),
            clips=None if self.clips is None else self.clips[rows],
            note=self.note,
            subset=subset_note(limit, len(self), seed, len(set(self.targets.tolist()))),
        )


def load_dataset(
    name: str,
    split: str,
    data_dir: str | Path | None = None,
    image_size: int = 32,
    seed: int = 0,
    limit: int | None = None,
    download: bool = True,
    *,
    registries: Registries,
    holdout: bool = True,
    fit: str = "crop",
    resize: int | None = None,
) -> Dataset:
    """Load one split of a registered dataset as ``image_size`` squares.

    Args:
        name: A registered dataset (``cifar10``, ``shapes``, ``folder`` or a plugin's).
        split: ``"train"`` or ``"eval"``.
        data_dir: Where its files are (``--data-dir``), for the datasets that read files.
        image_size: Side of the square images returned; other sizes are resized (the shorter
            side to ``image_size``, then the centre cropped), their original sizes kept in
            ``sizes``.
        seed: For datasets that draw or split at random.
        limit: Keep ``limit`` images: a class-balanced subset drawn with ``seed``.
        download: Whether fetching missing files is allowed.
        registries: Where ``name`` is looked up (``explainkit.load_registries()``).
        holdout: For a dataset without an evaluation split (a flat folder), hold a seeded
            part out as ``"eval"`` (training); False makes ``"eval"`` every image (what
            ``evaluate`` reads).
        fit: How images of another shape become squares: ``crop``, ``pad`` or ``stretch``
            (:mod:`explainkit.data.fit`).
        resize: The shorter side before a centre ``crop`` (default ``image_size``).

    Raises:
        DataError: An unknown name or split, a bad value, or what the dataset returned is not
            a well-formed ``Dataset``.
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose 'train' or 'eval'")
    if image_size < 8:
        raise DataError(f"image_size must be at least 8 pixels, got {image_size}")
    if limit is not None and limit < 1:
        raise DataError(f"limit must be a positive number of images, got {limit}")
    entry, plugin = registries.dataset_entry(name)
    offered = {
        "split": split,
        "data_dir": None if data_dir is None else str(data_dir),
        "image_size": image_size,
        "seed": seed,
        "limit": limit,
        "download": download,
        "holdout": holdout,
        "fit": fit,
        "resize": resize,
    }
    from explainkit.data.fit import FITS

    if fit not in FITS:
        raise DataError(f"fit must be one of {', '.join(FITS)}, got {fit!r}")
    ds = entry.load(**_accepted(entry.load, offered))
    ds = _checked(ds, name, plugin).take(limit, seed)
    return _fit(_with_sizes(ds), image_size, fit, resize)


def _accepted(func: Any, offered: dict[str, Any]) -> dict[str, Any]:
    """The arguments ``func`` names (all of them when it takes ``**kwargs``)."""
    try:
        params = inspect.signature(func).parameters
    except (TypeError, ValueError):
        return offered
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return offered
    return {k: v for k, v in offered.items() if k in params}


def _checked(ds: Any, name: str, plugin: str) -> Dataset:
    """``ds`` if it is a well-formed Dataset (targets and index as int64); DataError naming
    the dataset and its plugin otherwise."""
    import numpy as np

    from explainkit.data.lazy import is_lazy

    def bad(problem: str) -> DataError:
        return DataError(f"dataset {name!r} of plugin {plugin!r} returned {problem}; fix its load")

    if not isinstance(ds, Dataset):
        raise bad(f"{type(ds).__name__}, not an explainkit.data.Dataset")
    images = ds.images
    array = isinstance(images, np.ndarray) or is_lazy(images)
    if not array or images.dtype != np.uint8 or images.ndim != 4:
        raise bad("images that are not a uint8 (N, H, W, 3) array")
    if images.shape[-1] != 3 or len(images) == 0 or min(images.shape[1:3]) < 1:
        raise bad(f"images of shape {images.shape}, not a non-empty (N, H, W, 3) array")
    n = len(images)
    if not isinstance(ds.classes, list) or not ds.classes:
        raise bad("no class names (classes must be a non-empty list of str)")
    if not all(isinstance(c, str) for c in ds.classes):
        raise bad("class names that are not all str")
    for field in ("targets", "index"):
        values = np.asarray(getattr(ds, field))
        if values.shape != (n,) or not np.issubdtype(values.dtype, np.integer):
            raise bad(f"{field} that are not {n} integers (one per image)")
        setattr(ds, field, values.astype(np.int64, copy=False))
    if ds.targets.min() < 0 or ds.targets.max() >= len(ds.classes):
        raise bad(f"targets outside 0..{len(ds.classes) - 1} (its {len(ds.classes)} classes)")
    if ds.masks is not None and np.shape(ds.masks) != images.shape[:3]:
        raise bad(f"masks of shape {np.shape(ds.masks)}, not {images.shape[:3]}")
    if ds.annotations is not None:
        try:
            ds.annotations.check(n, images.shape[1:3], len(ds.classes))
        except DataError as e:
            raise bad(f"annotations that do not fit its images: {e}") from None
    if not ds.name:
        ds.name = name
    return ds


def _with_sizes(ds: Dataset) -> Dataset:
    """``ds`` with ``sizes`` recorded: its images' own (H, W), for datasets of one size."""
    import numpy as np

    if ds.sizes is None:
        ds.sizes = np.tile(np.asarray(ds.images.shape[1:3], np.int64), (len(ds), 1))
    return ds


def _fit(ds: Dataset, size: int, fit: str = "crop", resize: int | None = None) -> Dataset:
    """``ds`` with its images (and masks) made ``size`` squares, when they are not (lazy
    images become a lazy view that resizes as it decodes)."""
    from explainkit.data.lazy import is_lazy

    if ds.images.shape[1:3] == (size, size):
        return ds
    images = ds.images
    if is_lazy(images):
        ds.images = images.resized(size, fit, resize)
    else:
        ds.images = fit_images(images, size, False, fit, resize)
    if ds.masks is not None:
        ds.masks = fit_images(ds.masks, size, True, fit, resize)
    if ds.annotations is not None:
        from explainkit.data.tasks import fit_annotations

        if fit != "crop" or resize not in (None, size):
            raise DataError(
                f"{ds.name or 'this dataset'} has boxes or masks, which are fitted by the "
                "default centre crop only; leave --fit and the resize size at their defaults"
            )
        ds.annotations = fit_annotations(ds.annotations, ds.sizes, size)
    return ds


STATS_SAMPLE = 4096  # images of a lazy split that its channel statistics are computed from
STATS_CHUNK = 1 << 22  # values per channel_stats step: 4M uint8 values, 8 MB as uint16 squares


def channel_stats(
    images: np.ndarray | LazyImages, seed: int = 0
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std in [0,1] units, from exact integer sums chunk by chunk.

    A lazy split is streamed; one larger than :data:`STATS_SAMPLE` images is estimated from
    that many images drawn with ``seed``, so it costs no pass over the data: normalizing
    needs a few thousandths, and the error of a mean over 4,096 photos is the spread of
    their own means (about 0.1) over 64.
    """
    import numpy as np

    from explainkit.data.lazy import is_lazy

    lazy = is_lazy(images)
    if not lazy:
        images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or len(images) == 0:
        raise DataError(f"channel_stats expects non-empty (N,H,W,3) images, got {images.shape}")
    if lazy and len(images) > STATS_SAMPLE:
        rows = np.random.default_rng(seed).choice(len(images), STATS_SAMPLE, replace=False)
        images = images.select(np.sort(rows))
    total = np.zeros(3, np.int64)
    squares = np.zeros(3, np.int64)
    step = max(1, STATS_CHUNK // (int(np.prod(images.shape[1:3])) * 3))
    for _, batch in iter_batches(images, step):
        chunk = batch.numpy()
        total += chunk.sum(axis=(0, 1, 2), dtype=np.int64)
        squares += np.square(chunk, dtype=np.uint16).sum(axis=(0, 1, 2), dtype=np.int64)
    count = len(images) * int(np.prod(images.shape[1:3]))
    mean = total / (count * 255.0)
    std = np.sqrt(np.maximum(squares / (count * 255.0**2) - mean**2, 0.0))
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def iter_batches(
    data: Dataset | np.ndarray | LazyImages,
    batch_size: int,
    workers: int | None = None,
    pin_memory: bool = False,
) -> Iterator[tuple[int, torch.Tensor]]:
    """``(start, images)`` for consecutive batches of a split, in dataset order: ``images`` a
    uint8 tensor (b, H, W, 3) of positions ``start .. start + b - 1``.

    In-memory images are sliced (no copy, no workers); lazy ones are decoded by ``workers``
    DataLoader processes (default: a few, fewer than the cores), in order, with at most a few
    batches decoded at once; ``pin_memory`` pins batches for a fast copy to a CUDA device.
    """
    from explainkit.data.batches import iter_batches as batches

    return batches(data, batch_size, workers, pin_memory)


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """Resize uint8 NHWC images to size x size (bilinear, PIL), stretching non-square ones
    (:func:`fit_images` crops them instead)."""
    import numpy as np
    from PIL import Image

    out = np.empty((len(images), size, size, 3), dtype=np.uint8)
    for i, img in enumerate(images):
        out[i] = np.asarray(Image.fromarray(img).resize((size, size), Image.BILINEAR))
    return out


__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "DATASETS",
    "Dataset",
    "DatasetEntry",
    "channel_stats",
    "fit_images",
    "iter_batches",
    "load_dataset",
    "resize_images",
]
