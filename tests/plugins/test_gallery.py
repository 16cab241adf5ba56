"""The ``gallery`` analyzer: misclassified images, confusion matrix and per-class accuracy."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from explainkit.runner import analyze
from explainkit.store import open_store
from tests.helpers import run_cli
from tests.plugins.helpers import check_png, load, make_run, run_one, train_folder_run


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits.astype(np.float64) - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def test_analyzer_gallery_shows_confident_mistakes_in_order(tiny_run):
    manifest = run_one(tiny_run, "gallery")
    assert manifest["status"] == "ok", manifest["error"]
    with open_store(tiny_run) as store:
        epoch = store.best_epoch
        probs = softmax(store.logits(epoch))
        targets = store.targets
    assert manifest["epoch"] == epoch
    preds = probs.argmax(1)
    conf = probs.max(1)
    wrong = np.flatnonzero(preds != targets)
    expected = wrong[np.lexsort((wrong, -conf[wrong]))][:10]
    gallery = load(tiny_run, "gallery", "gallery.json")
    items = gallery["items"]
    assert [it["index"] for it in items] == expected.tolist()
    assert gallery["num_mistakes"] == len(wrong)
    classes = json.loads((tiny_run / "config.json").read_text())["data"]["classes"]
    for it in items:
        i = it["index"]
        assert it["true"] == classes[targets[i]] != it["predicted"] == classes[preds[i]]
        assert it["confidence"] == pytest.approx(conf[i], rel=1e-6)
    shown = [it["confidence"] for it in items]
    assert shown == sorted(shown, reverse=True)
    check_png(load(tiny_run, "gallery", "gallery.png"))
    paths = {a["path"] for a in manifest["artifacts"]}
    assert {"gallery.png", "confusion_matrix.png", "confusion_matrix.csv"} <= paths


def test_analyzer_gallery_items_name_their_source(tiny_run):
    """Without file paths (shapes), the source is the dataset and the position in it."""
    assert run_one(tiny_run, "gallery", gallery_count=5)["status"] == "ok"
    items = load(tiny_run, "gallery", "gallery.json")["items"]
    assert items and all(it["source"] == f"shapes #{it['source_index']}" for it in items)


def test_analyzer_gallery_names_the_users_files(tmp_path):
    """Folder datasets: each shown mistake names its file, also once the data folder is gone."""
    from PIL import Image

    run, data = train_folder_run(tmp_path)
    with open_store(run) as store:
        paths = store.sources()
    shutil.rmtree(data / "train")
    moved = shutil.move(data, tmp_path / "moved")  # the store needs no data folder
    manifest = run_one(run, "gallery", gallery_count=400)
    assert manifest["status"] == "ok", manifest["error"]
    gallery = load(run, "gallery", "gallery.json")
    items = gallery["items"]
    assert len(items) == gallery["num_mistakes"] > 0
    for it in items:
        assert it["source"] == paths[it["index"]]
        split, true_class, _ = it["source"].split("/")
        assert split == "val" and true_class == it["true"]
        with Image.open(Path(moved) / it["source"]) as img:
            assert img.format == "PNG"
    captions = manifest["artifacts"][0]["caption"]
    assert "true → predicted" in captions  # figure captions unchanged


def test_analyzer_gallery_confusion_matrix_matches_numpy(tiny_run):
    assert run_one(tiny_run, "gallery", epoch=1)["status"] == "ok"
    with open_store(tiny_run) as store:
        preds, targets, classes = store.predictions(1), store.targets, store.classes
    k = len(classes)
    expected = np.zeros((k, k), int)
    np.add.at(expected, (targets, preds), 1)
    with open(load(tiny_run, "gallery", "confusion_matrix.csv")) as f:
        rows = list(csv.reader(f))
    assert rows[0][1:] == classes
    assert [r[0] for r in rows[1:]] == classes
    matrix = np.array([[int(v) for v in r[1:]] for r in rows[1:]])
    np.testing.assert_array_equal(matrix, expected)
    assert matrix.sum() == len(targets)
    per_class = load(tiny_run, "gallery", "per_class_accuracy.json")
    assert per_class["accuracy"] == pytest.approx((preds == targets).mean())
    for k_, row in enumerate(per_class["classes"]):
        mask = targets == k_
        assert row["support"] == mask.sum()
        if mask.any():
            assert row["accuracy"] == pytest.approx((preds[mask] == k_).mean())


def test_analyzer_gallery_class_filter_and_unknown_class(tiny_run):
    with open_store(tiny_run) as store:
        epoch = store.best_epoch
        preds, targets, classes = store.predictions(epoch), store.targets, store.classes
    wrong_per_class = np.bincount(targets[preds != targets], minlength=len(classes))
    k = int(np.argmax(wrong_per_class))
    manifest = run_one(tiny_run, "gallery", gallery_class_name=classes[k], gallery_count=50)
    assert manifest["status"] == "ok"
    items = load(tiny_run, "gallery", "gallery.json")["items"]
    assert len(items) == wrong_per_class[k]
    assert {it["true"] for it in items} == {classes[k]}

    bad = run_one(tiny_run, "gallery", gallery_class_name="hexagon")
    assert bad["status"] == "failed"
    assert "hexagon" in bad["error"] and all(c in bad["error"] for c in classes)


def test_analyzer_gallery_random_is_seeded(tiny_run):
    picks = []
    for seed in (0, 0, 1):
        assert run_one(tiny_run, "gallery", gallery_select="random", seed=seed)["status"] == "ok"
        picks.append([it["index"] for it in load(tiny_run, "gallery", "gallery.json")["items"]])
    assert picks[0] == picks[1]
    with open_store(tiny_run) as store:
        epoch = store.best_epoch
        wrong = set(np.flatnonzero(store.predictions(epoch) != store.targets).tolist())
    assert len(picks[2]) == min(10, len(wrong))
    assert set(picks[0]) <= wrong and set(picks[2]) <= wrong


def test_analyzer_gallery_per_class_round_robin(tmp_path, tiny_run_master):
    run = make_run(tmp_path / "run", tiny_run_master, num_classes=12, num_images=400)
    assert run_one(run, "gallery", gallery_select="per_class", gallery_count=30)["status"] == "ok"
    gallery = load(run, "gallery", "gallery.json")
    true_ids = [it["true_id"] for it in gallery["items"]]
    with open_store(run) as store:
        wrong = store.predictions(gallery["epoch"]) != store.targets
        with_mistakes = sorted(set(store.targets[wrong].tolist()))
    first_round = true_ids[: len(with_mistakes)]
    assert first_round == with_mistakes  # one per class, in class order
    assert len(true_ids) == 30


def test_analyzer_gallery_many_classes(tmp_path, tiny_run_master):
    run = make_run(tmp_path / "run", tiny_run_master, num_classes=37)
    manifest = run_one(run, "gallery", gallery_count=20)
    assert manifest["status"] == "ok", manifest["error"]
    with open(load(run, "gallery", "confusion_matrix.csv")) as f:
        rows = list(csv.reader(f))
    assert len(rows) == 38 and len(rows[0]) == 38
    assert sum(int(v) for r in rows[1:] for v in r[1:]) == 300
    assert len(load(run, "gallery", "gallery.json")["items"]) == 20
    check_png(load(run, "gallery", "confusion_matrix.png"))


def test_analyzer_gallery_zero_mistakes(tmp_path, tiny_run_master):
    run = make_run(tmp_path / "run", tiny_run_master, num_classes=5, epochs=1, accuracy=1.0)
    manifest = run_one(run, "gallery")
    assert manifest["status"] == "ok", manifest["error"]
    gallery = load(run, "gallery", "gallery.json")
    assert gallery["items"] == [] and gallery["num_mistakes"] == 0
    check_png(load(run, "gallery", "gallery.png"))
    assert "no mistakes" in manifest["artifacts"][0]["caption"]


def test_analyzer_gallery_cli_options(cifar_run):
    result = run_cli(
        "analyze", str(cifar_run), "--plugin", "gallery", "--plugin", "data", "--plugin",
        "losses", "--device", "cpu", "--gallery-count", "4", "--gallery-select", "per_class",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    gallery = json.loads((cifar_run / "analyses" / "gallery" / "gallery.json").read_text())
    assert gallery["select"] == "per_class" and gallery["count"] == 4
    assert len(gallery["items"]) == min(4, gallery["num_mistakes"])
    for name in ("gallery", "data", "losses"):
        manifest = json.loads((cifar_run / "analyses" / name / "manifest.json").read_text())
        assert manifest["status"] == "ok"


def test_analyzer_gallery_bad_option_value_exits_2(tiny_run):
    result = run_cli("analyze", str(tiny_run), "--plugin", "gallery", "--gallery-select", "worst")
    assert result.returncode == 2
    assert "--gallery-select" in result.stderr


def test_analyzer_all_builtin_large_store(tmp_path, tiny_run_master):
    """10,000 images x 37 classes: vectorized code finishes in seconds, not minutes."""
    run = make_run(tmp_path / "run", tiny_run_master, num_classes=37, num_images=10_000)
    manifests = analyze(run, plugins=["losses", "gallery", "data"], device="cpu")
    assert [m["status"] for m in manifests] == ["ok"] * 3, [m["error"] for m in manifests]
    counts = load(run, "data", "data.json")["eval"]["class_counts"]
    assert sum(counts) == 10_000
    shutil.rmtree(run)


def test_analyzer_gallery_select_choices_are_the_selection_ones():
    from explainkit.plugins.gallery import GalleryAnalyzer

    from explainkit.selection import MISTAKE_CHOICES

    (select,) = [o for o in GalleryAnalyzer.options if o.name == "select"]
    assert select.choices == MISTAKE_CHOICES
