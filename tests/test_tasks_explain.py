"""Grad-CAM, explanation quality and the report on task runs (multi-label, segmentation,
detection) trained on scenes: each detection, class region and label gets its own map, and
the maps are judged against the ground truth."""

from __future__ import annotations

import csv
import json

import h5py
import numpy as np
import pytest
import torch

from explainkit import analyze, open_store
from explainkit.config import TrainConfig
from explainkit.task_explain import box_masks, choose_items, score_target, target_curves
from explainkit.task_quality import localization
from tests.helpers import registries, run_cli

TASK_RUN = dict(
    dataset="scenes", image_size=32, width=8, epochs=1, batch_size=16, limit_train=48,
    limit_eval=12, device="cpu", lr=0.05, ema=0.0,
)  # fmt: skip
FAST = dict(
    gradcam_count=4, quality_methods="gradcam", quality_count=8, quality_steps=4,
)  # fmt: skip
TASKS = ("detection", "segmentation", "multilabel")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One tiny trained run per task; segmentation and multi-label analyzed from Python,
    detection analyzed and reported by the real CLI (its true boxes for quality)."""
    from explainkit.train.tasks import train

    root = tmp_path_factory.mktemp("task_explain")
    made = {}
    for task in TASKS:
        config = TrainConfig(task=task, **TASK_RUN)
        made[task] = train(config, registries(), out=root / task, quiet=True)
    for task in ("segmentation", "multilabel"):
        analyze(made[task], ["gradcam", "quality"], device="cpu", batch_size=16, **FAST)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in FAST.items()]
    det = str(made["detection"])
    result = run_cli(
        "analyze", det, "--plugin", "gradcam", "--plugin", "quality", "--device", "cpu",
        "--batch-size", "16", "--quality-target", "true", *flags,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    result = run_cli("report", det)
    assert result.returncode == 0, result.stderr
    return made


def _h5(run):
    with h5py.File(run / "analyses" / "gradcam" / "attributions.h5", "r") as f:
        return {k: f[k][:] for k in f}, dict(f.attrs)


@pytest.mark.parametrize("task", TASKS)
def test_gradcam_writes_one_map_per_item_with_what_it_explains(runs, task):
    data, attrs = _h5(runs[task])
    with open_store(runs[task]) as store:
        items = choose_items(store, store.last_epoch, "predicted")
        k, n = len(store.classes), store.num_images
        logits = store.logits() if task == "multilabel" else None
        dets = store.detections() if task == "detection" else None
        masks = store.epoch_data("masks") if task == "segmentation" else None
    m = len(items)
    assert m >= n if task != "detection" else m > 0
    assert data["maps"].shape == (m, 32, 32) and data["raw"].shape[0] == m
    assert data["raw"].shape[1:] == (8, 8)  # layer4 of the stride-4 trunk at 32 px
    maps = data["maps"].astype(np.float32)
    assert maps.min() >= 0 and maps.max() <= 1 and (maps.reshape(m, -1).max(1) > 0).any()
    assert attrs["task"] == task and attrs["target"] == "predicted" and attrs["explained"]
    assert (np.diff(data["image"]) >= 0).all() and data["image"].max() < n
    assert ((data["class"] >= 0) & (data["class"] < k)).all()
    np.testing.assert_array_equal(data["targets"], data["class"])  # the map's own class
    for row, (image, cls) in enumerate(zip(data["image"], data["class"], strict=True)):
        if task == "detection":  # a stored detection of its image, of its class
            boxes, _, labels = dets[image]
            same = np.abs(boxes - data["box"][row]).max(1) < 1e-4
            assert (same & (labels == cls)).any()
        elif task == "segmentation":
            assert (masks[image] == cls).any()
        else:
            assert logits[image, cls] > 0 or cls == logits[image].argmax()
    if task == "detection":  # the detector re-finds its own box: IoU 1, plus its score
        np.testing.assert_allclose(data["explained_score"], data["recorded_score"] + 1, atol=0.02)
    if task == "multilabel":  # the explained score is the label's logit
        np.testing.assert_allclose(data["explained_score"], logits[data["image"], data["class"]],
                                   atol=1e-3)  # fmt: skip
    shown = list(csv.DictReader(open(runs[task] / "analyses" / "gradcam" / "shown.csv")))
    assert (
        0 < len(shown) <= 4 and (runs[task] / "analyses" / "gradcam" / "gradcam.png").stat().st_size
    )


@pytest.mark.parametrize("task", TASKS)
def test_quality_judges_task_items_against_the_ground_truth(runs, task):
    folder = runs[task] / "analyses" / "quality"
    report = json.loads((folder / "quality.json").read_text())
    rows = {(r["method"], r["metric"]): r for r in csv.DictReader(open(folder / "quality.csv"))}
    assert report["methods"] == ["gradcam", "random"] and 0 < report["count"] <= 8
    for method in ("gradcam", "random"):
        for metric in ("deletion_auc", "insertion_auc", "pointing_game", "energy_in_mask"):
            row = {k: float(v) for k, v in rows[(method, metric)].items() if k not in
                   ("method", "metric")}  # fmt: skip
            assert 0 <= row["ci_low"] <= row["mean"] <= row["ci_high"] <= 1, (method, metric)
            assert 0 < row["n"] <= 8
    loc = report["localization"]
    assert 0 < loc["mask_fraction"] < 1 and loc["items_with_region"] > 0
    assert (folder / "localization.png").is_file() and (folder / "deletion_insertion.png").is_file()
    curves = report["curves"]["gradcam"]
    assert len(curves["fractions"]) == 5 and len(curves["deletion"]["mean"]) == 5
    if task == "detection":  # true boxes explained: each one's own box is its region
        assert report["target"] == "true" and loc["items_with_region"] == report["count"]


def test_energy_in_a_box_prefers_a_map_inside_it():
    """A box's pixels are rows y1..y2, columns x1..x2: a map peaked in the box beats a
    uniform map (whose energy share is the box's area) and the same map transposed."""
    box = np.array([[4.0, 10.0, 12.0, 26.0]])  # x1, y1, x2, y2: 8 wide, 16 tall
    region = box_masks(box, 32, 32)
    assert region.sum() == 8 * 16 and region[0, 10:26, 4:12].all()
    ys, xs = np.mgrid[:32, :32]
    peak = np.exp(-((xs - 8) ** 2 + (ys - 18) ** 2) / 8.0)[None]
    maps = torch.tensor(np.concatenate([peak, np.ones((1, 32, 32)), peak.transpose(0, 2, 1)]))
    pointing, energy = localization(maps, torch.from_numpy(np.repeat(region, 3, 0)))
    assert pointing.tolist() == [1.0, 0.0, 0.0]
    assert energy[1] == pytest.approx(8 * 16 / 32**2)
    assert energy[0] > 0.9 > energy[1] > energy[2]


def test_deletion_starts_and_insertion_ends_at_the_label_probability(runs):
    """The curves track the item's own score: the label's sigmoid on the intact image."""
    from explainkit.train.checkpoint import load_model

    run = runs["multilabel"]
    with open_store(run) as store:
        items = choose_items(store, store.last_epoch).take(slice(0, 6))
        logits = store.logits()[items.image, items.cls]
        x = torch.from_numpy(store.images(items.image)).permute(0, 3, 1, 2).float() / 255
        mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (store.mean, store.std))
    model = load_model(run, registries(), store.last_epoch, "cpu").eval()
    maps = torch.rand(len(items), 32, 32, generator=torch.Generator().manual_seed(0))
    curves = target_curves(model, (x - mean) / std, maps, score_target(items), steps=4)
    expected = torch.sigmoid(torch.from_numpy(logits)).float()
    torch.testing.assert_close(curves.deletion[:, 0], expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(curves.insertion[:, -1], expected, atol=1e-4, rtol=0)
    assert ((curves.deletion >= 0) & (curves.deletion <= 1)).all()


def test_the_report_shows_a_task_run_s_explanations(runs):
    page = (runs["detection"] / "report.html").read_text()
    for text in ("Grad-CAM", "gradcam per detection item", "Explanation quality",
                 "Localization (pointing game, energy in the true region)",
                 "Deletion and insertion curves", "explain each detection"):  # fmt: skip
        assert text in page, text


def test_a_task_run_refuses_what_it_cannot_explain_in_one_sentence(runs):
    results = analyze(runs["multilabel"], ["gradcam"], device="cpu", collect_failures=True,
                      gradcam_target="circle")  # fmt: skip
    assert "explains its predicted or its true objects, not 'circle'" in results[0]["error"]


@pytest.mark.usefixtures("one_thread")
def test_scorecam_explains_each_detection_of_a_task_run(runs, tmp_path):
    """--gradcam-method scorecam on a detection run: each item's box is matched by IoU on
    every masked copy of its image. The intact image re-finds its own box (IoU 1 plus its
    recorded score), and the stored maps are Score-CAM's of each item's Detection target."""
    import shutil

    from explainkit.explain.perturbation import ScoreCAM
    from explainkit.task_explain import explained_model, item_target
    from explainkit.train.checkpoint import load_model

    run = tmp_path / "detection"
    shutil.copytree(runs["detection"], run)  # the other tests read the run's Grad-CAM maps
    analyze(run, ["gradcam"], device="cpu", batch_size=16, gradcam_method="scorecam",
            gradcam_count=4)  # fmt: skip
    data, attrs = _h5(run)
    m = len(data["maps"])
    assert attrs["method"] == "scorecam" and m > 0 and data["maps"].shape == (m, 32, 32)
    np.testing.assert_allclose(data["explained_score"], data["recorded_score"] + 1, atol=0.02)
    np.testing.assert_array_equal(data["targets"], data["class"])
    maps = data["maps"].astype(np.float32)
    assert maps.min() >= 0 and maps.max() <= 1 and (maps.reshape(m, -1).max(1) == 1).any()
    gradcam = json.loads((runs["detection"] / "analyses" / "gradcam" / "gradcam.json").read_text())
    assert gradcam["method"] == "gradcam"  # the run's own Grad-CAM analysis is untouched
    with open_store(run) as store:
        items = choose_items(store, store.last_epoch).take(slice(0, 4))
        x = torch.from_numpy(store.images(items.image)).permute(0, 3, 1, 2).float() / 255
        mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (store.mean, store.std))
        epoch = store.last_epoch
    model = load_model(run, registries(), epoch, "cpu").eval()
    engine = ScoreCAM(explained_model(model, "detection"), model.backbone.body.layer4)
    direct = engine((x - mean) / std, item_target(items))
    np.testing.assert_allclose(maps[: len(items)], direct.maps.numpy(), atol=2e-3)
