"""The ``evolution`` analyzer: CAMs at every saved epoch, and their quality per epoch."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from tests.helpers import train_run
from tests.plugins.helpers import check_png, run_one

pytestmark = pytest.mark.usefixtures("one_thread")


def test_evolution_grid_and_metrics_per_epoch(tiny_run):
    manifest = run_one(tiny_run, "evolution", evolution_count=4, evolution_metric_count=32,
                       evolution_steps=4)  # fmt: skip
    assert manifest["status"] == "ok", (manifest["error"], manifest.get("traceback"))
    out = tiny_run / "analyses" / "evolution"
    assert [a["path"] for a in manifest["artifacts"]] == [
        "evolution.png", "evolution_metrics.png", "evolution.csv", "evolution.json",
    ]  # fmt: skip
    data = json.loads((out / "evolution.json").read_text())
    assert data["epochs"] == [1, 2] and data["method"] == "gradcam" and data["layer"] == "layer4"
    assert len(data["grid_images"]) == 4 and data["metric_images"] == 32 and data["has_masks"]
    for probs in data["grid_true_prob"].values():
        assert len(probs) == 4 and all(0 <= p <= 1 for p in probs)
    with open(out / "evolution.csv") as f:
        rows = list(csv.DictReader(f))
    metrics = {"deletion_auc", "insertion_auc", "pointing_game", "energy_in_mask"}
    assert {(int(r["epoch"]), r["metric"]) for r in rows} == {
        (e, m) for e in (1, 2) for m in metrics
    }
    for r in rows:
        assert float(r["ci_low"]) <= float(r["mean"]) <= float(r["ci_high"])
        assert int(r["n"]) == 32
    from PIL import Image

    with Image.open(out / "evolution.png") as img:  # 4 rows, 1 image + 2 epoch columns
        assert img.size[1] > img.size[0]
    check_png(out / "evolution_metrics.png")


def test_evolution_with_one_epoch(tmp_path):
    run = train_run(tmp_path / "one", epochs=1, limit_train=128, limit_eval=32)
    manifest = run_one(Path(run), "evolution", evolution_method="layercam",
                       evolution_metric_count=16, evolution_steps=2)  # fmt: skip
    assert manifest["status"] == "ok", (manifest["error"], manifest.get("traceback"))
    data = json.loads((Path(run) / "analyses" / "evolution" / "evolution.json").read_text())
    assert data["epochs"] == [1] and data["method"] == "layercam"
    assert len(data["grid_images"]) == 8
    check_png(Path(run) / "analyses" / "evolution" / "evolution.png")
