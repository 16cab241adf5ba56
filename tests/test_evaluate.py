"""Explain any model: `explainkit evaluate` and `explainkit.evaluate` write a run every
analyzer and the report read, for a model explainkit did not train."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import explainkit
from explainkit.cli import cli
from explainkit.rundir import RunDir
from explainkit.store import open_store

CLASSES = ("circle", "square")


def _invoke(*args: object) -> object:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def _image(kind: str, seed: int) -> object:
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (72, 64), tuple(int(v) for v in rng.integers(0, 120, 3)))
    box = [int(v) for v in rng.integers(8, 24, 2)] + [int(v) for v in rng.integers(40, 56, 2)]
    draw = ImageDraw.Draw(img)
    (draw.ellipse if kind == "circle" else draw.rectangle)(box, fill=(230, 200, 40))
    return img


@pytest.fixture
def folder(tmp_path) -> Path:
    root = tmp_path / "photos"
    for split, count in (("train", 2), ("val", 3)):
        for c, kind in enumerate(CLASSES):
            (root / split / kind).mkdir(parents=True)
            for i in range(count):
                _image(kind, 100 * c + 10 * i + len(split)).save(root / split / kind / f"{i}.png")
    return root


@pytest.fixture
def weights(tmp_path) -> tuple[Path, torch.nn.Module]:
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=len(CLASSES)).eval()
    path = tmp_path / "r18.pt"
    torch.save(model.state_dict(), path)
    return path, model


def test_cli_evaluate_then_analyze_and_report(tmp_path, folder, weights):
    path, model = weights
    run = tmp_path / "runs" / "r18"
    _invoke(
        "evaluate", "--model", "torchvision:resnet18", "--weights", path, "--dataset", "folder",
        "--data-dir", folder, "--image-size", 64, "--device", "cpu", "--out", run,
    )  # fmt: skip
    rundir = RunDir(run)
    config = rundir.read_config()
    assert config["model"]["arch"] == "torchvision:resnet18"
    assert config["data"]["classes"] == list(CLASSES)
    # Recorded as an evaluation, with the options evaluate has and none of training's.
    assert config["command"] == "evaluate"
    assert "epochs" not in config["config"] and "lr" not in config["config"]
    assert config["config"]["model"] == "torchvision:resnet18"
    for name in (1, "best", "last"):
        assert rundir.checkpoint(name).is_file()

    # The stored logits are the model's own outputs on those images.
    mean = torch.tensor(config["data"]["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(config["data"]["std"]).view(1, 3, 1, 1)
    with open_store(rundir.store_path) as store:
        images = store.images()
        stored = store.logits()
        history = store.history
        assert len(images) == 6 and store.epochs == [1]
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        expected = model((x - mean) / std).numpy()
    np.testing.assert_allclose(stored, expected, rtol=1e-4, atol=1e-4)
    assert history["train_loss"][0] == 0 and "train_ce" not in history

    # A run that exists is refused without --overwrite, replaced with it.
    again = CliRunner().invoke(
        cli, ["evaluate", "--model", "torchvision:resnet18", "--weights", str(path),
              "--dataset", "folder", "--data-dir", str(folder), "--image-size", "64",
              "--device", "cpu", "--out", str(run)],
    )  # fmt: skip
    assert again.exit_code == 1 and "--overwrite" in again.output

    _invoke(
        "analyze", run, "--plugin", "gradcam", "--plugin", "gallery", "--plugin", "model",
        "--device", "cpu",
    )  # fmt: skip
    for name in ("gradcam", "gallery", "model"):
        assert (rundir.analysis(name) / RunDir.MANIFEST).is_file()
    _invoke("report", run)
    assert rundir.report_path.is_file()
    assert explainkit.load_model(run)(x).shape == (6, 2)


def test_cli_evaluate_refuses_a_head_for_other_classes(tmp_path, folder):
    import torchvision

    path = tmp_path / "r18-10.pt"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), path)
    result = CliRunner().invoke(
        cli, ["evaluate", "--model", "torchvision:resnet18", "--weights", str(path),
              "--dataset", "folder", "--data-dir", str(folder), "--image-size", "64",
              "--device", "cpu", "--out", str(tmp_path / "run")],
    )  # fmt: skip
    assert result.exit_code != 0 and "classifier head" in result.output
    assert not (tmp_path / "run").exists()


def test_python_evaluate_any_module(tmp_path):
    from evaluate_models import TinyNet

    torch.manual_seed(1)
    model = TinyNet(num_classes=3).eval()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 32, 32, 3), dtype=np.uint8)
    targets = np.array([0, 1, 2, 0, 1, 2, 0])
    run = explainkit.evaluate(
        model, (images, targets), out=tmp_path / "mine", classes=["a", "b", "c"],
        mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), device="cpu",
    )  # fmt: skip
    config = RunDir(run).read_config()
    assert config["model"]["arch"] == "import:evaluate_models:TinyNet"
    assert config["data"]["dataset"] == "arrays"
    assert config["model"]["default_layer"] == "features"
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.25
    with torch.no_grad(), open_store(RunDir(run).store_path) as store:
        np.testing.assert_allclose(store.logits(), model(x).numpy(), rtol=1e-5, atol=1e-5)
    json.loads(RunDir(run).config_path.read_text())  # plain JSON

    # The import path rebuilds the model wherever its module is importable (here: tests/).
    rebuilt = explainkit.load_model(run)
    assert type(rebuilt) is TinyNet and rebuilt.head.out_features == 3
    _invoke("analyze", run, "--plugin", "gradcam", "--plugin", "gallery", "--device", "cpu")
    _invoke("report", run)


def test_a_run_whose_module_is_missing_here_says_what_to_install(tmp_path):
    """Where the module is not importable, analyzers that rebuild the model say why in one
    sentence (the run is not "damaged"); those that read only the store still work."""
    import subprocess
    import sys

    from evaluate_models import TinyNet

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    run = explainkit.evaluate(
        TinyNet(num_classes=2), (images, [0, 1, 0, 1, 0]), out=tmp_path / "mine",
        classes=["a", "b"], device="cpu",
    )  # fmt: skip
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"}
    cmd = [sys.executable, "-m", "explainkit", "analyze", str(run), "--device", "cpu"]
    refused = subprocess.run([*cmd, "--plugin", "gradcam"], capture_output=True, text=True,
                             cwd=tmp_path, env=env)  # fmt: skip
    assert refused.returncode == 1
    assert "cannot be rebuilt here: model import:evaluate_models:TinyNet" in refused.stderr
    assert "module 'evaluate_models' is not importable" in refused.stderr
    assert "damaged" not in refused.stderr and "Traceback" not in refused.stderr
    gallery = subprocess.run([*cmd, "--plugin", "gallery"], capture_output=True, text=True,
                             cwd=tmp_path, env=env)  # fmt: skip
    assert gallery.returncode == 0, gallery.stderr


def test_python_evaluate_a_registered_model_rebuilds_it(tmp_path, folder):
    import torchvision

    torch.manual_seed(2)
    model = torchvision.models.resnet18(num_classes=2)
    run = explainkit.evaluate(
        model, "folder", out=tmp_path / "r18", data_dir=folder, image_size=64,
        arch="torchvision:resnet18", device="cpu",
    )  # fmt: skip
    assert RunDir(run).read_config()["model"]["default_layer"] == "layer4"
    rebuilt = explainkit.load_model(run)
    for key, value in model.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[key], value)


def test_torchrun_evaluate_writes_what_one_process_writes(tmp_path, folder, weights):
    """2 gloo processes each evaluate a block of the (odd) eval set; rank 0 writes the run:
    the same logits, images and history as one process, and it says so once."""
    import os
    import subprocess
    import sys

    path, _ = weights
    args = ["evaluate", "--model", "torchvision:resnet18", "--weights", str(path),
            "--dataset", "folder", "--data-dir", str(folder), "--image-size", "64",
            "--limit-eval", "5", "--device", "cpu"]  # fmt: skip
    _invoke(*args, "--out", tmp_path / "one")
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "EXPLAINKIT_LOAD_PLUGINS": "", "OMP_NUM_THREADS": "1"}
    two = subprocess.run(
        [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "explainkit", *args,
         "--out", str(tmp_path / "two")],
        capture_output=True, text=True, env=env, timeout=300, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr
    assert two.stderr.count("run written to") == 1
    with open_store(tmp_path / "one") as one, open_store(tmp_path / "two") as shared:
        np.testing.assert_allclose(shared.logits(), one.logits(), rtol=1e-5, atol=1e-6)
        assert np.array_equal(shared.images(), one.images())
        assert shared.history["eval_acc"] == pytest.approx(one.history["eval_acc"])
    refused = subprocess.run(
        [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "explainkit", *args,
         "--out", str(tmp_path / "two")],
        capture_output=True, text=True, env=env, timeout=300, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert refused.returncode != 0 and "already exists" in refused.stderr
    assert "explainkit/" not in refused.stderr  # our sentence; torchrun's own report follows


@pytest.mark.parametrize(
    "arch, layer, layout",
    [
        ("swin_t", "features.7", "swin"),
        ("vit_b_16", "encoder.layers.encoder_layer_11.ln_1", "vit"),
    ],
)
def test_transformers_at_224_pixels_through_the_three_commands(tmp_path, arch, layer, layout):
    """A saved torchvision Swin-T or ViT-B/16 state_dict on a folder of larger, non-square
    photos: evaluate, analyze and report, with maps laid on the token grid."""
    import warnings

    import h5py
    import torchvision

    root = tmp_path / "photos"
    for c, kind in enumerate(CLASSES):
        (root / kind).mkdir(parents=True)
        for i in range(6):
            _image(kind, 7 * c + i).resize((300, 240)).save(root / kind / f"{i}.jpg")
    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, num_classes=len(CLASSES))
    torch.save(model.state_dict(), tmp_path / "w.pt")
    del model
    run = tmp_path / "run"
    _invoke("evaluate", "--model", f"torchvision:{arch}", "--weights", tmp_path / "w.pt",
            "--dataset", "folder", "--data-dir", root, "--image-size", "224", "--out", run,
            "--device", "cpu")  # fmt: skip
    spec = RunDir(run).read_config()["model"]
    assert (spec["default_layer"], spec["reshape"]) == (layer, layout)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        _invoke(
            "analyze", run, "--plugin", "gradcam", "--plugin", "gallery", "--plugin", "captum",
            "--captum-methods", "gradcam,saliency", "--captum-count", "1", "--batch-size", "2",
            "--device", "cpu",
        )  # fmt: skip
    if arch == "vit_b_16":  # torchvision starts a ViT's head at zero: no gradient reaches
        assert any("get no gradient, so every map is zero" in str(w.message) for w in said)
    with h5py.File(run / "analyses" / "gradcam" / "attributions.h5") as f:
        assert f.attrs["layout"] == layout and f["maps"].shape[1:] == (224, 224)
        assert f["raw"].shape[1:] == (7, 7) if arch == "swin_t" else (14, 14)
    _invoke("report", run)
    assert "Grad-CAM" in (run / "report.html").read_text()
