"""The scores of each task, as the trainer's history and the task analyzers report them.

- detection: mean average precision at IoU 0.5 and averaged over IoU 0.5:0.95 (COCO's),
  computed by torchmetrics' ``MeanAveragePrecision`` (pycocotools underneath);
- segmentation: intersection over union per class from a confusion matrix accumulated batch by
  batch (bounded memory; pixels labelled 255 are not scored), and their mean over the classes
  present in the truth or the prediction;
- multi-label: per-label precision, recall and F1 at a logit threshold of 0, and the fraction
  of labels right.

tests/test_tasks_metrics.py checks the IoU and F1 against torchmetrics' own.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

IGNORE = 255


def confusion(pred: np.ndarray, truth: np.ndarray, k: int) -> np.ndarray:
    """(k, k) int64 counts of (true class, predicted class) pixels; truth 255 is skipped."""
    truth = np.asarray(truth).reshape(-1).astype(np.int64)
    pred = np.asarray(pred).reshape(-1).astype(np.int64)
    keep = truth != IGNORE
    codes = truth[keep] * k + np.clip(pred[keep], 0, k - 1)
    return np.bincount(codes, minlength=k * k).reshape(k, k)


def iou_per_class(conf: np.ndarray) -> np.ndarray:
    """IoU of each class from a confusion matrix; NaN for a class in neither truth nor
    prediction (it cannot be scored)."""
    tp = np.diag(conf).astype(np.float64)
    union = conf.sum(0) + conf.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / np.maximum(union, 1), np.nan)


def mean_iou(conf: np.ndarray) -> float:
    """Mean IoU over the classes that can be scored (0.0 when none can)."""
    ious = iou_per_class(conf)
    return float(np.nanmean(ious)) if np.isfinite(ious).any() else 0.0


def image_ious(pred: np.ndarray, truth: np.ndarray, k: int) -> np.ndarray:
    """(n,) mean IoU of each image of a batch (n, H, W): what ranks the worst segmentations."""
    return np.array([mean_iou(confusion(p, t, k)) for p, t in zip(pred, truth, strict=True)])


def label_scores(logits: np.ndarray, labels: np.ndarray, threshold: float = 0.0) -> dict:
    """Per-label ``precision``, ``recall``, ``f1`` (K,) (NaN where undefined: no positive in
    truth and prediction), ``accuracy`` (the fraction of labels right) and ``macro_f1``."""
    pred = np.asarray(logits) > threshold
    truth = np.asarray(labels).astype(bool)
    tp = (pred & truth).sum(0).astype(np.float64)
    fp = (pred & ~truth).sum(0)
    fn = (~pred & truth).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(tp + fp > 0, tp / (tp + fp), np.nan)
        recall = np.where(tp + fn > 0, tp / (tp + fn), np.nan)
        f1 = np.where(tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), np.nan)
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "accuracy": float((pred == truth).mean()) if truth.size else 0.0,
        "macro_f1": float(np.nanmean(f1)) if np.isfinite(f1).any() else 0.0,
    }


def detection_map(
    detections: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
    truths: Sequence[tuple[np.ndarray, np.ndarray]],
    num_classes: int,
) -> dict[str, object]:
    """COCO mAP of ``detections`` (per image: boxes (n, 4), scores (n,), labels (n,)) against
    ``truths`` (per image: boxes, labels): ``map_50``, ``map`` (0.5:0.95), ``map_75``,
    ``mar_100`` and ``map_per_class`` (K,) at 0.5:0.95, NaN for a class without truth."""
    import torch

    try:
        from torchmetrics.detection import MeanAveragePrecision
    except ImportError as e:
        from explainkit.errors import AnalyzerError

        raise AnalyzerError(
            "detection mAP needs torchmetrics and pycocotools: pip install 'explainkit[tasks]'"
        ) from e

    metric = MeanAveragePrecision(iou_type="bbox", class_metrics=True)
    preds = [
        {
            "boxes": torch.as_tensor(np.asarray(b, np.float32).reshape(-1, 4)),
            "scores": torch.as_tensor(np.asarray(s, np.float32)),
            "labels": torch.as_tensor(np.asarray(lab, np.int64)),
        }
        for b, s, lab in detections
    ]
    target = [
        {
            "boxes": torch.as_tensor(np.asarray(b, np.float32).reshape(-1, 4)),
            "labels": torch.as_tensor(np.asarray(lab, np.int64)),
        }
        for b, lab in truths
    ]
    metric.update(preds, target)
    result = metric.compute()
    per_class = np.full(num_classes, np.nan)
    classes = result["classes"].reshape(-1).numpy()
    values = result["map_per_class"].reshape(-1).numpy()
    for c, v in zip(classes, values, strict=False):
        if 0 <= c < num_classes and v >= 0:
            per_class[c] = v

    def number(name: str) -> float:
        value = float(result[name])
        return value if value >= 0 else 0.0  # torchmetrics says -1 when nothing can be scored

    return {
        "map_50": number("map_50"),
        "map": number("map"),
        "map_75": number("map_75"),
        "mar_100": number("mar_100"),
        "map_per_class": per_class,
    }


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) IoU of two sets of x0, y0, x1, y1 boxes."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    x0 = np.maximum(a[:, None, 0], b[None, :, 0])
    y0 = np.maximum(a[:, None, 1], b[None, :, 1])
    x1 = np.minimum(a[:, None, 2], b[None, :, 2])
    y1 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def match_detections(
    boxes: np.ndarray,
    scores: np.ndarray,
    labels: np.ndarray,
    truth_boxes: np.ndarray,
    truth_labels: np.ndarray,
    iou: float = 0.5,
    min_score: float = 0.3,
) -> tuple[np.ndarray, np.ndarray]:
    """One image's detections above ``min_score`` matched greedily (highest score first) to
    its truth of the same class at IoU >= ``iou``: (false detections (indices into the
    detections), missed truths (indices into the truth))."""
    order = [i for i in np.argsort(-np.asarray(scores)) if scores[i] >= min_score]
    overlaps = box_iou(boxes, truth_boxes)
    taken = np.zeros(len(truth_labels), bool)
    false = []
    for i in order:
        same = (truth_labels == labels[i]) & ~taken
        candidates = np.where(same, overlaps[i], -1.0)
        j = int(np.argmax(candidates)) if len(candidates) else -1
        if j >= 0 and candidates[j] >= iou:
            taken[j] = True
        else:
            false.append(i)
    return np.asarray(false, np.int64), np.flatnonzero(~taken)
