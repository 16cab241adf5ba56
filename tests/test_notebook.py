"""The notebook path (issue 26 items 4, 5, 8): explain_image in one call, results that draw
themselves, HuggingFace save_pretrained folders (hf:), and runs of a live module analyzed
with that module."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import explainkit
from explainkit.errors import AnalyzerError, ConfigError
from tests.helpers import REPO, run_cli


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    """A tall photo-like image (smooth blobs), not square."""
    path = tmp_path_factory.mktemp("photo") / "cat.jpg"
    yy, xx = np.mgrid[0:300, 0:200]
    pixels = np.stack([128 + 100 * np.sin(xx / 17), 128 + 100 * np.cos(yy / 23), xx % 256], -1)
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return torchvision.models.resnet18().eval()  # random weights: nothing downloads


# -- item 4: explain_image and inline results --------------------------------------------


def test_compute_cam_and_explain_image_are_top_level_names():
    assert explainkit.compute_cam.__module__ == "explainkit.explain.gradcam"
    assert callable(explainkit.explain_image) and "explain_image" in dir(explainkit)


def test_explain_image_preprocesses_as_torchvision_and_agrees_with_pytorch_grad_cam(photo, resnet):
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    weights = torchvision.models.ResNet18_Weights.DEFAULT  # metadata only, offline
    result = explainkit.explain_image(
        resnet, str(photo), target="tabby", layer=resnet.layer4[-1], weights=weights
    )
    tabby = weights.meta["categories"].index("tabby")
    assert result.targets.tolist() == [tabby] and result.maps.shape == (1, 224, 224)
    assert result.classes[tabby] == "tabby" and result.images.shape == (1, 224, 224, 3)
    # The preprocessing is torchvision's: Resize(256) + CenterCrop(224) + the ImageNet norm.
    x = weights.transforms()(Image.open(photo).convert("RGB"))[None]
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    ours = (torch.from_numpy(result.images).permute(0, 3, 1, 2).float() / 255 - mean) / std
    assert float((ours - x).abs().mean()) < 0.05
    with GradCAM(resnet, [resnet.layer4[-1]]) as cam:
        peer = cam(x, [ClassifierOutputTarget(tabby)])
    r = np.corrcoef(result.maps[0].flatten().numpy(), peer[0].flatten())[0, 1]
    assert r > 0.98, r


def test_explain_image_takes_pil_arrays_and_names_and_refuses_in_one_sentence(resnet):
    rng = np.random.default_rng(1)
    gray = rng.integers(0, 255, (40, 60), dtype=np.uint8)
    for image in (Image.fromarray(gray), gray, gray[..., None] / 255.0, torch.rand(3, 40, 60)):
        result = explainkit.explain_image(resnet, image, target=3, layer="layer4", size=64)
        assert result.maps.shape == (1, 64, 64) and result.targets.tolist() == [3]
    with pytest.raises(AnalyzerError, match="did you mean 'dog'"):
        explainkit.explain_image(resnet, gray, target="dgo", classes=["cat", "dog"] * 500)
    with pytest.raises(AnalyzerError, match="class names are unknown"):
        explainkit.explain_image(resnet, gray, target="dog")
    with pytest.raises(AnalyzerError) as refused:
        explainkit.explain_image(resnet, gray, layer=torch.nn.Conv2d(3, 3, 1))
    assert "not one of the model's modules" in str(refused.value)
    assert len(str(refused.value)) < 250  # no page-long repr


def test_a_result_draws_itself_as_png_and_html(resnet, photo):
    result = explainkit.explain_image(resnet, photo, layer=resnet.layer4, size=64)
    png = result._repr_png_()
    assert png.startswith(b"\x89PNG") and len(png) > 1000
    assert "data:image/png;base64," in result._repr_html_()
    bare = explainkit.compute_cam(resnet, torch.rand(2, 3, 64, 64), "layer3")
    assert bare._repr_png_().startswith(b"\x89PNG")  # the maps alone, without images


def test_a_notebook_shows_the_cam_figure_inline(tmp_path, photo):
    """The README's notebook path, executed by a real kernel (nbclient)."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    cells = [
        "import explainkit, torchvision\n"
        "weights = torchvision.models.ResNet18_Weights.DEFAULT\n"
        "model = torchvision.models.resnet18()  # pretrained: resnet18(weights=weights)",
        f"explainkit.explain_image(model, {str(photo)!r}, target='tabby', weights=weights)",
    ]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3").execute(cwd=str(tmp_path))
    outputs = nb.cells[-1].outputs
    assert any("image/png" in out.get("data", {}) for out in outputs), outputs
    assert not any(out.get("output_type") == "error" for out in outputs)


# -- item 5: hf: local save_pretrained folders ---------------------------------------------


@pytest.fixture(scope="module")
def hf_vit(tmp_path_factory) -> Path:
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("hf") / "tiny-vit"
    config = transformers.ViTConfig(
        image_size=32, patch_size=8, num_hidden_layers=2, hidden_size=32,
        num_attention_heads=2, intermediate_size=64, num_labels=2,
        id2label={0: "cat", 1: "dog"}, label2id={"cat": 0, "dog": 1},
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.ViTForImageClassification(config).save_pretrained(folder)
    return folder


def test_hf_folder_is_evaluated_with_its_own_weights_and_explained(hf_vit, tmp_path):
    for cls in ("cat", "dog"):
        for i in range(2):
            path = tmp_path / "photos" / cls / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((40, 30, 3), 60 * i + 20, np.uint8)).save(path)
    out = tmp_path / "run"
    result = run_cli(
        "evaluate", "--model", f"hf:{hf_vit}", "--dataset", "folder", "--data-dir",
        str(tmp_path / "photos"), "--device", "cpu", "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"input: 32 x 32 px (what hf:{hf_vit} expects)" in result.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["arch"] == f"hf:{hf_vit}"
    assert config["model"]["default_layer"].endswith(".1.layernorm_before")
    # The stored logits are the HuggingFace model's ModelOutput.logits.
    import transformers

    model = transformers.ViTForImageClassification.from_pretrained(hf_vit).eval()
    with explainkit.open_store(out / "predictions.h5") as store:
        images, logits = store.images(list(range(store.num_images))), store.logits(1)
        mean, std = store.mean, store.std
    x = torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        assert np.allclose(logits, model(x).logits.numpy(), atol=1e-4)
    manifests = explainkit.analyze(out, plugins=["gradcam"], device="cpu")
    assert manifests[0]["status"] == "ok"
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cam = explainkit.explain_image(model, images[0], target="dog")  # id2label, image_size
    assert cam.maps.shape == (1, 32, 32) and cam.targets.tolist() == [1]
    # The last block's tokens are explained, not a layer located by guessing (the stem).
    assert not [w for w in caught if "no layer given" in str(w.message)]
    assert cam.raw.shape == (1, 4, 4)


def test_hf_refusals_are_one_sentence(tmp_path, monkeypatch):
    registries = explainkit.load_registries()
    with pytest.raises(ConfigError, match="not a folder written by save_pretrained"):
        registries.model_entry(f"hf:{tmp_path}")
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setitem(__import__("sys").modules, "transformers", None)
    with pytest.raises(ConfigError, match=r"pip install explainkit\[transformers\]"):
        registries.model_entry(f"hf:{tmp_path}")


# -- item 8: a live module's run, analyzed with the module ---------------------------------


def test_a_run_of_a_plain_sequential_is_analyzed_and_reported_with_the_live_module(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3),
        torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 2),
    )  # fmt: skip
    images = np.random.default_rng(0).integers(0, 255, (6, 16, 16, 3), dtype=np.uint8)
    run = explainkit.evaluate(
        model, (images, [0, 1] * 3), tmp_path / "byo", classes=["a", "b"], device="cpu"
    )
    refused = run_cli("analyze", str(run), "--plugin", "gradcam", "--device", "cpu", cwd=REPO)
    assert refused.returncode == 1
    assert "explainkit.analyze(run, model=module)" in refused.stderr
    assert "Traceback" not in refused.stderr
    before = {k: v.clone() for k, v in model.state_dict().items()}
    manifests = explainkit.analyze(run, plugins=["gradcam"], device="cpu", model=model)
    assert manifests[0]["status"] == "ok"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    page = explainkit.write_report(run, plugins=["gradcam"], model=model, device="cpu")
    assert page.is_file() and "gradcam" in page.read_text()
    other = torch.nn.Sequential(torch.nn.Linear(3, 2))
    failed = explainkit.analyze(
        run, plugins=["gradcam"], device="cpu", model=other, collect_failures=True
    )
    assert failed[0]["status"] == "failed" and "does not fit the weights" in failed[0]["error"]


def test_a_one_channel_hf_model_explains_grayscale_files_through_the_cli(tmp_path):
    """Grayscale end to end: gray PNGs, a 1-channel ConvNeXt saved with save_pretrained,
    `explainkit evaluate` on the CLI, then Grad-CAM from the rebuilt model."""
    transformers = pytest.importorskip("transformers")
    config = transformers.ConvNextConfig(
        num_channels=1, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, image_size=32,
        num_labels=2,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.ConvNextForImageClassification(config).save_pretrained(tmp_path / "gray-cnn")
    for cls in ("0", "1"):
        for i in range(2):
            path = tmp_path / "digits" / cls / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((28, 28), 100 * i + 30, np.uint8), "L").save(path)
    out = tmp_path / "run"
    result = run_cli(
        "evaluate", "--model", f"hf:{tmp_path / 'gray-cnn'}", "--dataset", "folder",
        "--data-dir", str(tmp_path / "digits"), "--device", "cpu", "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    spec = json.loads((out / "config.json").read_text())["model"]
    assert spec["input_channels"] == 1 and spec["default_layer"].endswith("stages.1")
    manifests = explainkit.analyze(out, plugins=["gradcam"], device="cpu")
    assert manifests[0]["status"] == "ok"
