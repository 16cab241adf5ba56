"""The ``data`` analyzer: class distribution, samples per class, channel stats, sizes."""

from __future__ import annotations

import csv
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from explainkit.data import load_dataset
from explainkit.selection import per_class_sample
from explainkit.store import open_store
from tests.helpers import registries
from tests.plugins.helpers import check_png, load, make_run, run_one, train_folder_run


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def pil_sizes(root: Path, paths: list[str]) -> list[tuple[int, int]]:
    from PIL import Image

    sizes = []
    for rel in paths:
        with Image.open(root / rel) as img:
            sizes.append((img.height, img.width))
    return sizes


def size_counts(rows: list[dict], split: str) -> dict[tuple[int, int], int]:
    return {
        (int(r["height"]), int(r["width"])): int(r["count"]) for r in rows if r["split"] == split
    }


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
    train = load_dataset(
        "shapes", "train", limit=config["config"]["limit_train"], registries=registries()
    )
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


def test_analyzer_data_channel_stats_table_for_both_splits(tiny_run):
    """channel_stats.csv: eval computed from the stored images, train as the model normalizes."""
    assert run_one(tiny_run, "data")["status"] == "ok"
    rows = read_csv(load(tiny_run, "data", "channel_stats.csv"))
    assert [(r["split"], r["channel"]) for r in rows] == [
        (split, channel) for split in ("train", "eval") for channel in ("red", "green", "blue")
    ]
    with open_store(tiny_run) as store:
        images = store.images().astype(np.float64) / 255
        train_mean, train_std = store.mean, store.std
    train = (
        load_dataset("shapes", "train", limit=256, registries=registries()).images.astype(
            np.float64
        )
        / 255
    )
    expected = {
        "train": (train.mean(axis=(0, 1, 2)), train.std(axis=(0, 1, 2))),
        "eval": (images.mean(axis=(0, 1, 2)), images.std(axis=(0, 1, 2))),
    }
    for split, (mean, std) in expected.items():
        got = [r for r in rows if r["split"] == split]
        np.testing.assert_allclose([float(r["mean"]) for r in got], mean, rtol=1e-9)
        np.testing.assert_allclose([float(r["std"]) for r in got], std, rtol=1e-6)
    assert [float(r["mean"]) for r in rows[:3]] == list(train_mean)
    assert [float(r["std"]) for r in rows[:3]] == list(train_std)
    manifest = json.loads((tiny_run / "analyses" / "data" / "manifest.json").read_text())
    kinds = {a["path"]: a["kind"] for a in manifest["artifacts"]}
    assert kinds["channel_stats.csv"] == "table" and kinds["image_sizes.csv"] == "table"


def test_analyzer_data_fixed_size_datasets_say_so_in_a_table(cifar_run):
    """CIFAR-10: every image of both splits is 32x32; a two-row table, no figure."""
    manifest = run_one(cifar_run, "data")
    assert manifest["status"] == "ok", manifest["error"]
    rows = read_csv(load(cifar_run, "data", "image_sizes.csv"))
    assert [list(r.values()) for r in rows] == [
        ["train", "32", "32", "256"],
        ["eval", "32", "32", "128"],
    ]
    assert not (cifar_run / "analyses" / "data" / "image_sizes.png").exists()
    (caption,) = {a["caption"] for a in manifest["artifacts"] if a["path"] == "image_sizes.csv"}
    assert "all 256 train images are 32x32" in caption
    assert "all 128 eval images are 32x32" in caption
    sizes = load(cifar_run, "data", "data.json")["image_sizes"]
    assert sizes["varying"] is False and sizes["eval"]["source"] == "prediction store"


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
    # Neither split's sizes are known (no data here; a store that does not record them): a table
    # that says so, with the number of images.
    rows = read_csv(load(run, "data", "image_sizes.csv"))
    num_train = json.loads((run / "config.json").read_text())["data"]["num_train"]
    assert [list(r.values()) for r in rows] == [
        ["train", "", "", str(num_train)],
        ["eval", "", "", "300"],
    ]
    sizes = summary["image_sizes"]
    assert sizes["train"]["known"] is False and "not available" in sizes["train"]["reason"]
    assert sizes["eval"]["known"] is False and "does not record" in sizes["eval"]["reason"]
    assert "train sizes unknown" in manifest["artifacts"][-2]["caption"]


def test_analyzer_data_folder_sizes_of_both_splits(tmp_path):
    """A real folder run: the original sizes of train and eval are the files' own, and the eval
    ones still show once the data folder is gone (they are recorded in the store)."""
    run, data = train_folder_run(tmp_path)
    manifest = run_one(run, "data")
    assert manifest["status"] == "ok", manifest["error"]
    rows = read_csv(load(run, "data", "image_sizes.csv"))
    train = load_dataset("folder", "train", data, image_size=16, registries=registries())
    with open_store(run) as store:
        eval_paths = store.sources()
    assert size_counts(rows, "train") == Counter(pil_sizes(data, train.paths))
    assert size_counts(rows, "eval") == Counter(pil_sizes(data, eval_paths))
    assert len(eval_paths) == 8 and all(p.startswith("val/") for p in eval_paths)
    sizes = load(run, "data", "data.json")["image_sizes"]
    assert sizes["varying"] is True and sizes["stored"] == "16x16"
    assert sizes["train"]["distinct"] == len(size_counts(rows, "train")) > 1
    check_png(load(run, "data", "image_sizes.png"))

    shutil.rmtree(data)
    manifest = run_one(run, "data")
    assert manifest["status"] == "ok", manifest["error"]
    after = read_csv(load(run, "data", "image_sizes.csv"))
    assert [r for r in after if r["split"] == "eval"] == [r for r in rows if r["split"] == "eval"]
    assert [r for r in after if r["split"] == "train"] == [
        {"split": "train", "height": "", "width": "", "count": "24"}
    ]
    check_png(load(run, "data", "image_sizes.png"))  # the eval sizes still vary
    caption = manifest["artifacts"][-2]["caption"]
    assert "train sizes unknown" in caption and "8 eval images" in caption


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
