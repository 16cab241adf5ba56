"""The task scores (explainkit.task_metrics) against torchmetrics' own, and the matching that
the mistakes gallery counts with."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from explainkit.task_metrics import (
    IGNORE,
    confusion,
    detection_map,
    iou_per_class,
    label_scores,
    match_detections,
    mean_iou,
)


def test_iou_per_class_agrees_with_torchmetrics():
    from torchmetrics.functional.classification import multiclass_jaccard_index

    rng = np.random.default_rng(0)
    k = 5
    truth = rng.integers(0, k - 1, (4, 16, 16))  # class 4 never true, sometimes predicted
    pred = np.where(rng.random(truth.shape) < 0.7, truth, rng.integers(0, k, truth.shape))
    truth[0, :2] = IGNORE
    ours = iou_per_class(confusion(pred, truth, k))
    theirs = multiclass_jaccard_index(
        torch.as_tensor(pred), torch.as_tensor(truth), k, average="none", ignore_index=IGNORE
    ).numpy()
    assert np.allclose(ours, theirs, atol=1e-6)
    assert mean_iou(confusion(pred, truth, k)) == pytest.approx(float(np.mean(ours)))
    empty = np.zeros((3, 3), np.int64)
    assert np.isnan(iou_per_class(empty)).all() and mean_iou(empty) == 0.0


def test_label_f1_agrees_with_torchmetrics():
    from torchmetrics.functional.classification import multilabel_f1_score

    rng = np.random.default_rng(1)
    labels = (rng.random((40, 6)) < 0.4).astype(np.uint8)
    logits = rng.standard_normal((40, 6)) + 1.5 * (labels - 0.5)
    ours = label_scores(logits, labels)
    theirs = multilabel_f1_score(
        torch.sigmoid(torch.as_tensor(logits)), torch.as_tensor(labels), 6, average="none"
    ).numpy()
    assert np.allclose(ours["f1"], theirs, atol=1e-6)
    assert ours["accuracy"] == pytest.approx(float(((logits > 0) == labels).mean()))


def test_detection_map_is_one_for_perfect_detections_and_falls_with_mistakes():
    truths = [(np.array([[2, 2, 10, 10], [12, 12, 20, 22]], np.float32), np.array([0, 1]))]
    perfect = [(truths[0][0], np.array([0.9, 0.8], np.float32), truths[0][1])]
    result = detection_map(perfect, truths, 3)
    assert result["map_50"] == pytest.approx(1.0) and result["map"] == pytest.approx(1.0)
    assert np.isnan(result["map_per_class"][2])  # no truth of class 2
    shifted = [(truths[0][0] + np.float32(3), np.array([0.9, 0.8], np.float32), truths[0][1])]
    worse = detection_map(shifted, truths, 3)
    assert worse["map"] < result["map"]


def test_matching_counts_missed_and_false_detections():
    truth_boxes = np.array([[0, 0, 10, 10], [20, 20, 30, 30]], np.float32)
    truth_labels = np.array([0, 1])
    boxes = np.array([[1, 1, 10, 10], [0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]])
    scores = np.array([0.9, 0.8, 0.7, 0.1])
    labels = np.array([0, 0, 2, 1])
    false, missed = match_detections(boxes, scores, labels, truth_boxes, truth_labels)
    # the duplicate of object 0 and the wrong class on object 1 are false; the 0.1 one is
    # below min_score; object 1 is missed
    assert false.tolist() == [1, 2] and missed.tolist() == [1]
