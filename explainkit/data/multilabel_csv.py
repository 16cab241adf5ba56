"""Multi-label annotations in a CSV: ``ROOT/labels.csv`` beside the images it names.

Columns: ``image`` (a path relative to ROOT), ``labels`` (class names separated by ``;``,
empty for none) and optionally ``split`` (``train`` or ``eval``; without it a seeded 20% is
held out for evaluation). The classes are every name the file uses, sorted. Images are
decoded and resized to ``--image-size`` when the split loads.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from explainkit.data import Dataset
from explainkit.data.tasks import Record, assemble, holdout, read_rgb
from explainkit.errors import DataError

FILE = "labels.csv"


def read_rows(root: Path) -> list[dict[str, str]]:
    path = root / FILE
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except FileNotFoundError:
        raise DataError(f"the multilabel-csv dataset needs {path}") from None
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"cannot read {path}: {e}") from None
    if not rows or not {"image", "labels"} <= set(rows[0]):
        raise DataError(f"{path} needs a header with the columns image and labels, and rows")
    return rows


def load_multilabel_csv(
    split: str,
    data_dir: str | Path,
    image_size: int,
    seed: int = 0,
    limit: int | None = None,
    every_image: bool = False,
) -> Dataset:
    """One split of the CSV's images with their multi-hot labels (``every_image``: a CSV
    without a split column is evaluated whole)."""
    root = Path(data_dir)
    rows = read_rows(root)
    names = [[n.strip() for n in (r["labels"] or "").split(";") if n.strip()] for r in rows]
    classes = sorted({n for labels in names for n in labels})
    if not classes:
        raise DataError(f"{root / FILE} names no labels")
    if "split" in rows[0]:
        wanted = {"train": ("train",), "eval": ("eval", "val", "test")}[split]
        chosen = [i for i, r in enumerate(rows) if (r["split"] or "").strip() in wanted]
    else:
        rows_ids = [str(i) for i in range(len(rows))]
        chosen = [int(i) for i in holdout(rows_ids, split, seed, every_image)]
    chosen = chosen[:limit] if limit else chosen
    records = []
    for i in chosen:
        hot = np.zeros(len(classes), np.uint8)
        hot[[classes.index(n) for n in names[i]]] = 1
        image = rows[i]["image"]
        records.append(Record(image=read_rgb(root / image), path=image, multi_hot=hot))
    return assemble(records, classes, image_size, "multilabel-csv")
