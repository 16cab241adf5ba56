"""The scenes dataset and the task annotations every task dataset shares."""

from __future__ import annotations

import numpy as np
import pytest

from explainkit.data import load_dataset
from explainkit.data.scenes import CLASSES, make_scenes
from explainkit.data.tasks import IGNORE, Annotations, Detection, fit_annotations, require_task
from explainkit.errors import DataError
from tests.helpers import registries


def test_scenes_are_deterministic_and_a_limit_keeps_the_first_images():
    a = make_scenes("train", image_size=32, seed=3, limit=12)
    b = make_scenes("train", image_size=32, seed=3, limit=5)
    assert np.array_equal(a.images[:5], b.images)
    assert np.array_equal(a.annotations.segmentation[:5], b.annotations.segmentation)
    other = make_scenes("eval", image_size=32, seed=3, limit=5)
    assert not np.array_equal(other.images, b.images)


def test_scenes_ground_truth_agrees_with_itself():
    ds = make_scenes("eval", image_size=48, seed=0, limit=40)
    ann = ds.annotations
    counts = [len(d) for d in ann.detections]
    assert min(counts) >= 1 and max(counts) >= 2  # several shapes per image
    for i, det in enumerate(ann.detections):
        seg = ann.segmentation[i]
        present = sorted(set(np.unique(seg[seg > 0]) - 1))
        assert present == sorted(set(det.labels.tolist()))
        assert ann.multi_hot[i].tolist() == [int(c in det.labels) for c in range(len(CLASSES))]
        for box, mask, label in zip(det.boxes, ann.instances[i], det.labels, strict=True):
            x0, y0, x1, y1 = box.astype(int)
            assert mask[y0:y1, x0:x1].sum() == mask.sum() > 0  # the box is tight around it
            assert (seg[mask.astype(bool)] == label + 1).all()
        # targets: the largest shape's class; masks: every shape
        areas = ann.instances[i].reshape(len(det), -1).sum(1)
        assert ds.targets[i] == det.labels[np.argmax(areas)]
        assert np.array_equal(ds.masks[i], (seg > 0).astype(np.uint8))


def test_scenes_load_through_the_registry_with_their_annotations():
    ds = load_dataset("scenes", "train", image_size=32, limit=9, registries=registries())
    assert ds.images.shape == (9, 32, 32, 3) and ds.classes == CLASSES
    assert len(ds.annotations.detections) == 9 and ds.annotations.multi_hot.shape == (9, 6)


def test_resizing_moves_boxes_and_masks_with_the_pixels():
    seg = np.zeros((1, 40, 80), np.uint8)
    seg[0, 10:20, 30:50] = 2
    ann = Annotations([Detection([[30, 10, 50, 20]], [1])], segmentation=seg, num_classes=3)
    out = fit_annotations(ann, np.array([[40, 80]]), 20)
    box = out.detections[0].boxes[0]
    assert np.allclose(box, [5, 5, 15, 10])  # scaled by 1/2, the 40 px cropped off the left
    ys, xs = np.nonzero(out.segmentation[0] == 2)
    assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (5, 5, 15, 10)
    assert ann.multi_hot.tolist() == [[0, 1, 0]]


def test_annotations_that_do_not_fit_are_refused():
    with pytest.raises(DataError, match="box labels"):
        Detection(np.zeros((2, 4)), [0])
    bad = Annotations([Detection([[0, 0, 1, 1]], [5])], num_classes=3)
    with pytest.raises(DataError, match="outside 0..2"):
        bad.check(1, (4, 4), 3)
    seg = np.full((1, 4, 4), IGNORE, np.uint8)
    Annotations(segmentation=seg).check(1, (4, 4), 3)  # ignored pixels are fine
    with pytest.raises(DataError, match="no detection annotations"):
        require_task(None, "detection", "shapes")
