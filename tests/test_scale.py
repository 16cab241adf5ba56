"""ImageNet-sized label sets (issue 26.3): 1,000 and 21,000 classes stay bounded.

Real runs written by ``explainkit.evaluate`` (a width-8 ResNet with a 1,000- or
21,000-way head on small random images), analyzed by the real CLI or the Python API. Memory
is measured, not timed: the peak RSS of the CLI process over the same analyzers on a
10-class run, and tracemalloc's peak (numpy's allocations) for the 21,000-class gallery.
Figures are checked for their pixel size and smallest font, the report for its size.
"""

from __future__ import annotations

import csv
import json
import re
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

import explainkit
from explainkit.figures import MAX_SIDE_PX, MIN_FONT_PT, figure_facts
from tests.helpers import build_model, run_cli, run_cli_peak

ANALYZERS = ("losses", "gallery", "data", "model")


def evaluated_run(out: Path, num_classes: int, num_images: int, size: int = 16) -> Path:
    """A run of an untrained model over random images, every class present when there are
    enough images."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (num_images, size, size, 3), dtype=np.uint8)
    targets = np.arange(num_images) % num_classes
    model = build_model("resnet18-s8", num_classes=num_classes, width=8)
    return explainkit.evaluate(
        model, (images, targets), out=out, classes=[f"class {i}" for i in range(num_classes)],
        arch="resnet18-s8", kwargs={"width": 8}, device="cpu",
    )  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[int, Path]:
    root = tmp_path_factory.mktemp("scale")
    return {k: evaluated_run(root / f"k{k}", k, 2 * k) for k in (10, 1000)}


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def check_figures(run: Path) -> list[str]:
    """Every PNG of the run's analyses within the size cap and no text below the minimum."""
    names = []
    for png in sorted((run / "analyses").rglob("*.png")):
        facts = figure_facts(png)
        assert facts["width"] <= MAX_SIDE_PX and facts["height"] <= MAX_SIDE_PX, (png, facts)
        assert facts["min_font_pt"] >= MIN_FONT_PT, (png, facts)
        names.append(f"{png.parent.name}/{png.name}")
    return names


def expected_pairs(run: Path) -> dict[tuple[int, int], int]:
    """The off-diagonal cells counted from the store, one image at a time."""
    from explainkit.store import open_store

    with open_store(run / "predictions.h5") as store:
        targets, preds = store.targets, store.logits(1).argmax(1)
    pairs: dict[tuple[int, int], int] = {}
    for t, p in zip(targets.tolist(), preds.tolist(), strict=True):
        if t != p:
            pairs[(t, p)] = pairs.get((t, p), 0) + 1
    return pairs


def test_thousand_classes_cli_memory_figures_and_report_are_bounded(runs):
    peaks = {}
    for k, run in runs.items():
        args = ["analyze", str(run), "--device", "cpu"]
        for name in ANALYZERS:
            args += ["--plugin", name]
        result, peaks[k] = run_cli_peak(*args)
        assert result.returncode == 0, result.stderr
    # The same analyzers on 100x the classes: a few tens of MB more, not gigabytes (a dense
    # 1,000-class confusion figure alone drew 52,600 x 23,600 px before).
    assert peaks[1000] - peaks[10] < 250e6, peaks
    big = runs[1000]
    shown = check_figures(big)
    assert "gallery/top_confusions.png" in shown and "gallery/worst_classes.png" in shown
    assert "gallery/confusion_matrix.png" not in shown  # 1,000 classes cannot be named
    gallery = big / "analyses" / "gallery"
    assert not (gallery / "confusion_matrix.csv").exists()  # 10^6 cells: the pairs instead
    pairs = read_csv(gallery / "confusion_pairs.csv")
    got = {(int(r["true_id"]), int(r["predicted_id"])): int(r["count"]) for r in pairs}
    assert got == expected_pairs(big)
    counts = [int(r["count"]) for r in pairs]
    assert counts == sorted(counts, reverse=True)
    accuracy = read_csv(gallery / "per_class_accuracy.csv")
    assert len(accuracy) == 1000
    values = [float(r["accuracy"]) for r in accuracy]
    assert values == sorted(values)  # the worst first
    result = run_cli("report", str(big))
    assert result.returncode == 0, result.stderr
    page = (big / "report.html").read_text()
    assert len(page) < 2_000_000, len(page)
    assert "Largest confusions" in page and "Worst classes" in page
    assert "first 50 of 1000 rows shown" in page  # tables are cut, the CSV holds the rest
    assert "config.json lists them all" in page  # not 1,000 class names in the facts


def test_thousand_classes_data_grid_samples_classes(runs):
    run = runs[1000]
    manifest = json.loads((run / "analyses" / "data" / "manifest.json").read_text())
    samples = next(a for a in manifest["artifacts"] if a["path"] == "samples.png")
    assert "24 of the 1000 classes" in samples["caption"]
    facts = figure_facts(run / "analyses" / "data" / "samples.png")
    assert facts["height"] < 2500  # 24 rows, not 1,000 (68,038 px before)


def test_21000_classes_gallery_bounded_in_memory(tmp_path):
    run = evaluated_run(tmp_path / "k21000", 21_000, 600, size=8)
    tracemalloc.start()
    try:
        (manifest,) = explainkit.analyze(run, plugins=["gallery"], device="cpu")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert manifest["status"] == "ok", manifest["error"]
    # The logits are 600 x 21,000 float32 (50 MB); anything K x K would be 3.5 GB (int64).
    assert peak < 300e6, peak
    shown = check_figures(run)
    assert shown == ["gallery/gallery.png", "gallery/top_confusions.png",
                     "gallery/worst_classes.png"]  # fmt: skip
    pairs = read_csv(run / "analyses" / "gallery" / "confusion_pairs.csv")
    got = {(int(r["true_id"]), int(r["predicted_id"])): int(r["count"]) for r in pairs}
    assert got == expected_pairs(run)
    rows = read_csv(run / "analyses" / "gallery" / "per_class_accuracy.csv")
    assert len(rows) == 21_000 and rows[-1]["accuracy"] == ""  # empty classes last


def test_imagenet_ids_become_names_offline():
    from explainkit.classnames import imagenet_classes, readable_classes

    names = imagenet_classes()
    assert len(names) == 1000 and names[0] == "tench" and names[713] == "photocopier"
    assert readable_classes([f"{i:03d}" for i in range(1000)]) == names
    assert readable_classes([str(i) for i in range(1000)])[713] == "photocopier"
    wnids = ["n01440764", *(f"n0{i:07d}" for i in range(2_000_000, 2_000_998)), "n15075141"]
    assert readable_classes(wnids)[0] == "tench"
    for own in (
        [f"class {i}" for i in range(1000)],  # names of their own
        [str(i) for i in range(999)],  # not ImageNet-1k's 1,000
        sorted(str(i) for i in range(1000)),  # "0", "1", "10": not the output order
    ):
        assert readable_classes(own) == own


def test_evaluate_records_imagenet_names_for_id_folders(tmp_path):
    """A dataset whose classes are ImageNet-1k ids (as an ImageFolder of 000/ ... 999/ reads)
    is recorded with the category names, so the gallery says "photocopier", not "713"."""
    from explainkit import Dataset

    rng = np.random.default_rng(0)
    n = 8
    ds = Dataset(
        images=rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8),
        targets=np.array([713] * n),
        classes=[f"{i:03d}" for i in range(1000)],
        index=np.arange(n),
    )
    model = build_model("resnet18-s8", num_classes=1000, width=8)
    run = explainkit.evaluate(model, ds, out=tmp_path / "run", arch="resnet18-s8",
                              kwargs={"width": 8}, device="cpu")  # fmt: skip
    assert ds.classes[713] == "713"  # the caller's dataset is left as it was
    recorded = json.loads((run / "config.json").read_text())["data"]["classes"]
    assert recorded[713] == "photocopier" and recorded[0] == "tench"
    (manifest,) = explainkit.analyze(run, plugins=["gallery"], device="cpu")
    assert manifest["status"] == "ok", manifest["error"]
    items = json.loads((run / "analyses" / "gallery" / "gallery.json").read_text())["items"]
    assert items and all(item["true"] == "photocopier" for item in items)


def test_unknown_class_name_among_1000_is_one_short_sentence(runs):
    (manifest,) = explainkit.analyze(
        runs[1000], plugins=["gallery"], device="cpu", collect_failures=True,
        gallery_class_name="clas 713",
    )  # fmt: skip
    assert manifest["status"] == "failed"
    assert "did you mean 'class 713'" in manifest["error"]
    assert len(manifest["error"]) < 600 and "per_class_accuracy.csv" in manifest["error"]


def test_figures_are_capped_whatever_is_drawn(tmp_path):
    from explainkit import figures

    wide = figures.new_figure(200, 3)  # 20,000 px wide, as a figure of every class would be
    wide.add_subplot().set_title("a title", fontsize=10)
    facts = figure_facts(figures.save_figure(wide, tmp_path / "wide.png"))
    assert facts["width"] <= MAX_SIDE_PX and facts["height"] <= MAX_SIDE_PX
    assert facts["min_font_pt"] < MIN_FONT_PT  # shrunk to fit, and the file says so
    tiles = np.zeros((400, 224, 224, 3), np.uint8)  # the gallery's most: 400 images, 10 a row
    grid = figures.grid_figure(tiles, cols=10, captions=["a → b\n(99.0%)"] * 400)
    facts = figure_facts(figures.save_figure(grid, tmp_path / "grid.png"))
    assert facts["height"] <= MAX_SIDE_PX and facts["min_font_pt"] >= MIN_FONT_PT


def test_an_unknown_target_class_among_21000_is_one_short_sentence():
    from explainkit.errors import AnalyzerError
    from explainkit.selection import parse_target

    classes = [f"n{i:08d}" for i in range(21_000)]
    assert parse_target("n00000042", classes, "--gradcam-target") == 42
    with pytest.raises(AnalyzerError) as info:
        parse_target("n0000042x", classes, "--gradcam-target")
    message = str(info.value)
    assert re.search(r"did you mean 'n\d{8}'\?", message)
    assert message.endswith("… (21000 classes)") and len(message) < 600
