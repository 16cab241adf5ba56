"""The ``captum`` analyzer: agreement with LayerGradCam, timing, methods and rank correlations."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from explainkit.explain.stats import average_ranks, mean_spearman_matrix
from explainkit.runner import analyze
from tests.helpers import run_cli

pytest.importorskip("captum")


def check_png(path: Path) -> None:
    from PIL import Image

    with Image.open(path) as img:
        assert img.format == "PNG" and min(img.size) >= 100


def read_table(path: Path) -> tuple[list[str], list[list[str]]]:
    with open(path) as f:
        header, *rows = list(csv.reader(f))
    return header, rows


def test_analyzer_captum_agrees_and_compares_methods(tiny_run):
    (manifest,) = analyze(
        tiny_run, plugins=["captum"], device="cpu", batch_size=16,
        captum_count=4, captum_n_steps=8, captum_map_images=5,
    )  # fmt: skip
    assert manifest["status"] == "ok", manifest["error"]
    out = tiny_run / "analyses" / "captum"
    report = json.loads((out / "agreement.json").read_text())
    assert report["num_images"] == 64 and report["layer"] == "layer4"
    for which in ("raw", "upsampled"):
        agreement = report["agreement"][which]
        assert agreement["rel_diff"] <= 1e-5, agreement
        assert agreement["pearson"] > 0.999, agreement
    for impl in ("native", "captum"):
        assert report["timing"][impl]["images"] == 64
        assert report["timing"][impl]["ms_per_image"] > 0

    methods = report["side_by_side"]["methods"]
    assert methods == ["gradcam", "integrated_gradients", "saliency", "guided_gradcam", "occlusion"]
    header, rows = read_table(out / "rank_correlation.csv")
    assert header == ["method", *methods, "ms_per_image"]
    assert [r[0] for r in rows] == methods
    rho = np.array([[float(v) for v in r[1:-1]] for r in rows])
    np.testing.assert_array_equal(rho, rho.T)
    np.testing.assert_array_equal(np.diag(rho), 1.0)
    assert np.isfinite(rho).all() and (np.abs(rho) <= 1).all()
    assert all(float(r[-1]) > 0 for r in rows)
    np.testing.assert_array_equal(np.array(report["side_by_side"]["spearman"]), rho)

    header, rows = read_table(out / "agreement.csv")
    assert header == ["maps", "max_abs_diff", "rel_diff", "pearson"]
    assert [r[0] for r in rows] == ["raw", "upsampled"]
    header, rows = read_table(out / "timing.csv")
    assert [r[0] for r in rows] == ["native", "captum"]
    check_png(out / "methods.png")
    check_png(out / "rank_correlation.png")
    check_map_files(tiny_run, out, methods, report["side_by_side"]["images"], manifest)


def check_map_files(run: Path, out: Path, methods: list[str], shown: list[int], manifest) -> None:
    """Each method's attributions-METHOD.h5, in the gradcam analyzer's form, for the first 5
    images and the figure's: rows in [0, 1] there, NaN maps and targets of -1 elsewhere."""
    import h5py

    from explainkit.explain.gradcam import compute_cam
    from explainkit.store import open_store
    from explainkit.train.checkpoint import load_model
    from tests.helpers import registries

    explained = sorted({*range(5), *shown})
    with open_store(run) as store:
        epoch = store.best_epoch
        recorded = store.predictions(epoch)
        images, mean, std, classes = (
            store.images(np.arange(5)),
            store.mean,
            store.std,
            store.classes,
        )
    assert epoch is not None
    listed = {a["path"] for a in manifest["artifacts"]}
    for name in methods:
        path = out / f"attributions-{name}.h5"
        assert path.name in listed
        with h5py.File(path, "r") as f:
            assert f.attrs["method"] == name and f.attrs["num_images"] == 64
            assert f.attrs["explained"] == len(explained) and f.attrs["target"] == "predicted"
            assert [str(c) for c in f.attrs["classes"]] == classes
            assert ("layer" in f.attrs) == (name in ("gradcam", "guided_gradcam"))
            maps, targets = f["maps"][:], f["targets"][:]
            assert maps.shape == (64, 32, 32) and f["index"][:].tolist() == explained
            np.testing.assert_array_equal(f["predicted"][:], recorded)
        done = np.zeros(64, bool)
        done[explained] = True
        assert np.isfinite(maps[done]).all() and maps[done].min() >= 0 and maps[done].max() <= 1
        assert np.isnan(maps[~done]).all() and (targets[~done] == -1).all()
        np.testing.assert_array_equal(targets[done], recorded[done])
        if name == "gradcam":  # the native engine's maps of the first images, computed here
            model = load_model(run, registries(), epoch, "cpu")
            x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
            x = (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
            want = compute_cam(model, x, "layer4", target=torch.from_numpy(recorded[:5]))
            np.testing.assert_allclose(maps[:5], want.maps.detach().numpy(), atol=1e-4)


def test_analyzer_captum_cli_methods_target_and_limit(cifar_run):
    result = run_cli(
        "analyze", str(cifar_run), "--plugin", "captum", "--device", "cpu",
        "--captum-methods", "saliency,gradcam,input_x_gradient", "--captum-limit", "40",
        "--captum-count", "3", "--captum-target", "true", "--captum-layer", "layer3.1",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads((cifar_run / "analyses" / "captum" / "agreement.json").read_text())
    assert report["num_images"] == 40 and report["layer"] == "layer3.1"
    assert report["agreement"]["upsampled"]["rel_diff"] <= 1e-5
    assert report["side_by_side"]["methods"] == ["saliency", "gradcam", "input_x_gradient"]
    assert len(report["side_by_side"]["images"]) == 3


def test_analyzer_captum_unknown_method_exits_1(tiny_run):
    result = run_cli(
        "analyze", str(tiny_run), "--plugin", "captum", "--device", "cpu",
        "--captum-methods", "saliency,lime",
    )  # fmt: skip
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "lime" in result.stderr and "integrated_gradients" in result.stderr


def test_analyzer_captum_spearman_ranks_ties_and_symmetry():
    np.testing.assert_array_equal(
        average_ranks(torch.tensor([[3.0, 1.0, 3.0, 2.0], [0.0, 0.0, 0.0, 5.0]])).numpy(),
        [[2.5, 0.0, 2.5, 1.0], [1.0, 1.0, 1.0, 3.0]],
    )
    rng = np.random.default_rng(0)
    a = rng.random((5, 6, 6))
    maps = np.stack([a, a**3, -a, rng.random((5, 6, 6)), np.zeros((5, 6, 6))])
    rho = mean_spearman_matrix(maps)
    np.testing.assert_array_equal(rho, rho.T)
    np.testing.assert_array_equal(np.diag(rho), 1.0)
    assert rho[0, 1] == pytest.approx(1.0)  # monotone transform: same ranks
    assert rho[0, 2] == pytest.approx(-1.0)
    assert abs(rho[0, 3]) < 0.5
    # A constant map ranks nothing: rho 0 with any map, as everywhere (explain/stats.py).
    assert rho[0, 4] == 0.0
    # Against the textbook formula for distinct values: 1 - 6 sum d^2 / (n (n^2 - 1)).
    x, y = rng.random(50), rng.random(50)
    rx, ry = average_ranks(torch.from_numpy(np.stack([x, y]))).numpy()
    d2 = ((rx - ry) ** 2).sum()
    expected = 1 - 6 * d2 / (50 * (50**2 - 1))
    assert mean_spearman_matrix(np.stack([x, y])[:, None])[0, 1] == pytest.approx(expected)
