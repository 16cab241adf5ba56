"""One representation of a split's task annotations, shared by every task dataset.

A :class:`~explainkit.data.Dataset` holds what classification needs (``targets``, one class
per image, and an optional binary object mask). Datasets that know more (the synthetic scenes,
COCO and VOC folders, a multi-label CSV) also fill ``Dataset.annotations`` with
:class:`Annotations`, in the dataset's own class indices ``0..K-1``:

- detection: per image a :class:`Detection` of boxes ``(n, 4)`` float32 pixels
  ``x0, y0, x1, y1`` (x1, y1 exclusive) and their classes ``(n,)`` int64;
- instance masks: per image ``(n, H, W)`` uint8 of 0 and 1, one per box (optional);
- segmentation: ``(N, H, W)`` uint8, 0 for background, ``c + 1`` for class ``c`` and
  :data:`IGNORE` (255) for pixels not to be scored (VOC's "void" outlines);
- multi-label: ``(N, K)`` uint8 multi-hot, given or derived from the boxes' classes.

A segmentation task's classes are therefore ``["background", *classes]`` (:func:`task_classes`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from explainkit.errors import DataError

TASKS = ("classification", "multilabel", "segmentation", "detection")
IGNORE = 255  # a segmentation pixel that is not scored
BACKGROUND = "background"


@dataclass
class Detection:
    """One image's objects: boxes (n, 4) float32 x0, y0, x1, y1 in pixels, classes (n,)."""

    boxes: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        self.boxes = np.asarray(self.boxes, np.float32).reshape(-1, 4)
        self.labels = np.asarray(self.labels, np.int64).reshape(-1)
        if len(self.boxes) != len(self.labels):
            raise DataError(f"{len(self.boxes)} boxes but {len(self.labels)} box labels")

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Annotations:
    """A split's task annotations (any of them may be absent; see the module docstring)."""

    detections: list[Detection] | None = None
    instances: list[np.ndarray] | None = None
    segmentation: np.ndarray | None = None
    multi_hot: np.ndarray | None = None
    num_classes: int = 0
    notes: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.multi_hot is None and self.detections is not None and self.num_classes:
            self.multi_hot = multi_hot_of(self.detections, self.num_classes)

    def supports(self, task: str) -> bool:
        """Whether these annotations hold the ground truth ``task`` is trained on."""
        return {
            "classification": True,
            "multilabel": self.multi_hot is not None,
            "segmentation": self.segmentation is not None,
            "detection": self.detections is not None,
        }.get(task, False)

    def take(self, rows: Any) -> Annotations:
        """The annotations of the images at ``rows`` (indices, in the order given)."""

        def pick(values: Any) -> Any:
            if values is None:
                return None
            return values[rows] if hasattr(values, "shape") else [values[i] for i in rows]

        return Annotations(
            detections=pick(self.detections),
            instances=pick(self.instances),
            segmentation=pick(self.segmentation),
            multi_hot=pick(self.multi_hot),
            num_classes=self.num_classes,
            notes=dict(self.notes),
        )

    def check(self, n: int, shape: tuple[int, int], num_classes: int) -> None:
        """Raise DataError unless every annotation has one entry per image of ``shape``."""
        h, w = shape
        if self.detections is not None:
            if len(self.detections) != n:
                raise DataError(f"{len(self.detections)} box lists for {n} images")
            for det in self.detections:
                if len(det) and (det.labels.min() < 0 or det.labels.max() >= num_classes):
                    raise DataError(f"a box label outside 0..{num_classes - 1}")
                if len(det) and not np.isfinite(det.boxes).all():
                    raise DataError("a box with NaN or infinite coordinates")
        if self.segmentation is not None:
            seg = self.segmentation
            if seg.shape != (n, h, w) or seg.dtype != np.uint8:
                raise DataError(
                    f"segmentation masks {seg.dtype} {seg.shape}, not uint8 {(n, h, w)}"
                )
            valid = seg[seg != IGNORE]
            if valid.size and valid.max() > num_classes:
                raise DataError(f"a segmentation class id above {num_classes} (its classes + 1)")
        if self.multi_hot is not None and np.shape(self.multi_hot) != (n, num_classes):
            raise DataError(
                f"multi-hot labels of shape {np.shape(self.multi_hot)}, not {n, num_classes}"
            )


def multi_hot_of(detections: list[Detection], num_classes: int) -> np.ndarray:
    """(N, K) uint8: 1 where an image holds at least one object of the class (labels
    outside 0..K-1 are left for :meth:`Annotations.check` to refuse)."""
    out = np.zeros((len(detections), num_classes), np.uint8)
    for i, det in enumerate(detections):
        out[i, det.labels[(det.labels >= 0) & (det.labels < num_classes)]] = 1
    return out


def semantic_of(instances: np.ndarray, labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """An image's segmentation (H, W) uint8 from its instance masks: later ones on top."""
    seg = np.zeros(shape, np.uint8)
    for mask, label in zip(instances, labels, strict=True):
        seg[mask.astype(bool)] = label + 1
    return seg


def boxes_of(instances: np.ndarray) -> np.ndarray:
    """(n, 4) float32 tight boxes around instance masks (x1, y1 exclusive)."""
    out = np.zeros((len(instances), 4), np.float32)
    for i, mask in enumerate(instances):
        ys, xs = np.nonzero(mask)
        if len(xs):
            out[i] = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    return out


def task_classes(task: str, classes: list[str]) -> list[str]:
    """The classes a ``task`` model scores: a segmenter's have the background first."""
    if task == "segmentation":
        return [BACKGROUND, *classes]
    return list(classes)


def fit_box(boxes: np.ndarray, size: tuple[int, int], side: int) -> np.ndarray:
    """Boxes of an image of ``size`` (H, W) moved as :func:`explainkit.data.fit_images` moves
    its pixels (shorter side scaled to ``side``, centre cropped), clipped to the square."""
    h, w = size
    scale = side / min(h, w)
    rw, rh = max(side, round(w * scale)), max(side, round(h * scale))
    left, top = (rw - side) // 2, (rh - side) // 2
    out = np.asarray(boxes, np.float32).reshape(-1, 4) * np.float32(scale)
    out -= np.array([left, top, left, top], np.float32)
    return np.clip(out, 0, side)


def keep_visible(det: Detection, min_side: float = 1.0) -> Detection:
    """The boxes still at least ``min_side`` pixels wide and high (after a crop)."""
    b = det.boxes
    keep = ((b[:, 2] - b[:, 0]) >= min_side) & ((b[:, 3] - b[:, 1]) >= min_side)
    return Detection(b[keep], det.labels[keep])


def fit_annotations(ann: Annotations, sizes: np.ndarray, side: int) -> Annotations:
    """``ann`` for images resized to ``side`` squares as :func:`explainkit.data.fit_images`
    resizes them (``sizes``: each image's (H, W) before)."""
    from explainkit.data import fit_images

    detections = None
    if ann.detections is not None:
        detections = [
            keep_visible(Detection(fit_box(d.boxes, tuple(s), side), d.labels))
            for d, s in zip(ann.detections, sizes, strict=True)
        ]
    segmentation = None
    if ann.segmentation is not None:
        segmentation = fit_images(ann.segmentation, side, nearest=True)
    return Annotations(
        detections=detections,
        instances=None,  # instance masks are not kept through a resize
        segmentation=segmentation,
        multi_hot=ann.multi_hot,
        num_classes=ann.num_classes,
        notes=dict(ann.notes),
    )


def require_task(ann: Annotations | None, task: str, dataset: str) -> Annotations:
    """``ann`` when it holds ``task``'s ground truth; DataError naming what would."""
    if task == "classification":
        return ann or Annotations()
    if ann is None or not ann.supports(task):
        raise DataError(
            f"dataset {dataset!r} has no {task} annotations; use --dataset scenes, coco, voc "
            "or multilabel-csv, or a dataset a plugin registers with them"
        )
    return ann


def store_truth(task: str, dataset: Any) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """What a ``task`` store records of an evaluation split: its targets in the task's classes
    (a segmenter's are shifted past the background) and its ground truth by dataset name
    (explainkit.store.schema.TASKS)."""
    targets = np.asarray(dataset.targets, np.int64)
    if task in ("classification", "video"):  # a video store's clips are in RUN/clips.h5
        return targets, {}
    ann = require_task(dataset.annotations, task, dataset.name)
    if task == "multilabel":
        return targets, {"eval/labels": np.asarray(ann.multi_hot, np.uint8)}
    if task == "segmentation":
        return targets + 1, {"eval/segmentation": ann.segmentation}
    dets = ann.detections or []
    boxes = [d.boxes for d in dets]
    return targets, {
        "eval/box_counts": np.array([len(d) for d in dets], np.int64),
        "eval/boxes": np.concatenate(boxes) if boxes else np.zeros((0, 4), np.float32),
        "eval/box_labels": np.concatenate([d.labels for d in dets]).astype(np.int64)
        if dets
        else np.zeros(0, np.int64),
    }


HOLDOUT = 0.2  # the share of a folder without its own evaluation split held out for it


def holdout(names: list[str], split: str, seed: int, every_image: bool = False) -> list[str]:
    """The ``split`` part of ``names`` when a dataset has no split of its own: a seeded
    :data:`HOLDOUT` (at least one) for evaluation, the rest for training; never overlapping.
    ``every_image``: the evaluation split is all of ``names`` (what ``evaluate`` reads)."""
    if every_image and split == "eval":
        return list(names)
    order = np.random.default_rng(seed).permutation(len(names))
    held = np.zeros(len(names), bool)
    held[order[: max(1, round(HOLDOUT * len(names)))]] = True
    return [n for n, h in zip(names, held, strict=True) if h == (split == "eval")]


@dataclass
class Record:
    """One image as a task dataset reads it, before resizing: pixels, objects, class mask."""

    image: np.ndarray  # uint8 (H, W, 3)
    path: str  # relative to the data folder
    detection: Detection | None = None
    segmentation: np.ndarray | None = None  # uint8 (H, W): 0 background, c + 1, 255 ignored
    multi_hot: np.ndarray | None = None  # uint8 (K,)


def assemble(records: list[Record], classes: list[str], size: int, name: str) -> Any:
    """A :class:`~explainkit.data.Dataset` of ``records`` resized to ``size`` squares (the
    shorter side scaled, the centre cropped), their boxes and masks moved with the pixels.

    ``targets`` is each image's largest object's class (0 when it has none) and ``masks``
    where any object is. Boxes, class masks or labels are kept when every record has them;
    without boxes or labels, a class mask's classes are the image's labels.
    """
    from explainkit.data import Dataset, fit_images

    if not records:
        raise DataError(f"the {name} dataset has no images in this split")
    n = len(records)
    images = np.empty((n, size, size, 3), np.uint8)
    sizes = np.zeros((n, 2), np.int64)
    segs = (
        np.zeros((n, size, size), np.uint8)
        if all(r.segmentation is not None for r in records)
        else None
    )
    detections: list[Detection] | None = (
        [] if all(r.detection is not None for r in records) else None
    )
    targets = np.zeros(n, np.int64)
    for i, r in enumerate(records):
        sizes[i] = r.image.shape[:2]
        images[i] = fit_images(r.image[None], size)[0]
        if segs is not None:
            segs[i] = fit_images(r.segmentation[None], size, nearest=True)[0]
        if detections is not None:
            det = keep_visible(
                Detection(fit_box(r.detection.boxes, tuple(sizes[i]), size), r.detection.labels)
            )
            detections.append(det)
            if len(det):
                areas = (det.boxes[:, 2] - det.boxes[:, 0]) * (det.boxes[:, 3] - det.boxes[:, 1])
                targets[i] = det.labels[int(np.argmax(areas))]
        elif segs is not None and (segs[i][segs[i] != IGNORE] > 0).any():
            ids = segs[i][(segs[i] > 0) & (segs[i] != IGNORE)]
            targets[i] = np.bincount(ids).argmax() - 1
        elif r.multi_hot is not None and r.multi_hot.any():
            targets[i] = int(np.argmax(r.multi_hot))
    multi = None
    if all(r.multi_hot is not None for r in records):
        multi = np.stack([r.multi_hot for r in records]).astype(np.uint8)
    elif detections is None and segs is not None:  # the classes a class mask shows
        multi = np.zeros((n, len(classes)), np.uint8)
        for i, seg in enumerate(segs):
            ids = np.unique(seg[(seg > 0) & (seg != IGNORE)]).astype(np.int64) - 1
            multi[i, ids] = 1
    masks = None if segs is None else ((segs > 0) & (segs != IGNORE)).astype(np.uint8)
    return Dataset(
        images=images,
        targets=targets,
        classes=list(classes),
        index=np.arange(n, dtype=np.int64),
        masks=masks,
        sizes=sizes,
        name=name,
        paths=[r.path for r in records],
        annotations=Annotations(
            detections=detections, segmentation=segs, multi_hot=multi, num_classes=len(classes)
        ),
    )


def read_rgb(path: Any) -> np.ndarray:
    """An image file as uint8 (H, W, 3); DataError naming it when it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise DataError(f"cannot read the image {path}: {e}") from None
