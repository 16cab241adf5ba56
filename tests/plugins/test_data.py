"""The ``data`` analyzer: class distribution, samples per class, channel stats, sizes."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from explainkit.data import load_dataset
from explainkit.selection import per_class_sample
from explainkit.store import open_store

from .test_gallery import check_png, load, make_run, run_one


def test_analyzer_data_stats_and_counts_match_numpy(tiny_run):
    manifest = run_one(tiny_run, "data")
    assert manifest["status"] == "ok", manifest["error"]
    summary = load(tiny_run, "data", "data.json")
    with open_store(tiny_run) as store:
        images = store.images().astype(np.float64) / 255
        targets, classes = store.targets, store.classes
    np.testing.assert_allclose(summary["eval"]["mean"], images.mean(axis=(0, 1, 2)), rtol=1e-9)
    np.testing.assert_allclose(summary["eval"]["std"], images.std(axis=(0, 1, 2)), rtol=1e-6)
    assert summary["eval"]["class_counts"] == np.bincount(targets, minlength=10).tolist()
    config = json.loads((tiny_run / "config.json").read_text())
    assert summary["train"]["mean"] == config["data"]["mean"]
    assert summary["train"]["std"] == config["data"]["std"]
    train = load_dataset("shapes", "train", limit=config["config"]["limit_train"])
    assert summary["train"]["available"] is True
    assert summary["train"]["class_counts"] == np.bincount(train.targets, minlength=10).tolist()
    with open(load(tiny_run, "data", "class_distribution.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [r["class"] for r in rows] == classes
    assert sum(int(r["eval_count"]) for r in rows) == len(targets)
    assert sum(int(r["train_count"]) for r in rows) == len(train)
    assert summary["image_sizes"]["varying"] is False
    for name in ("class_distribution.png", "samples.png"):
        check_png(load(tiny_run, "data", name))


def test_analyzer_data_missing_train_data_is_skipped_with_reason(tmp_path, tiny_run_master):
    run = make_run(
        tmp_path / "run",
        tiny_run_master,
        num_classes=37,
        config={"dataset": "cifar10", "data_dir": str(tmp_path / "missing")},
    )
    manifest = run_one(run, "data")
    assert manifest["status"] == "ok", manifest["error"]
    summary = load(run, "data", "data.json")
    assert summary["train"]["available"] is False
    assert "not available" in summary["train"]["reason"]
    caption = manifest["artifacts"][0]["caption"]
    assert "train split skipped" in caption
    assert len(summary["eval"]["class_counts"]) == 37
    check_png(load(run, "data", "samples.png"))


def test_analyzer_data_folder_sizes_vary(tmp_path, tiny_run_master):
    from PIL import Image

    root = tmp_path / "folder"
    rng = np.random.default_rng(0)
    run = make_run(tmp_path / "run", tiny_run_master, num_classes=37, num_images=60)
    config = json.loads((run / "config.json").read_text())
    for name in config["data"]["classes"]:
        (root / name).mkdir(parents=True)
        for j in range(3):
            h, w = int(rng.integers(20, 90)), int(rng.integers(20, 90))
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
                root / name / f"{j}.png"
            )
    config["config"].update({"dataset": "folder", "data_dir": str(root), "limit_train": None})
    (run / "config.json").write_text(json.dumps(config))
    manifest = run_one(run, "data")
    assert manifest["status"] == "ok", manifest["error"]
    summary = load(run, "data", "data.json")
    assert summary["train"]["available"] is True
    sizes = summary["image_sizes"]
    assert sizes["varying"] is True and sizes["distinct"] > 1
    train = load_dataset("folder", "train", root)
    with open(load(run, "data", "image_sizes.csv")) as f:
        rows = list(csv.DictReader(f))
    assert sum(int(r["count"]) for r in rows) == len(train)
    check_png(load(run, "data", "image_sizes.png"))


@pytest.mark.parametrize("per_class", [1, 3, 8])
def test_analyzer_data_samples_per_class_are_from_their_class(per_class):
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 6, 50)
    chosen, positions = per_class_sample(targets, 6, per_class, np.random.default_rng(1))
    assert len(set(chosen.tolist())) == len(chosen)
    np.testing.assert_array_equal(positions // per_class, targets[chosen])
    counts = np.bincount(targets[chosen], minlength=6)
    np.testing.assert_array_equal(counts, np.minimum(np.bincount(targets, minlength=6), per_class))
    assert len(set(positions.tolist())) == len(positions)
