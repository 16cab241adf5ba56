"""A Pascal VOC-format folder: ``JPEGImages/``, ``SegmentationClass/``, ``Annotations/``.

``--data-dir ROOT`` holds ``JPEGImages/NAME.jpg``, and where present
``SegmentationClass/NAME.png`` (index PNGs: 0 background, ``c + 1`` for class ``c``, 255 the
void outlines, not scored) and ``Annotations/NAME.xml`` (``<object>`` boxes, 1-based inclusive
pixel corners). The splits are ``ImageSets/Segmentation/{train,val}.txt`` (else
``ImageSets/Main/``), else a seeded 20% of the images is held out for evaluation. The classes
are ``ROOT/classes.txt`` (one name a line, the background not among them) when present, else
VOC's twenty. A split has class masks when all its images have a PNG, and boxes when all have
an XML. Images are decoded and resized to ``--image-size`` when the split loads.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from explainkit.data import Dataset
from explainkit.data.tasks import Detection, Record, assemble, holdout, read_rgb
from explainkit.errors import DataError

VOC_CLASSES = [
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
]  # fmt: skip
SPLIT_FILES = {"train": ("train.txt",), "eval": ("val.txt", "eval.txt", "test.txt")}


def voc_classes(root: Path) -> list[str]:
    listed = root / "classes.txt"
    if not listed.is_file():
        return list(VOC_CLASSES)
    names = [line.strip() for line in listed.read_text(encoding="utf-8").splitlines()]
    names = [n for n in names if n and n != "background"]
    if not names or len(set(names)) != len(names):
        raise DataError(f"{listed} must name distinct classes, one a line")
    return names


def split_names(root: Path, split: str, seed: int, every_image: bool = False) -> list[str]:
    """The image names of ``split``: its ImageSets list, else a seeded holdout (or every
    image, for ``evaluate``)."""
    for sets in ("Segmentation", "Main"):
        for name in SPLIT_FILES[split]:
            listed = root / "ImageSets" / sets / name
            if listed.is_file():
                return [line.split()[0] for line in listed.read_text().splitlines() if line.strip()]
    names = sorted(p.stem for p in (root / "JPEGImages").glob("*.jpg"))
    if not names:
        raise DataError(f"{root} is not a VOC folder: JPEGImages/ holds no .jpg images")
    return holdout(names, split, seed, every_image)


def read_boxes(path: Path, classes: list[str]) -> Detection:
    """The ``<object>`` boxes of a VOC XML file, as 0-based boxes with exclusive far corners."""
    import xml.etree.ElementTree as ET

    try:
        tree = ET.parse(path)
    except (ET.ParseError, OSError) as e:
        raise DataError(f"cannot read {path}: {e}") from None
    boxes, labels = [], []
    for obj in tree.getroot().iter("object"):
        name = (obj.findtext("name") or "").strip()
        if name not in classes:
            raise DataError(f"{path} has an object of class {name!r}, not one of its classes")
        box = obj.find("bndbox")
        try:
            x0, y0, x1, y1 = (float(box.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
        except (AttributeError, TypeError, ValueError):
            raise DataError(f"{path} has an object without a numeric bndbox") from None
        boxes.append([x0 - 1, y0 - 1, x1, y1])
        labels.append(classes.index(name))
    return Detection(np.asarray(boxes, np.float32).reshape(-1, 4), labels)


def read_classes_png(path: Path, classes: list[str]) -> np.ndarray:
    """An index PNG's class ids (palette indices, not colours)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "L"):
                raise DataError(f"{path} is not an index PNG (mode {im.mode}); save class ids")
            ids = np.asarray(im, np.uint8)
    except OSError as e:
        raise DataError(f"cannot read {path}: {e}") from None
    bad = ids[(ids != 255) & (ids > len(classes))]
    if bad.size:
        raise DataError(f"{path} holds class id {int(bad[0])}, above its {len(classes)} classes")
    return ids


def load_voc(
    split: str,
    data_dir: str | Path,
    image_size: int,
    seed: int = 0,
    limit: int | None = None,
    every_image: bool = False,
) -> Dataset:
    """One split of a VOC folder with its class masks and boxes where present (``every_image``:
    a folder without ImageSets lists is evaluated whole)."""
    root = Path(data_dir)
    if not (root / "JPEGImages").is_dir():
        raise DataError(f"{root} is not a VOC folder: it has no JPEGImages/")
    classes = voc_classes(root)
    names = split_names(root, split, seed, every_image)
    names = names[:limit] if limit else names
    segs = [root / "SegmentationClass" / f"{n}.png" for n in names]
    xmls = [root / "Annotations" / f"{n}.xml" for n in names]
    with_segs = bool(names) and all(p.is_file() for p in segs)
    with_boxes = bool(names) and all(p.is_file() for p in xmls)
    records = []
    for name, seg, xml in zip(names, segs, xmls, strict=True):
        pixels = read_rgb(root / "JPEGImages" / f"{name}.jpg")
        mask = read_classes_png(seg, classes) if with_segs else None
        if mask is not None and mask.shape != pixels.shape[:2]:
            raise DataError(f"{seg} is {mask.shape} but its image is {pixels.shape[:2]}")
        records.append(
            Record(
                image=pixels,
                path=f"JPEGImages/{name}.jpg",
                detection=read_boxes(xml, classes) if with_boxes else None,
                segmentation=mask,
            )
        )
    return assemble(records, classes, image_size, "voc")
