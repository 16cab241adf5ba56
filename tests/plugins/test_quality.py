"""The ``quality`` analyzer on a trained shapes run: tables, verdicts and figures."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from explainkit.runner import analyze
from tests.plugins.helpers import check_png, make_run


def run_one(run: Path, name: str, **options) -> dict:
    (manifest,) = analyze(run, plugins=[name], device="cpu", collect_failures=True, **options)
    return manifest


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def quality_run(trained_shapes_run, tmp_path_factory):
    """A copy of the trained run with one ``quality`` analysis done (64 images, 8 steps)."""
    run = Path(shutil.copytree(trained_shapes_run, tmp_path_factory.mktemp("quality") / "run"))
    manifest = run_one(
        run, "quality", quality_count=64, quality_steps=8,
        quality_methods="gradcam,gradcampp,saliency",
    )  # fmt: skip
    assert manifest["status"] == "ok", (manifest["error"], manifest.get("traceback"))
    return run, manifest


def test_quality_table_json_and_csv_agree(quality_run):
    run, manifest = quality_run
    out = run / "analyses" / "quality"
    paths = {a["path"] for a in manifest["artifacts"]}
    assert {
        "quality.csv", "quality.json", "deletion_insertion.png", "sanity.png",
        "localization.png", "localization_per_class.png", "localization_per_class.csv",
        "road.png",
    } <= paths  # fmt: skip
    report = json.loads((out / "quality.json").read_text())
    assert report["methods"] == ["gradcam", "gradcampp", "saliency", "random"]  # random added
    assert report["count"] == 64 and report["steps"] == 8 and report["baseline"] == "blur"
    with open(out / "quality.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["method", "metric", "mean", "ci_low", "ci_high", "n"]
    assert len(rows) == len(report["table"])
    for row, ref in zip(rows, report["table"], strict=True):
        assert row["method"] == ref["method"] and row["metric"] == ref["metric"]
        assert float(row["mean"]) == ref["mean"] and int(row["n"]) == ref["n"] == 64
        assert ref["ci_low"] <= ref["mean"] <= ref["ci_high"]
    metrics = {(r["method"], r["metric"]) for r in report["table"]}
    for method in report["methods"]:
        for metric in ("deletion_auc", "insertion_auc", "pointing_game", "energy_in_mask",
                       "sanity_spearman:layer4", "sanity_ssim:conv1+bn1", "road_morf",
                       "road_lerf", "road_combined", "average_drop",
                       "increase_in_confidence"):  # fmt: skip
            assert (method, metric) in metrics
    for r in report["table"]:
        if r["metric"] in ("average_drop", "increase_in_confidence"):
            assert 0 <= r["ci_low"] <= r["mean"] <= r["ci_high"] <= 1
    assert set(report["road"]) == set(report["methods"])
    assert len(report["road"]["gradcam"]["morf"]["mean"]) == 9
    assert ("random", "deletion_gain_vs_random") not in metrics
    assert 0 < report["localization"]["mask_fraction"] < 1
    per_class = report["per_class"]
    assert {r["class"] for r in per_class} <= set(json.loads(
        (run / "config.json").read_text())["data"]["classes"])  # fmt: skip
    assert sum(r["n"] for r in per_class if r["method"] == "gradcam"
               and r["metric"] == "pointing_game") == 64  # fmt: skip
    for name in ("deletion_insertion.png", "sanity.png", "localization.png", "road.png"):
        check_png(out / name)


def test_quality_results_show_the_expected_properties(quality_run):
    run, _ = quality_run
    report = json.loads((run / "analyses" / "quality" / "quality.json").read_text())
    value = {(r["method"], r["metric"]): r for r in report["table"]}
    gc = lambda m: value[("gradcam", m)]  # noqa: E731
    assert gc("deletion_auc")["mean"] < gc("insertion_auc")["mean"]
    assert gc("deletion_gain_vs_random")["ci_low"] > 0
    assert gc("pointing_game")["mean"] > value[("random", "pointing_game")]["mean"]
    sanity = report["sanity"]
    assert "gradcam" in sanity["passed"] and "random" in sanity["failed"]
    assert sanity["threshold"] == 0.5 and sanity["depth"] == "layer4"
    assert "PASSES" in sanity["methods"]["gradcam"]["verdict"]
    assert "FAILS" in sanity["methods"]["random"]["verdict"]
    assert set(sanity["passed"]) | set(sanity["failed"]) == set(report["methods"])
    curves = report["curves"]["gradcam"]
    assert len(curves["fractions"]) == 9 and len(curves["deletion"]["mean"]) == 9


def test_quality_without_masks_or_sanity(tmp_path, tiny_run_master):
    run = Path(shutil.copytree(tiny_run_master, tmp_path / "run"))
    # drop the masks from the store, as for CIFAR-10
    import h5py

    with h5py.File(run / "predictions.h5", "r+") as f:
        del f["eval/masks"]
    manifest = run_one(
        run, "quality", quality_count=16, quality_steps=4, quality_sanity=False,
        quality_methods="gradcam", quality_baseline="mean", quality_road=False,
    )  # fmt: skip
    assert manifest["status"] == "ok", (manifest["error"], manifest.get("traceback"))
    paths = {a["path"] for a in manifest["artifacts"]}
    assert "localization.png" not in paths and "sanity.png" not in paths
    report = json.loads((run / "analyses" / "quality" / "quality.json").read_text())
    assert report["sanity"] is None and report["localization"] is None
    assert report["localization_skipped"] and report["baseline"] == "mean"
    assert {r["metric"] for r in report["table"]} == {
        "deletion_auc", "insertion_auc", "deletion_gain_vs_random", "insertion_gain_vs_random",
        "average_drop", "increase_in_confidence",
    }  # fmt: skip
    assert report["road"] is None and "road.png" not in paths


def test_quality_rejects_unknown_method(tiny_run):
    manifest = run_one(tiny_run, "quality", quality_methods="gradcam,nope")
    assert manifest["status"] == "failed"
    assert "unknown method 'nope'" in manifest["error"] and "gradcam" in manifest["error"]


def test_quality_needs_a_checkpoint(tmp_path, tiny_run_master):
    run = make_run(tmp_path / "run", tiny_run_master, num_classes=4, epochs=1)
    manifest = run_one(run, "quality")
    assert manifest["status"] == "failed" and "checkpoint" in manifest["error"]


def test_quality_says_its_sample_and_an_estimate_before_the_long_part(tiny_run):
    from tests.helpers import run_cli

    result = run_cli(
        "analyze", str(tiny_run), "--plugin", "quality", "--quality-count", "40",
        "--quality-methods", "gradcam,random", "--no-quality-sanity", "--device", "cpu",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    (line,) = [ln for ln in result.stderr.splitlines() if "about" in ln]
    assert line.startswith("quality: 40 of 64 eval images (a seeded sample): the other 1 methods")
    assert "--quality-count" in line
    assert result.stderr.index(line) < result.stderr.index("ok      quality")
