"""A practitioner's own data (issue 26 items 1, 2, 6, 9; issue 25 class 5): flat folders, a
val-only tree, the model's expected input, whole images (--fit), grayscale, seeded
class-balanced limits, and class folders whose names read alike in two encodings."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from explainkit.data import load_dataset
from explainkit.data.fit import balanced_subset, fit_images
from explainkit.errors import DataError
from tests.helpers import registries, run_cli


def _photo(path: Path, h: int, w: int, value: int = 0, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    shape = (h, w) if mode == "L" else (h, w, 3)
    Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(path)


# -- item 1: flat folders, val-only trees, one image per class ----------------------------


def test_evaluate_reads_every_image_of_a_flat_folder_of_one_image_per_class(tmp_path):
    for i in range(25):
        _photo(tmp_path / "photos" / f"class{i:02d}" / "only.jpg", 30, 40, i)
    held = load_dataset("folder", "eval", tmp_path / "photos", 16, registries=registries())
    every = load_dataset(
        "folder", "eval", tmp_path / "photos", 16, holdout=False, registries=registries()
    )
    assert len(held) == 2  # training's 10% hold-out
    assert len(every) == 25 and sorted(every.targets.tolist()) == list(range(25))
    assert "nothing is held out" in every.note


def test_a_tree_with_only_val_is_that_split_not_a_class_named_val(tmp_path):
    for cls in ("cat", "dog"):
        for i in range(3):
            _photo(tmp_path / "d" / "val" / cls / f"{i}.png", 12, 12, i)
    ds = load_dataset("folder", "eval", tmp_path / "d", 8, holdout=False, registries=registries())
    assert ds.classes == ["cat", "dog"] and len(ds) == 6 and ds.note == str(tmp_path / "d" / "val")
    with pytest.raises(DataError, match="only val/"):
        load_dataset("folder", "train", tmp_path / "d", 8, registries=registries())


# -- issue 25 class 5: folder names that collide under decoding -----------------------------


def _at(root: bytes, *parts: bytes) -> Path:
    return Path(os.fsdecode(os.path.join(root, *parts)))


def test_class_folders_that_read_alike_in_utf8_and_latin1_stay_two_classes(tmp_path):
    root = os.fsencode(tmp_path / "data")
    for folder in ("café".encode(), b"caf\xe9"):  # UTF-8 'café' and Latin-1 'café'
        for i in range(9):
            _photo(_at(root, folder, b"%d.png" % i), 8, 8, i)
    ds = load_dataset(
        "folder", "eval", tmp_path / "data", 8, holdout=False, registries=registries()
    )
    assert ds.classes == ["café", "café (Latin-1)"] and len(ds) == 18
    assert np.bincount(ds.targets).tolist() == [9, 9]
    # The name does not depend on what else a folder holds: val/ with only the Latin-1 one.
    for i in range(2):
        _photo(_at(root, b"tree", b"train", b"caf\xe9", b"%d.png" % i), 8, 8, i)
        _photo(_at(root, b"tree", b"train", "café".encode(), b"%d.png" % i), 8, 8, i)
    _photo(_at(root, b"tree", b"val", b"caf\xe9", b"0.png"), 8, 8)
    val = load_dataset("folder", "eval", tmp_path / "data" / "tree", 8, registries=registries())
    assert val.classes == ["café", "café (Latin-1)"] and val.targets.tolist() == [1]


def test_two_folders_with_one_readable_name_are_refused_not_merged(tmp_path):
    from explainkit.data.folder import scan

    root = tmp_path / "data"
    for name in ("café (Latin-1)",):
        _photo(root / name / "0.png", 8, 8)
    _photo(_at(os.fsencode(root), b"caf\xe9", b"0.png"), 8, 8)
    with pytest.raises(DataError, match="rename one"):
        scan(root)


# -- item 9: seeded class-balanced limits ----------------------------------------------------


@pytest.fixture(scope="module")
def class_ordered(tmp_path_factory):
    """A CIFAR-10-jpeg-like ImageFolder slice: 10 classes of 6 images in class order."""
    root = tmp_path_factory.mktemp("cifar-jpeg")
    src = Path("/work/shared/data/cifar10-jpeg/train")
    classes = sorted(p.name for p in src.iterdir())[:10] if src.is_dir() else []
    for c in range(10):
        name = classes[c] if len(classes) == 10 else f"class{c}"
        files = sorted((src / name).iterdir())[:6] if classes else []
        for i in range(6):
            target = root / "train" / name / f"{i}.jpg"
            if files:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(files[i].read_bytes())
            else:
                _photo(target, 32, 32, 10 * c + i)
            (root / "val" / name).mkdir(parents=True, exist_ok=True)
            (root / "val" / name / f"{i}.jpg").write_bytes(target.read_bytes())
    return root


def test_a_limit_keeps_a_seeded_class_balanced_subset(class_ordered):
    load = lambda seed, limit: load_dataset(  # noqa: E731
        "folder", "train", class_ordered, 8, seed, limit, registries=registries()
    )
    a, b, c = load(0, 20), load(0, 20), load(1, 20)
    assert np.bincount(a.targets, minlength=10).tolist() == [2] * 10  # every class, not one
    assert a.paths == b.paths and a.paths != c.paths  # the same for the same seed
    assert a.subset.startswith("a seeded class-balanced subset: 20 of 60 images")
    odd = load(0, 13)
    assert sorted(np.bincount(odd.targets, minlength=10).tolist()) == [1] * 7 + [2] * 3
    assert load(0, None).subset == ""


def test_balanced_subset_gives_what_small_classes_cannot_to_the_others():
    targets = np.asarray([0] * 2 + [1] * 50 + [2] * 50)
    rows = balanced_subset(targets, 30, seed=4)
    assert np.bincount(targets[rows]).tolist() == [2, 14, 14]
    assert rows.tolist() == sorted(rows.tolist()) == balanced_subset(targets, 30, 4).tolist()


def test_train_and_evaluate_record_which_subset_a_limit_kept(class_ordered, tmp_path):
    out = tmp_path / "run"
    trained = run_cli(
        "train", "--dataset", "folder", "--data-dir", str(class_ordered), "--image-size", "16",
        "--width", "8", "--epochs", "1", "--limit-train", "20", "--limit-eval", "10",
        "--device", "cpu", "--quiet", "--out", str(out),
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr
    data = json.loads((out / "config.json").read_text())["data"]
    assert data["train_subset"].startswith("a seeded class-balanced subset: 20 of 60")
    assert data["eval_subset"].startswith("a seeded class-balanced subset: 10 of 60")
    evaluated = run_cli(
        "evaluate", "--model", "resnet18-s8", "--weights", str(out / "checkpoints" / "best.pt"),
        "--dataset", "folder", "--data-dir", str(class_ordered), "--width", "8",
        "--limit-eval", "10", "--fit", "pad", "--device", "cpu", "--out", str(tmp_path / "e"),
    )  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr
    assert "read 10 images of 10 classes" in evaluated.stderr
    assert "class-balanced subset: 10 of 60" in evaluated.stderr
    # The size the checkpoint's run used (16), not resnet18-s8's usual 32; the whole image.
    assert "input: 16 x 16 px (what checkpoint " in evaluated.stderr
    assert "was run at): the whole image" in evaluated.stderr
    config = json.loads((tmp_path / "e" / "config.json").read_text())["config"]
    assert config["fit"] == "pad" and config["image_size"] == 16


# -- item 2: the model's expected input ------------------------------------------------------


def test_evaluate_uses_the_models_expected_input_and_says_so(tmp_path):
    import torchvision

    for i in range(3):
        _photo(tmp_path / "photos" / f"c{i}" / "a.jpg", 300, 200, i)
    model = torchvision.models.get_model("resnet18", num_classes=3)
    torch.save(model.state_dict(), tmp_path / "r18.pt")
    result = run_cli(
        "evaluate", "--model", "torchvision:resnet18", "--weights", str(tmp_path / "r18.pt"),
        "--dataset", "folder", "--data-dir", str(tmp_path / "photos"), "--device", "cpu",
        "--out", str(tmp_path / "run"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "read 3 images of 3 classes: every image of" in result.stderr
    assert (
        "input: 224 x 224 px (what torchvision:resnet18 expects): shorter side resized to 256 "
        "px, centre 224 px cropped" in result.stderr
    )
    assert "mean (0.485, 0.456, 0.406)" in result.stderr
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["config"]["image_size"] == 224 and config["config"]["resize_size"] == 256
    assert config["model"]["input_shape"] == [3, 224, 224]
    assert config["data"]["mean"] == [0.485, 0.456, 0.406]


def test_model_input_comes_from_the_registry_entry_and_torchvision_metadata():
    from explainkit.eval_data import model_input

    r = registries()
    assert model_input(r.model_entry("torchvision:resnet50"), None)[:2] == (224, 232)  # V2
    assert model_input(r.model_entry("torchvision:inception_v3"), None)[:2] == (299, 342)
    assert model_input(r.model_entry("resnet18-s8"), None)[:2] == (32, None)
    assert model_input(r.model_entry("torchvision:resnet50"), 64)[:2] == (64, None)


# -- item 6: whole images and grayscale ------------------------------------------------------


def test_fit_pad_keeps_the_whole_image_and_stretch_distorts_it():
    tall = np.zeros((1, 40, 20, 3), np.uint8)
    tall[:, :5] = 255  # a white band at the very top, which a centre crop loses
    crop, pad, stretch = (fit_images(tall, 20, fit=f) for f in ("crop", "pad", "stretch"))
    assert crop[0, :, :, 0].max() == 0
    assert pad[0, :2, 5:15, 0].min() > 200 and pad[0, :, :4].max() == 0  # black sides
    assert stretch[0, :2, :, 0].min() > 200 and stretch.shape == (1, 20, 20, 3)


class GrayNet(torch.nn.Module):
    """A one-channel classifier, as MNIST-style models are."""

    def __init__(self, num_classes: int = 2) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU())
        self.head = torch.nn.Linear(4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


def test_grayscale_arrays_and_a_one_channel_model_end_to_end(tmp_path):
    import explainkit

    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (6, 12, 12, 1), dtype=np.uint8)
    model = GrayNet().eval()
    run = explainkit.evaluate(
        model, (images, [0, 1] * 3), tmp_path / "g", classes=["a", "b"], mean=(0.5,), std=(0.25,),
        device="cpu",
    )  # fmt: skip
    config = json.loads((run / "config.json").read_text())
    assert config["data"]["mean"] == [0.5] * 3 and config["model"]["input_channels"] == 1
    assert (
        "read 6 images of 2 classes: the (images, targets) arrays given"
        in (run / "train.log").read_text()
    )
    with explainkit.open_store(run / "predictions.h5") as store:
        logits = store.logits(1)
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.25
    with torch.no_grad():
        assert np.allclose(logits, GrayNet.forward(model, x).numpy(), atol=1e-5)
    manifests = explainkit.analyze(run, plugins=["gradcam"], device="cpu", model=model)
    assert manifests[0]["status"] == "ok"


def test_grayscale_files_are_read(tmp_path):
    for i in range(2):
        _photo(tmp_path / "g" / "digit" / f"{i}.png", 20, 10, i, mode="L")
    ds = load_dataset("folder", "eval", tmp_path / "g", 8, holdout=False, registries=registries())
    assert ds.images.shape == (2, 8, 8, 3)
    assert np.array_equal(ds.images[..., 0], ds.images[..., 2])


def test_class_folders_named_in_every_encoding_never_merge(tmp_path):
    """Words written in several encodings (the suite makes its own names): every distinct
    folder is its own class with its own images, or the folder is refused; never merged."""
    words = ["café", "naïve", "Ærø", "über", "日本", "plain"]
    encodings = ["utf-8", "latin-1", "cp1252", "shift_jis", "cp437", "koi8-r"]
    names = set()
    for word in words:
        for encoding in encodings:
            try:
                names.add(word.encode(encoding))
            except UnicodeEncodeError:
                continue
    names.add("café (Latin-1)".encode())  # what the Latin-1 'café' reads as: refused below
    root = os.fsencode(tmp_path / "data")
    ordered = sorted(names)
    for n, name in enumerate(ordered):
        for i in range(n % 3 + 1):
            _photo(_at(root, name, b"%d.png" % i), 4, 4, i)
    with pytest.raises(DataError, match="rename one"):
        load_dataset("folder", "eval", tmp_path / "data", 8, holdout=False, registries=registries())
    os.makedirs(_at(root, b"x"))
    os.rename(_at(root, "café (Latin-1)".encode()), _at(root, b"x", b"y"))
    ordered.remove("café (Latin-1)".encode())
    ds = load_dataset(
        "folder", "eval", tmp_path / "data", 8, holdout=False, registries=registries()
    )
    assert len(ds.classes) == len(ordered) + 1 == len(set(ds.classes))  # + the folder x
    counts = np.bincount(ds.targets, minlength=len(ds.classes))
    by_name = dict(zip(ds.classes, counts.tolist(), strict=True))
    from explainkit.data.folder import class_name

    for n, name in enumerate(sorted(names)):
        if name in ordered:
            assert by_name[class_name(os.fsdecode(name))] == n % 3 + 1
