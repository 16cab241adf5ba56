"""The perturbation CAMs through the real CLI and the analyzers: --gradcam-method, the
quality analyzer's tables and the captum analyzer's side by side."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from explainkit.runner import analyze
from tests.helpers import run_cli

pytestmark = pytest.mark.usefixtures("one_thread")


def test_gradcam_method_ablationcam_through_the_cli(tiny_run):
    """`explainkit analyze --gradcam-method ablationcam` writes maps equal to the engine's."""
    import torch

    from explainkit import load_model
    from explainkit.explain.perturbation import AblationCAM
    from explainkit.store import open_store

    result = run_cli(
        "analyze", str(tiny_run), "--plugin", "gradcam", "--gradcam-method", "ablationcam",
        "--gradcam-layer", "layer3", "--device", "cpu", "--gradcam-count", "2",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    with h5py.File(tiny_run / "analyses" / "gradcam" / "attributions.h5", "r") as f:
        maps, targets = f["maps"][:4].astype(np.float32), f["targets"][:4]
        assert f.attrs["method"] == "ablationcam" and f.attrs["layout"] == "nchw"
    model = load_model(tiny_run, device="cpu")
    with open_store(tiny_run) as store:
        x = torch.from_numpy(store.images(np.arange(4))).permute(0, 3, 1, 2).float() / 255
        mean = torch.tensor(store.mean).view(1, 3, 1, 1)
        std = torch.tensor(store.std).view(1, 3, 1, 1)
    ours = AblationCAM(model, "layer3")((x - mean) / std, torch.from_numpy(targets)).maps
    assert np.abs(ours.numpy() - maps).max() < 1e-2  # maps are stored as float16
    bad = run_cli("analyze", str(tiny_run), "--plugin", "gradcam", "--gradcam-method", "nope")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def test_quality_and_captum_accept_the_new_methods(tiny_run):
    (manifest,) = analyze(
        tiny_run, plugins=["quality"], device="cpu", collect_failures=True, quality_count=8,
        quality_steps=4, quality_sanity=False, quality_layer="layer3",
        quality_methods="scorecam,ablationcam,smoothgrad:gradcam",
    )  # fmt: skip
    assert manifest["status"] == "ok", (manifest["error"], manifest.get("traceback"))
    report = json.loads((tiny_run / "analyses" / "quality" / "quality.json").read_text())
    assert report["methods"] == ["scorecam", "ablationcam", "smoothgrad:gradcam", "random"]
    rows = {(r["method"], r["metric"]): r for r in report["table"]}
    for name in report["methods"]:
        for metric in ("deletion_auc", "road_combined", "average_drop"):
            assert rows[(name, metric)]["n"] == 8
    pytest.importorskip("captum")
    (manifest,) = analyze(
        tiny_run, plugins=["captum"], device="cpu", collect_failures=True, captum_limit=8,
        captum_count=2, captum_methods="gradcam,scorecam,deeplift,smoothgrad:saliency",
    )  # fmt: skip
    assert manifest["status"] == "ok", (manifest["error"], manifest.get("traceback"))
