"""COCO, VOC and multi-label CSV folders (generated here from scenes) as datasets: their boxes,
class masks and labels come back as written; a detector trains on a COCO folder by the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from explainkit import open_store
from explainkit.data import load_dataset
from explainkit.data.scenes import make_scenes
from explainkit.errors import DataError
from tests.helpers import assert_clean_failure, registries, run_cli, write_coco, write_voc


@pytest.fixture(scope="module")
def scenes():
    return make_scenes("train", image_size=32, seed=5, limit=24)


def test_a_coco_folder_reads_back_its_boxes_and_masks(tmp_path, scenes):
    write_coco(tmp_path / "train", scenes)
    write_coco(tmp_path / "val", make_scenes("eval", image_size=32, seed=5, limit=6))
    ds = load_dataset("coco", "train", tmp_path, image_size=32, registries=registries())
    assert ds.classes == scenes.classes and len(ds) == 24
    assert np.array_equal(ds.images, scenes.images)  # PNG: lossless
    assert np.array_equal(ds.annotations.segmentation, scenes.annotations.segmentation)
    for got, want in zip(ds.annotations.detections, scenes.annotations.detections, strict=True):
        assert np.allclose(got.boxes, want.boxes) and np.array_equal(got.labels, want.labels)
    for target, det in zip(ds.targets, ds.annotations.detections, strict=True):
        areas = (det.boxes[:, 2] - det.boxes[:, 0]) * (det.boxes[:, 3] - det.boxes[:, 1])
        assert target == det.labels[np.argmax(areas)]  # the largest box's class
    assert ds.paths[0] == "train/images/scene_000.png"
    evals = load_dataset("coco", "eval", tmp_path, image_size=16, registries=registries())
    assert len(evals) == 6 and evals.images.shape[1:3] == (16, 16)
    half = evals.annotations.detections[0].boxes  # resized: boxes scale with the pixels
    full = make_scenes("eval", image_size=32, seed=5, limit=1).annotations.detections[0].boxes
    assert np.allclose(half, full / 2)


def test_a_voc_folder_reads_back_its_class_masks_and_boxes(tmp_path, scenes):
    write_voc(tmp_path, scenes)
    names = [f"{i:06d}" for i in range(24)]
    (tmp_path / "ImageSets" / "Segmentation").mkdir(parents=True)
    (tmp_path / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(names[:18]))
    (tmp_path / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(names[18:]))
    ds = load_dataset("voc", "train", tmp_path, image_size=32, registries=registries())
    assert len(ds) == 18 and ds.classes == scenes.classes
    assert np.array_equal(ds.annotations.segmentation, scenes.annotations.segmentation[:18])
    truth = scenes.annotations.detections[:18]
    for got, want in zip(ds.annotations.detections, truth, strict=True):
        assert np.allclose(got.boxes, want.boxes) and np.array_equal(got.labels, want.labels)
    evals = load_dataset("voc", "eval", tmp_path, image_size=32, registries=registries())
    assert evals.paths == [f"JPEGImages/{n}.jpg" for n in names[18:]]


def test_a_multilabel_csv_reads_its_labels(tmp_path, scenes):
    from PIL import Image

    lines = ["image,labels,split"]
    for i, image in enumerate(scenes.images[:10]):
        Image.fromarray(image).save(tmp_path / f"{i}.png")
        names = ";".join(scenes.classes[c] for c in np.flatnonzero(scenes.annotations.multi_hot[i]))
        lines.append(f"{i}.png,{names},{'eval' if i >= 8 else 'train'}")
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    ds = load_dataset("multilabel-csv", "train", tmp_path, image_size=32, registries=registries())
    used = sorted({c for row in lines[1:] for c in row.split(",")[1].split(";")})
    assert ds.classes == used and len(ds) == 8
    for i in range(8):
        want = {scenes.classes[c] for c in np.flatnonzero(scenes.annotations.multi_hot[i])}
        assert {used[c] for c in np.flatnonzero(ds.annotations.multi_hot[i])} == want
    assert ds.annotations.supports("multilabel") and not ds.annotations.supports("detection")


def test_malformed_folders_are_one_sentence(tmp_path):
    with pytest.raises(DataError, match="not a COCO folder"):
        load_dataset("coco", "train", tmp_path, registries=registries())
    (tmp_path / "images").mkdir()
    (tmp_path / "instances.json").write_text("{not json")
    with pytest.raises(DataError, match="not a COCO instances file|cannot|JSON"):
        load_dataset("coco", "train", tmp_path, registries=registries())
    with pytest.raises(DataError, match="not a VOC folder"):
        load_dataset("voc", "train", tmp_path, registries=registries())
    result = run_cli(
        "train", "--dataset", "voc", "--task", "segmentation", "--out", str(tmp_path / "run")
    )
    assert_clean_failure(result, (1, 2), "--data-dir")


def test_a_detector_trains_on_a_coco_folder_by_the_cli(tmp_path, scenes):
    write_coco(tmp_path / "data", scenes, fmt="jpg")
    out = tmp_path / "run"
    result = run_cli(
        "train", "--task", "detection", "--dataset", "coco", "--data-dir", str(tmp_path / "data"),
        "--image-size", "32", "--width", "8", "--epochs", "1", "--batch-size", "8",
        "--device", "cpu", "--quiet", "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    with open_store(out) as store:
        assert store.task == "detection" and store.num_images == 5  # 20% of 24 held out
        assert sum(len(b) for b, _ in store.boxes()) > 0
        assert store.has_paths and store.sources([0])[0].startswith("images/scene_")
    assert json.loads((out / "config.json").read_text())["data"]["dataset"] == "coco"


def test_a_voc_folder_without_boxes_still_has_labels(tmp_path, scenes):
    import shutil

    write_voc(tmp_path, scenes)
    shutil.rmtree(tmp_path / "Annotations")
    ds = load_dataset("voc", "eval", tmp_path, image_size=32, registries=registries())
    assert ds.annotations.detections is None and ds.annotations.supports("segmentation")
    rows = [int(p.split("/")[-1].split(".")[0]) for p in ds.paths]
    assert np.array_equal(ds.annotations.multi_hot, scenes.annotations.multi_hot[rows])
