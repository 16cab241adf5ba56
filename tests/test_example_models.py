"""A third party adds a model and a dataset: examples/explainkit-example-models installed with
pip, found through its entry point, trained, evaluated and explained through the real CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from explainkit.store import open_store
from tests.helpers import install_example, run_installed_cli

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "explainkit-example-models"
FAST = ["--width", "4", "--epochs", "2", "--batch-size", "32", "--image-size", "24",
        "--limit-train", "96", "--limit-eval", "24", "--device", "cpu"]  # fmt: skip


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    return install_example(EXAMPLE, tmp_path_factory)


def test_the_installed_plugin_lists_its_model_and_dataset(installed):
    listed = run_installed_cli(["plugins", "--json"], installed)
    assert listed.returncode == 0, listed.stderr
    (row,) = [r for r in json.loads(listed.stdout) if r["name"] == "stripes"]
    assert row["package"] == "explainkit-example-models" and row["source"] == "entry point"
    assert [m["name"] for m in row["models"]] == ["stripes-cnn"]
    assert [d["name"] for d in row["datasets"]] == ["stripes"]


def test_its_model_trains_on_its_dataset_and_is_explained(installed, tmp_path):
    run = tmp_path / "stripes"
    trained = run_installed_cli(
        ["train", "--model", "stripes-cnn", "--dataset", "stripes", *FAST, "--out", str(run)],
        installed,
    )
    assert trained.returncode == 0, trained.stderr
    analyzed = run_installed_cli(
        ["analyze", str(run), "--plugin", "gradcam", "--plugin", "quality", "--device", "cpu"],
        installed,
    )
    assert analyzed.returncode == 0, analyzed.stderr
    assert "using 'blocks.3' from the run's metadata" in analyzed.stderr
    with open_store(run) as store:
        assert store.classes == ["horizontal", "vertical", "diagonal"] and store.has_masks

    # Its checkpoint explained again from a state_dict, as a model explainkit did not train.
    weights = tmp_path / "cnn.pt"
    state = torch.load(run / "checkpoints" / "best.pt", weights_only=True)["state_dict"]
    torch.save(state, weights)
    evaluated = run_installed_cli(
        ["evaluate", "--model", "stripes-cnn", "--width", "4", "--weights", str(weights),
         "--dataset", "stripes", "--image-size", "24", "--limit-eval", "24", "--device", "cpu",
         "--out", str(tmp_path / "again")],
        installed,
    )  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr
    with open_store(tmp_path / "again") as store:
        assert store.epochs == [1] and store.num_images == 24

    without = run_installed_cli(["analyze", str(run), "--plugin", "gradcam", "--device", "cpu"])
    assert without.returncode == 1
    assert "its model arch 'stripes-cnn' is unknown" in without.stderr
    assert "Traceback" not in without.stderr
