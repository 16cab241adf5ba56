"""Task stores (schema.TASKS): multi-label, segmentation and detection, written, read back and
validated with the same guarantees as a classification store."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from explainkit.errors import StoreError
from explainkit.store import append_epoch, create_store, epoch_file, open_store
from explainkit.store.schema import TASKS
from tests.helpers import history_row

N, K, S = 6, 3, 8


def _create(path, task, truth, classes=K):
    rng = np.random.default_rng(0)
    create_store(
        path,
        images=rng.integers(0, 255, (N, S, S, 3), dtype=np.uint8),
        targets=np.arange(N) % classes,
        index=np.arange(N),
        classes=[f"c{i}" for i in range(classes)],
        dataset="test",
        model={"arch": "resnet18-s8", "num_classes": classes},
        mean=(0.5,) * 3,
        std=(0.25,) * 3,
        task=task,
        truth=truth,
    )


def _detections(rng, counts):
    d = int(sum(counts))
    corner = rng.uniform(0, 4, (d, 2)).astype(np.float32)
    return {
        "box_counts": np.asarray(counts, np.int64),
        "boxes": np.concatenate([corner, corner + 3], axis=1),
        "box_scores": rng.uniform(0, 1, d).astype(np.float32),
        "box_labels": rng.integers(0, K, d),
    }


def _detection_store(path):
    rng = np.random.default_rng(1)
    counts = np.array([1, 0, 2, 1, 3, 1])
    truth = _detections(rng, counts)
    _create(
        path,
        "detection",
        {
            "eval/box_counts": truth["box_counts"],
            "eval/boxes": truth["boxes"],
            "eval/box_labels": truth["box_labels"],
        },
    )
    epochs = [_detections(rng, [0, 2, 1, 0, 0, 4]), _detections(rng, [1] * N)]
    for e, results in enumerate(epochs, 1):
        row = history_row(e)
        del row["train_acc"]  # a detector has no training accuracy
        append_epoch(path, results, row)
    return truth, epochs


def test_detection_store_round_trips_ragged_boxes(tmp_path):
    path = tmp_path / "p.h5"
    truth, epochs = _detection_store(path)
    with open_store(path) as store:
        assert store.task == "detection" and store.committed == 2
        boxes = store.boxes()
        assert [len(b) for b, _ in boxes] == [1, 0, 2, 1, 3, 1]
        assert np.array_equal(np.concatenate([b for b, _ in boxes]), truth["boxes"])
        for e, results in enumerate(epochs, 1):
            dets = store.detections(e)
            assert [len(b) for b, _, _ in dets] == results["box_counts"].tolist()
            assert np.array_equal(np.concatenate([s for _, s, _ in dets]), results["box_scores"])
        assert "train_acc" not in store.history
        store.verify()
        with pytest.raises(StoreError, match="records no logits"):
            store.logits()


def test_multilabel_store_holds_logits_and_multi_hot_labels(tmp_path):
    path = tmp_path / "p.h5"
    labels = (np.arange(N * K).reshape(N, K) % 2).astype(np.uint8)
    _create(path, "multilabel", {"eval/labels": labels})
    logits = np.random.default_rng(0).standard_normal((N, K)).astype(np.float32)
    append_epoch(path, logits, history_row(1))
    with open_store(path) as store:
        assert store.task == "multilabel"
        assert np.array_equal(store.truth("eval/labels"), labels)
        assert np.array_equal(store.logits(), logits) and np.array_equal(store.scores(), logits)
    with pytest.raises(ValueError, match="values other than 0 and 1"):
        _create(tmp_path / "q.h5", "multilabel", {"eval/labels": labels * 2})


def test_segmentation_store_bounds_its_class_ids(tmp_path):
    path = tmp_path / "p.h5"
    rng = np.random.default_rng(0)
    seg = rng.integers(0, K, (N, S, S)).astype(np.uint8)
    seg[0, 0, 0] = 255  # not scored
    _create(path, "segmentation", {"eval/segmentation": seg})
    masks = rng.integers(0, K, (N, S, S)).astype(np.uint8)
    scores = np.full((N, K), 1 / K, np.float32)
    append_epoch(path, {"masks": masks, "scores": scores}, history_row(1))
    with open_store(path) as store:
        assert np.array_equal(store.truth("eval/segmentation"), seg)
        assert np.array_equal(store.epoch_data("masks"), masks)
        assert np.allclose(store.scores(), scores)
    with pytest.raises(StoreError, match="class id outside 0..2"):
        append_epoch(path, {"masks": masks + 3, "scores": scores}, history_row(2))
    with pytest.raises(StoreError, match="outside \\[0, 1\\]"):
        append_epoch(path, {"masks": masks, "scores": scores * 4}, history_row(2))
    with pytest.raises(ValueError, match="not 255"):
        _create(tmp_path / "q.h5", "segmentation", {"eval/segmentation": seg + 10})
    with open_store(path) as store:
        assert store.committed == 1  # the refused epochs wrote nothing


def test_task_epoch_results_must_fit_the_store(tmp_path):
    path = tmp_path / "p.h5"
    _detection_store(path)
    rng = np.random.default_rng(2)
    bad = _detections(rng, [1] * N)
    bad["box_labels"][0] = K
    with pytest.raises(StoreError, match="class outside"):
        append_epoch(path, bad, {**history_row(3), "train_acc": float("nan")})
    bad = _detections(rng, [1] * N)
    bad["boxes"][0] = [5, 5, 1, 1]
    with pytest.raises(StoreError, match="x1 < x0"):
        append_epoch(path, bad, history_row(3))
    with pytest.raises(StoreError, match="takes its results as a dict"):
        append_epoch(path, np.zeros((N, K)), history_row(3))
    with pytest.raises(StoreError, match="missing box_scores"):
        append_epoch(path, {k: v for k, v in bad.items() if k != "box_scores"}, history_row(3))


def test_damaged_task_datasets_are_refused_on_open_or_read(tmp_path):
    path = tmp_path / "p.h5"
    _detection_store(path)
    with h5py.File(path, "r+") as f:  # one box too few for the counts
        boxes = f["eval/boxes"][:-1]
        del f["eval/boxes"]
        f["eval/boxes"] = boxes
    with pytest.raises(StoreError, match="damaged: eval/boxes is .* for .* ground-truth boxes"):
        open_store(path)

    path = tmp_path / "q.h5"
    _detection_store(path)
    with h5py.File(epoch_file(path, 2), "r+") as f:  # a score out of range: refused on read
        f["box_scores"][0] = 7.0
    with open_store(path) as store:
        store.detections(1)
        with pytest.raises(StoreError, match="damaged: in epoch 2, box_scores holds a score"):
            store.detections(2)


def test_every_task_is_in_the_schema_docs():
    from tests.helpers import REPO

    text = (REPO / "docs" / "store-format.md").read_text()
    for task, spec in TASKS.items():
        assert f"`{task}`" in text
        for field in (*spec.truth, *spec.epoch):
            assert f"`{field.name}`" in text, field.name


def test_an_epoch_whose_counts_disagree_with_its_boxes_is_damage(tmp_path):
    path = tmp_path / "p.h5"
    _detection_store(path)
    with h5py.File(epoch_file(path, 1), "r+") as f:
        counts = f["box_counts"][()]
        counts[0] += 1  # one box more than the table holds
        del f["box_counts"]
        f["box_counts"] = counts
    with pytest.raises(
        StoreError, match="damaged: the boxes of p.epochs/epoch_0001.h5 are .* detections"
    ):
        open_store(path)


def test_a_segmentation_store_of_too_many_classes_is_refused(tmp_path):
    seg = np.zeros((N, S, S), np.uint8)
    with pytest.raises(ValueError, match="at most 255 classes"):
        _create(tmp_path / "p.h5", "segmentation", {"eval/segmentation": seg}, classes=300)


def test_a_thousand_label_store_stays_a_thousand_columns(tmp_path):
    """Multi-label at scale: 1,000 labels are (N, 1000) tables, read and scored at once."""
    from explainkit.task_metrics import label_scores

    path = tmp_path / "p.h5"
    k = 1000
    rng = np.random.default_rng(0)
    labels = (rng.random((N, k)) < 0.01).astype(np.uint8)
    _create(path, "multilabel", {"eval/labels": labels}, classes=k)
    append_epoch(path, rng.standard_normal((N, k)).astype(np.float32), history_row(1))
    with open_store(path) as store:
        scores = label_scores(store.logits(), store.truth("eval/labels"))
        assert scores["f1"].shape == (k,) and 0 <= scores["macro_f1"] <= 1
