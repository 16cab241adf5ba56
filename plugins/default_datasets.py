"""Built-in datasets: CIFAR-10, the synthetic shapes and any ImageFolder tree.

Registered through the ``register_datasets`` hook exactly as a third-party plugin would, with
public names only; each loader imports its reader (and numpy) when it runs. explainkit's
``load_dataset`` then keeps a seeded class-balanced ``limit`` and fits them to ``--image-size``
(docs/datasets.md describes each dataset).
"""

from __future__ import annotations

from typing import Any

from explainkit import hookimpl
from explainkit.data import Dataset, DatasetEntry
from explainkit.errors import DataError

__all__ = [
    "load_cifar10_split",
    "load_coco_split",
    "load_folder_split",
    "load_multilabel_csv_split",
    "load_voc_split",
    "load_scenes_split",
    "load_shapes_split",
    "register_datasets",
]


@hookimpl
def register_datasets(register: Any) -> None:
    register(
        DatasetEntry(
            "cifar10",
            load_cifar10_split,
            summary="CIFAR-10 from --data-dir (downloaded when missing): 32x32 photos, 10 classes.",
        )
    )
    register(
        DatasetEntry(
            "shapes",
            load_shapes_split,
            summary="Synthetic shapes with object masks, drawn from --seed (no files needed).",
        )
    )
    register(
        DatasetEntry(
            "scenes",
            load_scenes_split,
            summary="Synthetic scenes of several shapes with boxes, masks and labels (no files).",
        )
    )
    register(
        DatasetEntry(
            "folder",
            load_folder_split,
            summary="Any ImageFolder tree in --data-dir (one subfolder per class).",
        )
    )
    register(
        DatasetEntry(
            "coco",
            load_coco_split,
            summary="A COCO folder in --data-dir: images/ and an instances JSON (boxes, masks).",
        )
    )
    register(
        DatasetEntry(
            "voc",
            load_voc_split,
            summary="A VOC folder in --data-dir: JPEGImages/, SegmentationClass/, Annotations/.",
        )
    )
    register(
        DatasetEntry(
            "multilabel-csv",
            load_multilabel_csv_split,
            summary="Images with several labels each, listed in --data-dir/labels.csv.",
        )
    )
    register(
        DatasetEntry(
            "clips",
            load_clips_split,
            summary="Video clips in --data-dir: <class>/<clip>/ frame folders or .gif files.",
        )
    )


def load_clips_split(
    split: str,
    data_dir: str | None,
    image_size: int,
    seed: int,
    limit: int | None,
    holdout: bool = True,
    fit: str = "crop",
) -> Dataset:
    """A folder of clips, each 16 frames fitted to ``image_size`` (explainkit.data.clips)."""
    from explainkit.data.clips import load_clips

    folder = _task_folder("clips", data_dir)
    return load_clips(split, folder, image_size, seed, limit, every_clip=not holdout, fit=fit)


def load_cifar10_split(split: str, data_dir: str | None, download: bool) -> Dataset:
    """The CIFAR-10 python batches at their own 32x32 (explainkit resizes them)."""
    from explainkit.data.cifar10 import load_cifar10

    return load_cifar10(split, data_dir, download=download)


def load_shapes_split(split: str, image_size: int, seed: int, limit: int | None) -> Dataset:
    """The shapes, drawn at ``image_size`` (sharper than resizing them)."""
    from explainkit.data.shapes import make_shapes

    return make_shapes(split, image_size=image_size, seed=seed, limit=limit)


def load_scenes_split(split: str, image_size: int, seed: int, limit: int | None) -> Dataset:
    """The scenes, drawn at ``image_size`` with their boxes, masks and labels."""
    from explainkit.data.scenes import make_scenes

    return make_scenes(split, image_size=image_size, seed=seed, limit=limit)


def load_folder_split(
    split: str,
    data_dir: str | None,
    image_size: int,
    seed: int,
    limit: int | None,
    holdout: bool = True,
    fit: str = "crop",
    resize: int | None = None,
) -> Dataset:
    """An ImageFolder tree, each image decoded and fitted to ``image_size`` (``fit``); a
    limit picks its class-balanced subset before anything is decoded."""
    from explainkit.data.folder import load_folder

    if data_dir is None:
        raise DataError("the folder dataset needs --data-dir pointing at an ImageFolder tree")
    return load_folder(
        split, data_dir, image_size=image_size, seed=seed, limit=limit, holdout=holdout,
        fit=fit, resize=resize,
    )  # fmt: skip


def _task_folder(name: str, data_dir: str | None) -> str:
    if data_dir is None:
        raise DataError(f"the {name} dataset needs --data-dir pointing at its folder")
    return data_dir


def _task_split(name: str, module: str, function: str) -> Any:
    """The loader of a task dataset in a folder: ``module.function(split, folder, image_size,
    seed, limit, every_image=)`` given ``--data-dir``; ``evaluate`` (``holdout=False``) reads
    every image of a folder without its own splits. Imported when called (pycocotools...)."""

    def load_split(
        split: str,
        data_dir: str | None,
        image_size: int,
        seed: int,
        limit: int | None,
        holdout: bool = True,
    ) -> Dataset:
        import importlib

        load = getattr(importlib.import_module(module), function)
        folder = _task_folder(name, data_dir)
        return load(split, folder, image_size, seed, limit, every_image=not holdout)

    load_split.__doc__ = f"The {name} dataset's split (explainkit.data: {module}.{function})."
    return load_split


load_coco_split = _task_split("coco", "explainkit.data.coco", "load_coco")
load_voc_split = _task_split("voc", "explainkit.data.voc", "load_voc")
load_multilabel_csv_split = _task_split(
    "multilabel-csv", "explainkit.data.multilabel_csv", "load_multilabel_csv"
)
