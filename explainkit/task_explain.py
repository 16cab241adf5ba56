"""What is explained on a multi-label, segmentation or detection run, read from its store.

A classifier's eval image has one map (its class). A task run's image has several things
worth explaining, each an *item*: a detection (its box and class), a predicted class region
of a segmentation, a predicted label. This module chooses the items of a run from its store,
builds the :mod:`explainkit.explain.targets` target of each (what Grad-CAM differentiates),
the bounded score that deletion/insertion tracks, and the ground-truth region each item is
localized against (its true box or true mask). The analyzers ``gradcam`` and ``quality``
(:mod:`explainkit.task_cams`, :mod:`explainkit.task_quality`) use it for their task runs.

Items are chosen per image, at most :data:`PER_IMAGE` each:

- detection, ``predicted``: the detections scoring at least :data:`MIN_SCORE` (best first),
  or the best one when none does; boxes thinner than a pixel are skipped (no IoU can match
  them). ``true``: the ground-truth boxes.
- segmentation, ``predicted``: the classes of the stored predicted mask, largest region
  first, the background only when nothing else is predicted; ``true``: the true mask's.
- multi-label, ``predicted``: the labels whose logit is above 0 (highest first), or the
  highest label when none is; ``true``: the true labels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from explainkit.errors import AnalyzerError
from explainkit.explain.metrics import PerturbationCurves, curves_of
from explainkit.explain.outputs import describe_output, scores_of
from explainkit.explain.targets import Detection, MultiLabel, SegmentationRegion, Target

__all__ = [
    "EXPLAINED",
    "MIN_SCORE",
    "PER_IMAGE",
    "TASKS",
    "DetectorOutputs",
    "Items",
    "RegionProbability",
    "box_masks",
    "choose_items",
    "explained_model",
    "item_target",
    "score_target",
    "target_curves",
    "target_regions",
    "truth_regions",
]

TASKS = ("multilabel", "segmentation", "detection")
TARGETS = ("predicted", "true")
PER_IMAGE = 3  # items explained per image at most
MIN_SCORE = 0.3  # a detection scoring less is explained only when it is the image's best
MIN_SIDE = 1.0  # pixels: a thinner box matches nothing by IoU
IGNORE = 255  # segmentation truth not scored
# What one map explains, per task, in words (the HDF5 file and the report say it).
EXPLAINED = {
    "detection": "a detection: its class score plus its IoU with the explained box "
    "(Detection target, matched at IoU 0.5)",
    "segmentation": "a class region: the class's logits summed over the region "
    "(SegmentationRegion target)",
    "multilabel": "a label: its logit (MultiLabel target)",
}


@dataclass
class Items:
    """The explained items of a run, one row each, sorted by image.

    Attributes:
        image: (M,) store position of each item's image.
        cls: (M,) the class (label) explained.
        box: (M, 4) float32 ``x1, y1, x2, y2``: the explained box (detection) or the region's
            bounding box (segmentation); NaN for a label (multi-label).
        score: (M,) the run's recorded score: the detection's, the class's share of the image's
            pixels, the label's sigmoid; NaN for ground truth.
        correct: (M,) whether the item agrees with the other side: a prediction with the ground
            truth (a true box of its class at IoU 0.5, the class in the true mask, a true
            label), a true item with the predictions.
    """

    task: str
    target: str
    image: np.ndarray
    cls: np.ndarray
    box: np.ndarray
    score: np.ndarray
    correct: np.ndarray

    def __len__(self) -> int:
        return int(self.image.shape[0])

    def take(self, rows: Any) -> Items:
        """The items at ``rows``."""
        cut = (self.image, self.cls, self.box, self.score, self.correct)
        return Items(self.task, self.target, *(v[rows] for v in cut))


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) IoU of ``x1, y1, x2, y2`` boxes (0 where a union is empty)."""
    a, b = a.reshape(-1, 4).astype(np.float64), b.reshape(-1, 4).astype(np.float64)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area = lambda x: np.clip(x[:, 2] - x[:, 0], 0, None) * np.clip(x[:, 3] - x[:, 1], 0, None)  # noqa: E731
    union = area(a)[:, None] + area(b)[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def _matched(boxes: np.ndarray, labels: np.ndarray, other: tuple[np.ndarray, np.ndarray]) -> Any:
    """Whether each box overlaps a box of ``other`` of its class at IoU 0.5 or more."""
    ob, ol = other
    if len(boxes) == 0 or len(ob) == 0:
        return np.zeros(len(boxes), bool)
    ious = _iou(boxes, ob) * (labels[:, None] == ol[None, :])
    return ious.max(1) >= 0.5


def choose_items(
    store: Any, epoch: int, target: str = "predicted", per_image: int = PER_IMAGE
) -> Items:
    """The items of every eval image of a task ``store`` at ``epoch`` (see the module doc)."""
    if target not in TARGETS:
        raise AnalyzerError(
            f"a {store.task} run explains its predicted or its true objects, not {target!r}; "
            "use predicted or true"
        )
    if store.task not in TASKS:
        raise AnalyzerError(f"a {store.task} run has no task items; explain it as a classifier")
    rows: list[tuple[int, int, Any, float, bool]] = []
    if store.task == "detection":
        _detection_items(store, epoch, target, per_image, rows)
    elif store.task == "segmentation":
        _segmentation_items(store, epoch, target, per_image, rows)
    else:
        _label_items(store, epoch, target, per_image, rows)
    nan_box = np.full(4, np.nan, np.float32)
    return Items(
        store.task,
        target,
        np.array([r[0] for r in rows], np.int64),
        np.array([r[1] for r in rows], np.int64),
        np.array([nan_box if r[2] is None else r[2] for r in rows], np.float32).reshape(-1, 4),
        np.array([r[3] for r in rows], np.float32),
        np.array([r[4] for r in rows], bool),
    )


def _detection_items(store: Any, epoch: int, target: str, per_image: int, rows: list) -> None:
    truth = store.boxes()
    if target == "true":
        dets = store.detections(epoch)
        for i, (boxes, labels) in enumerate(truth):
            found = _matched(boxes, labels, (dets[i][0], dets[i][2]))
            for j in range(min(per_image, len(boxes))):
                rows.append((i, int(labels[j]), boxes[j], float("nan"), bool(found[j])))
        return
    for i, (boxes, scores, labels) in enumerate(store.detections(epoch)):
        wide = ((boxes[:, 2] - boxes[:, 0]) >= MIN_SIDE) & ((boxes[:, 3] - boxes[:, 1]) >= MIN_SIDE)
        order = [j for j in np.argsort(-scores, kind="stable") if wide[j]]
        keep = [j for j in order if scores[j] >= MIN_SCORE][:per_image] or order[:1]
        right = _matched(boxes[keep], labels[keep], truth[i])
        for k, j in enumerate(keep):
            rows.append((i, int(labels[j]), boxes[j], float(scores[j]), bool(right[k])))


def _bounding_box(region: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(region)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


def _segmentation_items(store: Any, epoch: int, target: str, per_image: int, rows: list) -> None:
    for batch in store.batches(256):
        part = slice(int(batch[0]), int(batch[-1]) + 1)
        pred = store.epoch_data("masks", epoch, part)
        truth = store.truth("eval/segmentation", part)
        chosen, other = (pred, truth) if target == "predicted" else (truth, pred)
        for i, mask, against in zip(batch, chosen, other, strict=True):
            ids, counts = np.unique(mask[mask != IGNORE], return_counts=True)
            order = [k for k in np.argsort(-counts, kind="stable") if ids[k] != 0]
            if not order and target == "predicted":
                order = [k for k in range(len(ids)) if ids[k] == 0]  # background only
            for k in order[:per_image]:
                c = int(ids[k])
                share = float(counts[k] / mask.size) if target == "predicted" else float("nan")
                present = bool((against == c).any())
                rows.append((int(i), c, _bounding_box(mask == c), share, present))


def _label_items(store: Any, epoch: int, target: str, per_image: int, rows: list) -> None:
    logits = store.logits(epoch)
    labels = store.truth("eval/labels").astype(bool)
    for i in range(len(logits)):
        order = np.argsort(-logits[i], kind="stable")
        if target == "true":
            chosen = [c for c in order if labels[i, c]][:per_image]
        else:
            chosen = [c for c in order if logits[i, c] > 0][:per_image] or list(order[:1])
        for c in chosen:
            p = float(1 / (1 + np.exp(-logits[i, c]))) if target == "predicted" else float("nan")
            other = labels[i, c] if target == "predicted" else logits[i, c] > 0
            rows.append((i, int(c), None, p, bool(other)))


def box_masks(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """(M, H, W) bool: the pixels whose centre lies inside each box ``x1, y1, x2, y2``."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    ys, xs = np.arange(height) + 0.5, np.arange(width) + 0.5
    inside_x = (xs[None, :] >= boxes[:, :1]) & (xs[None, :] <= boxes[:, 2:3])
    inside_y = (ys[None, :] >= boxes[:, 1:2]) & (ys[None, :] <= boxes[:, 3:4])
    return inside_y[:, :, None] & inside_x[:, None, :]


def target_regions(store: Any, epoch: int, items: Items) -> np.ndarray | None:
    """(M, H, W) float32 region each segmentation item's target sums over (the stored
    predicted mask of its class, or its true mask); None for the other tasks."""
    if items.task != "segmentation" or not len(items):
        return None
    out = np.empty((len(items), *store.images([0]).shape[1:3]), np.float32)
    for image in np.unique(items.image):
        sel = slice(int(image), int(image) + 1)
        if items.target == "predicted":
            mask = store.epoch_data("masks", epoch, sel)[0]
        else:
            mask = store.truth("eval/segmentation", sel)[0]
        for row in np.flatnonzero(items.image == image):
            out[row] = mask == items.cls[row]
    return out


def truth_regions(store: Any, items: Items) -> tuple[np.ndarray, np.ndarray, str]:
    """Each item's ground-truth region, for localization.

    Returns ``(regions, known, what)``: (M, H, W) bool regions, (M,) whether the item has
    one, and the region in words. Detection: the true box of the item's class that overlaps
    the explained box most (none when no true box of its class overlaps it); segmentation:
    the true mask of the item's class; multi-label: the image's object mask when the store
    has one and the label is true (a multi-label store holds no region per label).
    """
    h, w = store.images([0]).shape[1:3]
    regions = np.zeros((len(items), h, w), bool)
    known = np.zeros(len(items), bool)
    if items.task == "detection":
        truth = store.boxes()
        for row, (i, c, box) in enumerate(zip(items.image, items.cls, items.box, strict=True)):
            boxes, labels = truth[int(i)]
            same = boxes[labels == c]
            if len(same):
                ious = _iou(box, same)[0]
                if ious.max() > 0:
                    regions[row] = box_masks(same[int(ious.argmax())], h, w)[0]
                    known[row] = True
        return regions, known, "the true box of the explained class that overlaps it most"
    if items.task == "segmentation":
        for image in np.unique(items.image):
            truth = store.truth("eval/segmentation", slice(int(image), int(image) + 1))[0]
            for row in np.flatnonzero(items.image == image):
                regions[row] = truth == items.cls[row]
                known[row] = bool(regions[row].any())
        return regions, known, "the true mask of the explained class"
    if not store.has_masks:
        return regions, known, "none: the store has no object masks"
    labels = store.truth("eval/labels").astype(bool)
    for row, (i, c) in enumerate(zip(items.image, items.cls, strict=True)):
        if labels[i, c]:
            regions[row] = store.read_masks(np.array([i]))[0] > 0
            known[row] = bool(regions[row].any())
    return regions, known, "the image's object mask (all its objects), for true labels"


class DetectorOutputs(nn.Module):
    """A detector (torchvision's or a transformers one) as the store records it, labels
    0..K-1, from a batch tensor, every detection kept
    (:func:`explainkit.task_eval.detections_of`)."""

    def __init__(self, model: nn.Module) -> None:
        from explainkit.task_eval import takes_image_list

        super().__init__()
        self.model = model
        self.listed = takes_image_list(model)

    def forward(self, x: Tensor) -> list[dict[str, Tensor]]:
        from explainkit.task_eval import detections_of

        out = self.model(list(x)) if self.listed else self.model(x)
        return detections_of(out, tuple(x.shape[-2:]), min_score=0.0, limit=None)


class SegmenterOutputs(nn.Module):
    """A segmenter's logits at the image's resolution, whatever it returns (a tensor,
    ``{"out": ...}``, a transformers output at a quarter of the size):
    :func:`explainkit.task_eval.segmentation_logits`, so regions match the store's masks."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        from explainkit.explain.outputs import scores_of
        from explainkit.task_eval import segmentation_logits

        out = self.model(x)
        return segmentation_logits(out, tuple(x.shape[-2:]), scores_of(out).shape[1])


def explained_model(model: nn.Module, task: str) -> nn.Module:
    """The module whose output the task's targets read (the detector's, re-labelled; the
    segmenter's at the image's size)."""
    if task == "detection":
        return DetectorOutputs(model).eval()
    if task == "segmentation":
        return SegmenterOutputs(model).eval()
    return model


def item_target(items: Items, regions: np.ndarray | None = None) -> Target:
    """The target of each item: what its Grad-CAM map explains."""
    cls = torch.from_numpy(items.cls)
    if items.task == "detection":
        boxes = [torch.from_numpy(b[None]) for b in items.box]
        return Detection(boxes, [c[None] for c in cls])
    if items.task == "segmentation":
        if regions is None:
            raise AnalyzerError("a segmentation item's target needs its region")
        return SegmentationRegion(cls, torch.from_numpy(regions))
    return MultiLabel(cls)


class RegionProbability(Target):
    """The mean softmax probability of a class over a fixed region of (N, K, H, W) output:
    the bounded score deletion/insertion tracks for a segmentation region."""

    per_image = ("cls", "mask")

    def __init__(self, cls: Tensor, mask: Tensor) -> None:
        self.cls, self.mask = cls.long(), mask.float()

    def scores(self, output: Any) -> Tensor:
        out = scores_of(output)
        if out.dim() != 4 or tuple(out.shape[-2:]) != tuple(self.mask.shape[-2:]):
            raise AnalyzerError(
                f"a segmentation region needs (N, K, H, W) scores at the region's size; the "
                f"model returned {describe_output(out)}"
            )
        n, _, h, w = out.shape
        cls = self.cls.to(out.device).view(n, 1, 1, 1).expand(n, 1, h, w)
        prob = out.float().softmax(1).gather(1, cls)[:, 0]
        mask = self.mask.to(out.device)
        return (prob * mask).sum((1, 2)) / mask.sum((1, 2)).clamp_min(1)


def score_target(items: Items, regions: np.ndarray | None = None) -> Target:
    """The bounded score (in [0, 1]) deletion/insertion tracks for each item: the matched
    detection's confidence, the class's mean probability over the region, the label's
    sigmoid."""
    cls = torch.from_numpy(items.cls)
    if items.task == "detection":
        boxes = [torch.from_numpy(b[None]) for b in items.box]
        return Detection(boxes, [c[None] for c in cls], with_iou=False)
    if items.task == "segmentation":
        if regions is None:
            raise AnalyzerError("a segmentation item's score needs its region")
        return RegionProbability(cls, torch.from_numpy(regions))
    return MultiLabel(cls, probability=True)


@torch.no_grad()
def target_curves(
    model: nn.Module,
    images: Tensor,
    maps: Tensor,
    target: Target,
    *,
    steps: int = 16,
    baseline: str = "blur",
    max_batch: int = 128,
    generator: torch.Generator | None = None,
) -> PerturbationCurves:
    """Deletion and insertion curves (Petsiuk et al. 2018) of any target's score.

    As :func:`explainkit.explain.metrics.perturbation_curves`, but the tracked number is
    ``target``'s score for each image (one target entry per image) instead of a class's
    softmax probability: the most-attributed pixels are removed from (or added to) the
    ``baseline`` in ``steps`` steps, and every version is scored by the model.
    """

    def score(outputs: Any, rows: Tensor) -> Tensor:
        return target.take(rows).scores(outputs)

    return curves_of(model, images, maps, score, steps, baseline, max_batch, generator)
