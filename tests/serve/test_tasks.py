"""The explorer on task runs (detection, segmentation, multi-label): what the grid, filters,
CSV, detail view and masks answer, checked against the store read independently here. Runs
0, 1 and 2 of ``task_client`` are the detection, segmentation and multi-label runs."""

from __future__ import annotations

import csv
import io

import numpy as np
import pytest
from PIL import Image

from explainkit.serve.tasks import MIN_SCORE, palette
from explainkit.store import open_store
from explainkit.task_metrics import image_ious, match_detections

DET, SEG, ML = 0, 1, 2


def items(client, run: int, query: str = "") -> list[dict]:
    r = client.get(f"/api/runs/{run}/images?per_page=96&{query}")
    assert r.status_code == 200, r.text
    return r.json()["items"]


def test_detection_grid_counts_missed_and_false_as_the_store_says(task_client, task_runs):
    with open_store(task_runs["detection"]) as store:
        dets, truth, classes = store.detections(), store.boxes(), store.classes
    errors = [
        match_detections(b, s, lab, tb, tl, min_score=MIN_SCORE)
        for (b, s, lab), (tb, tl) in zip(dets, truth, strict=True)
    ]
    shown = items(task_client, DET, "sort=missed&desc=1")
    missed = [len(errors[x["index"]][1]) for x in shown]
    assert missed == sorted(missed, reverse=True) and len(shown) == len(truth)
    for x in shown:
        false, miss = errors[x["index"]]
        assert (x["missed"], x["false"], x["objects"]) == (
            len(miss),
            len(false),
            len(truth[x["index"]][1]),
        )
        assert x["correct"] == (not len(false) and not len(miss))
    # the class filter: images that missed an object of the class
    c = int(truth[0][1][0])
    want = sorted(i for i, (_, m) in enumerate(errors) if c in truth[i][1][m])
    got = sorted(x["index"] for x in items(task_client, DET, f"label={c}&has=missed"))
    assert got == want
    # the detail view: every true box and every detection, from the store
    d = task_client.get("/api/runs/0/images/0").json()
    assert d["task"] == "detection" and d["min_score"] == MIN_SCORE
    np.testing.assert_allclose([t["box"] for t in d["truth"]], truth[0][0])
    assert [t["class"] for t in d["truth"]] == [classes[k] for k in truth[0][1]]
    order = np.argsort(-dets[0][1], kind="stable")
    np.testing.assert_allclose([x["score"] for x in d["detections"]], dets[0][1][order], rtol=1e-6)
    np.testing.assert_allclose([x["box"] for x in d["detections"]], dets[0][0][order])
    page = task_client.get("/runs/0/images/0")
    assert page.status_code == 200 and 'id="boxes"' in page.text and 'id="min-score"' in page.text


def test_segmentation_sorts_by_image_iou_and_serves_masks(task_client, task_runs):
    with open_store(task_runs["segmentation"]) as store:
        pred, truth = store.epoch_data("masks"), store.truth("eval/segmentation")
        k = len(store.classes)
    ious = image_ious(pred, truth, k)
    shown = items(task_client, SEG, "sort=mean_iou")
    assert [x["index"] for x in shown] == np.argsort(ious, kind="stable").tolist()
    np.testing.assert_allclose([x["mean_iou"] for x in shown], np.sort(ious), atol=1e-6)
    c = int(np.unique(truth[truth != 255])[-1])
    want = sorted(i for i in range(len(truth)) if (truth[i] == c).any())
    assert sorted(x["index"] for x in items(task_client, SEG, f"label={c}&has=true")) == want
    for which, mask in (("true", truth[3]), ("predicted", pred[3])):
        r = task_client.get(f"/mask/1/3/{which}.png")
        assert r.status_code == 200
        got = np.asarray(Image.open(io.BytesIO(r.content)).convert("RGBA"))
        np.testing.assert_array_equal(got, palette(k)[mask])
    assert task_client.get("/mask/0/3/true.png").status_code == 404  # a detection run
    assert task_client.get("/mask/1/3/other.png").status_code == 404
    d = task_client.get("/api/runs/1/images/3").json()
    assert d["masks"] == {"predicted": "/mask/1/3/predicted.png", "true": "/mask/1/3/true.png"}


def test_multilabel_labels_filters_and_csv(task_client, task_runs):
    with open_store(task_runs["multilabel"]) as store:
        logits, labels = store.logits(), store.truth("eval/labels").astype(bool)
        classes, sources = store.classes, store.sources()
    pred = logits > 0
    wrong = (pred != labels).sum(1)
    shown = items(task_client, ML, "sort=wrong&desc=1")
    assert [x["wrong"] for x in shown] == sorted(wrong.tolist(), reverse=True)
    for c in range(len(classes)):
        for has, column in (("true", labels[:, c]), ("false", pred[:, c] & ~labels[:, c])):
            got = sorted(x["index"] for x in items(task_client, ML, f"label={c}&has={has}"))
            assert got == np.flatnonzero(column).tolist()
    right = sorted(x["index"] for x in items(task_client, ML, "correct=1"))
    assert right == np.flatnonzero(wrong == 0).tolist()
    d = task_client.get("/api/runs/2/images/5").json()
    assert {x["class"] for x in d["labels"] if x["true"]} == {
        classes[c] for c in np.flatnonzero(labels[5])
    }
    assert [x["predicted"] for x in d["labels"]] == [bool(z > 0) for z in np.sort(logits[5])[::-1]]
    # a multi-label image's maps are per label (its items), computed on demand here
    assert d["methods"] == [] and any(m["key"] == "live-gradcam" for m in d["item_methods"])
    text = task_client.get("/api/runs/2/selection.csv?label=0&has=true").text
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [r["source"] for r in rows] == [sources[i] for i in np.flatnonzero(labels[:, 0])]
    for r in rows:
        assert r["true_classes"].split() == [
            classes[c] for c in np.flatnonzero(labels[int(r["index"])])
        ]
    table = task_client.get("/api/runs/2/confusion").json()["labels"]
    assert [x["true"] for x in table] == labels.sum(0).tolist()
    assert [x["missed"] for x in table] == (labels & ~pred).sum(0).tolist()


@pytest.mark.parametrize(
    ("url", "status", "words"),
    [
        ("/api/runs/0/images?true=1", 400, "no single true or predicted class"),
        ("/api/runs/2/images?has=maybe", 400, "has must be one of"),
        ("/api/runs/1/images?label=99", 400, "label must be a class number"),
        ("/api/runs/0/images?vs=2", 400, "not evaluated on the same images"),
        ("/map/0/0/live-gradcam.png", 404, "are per item"),
        ("/map/0/0/nothing.png", 404, "no map"),
        ("/map/0/0/item/0/nothing.png", 404, "no item map"),
        ("/map/2/0/item/07/live-gradcam.png", 404, "image 0 has items"),
        ("/map/2/0/item/99/live-gradcam.png", 404, "image 0 has items"),
    ],
)
def test_task_runs_refuse_what_does_not_fit_in_one_sentence(task_client, url, status, words):
    r = task_client.get(url)
    assert r.status_code == status and words in r.text
