"""The report of a run that was evaluated, not trained (issue 26.7): only facts that apply,
no raw JSON repeating the tables, and every warning an analyzer raised next to its figure.

Through the real CLI (``evaluate``, ``analyze``, ``report`` in subprocesses) and, for the
issue's own case (a ViT whose fresh head gives all-zero maps), through the Python API.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import explainkit
from tests.helpers import build_model, run_cli

TRAINING_ONLY = ("lr", "schedule", "label_smoothing", "cutout", "amp", "weight_decay", "epochs")


def section(page: str, name: str) -> str:
    """The HTML of one analysis section of the report."""
    start = page.index(f'<section id="a-{name}"')
    return page[start : page.index("</section>", start)]


def outside_details(page: str) -> str:
    return re.sub(r"<details>.*?</details>", "", page, flags=re.S)


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory) -> Path:
    """``explainkit evaluate`` of saved weights on shapes, then three analyzers and the
    report."""
    root = tmp_path_factory.mktemp("evaluated")
    weights = root / "w.pt"
    torch.save(build_model("resnet18-s8", num_classes=10, width=8).state_dict(), weights)
    run = root / "run"
    steps = [
        ["evaluate", "--model", "resnet18-s8", "--width", "8", "--weights", str(weights),
         "--dataset", "shapes", "--limit-eval", "32", "--device", "cpu", "--out", str(run)],
        ["analyze", str(run), "--device", "cpu", "--plugin", "losses", "--plugin", "data",
         "--plugin", "gallery"],
        ["report", str(run)],
    ]  # fmt: skip
    for args in steps:
        result = run_cli(*args)
        assert result.returncode == 0, (args[0], result.stderr)
    return run


def test_evaluated_run_report_shows_only_facts_that_apply(cli_run):
    assert json.loads((cli_run / "config.json").read_text())["command"] == "evaluate"
    page = (cli_run / "report.html").read_text()
    run = page[page.index('<section id="run">') : page.index("</section>")]
    assert "the model was evaluated, not trained" in run
    assert "eval accuracy" in run and "training time" not in run and "training images" not in run
    options = re.findall(r"<tr><td>(\w+)</td>", run)
    assert "model" in options and "weights" in options
    assert not set(options) & set(TRAINING_ONLY), options
    assert "train acc" not in run and "0.00%" not in run and "all options" not in run
    assert "Evaluation log" in run and "Training log" not in page
    losses = section(page, "losses")
    assert "evaluated, not trained" in losses
    with open(cli_run / "analyses" / "losses" / "history.csv") as f:
        header = next(csv.reader(f))
    assert "train_acc" not in header and "lr" not in header and "eval_acc" in header
    data = section(page, "data")
    assert "<td>normalization</td>" in data and "<td>train</td>" not in data
    assert "no train split" in data


def test_report_dumps_no_raw_json_outside_folded_details(cli_run):
    page = (cli_run / "report.html").read_text()
    assert "<pre>{" in page  # the JSON files are still there for who unfolds them
    assert "<pre>{" not in outside_details(page)


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory) -> Path:
    """The issue's case: torchvision's ViT zero-initialises its head, so no gradient reaches
    the patch tokens and every map is zero. Evaluated from Python (a tiny ViT), then analyzed
    and reported by the real CLI."""
    from torchvision.models.vision_transformer import VisionTransformer

    kw = dict(image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32)
    rng = np.random.default_rng(0)
    run = explainkit.evaluate(
        VisionTransformer(num_classes=3, **kw),
        (rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8), np.arange(12) % 3),
        out=tmp_path_factory.mktemp("vit") / "run", classes=["a", "b", "c"], device="cpu",
        arch="import:torchvision.models.vision_transformer:VisionTransformer", kwargs=kw,
        default_layer="encoder.layers.encoder_layer_0",
    )  # fmt: skip
    for args in (["analyze", str(run), "--device", "cpu", "--plugin", "gradcam",
                  "--plugin", "losses", "--trust-imports"], ["report", str(run)]):  # fmt: skip
        result = run_cli(*args)
        assert result.returncode == 0, (args[0], result.stderr)
        if args[0] == "analyze":
            assert "every map is zero" in result.stderr  # still printed as before
    return run


def test_analyzer_warning_is_recorded_and_shown_next_to_its_figure(vit_run):
    manifest = json.loads((vit_run / "analyses" / "gradcam" / "manifest.json").read_text())
    (warning,) = [w for w in manifest["warnings"] if w["category"] == "UserWarning"]
    assert "every map is zero" in warning["message"]
    figure = manifest["artifacts"][0]["path"]
    assert warning["artifact"] == figure and figure.endswith(".png")
    page = (vit_run / "report.html").read_text()
    gradcam = section(page, "gradcam")
    assert 'class="badge warned">ok, 1 warning<' in gradcam  # not just "ok"
    box = gradcam.index('<div class="warning">')
    assert box < gradcam.index("every map is zero") < gradcam.index("<img")  # by the figure
    assert "Note: gradcam: no layer given" in gradcam  # logged lines are notes
    losses = json.loads((vit_run / "analyses" / "losses" / "manifest.json").read_text())
    assert losses["warnings"] == []
    assert '<div class="warning">' not in section(page, "losses")


def test_warnings_show_in_a_notebook_cell_of_analyze(vit_run, tmp_path):
    run = Path(shutil.copytree(vit_run, tmp_path / "run"))
    with pytest.warns(UserWarning, match="every map is zero"):  # still raised to the caller
        results = explainkit.analyze(run, plugins=["gradcam"], device="cpu")
    assert any("every map is zero" in w["message"] for w in results[0]["warnings"])
    assert "every map is zero" in results._repr_html_()
