"""A COCO-format folder: ``images/`` and an instances JSON, read with pycocotools.

Layouts (``--data-dir ROOT``):

- ``ROOT/train/`` and ``ROOT/val/`` (or ``ROOT/eval/``), each with ``images/`` and one
  ``*.json`` COCO instances file beside it; or
- ``ROOT/images/`` with one ``*.json`` beside it: a seeded 20% is held out for evaluation.

Each annotation's ``bbox`` becomes a box and its ``segmentation`` (polygons or RLE, through
``pycocotools``) an instance mask; the class masks put later annotations on top, and crowd
annotations are left unscored (255) and out of the boxes. Classes are the categories in
order of their ids; images are taken in order of their ids. Images are decoded and resized
to ``--image-size`` when the split loads.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from explainkit.data import Dataset
from explainkit.data.tasks import IGNORE, Detection, Record, assemble, holdout, read_rgb
from explainkit.errors import DataError

EVAL_FOLDERS = ("val", "eval")


def split_folder(root: Path, split: str) -> tuple[Path, bool]:
    """The folder holding ``split`` and whether it is the whole dataset (to be held out)."""
    names = ("train",) if split == "train" else EVAL_FOLDERS
    for name in names:
        if (root / name / "images").is_dir():
            return root / name, False
    if (root / "images").is_dir():
        return root, True
    raise DataError(
        f"{root} is not a COCO folder: expected images/ and an instances JSON beside it, "
        "or train/ and val/ folders that each hold them"
    )


def instances_json(folder: Path) -> Path:
    files = sorted(folder.glob("*.json")) + sorted((folder / "annotations").glob("*.json"))
    if len(files) != 1:
        found = "none" if not files else ", ".join(f.name for f in files)
        raise DataError(
            f"{folder} needs exactly one COCO instances JSON beside images/ (found {found})"
        )
    return files[0]


def _mask(coco: object, ann: dict) -> np.ndarray | None:
    """An annotation's instance mask, or None when it has no segmentation."""
    import warnings

    if not ann.get("segmentation"):
        return None
    with warnings.catch_warnings():  # pycocotools' numpy 2 copy= deprecation, not ours
        warnings.simplefilter("ignore", DeprecationWarning)
        return coco.annToMask(ann).astype(bool)


def load_coco(
    split: str,
    data_dir: str | Path,
    image_size: int,
    seed: int = 0,
    limit: int | None = None,
    every_image: bool = False,
) -> Dataset:
    """One split of a COCO folder with its boxes, class masks and labels (``every_image``:
    a folder without its own splits is evaluated whole)."""
    import contextlib
    import io

    try:
        from pycocotools.coco import COCO
    except ImportError as e:
        raise DataError(
            "the coco dataset needs pycocotools: pip install 'explainkit[tasks]'"
        ) from e

    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"the coco dataset's --data-dir {root} does not exist")
    folder, whole = split_folder(root, split)
    path = instances_json(folder)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
            coco = COCO(str(path))
    except (ValueError, KeyError, TypeError, AssertionError) as e:
        raise DataError(f"{path} is not a COCO instances file: {e}") from None
    cat_ids = sorted(coco.getCatIds())
    if not cat_ids:
        raise DataError(f"{path} names no categories")
    index = {c: i for i, c in enumerate(cat_ids)}
    classes = [str(coco.loadCats(c)[0].get("name", c)) for c in cat_ids]
    ids = sorted(coco.getImgIds())
    if whole:
        kept = set(holdout([str(i) for i in ids], split, seed, every_image))
        ids = [i for i in ids if str(i) in kept]
    ids = ids[:limit] if limit else ids
    records = []
    for image_id in ids:
        info = coco.loadImgs(image_id)[0]
        name = str(info.get("file_name", ""))
        pixels = read_rgb(folder / "images" / name)
        h, w = pixels.shape[:2]
        seg = np.zeros((h, w), np.uint8)
        boxes, labels = [], []
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=image_id)):
            label = index.get(ann.get("category_id"))
            if label is None:
                raise DataError(f"{path}: an annotation of image {name} has an unknown category")
            try:
                mask = _mask(coco, ann)
            except (ValueError, KeyError, TypeError, IndexError) as e:
                raise DataError(
                    f"{path}: a segmentation of image {name} is malformed ({e})"
                ) from None
            if ann.get("iscrowd"):
                if mask is not None:
                    seg[mask] = IGNORE
                continue
            try:
                x, y, bw, bh = (float(v) for v in ann["bbox"])
            except (KeyError, TypeError, ValueError):
                raise DataError(
                    f"{path}: an annotation of image {name} has no numeric bbox"
                ) from None
            boxes.append([x, y, x + bw, y + bh])
            labels.append(label)
            if mask is not None:
                seg[mask] = label + 1
        records.append(
            Record(
                image=pixels,
                path=f"images/{name}" if folder == root else f"{folder.name}/images/{name}",
                detection=Detection(np.asarray(boxes, np.float32).reshape(-1, 4), labels),
                segmentation=seg,
            )
        )
    return assemble(records, classes, image_size, "coco")
