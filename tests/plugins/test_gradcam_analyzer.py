"""The ``gradcam`` analyzer: whole-eval-set maps in HDF5, targets, layers, errors, the figure."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from explainkit import hookimpl, load_model
from explainkit.explain.gradcam import normalize_maps
from explainkit.manager import build_registries, load_plugins
from explainkit.runner import analyze
from explainkit.store import open_store
from tests.helpers import run_cli


def run_gradcam(run: Path, **options) -> dict:
    (manifest,) = analyze(
        run, plugins=["gradcam"], device="cpu", batch_size=24, collect_failures=True, **options
    )
    return manifest


def read_h5(run: Path) -> tuple[dict, dict]:
    with h5py.File(run / "analyses" / "gradcam" / "attributions.h5", "r") as f:
        data = {name: f[name][:] for name in f}
        attrs = dict(f.attrs)
        for name in f:  # stored as the DESIGN asks: chunked, compressed, checksummed
            assert f[name].chunks is not None and f[name].compression == "gzip"
            assert f[name].fletcher32
    return data, attrs


def _verify_maps(maps: np.ndarray, n: int) -> None:
    assert maps.shape == (n, 32, 32)
    assert np.isfinite(maps).all()
    assert maps.min() >= 0 and maps.max() <= 1


def check_png(path: Path) -> None:
    from PIL import Image

    with Image.open(path) as img:
        assert img.format == "PNG" and min(img.size) >= 100


def captum_maps(run: Path, epoch: int, layer: str, index: np.ndarray, targets: np.ndarray):
    """Captum's LayerGradCam on stored images: (raw, upsampled and normalized)."""
    captum_attr = pytest.importorskip("captum.attr")
    model = load_model(run, epoch=epoch, device="cpu")
    with open_store(run) as store:
        images, mean, std = store.images(index), store.mean, store.std
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    module = dict(model.named_modules())[layer]
    raw = captum_attr.LayerGradCam(model, module).attribute(
        x, target=torch.from_numpy(targets), relu_attributions=True
    )
    up = captum_attr.LayerAttribution.interpolate(raw, (32, 32), "bilinear")
    return raw.detach()[:, 0].numpy(), normalize_maps(up.detach()[:, 0]).numpy()


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def test_analyzer_gradcam_maps_whole_eval_set_match_captum(tiny_run):
    manifest = run_gradcam(tiny_run)
    assert manifest["status"] == "ok", manifest["error"]
    data, attrs = read_h5(tiny_run)
    with open_store(tiny_run) as store:
        n, epoch = store.num_images, store.best_epoch
    assert manifest["epoch"] == epoch == attrs["epoch"]
    assert attrs["layer"] == "layer4" and attrs["method"] == "gradcam"
    _verify_maps(data["maps"], n)
    assert data["maps"].dtype == np.float16 and data["raw"].dtype == np.float32
    assert data["raw"].shape[0] == n and np.isfinite(data["raw"]).all()
    assert (data["raw"] >= 0).all() and data["raw"].max() > 0
    np.testing.assert_array_equal(data["targets"], data["predicted"])  # default: predicted

    some = np.array([0, 5, 23, 24, n - 1])  # across the batches of 24
    raw, maps = captum_maps(tiny_run, epoch, "layer4", some, data["targets"][some])
    assert _rel(data["raw"][some], raw) <= 1e-5
    # float16 storage: about 3 significant digits of a value in [0, 1].
    np.testing.assert_allclose(data["maps"][some].astype(np.float32), maps, atol=1e-3)

    summary = json.loads((tiny_run / "analyses" / "gradcam" / "gradcam.json").read_text())
    assert summary["num_images"] == n and len(summary["shown"]) == min(10, n)
    shown = summary["shown"]
    assert [s["correct"] for s in shown] == sorted(s["correct"] for s in shown)  # wrong first
    check_png(tiny_run / "analyses" / "gradcam" / "gradcam.png")
    assert {a["path"] for a in manifest["artifacts"]} == {
        "gradcam.png",
        "shown.csv",
        "attributions.h5",
        "gradcam.json",
    }


def test_analyzer_gradcam_target_true_class_and_float32(tiny_run):
    assert run_gradcam(tiny_run, gradcam_target="true", gradcam_dtype="float32")["status"] == "ok"
    data, attrs = read_h5(tiny_run)
    with open_store(tiny_run) as store:
        labels, classes, epoch = store.targets, store.classes, store.best_epoch
    np.testing.assert_array_equal(data["targets"], labels)
    assert data["maps"].dtype == np.float32 and attrs["target"] == "true"
    _verify_maps(data["maps"], len(labels))
    some = np.arange(6)
    raw, maps = captum_maps(tiny_run, epoch, "layer4", some, labels[some])
    assert _rel(data["raw"][some], raw) <= 1e-5
    assert _rel(data["maps"][some], maps) <= 1e-5

    for target, expected in ((classes[2], 2), ("1", 1)):
        assert run_gradcam(tiny_run, gradcam_target=target)["status"] == "ok"
        assert (read_h5(tiny_run)[0]["targets"] == expected).all()

    bad = run_gradcam(tiny_run, gradcam_target="zebra")
    assert bad["status"] == "failed"
    assert "zebra" in bad["error"] and all(c in bad["error"] for c in classes)


@pytest.mark.parametrize("method", ["gradcampp", "xgradcam", "layercam", "hirescam", "eigencam"])
def test_analyzer_gradcam_other_methods(tiny_run, method):
    manifest = run_gradcam(tiny_run, gradcam_method=method, gradcam_count=2)
    assert manifest["status"] == "ok", manifest["error"]
    data, attrs = read_h5(tiny_run)
    assert attrs["method"] == method
    _verify_maps(data["maps"], len(data["targets"]))


def test_analyzer_gradcam_cli_probability_target_and_new_method(tiny_run):
    """--gradcam-target probability:predicted explains the softmax, not the logit."""
    maps = {}
    for target in ("predicted", "probability:predicted"):
        result = run_cli(
            "analyze", str(tiny_run), "--plugin", "gradcam", "--device", "cpu",
            "--gradcam-method", "shapleycam", "--gradcam-target", target, "--gradcam-count", "2",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        data, attrs = read_h5(tiny_run)
        assert attrs["method"] == "shapleycam" and attrs["target"] == target
        np.testing.assert_array_equal(data["targets"], data["predicted"])
        _verify_maps(data["maps"], len(data["targets"]))
        maps[target] = data["maps"].astype(np.float32)
    assert maps["predicted"].max() == 1.0  # real maps, not zeros agreeing with zeros
    assert np.abs(maps["predicted"] - maps["probability:predicted"]).max() > 0.05
    bad = run_cli(
        "analyze", str(tiny_run), "--plugin", "gradcam", "--device", "cpu",
        "--gradcam-target", "probability:zebra",
    )  # fmt: skip
    assert bad.returncode == 1 and "Traceback" not in bad.stderr and "zebra" in bad.stderr


def test_analyzer_gradcam_select_misclassified(tiny_run):
    manifest = run_gradcam(tiny_run, gradcam_select="misclassified", gradcam_count=4)
    assert manifest["status"] == "ok", manifest["error"]
    summary = json.loads((tiny_run / "analyses" / "gradcam" / "gradcam.json").read_text())
    assert len(summary["shown"]) == min(4, summary["num_misclassified"])
    assert not any(s["correct"] for s in summary["shown"])

    bad = run_gradcam(tiny_run, gradcam_colormap="rainbowz")
    assert bad["status"] == "failed" and "rainbowz" in bad["error"]


def test_analyzer_gradcam_layer_from_resolve_target_layer_hook(tiny_run):
    with h5py.File(tiny_run / "predictions.h5", "r+") as f:
        f.attrs["default_layer"] = ""  # no run metadata: the hook decides

    class Plugin:
        @hookimpl
        def resolve_target_layer(self, model, analyzer_name):
            return "layer3" if analyzer_name == "gradcam" else None

    pm = load_plugins()
    pm.register(Plugin(), name="undo-gradcam-layer")
    try:
        manifest = run_gradcam(tiny_run, gradcam_count=1)
    finally:
        pm.unregister(name="undo-gradcam-layer")
    assert manifest["status"] == "ok", manifest["error"]
    assert read_h5(tiny_run)[1]["layer"] == "layer3"


def test_analyzer_gradcam_cli_layer(cifar_run):
    result = run_cli(
        "analyze", str(cifar_run), "--plugin", "gradcam", "--device", "cpu",
        "--gradcam-layer", "layer3.1", "--gradcam-count", "4",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    data, attrs = read_h5(cifar_run)
    assert attrs["layer"] == "layer3.1"
    _verify_maps(data["maps"], 128)
    np.testing.assert_array_equal(data["targets"], data["predicted"])
    check_png(cifar_run / "analyses" / "gradcam" / "gradcam.png")


def test_analyzer_gradcam_wrong_layer_exits_1_listing_layers(tiny_run):
    result = run_cli(
        "analyze", str(tiny_run), "--plugin", "gradcam", "--device", "cpu",
        "--gradcam-layer", "layer9",
    )  # fmt: skip
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    (line,) = [ln for ln in result.stderr.splitlines() if ln.startswith("failed")]
    assert "layer9" in line and "layer4" in line and "layer3.1" in line
    manifest = json.loads((tiny_run / "analyses" / "gradcam" / "manifest.json").read_text())
    assert manifest["status"] == "failed" and manifest["error"].count(". ") == 0


def test_analyzer_gradcam_asks_the_plugin_manager_it_runs_under(tiny_run):
    """analyze(pm=...) from a notebook: that manager's resolve_target_layer is the one asked."""
    from explainkit.manager import get_plugin_manager
    from explainkit.runner import analyze

    with h5py.File(tiny_run / "predictions.h5", "r+") as f:
        f.attrs["default_layer"] = ""

    class Plugin:
        @hookimpl
        def resolve_target_layer(self, model, analyzer_name):
            return "layer2.1"

    pm = get_plugin_manager(entrypoints=False)
    pm.register(Plugin(), name="undo-own-manager")
    (manifest,) = analyze(
        tiny_run,
        plugins=["gradcam"],
        registries=build_registries(pm),
        device="cpu",
        gradcam_count=1,
    )
    assert manifest["status"] == "ok", manifest["error"]
    assert read_h5(tiny_run)[1]["layer"] == "layer2.1"


def test_gradcam_gallery_and_confusion_agree_on_every_image(tiny_run):
    """'predicted' is the run's recorded prediction (EMA + flip TTA here) in every analyzer."""
    from explainkit.store import open_store

    manifests = analyze(tiny_run, plugins=["gradcam", "gallery"], device="cpu", gradcam_count=12)
    assert all(m["status"] == "ok" for m in manifests), [m["error"] for m in manifests]
    with open_store(tiny_run) as store:
        epoch = manifests[0]["epoch"]
        recorded, labels, classes = store.predictions(epoch), store.targets, store.classes
    data, _ = read_h5(tiny_run)
    np.testing.assert_array_equal(data["predicted"], recorded)
    np.testing.assert_array_equal(data["targets"], recorded)  # maps explain that class
    out = tiny_run / "analyses"
    shown = json.loads((out / "gradcam" / "gradcam.json").read_text())["shown"]
    for item in shown:
        assert item["predicted"] == classes[recorded[item["index"]]]
        assert item["correct"] == (recorded[item["index"]] == labels[item["index"]])
    gallery = json.loads((out / "gallery" / "gallery.json").read_text())
    assert gallery["num_mistakes"] == int((recorded != labels).sum())
    for item in gallery["items"]:
        assert item["predicted_id"] == recorded[item["index"]]
    header, *rows = (out / "gallery" / "confusion_matrix.csv").read_text().splitlines()
    counts = np.array([[int(v) for v in row.split(",")[1:]] for row in rows])
    expected = np.zeros_like(counts)
    np.add.at(expected, (labels, recorded), 1)
    np.testing.assert_array_equal(counts, expected)
    summary = json.loads((out / "gradcam" / "gradcam.json").read_text())
    alone = data["model_predicted"]
    assert summary["num_model_disagrees"] == int((alone != recorded).sum())


def test_gradcam_and_gallery_tables_name_the_users_own_files(tmp_path):
    """A folder dataset: the tables give each shown image's file, not a position."""
    import csv

    from PIL import Image

    from tests.helpers import run_cli

    rng = np.random.default_rng(0)
    for cls in ("cats", "dogs"):
        (tmp_path / "data" / cls).mkdir(parents=True)
        for i in range(16):
            pixels = rng.integers(0, 255, (20 + i, 24, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "data" / cls / f"{cls} photo {i}.png")
    run = tmp_path / "run"
    trained = run_cli(
        "train", "--dataset", "folder", "--data-dir", str(tmp_path / "data"), "--width", "8",
        "--epochs", "1", "--device", "cpu", "--quiet", "--out", str(run),
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr
    result = run_cli("analyze", str(run), "--plugin", "gradcam", "--plugin", "gallery",
                     "--gradcam-count", "4", "--device", "cpu")  # fmt: skip
    assert result.returncode == 0, result.stderr
    for table in ("gradcam/shown.csv", "gallery/gallery.csv"):
        with open(run / "analyses" / table, newline="") as f:
            rows = list(csv.DictReader(f))
        for row in rows:
            folder, name = row["source"].split("/")
            assert folder in ("cats", "dogs") and name.endswith(".png") and "photo" in name
            assert (tmp_path / "data" / row["source"]).is_file()
            assert row["true"] == folder


VIT_LAYER = "encoder.layers.encoder_layer_1.ln_1"


@pytest.fixture
def vit_run(tiny_run, monkeypatch):
    """The tiny run, its checkpoint standing for a small torchvision ViT (4x4 patch tokens).

    The model registry knows no transformer yet, so loading the checkpoint is replaced; the
    recorded predictions stay the ResNet's, which only changes what "predicted" explains.
    """
    import torchvision

    from explainkit.train import checkpoint

    with open_store(tiny_run) as store:
        num_classes = len(store.classes)
    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
        num_classes=num_classes,
    )  # fmt: skip
    torch.nn.init.normal_(vit.heads.head.weight, std=0.5)  # torchvision starts it at zero
    monkeypatch.setattr(checkpoint, "load_model", lambda *a, **k: vit.eval())
    return tiny_run


def test_analyzer_gradcam_explains_a_vit_token_layer(vit_run):
    manifest = run_gradcam(vit_run, gradcam_layer=VIT_LAYER, gradcam_count=4)
    assert manifest["status"] == "ok", manifest["error"]
    data, attrs = read_h5(vit_run)
    n = len(data["targets"])
    _verify_maps(data["maps"], n)
    assert data["raw"].shape == (n, 4, 4) and data["raw"].max() > 0
    assert attrs["reshape"] == "auto" and attrs["layout"] == "vit"
    summary = json.loads((vit_run / "analyses" / "gradcam" / "gradcam.json").read_text())
    assert summary["reshape"] == "vit: 1 leading token dropped, 4x4 grid of patch tokens"
    (h5,) = [a for a in manifest["artifacts"] if a["path"] == "attributions.h5"]
    assert "vit: 1 leading token dropped" in h5["caption"]

    assert run_gradcam(vit_run, gradcam_layer=VIT_LAYER, gradcam_reshape="vit")["status"] == "ok"
    bad = run_gradcam(vit_run, gradcam_layer=VIT_LAYER, gradcam_reshape="nchw")
    assert bad["status"] == "failed" and VIT_LAYER in bad["error"] and "'vit'" in bad["error"]
    assert bad["error"].count(". ") == 0


def test_analyzer_captum_skips_the_agreement_on_a_vit_token_layer(vit_run):
    pytest.importorskip("captum")
    (manifest,) = analyze(
        vit_run, plugins=["captum"], device="cpu", batch_size=16, collect_failures=True,
        captum_layer=VIT_LAYER, captum_count=4, captum_n_steps=4, captum_limit=16,
    )  # fmt: skip
    assert manifest["status"] == "ok", manifest["error"]
    out = vit_run / "analyses" / "captum"
    report = json.loads((out / "agreement.json").read_text())
    skip = "captum's LayerGradCam cannot compare a token layer; the agreement check is skipped"
    assert report["skipped"] == skip and report["agreement"] is None
    side = report["side_by_side"]
    assert side["methods"] == ["gradcam", "integrated_gradients", "saliency", "occlusion"]
    assert "guided_gradcam" in side["left_out"]
    rho = np.array(side["spearman"])
    assert rho.shape == (4, 4) and np.isfinite(rho).all()
    captions = {a["path"]: a["caption"] for a in manifest["artifacts"]}
    assert skip in captions["agreement.json"]
    assert "guided_gradcam" in captions["methods.png"]
    assert "agreement.csv" not in captions and not (out / "agreement.csv").exists()
    check_png(out / "methods.png")

    (alone,) = analyze(
        vit_run, plugins=["captum"], device="cpu", collect_failures=True,
        captum_layer=VIT_LAYER, captum_methods="guided_gradcam", captum_limit=16,
    )  # fmt: skip
    assert alone["status"] == "failed" and "--captum-methods" in alone["error"]
