"""Datasets: safe CIFAR-10 reading, synthetic shapes, ImageFolder trees, stats, augmentation."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tarfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest

from explainkit.data import (
    CIFAR10_MEAN,
    DATASETS,
    channel_stats,
    load_dataset,
)
from explainkit.errors import DataError
from tests.helpers import CIFAR_MINI, registries, run_cli

SAMPLE = CIFAR_MINI / "cifar-10-batches-py"


def _meta(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)


def _batch(folder: Path, name: str, obj: object) -> Path:
    with open(folder / name, "wb") as f:
        pickle.dump(obj, f)
    return folder / name


# --- cifar10 ---------------------------------------------------------------------------------


def test_cifar10_reads_shared_sample():
    train = load_dataset("cifar10", "train", SAMPLE.parent, download=False, registries=registries())
    test = load_dataset("cifar10", "eval", SAMPLE, download=False, registries=registries())
    assert train.images.shape == (4068, 32, 32, 3) and train.images.dtype == np.uint8
    assert test.images.shape == (1017, 32, 32, 3)
    assert train.targets.dtype == np.int64 and train.targets.shape == (4068,)
    assert 0 <= train.targets.min() and train.targets.max() <= 9
    assert train.classes[0] == "airplane" and len(train.classes) == 10
    assert np.array_equal(train.index, np.arange(4068))
    # A plain (trusting) pickle read, done only on this known-good file, must agree.
    with open(SAMPLE / "data_batch_1", "rb") as f:
        raw = pickle.load(f, encoding="latin1")
    row = raw["data"][0]
    assert np.array_equal(train.images[0, :, :, 0].ravel(), row[:1024])
    assert np.array_equal(train.images[0, :, :, 1].ravel(), row[1024:2048])
    assert np.array_equal(train.images[0, :, :, 2].ravel(), row[2048:])
    assert train.targets[0] == raw["labels"][0]
    assert (
        load_dataset(
            "cifar10", "eval", SAMPLE, download=False, limit=7, registries=registries()
        ).images.shape[0]
        == 7
    )


class _RunsCommand:
    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


class _OpensFile:
    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return (open, (str(self.sentinel), "w"))


@pytest.mark.parametrize("payload", [_RunsCommand, _OpensFile])
def test_cifar10_refuses_code_running_pickle(tmp_path, payload):
    folder = tmp_path / "cifar-10-batches-py"
    _meta(folder)
    sentinel = tmp_path / "pwned"
    _batch(folder, "data_batch_1", {"data": payload(sentinel), "labels": [0]})
    with pytest.raises(DataError, match="data_batch_1"):
        load_dataset("cifar10", "train", tmp_path, download=False, registries=registries())
    assert not sentinel.exists()


def test_cifar10_refuses_truncated_file(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    _meta(folder)
    data = (SAMPLE / "data_batch_1").read_bytes()
    (folder / "data_batch_1").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="data_batch_1"):
        load_dataset("cifar10", "train", folder, download=False, registries=registries())


@pytest.mark.parametrize(
    "obj",
    [
        {"labels": [1, 2]},
        {"data": np.zeros((2, 3072), np.float32), "labels": [1, 2]},
        {"data": np.zeros((2, 100), np.uint8), "labels": [1, 2]},
        {"data": np.zeros((2, 3072), np.uint8), "labels": [1]},
        {"data": np.zeros((2, 3072), np.uint8), "labels": [1, 10]},
        [1, 2, 3],
    ],
)
def test_cifar10_refuses_non_cifar_pickle(tmp_path, obj):
    folder = tmp_path / "cifar-10-batches-py"
    _meta(folder)
    _batch(folder, "test_batch", obj)
    with pytest.raises(DataError, match="test_batch"):
        load_dataset("cifar10", "eval", tmp_path, download=False, registries=registries())


def test_cifar10_accepts_valid_pickle_and_fine_labels(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    _meta(folder)
    data = np.arange(2 * 3072).astype(np.uint8).reshape(2, 3072)
    _batch(folder, "data_batch_1", {"data": data, "labels": [3, 4]})
    _batch(folder, "data_batch_2", {"data": data[:1], "fine_labels": np.array([9])})
    ds = load_dataset("cifar10", "train", tmp_path, download=False, registries=registries())
    assert ds.images.shape == (3, 32, 32, 3) and list(ds.targets) == [3, 4, 9]
    assert ds.classes == [f"c{i}" for i in range(10)]
    assert ds.images[0, 0, 1, 2] == data[0, 2048 + 1]


def test_cifar10_missing_without_download(tmp_path):
    with pytest.raises(DataError, match="--data-dir"):
        load_dataset("cifar10", "train", tmp_path, download=False, registries=registries())


def test_cifar10_download_failure_is_a_data_error(tmp_path, monkeypatch, capsys):
    import torchvision.datasets.utils as tv_utils

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", offline)
    with pytest.raises(DataError, match="--data-dir") as info:
        load_dataset("cifar10", "train", tmp_path, registries=registries())
    assert "cifar-10-batches-py" in str(info.value)
    assert "Downloading CIFAR-10" in capsys.readouterr().err

    def partial(url, download_root, **kwargs):  # dies half-way, as a dropped connection does
        Path(download_root).mkdir(parents=True, exist_ok=True)
        (Path(download_root) / "cifar-10-python.tar.gz").write_bytes(b"partial")
        (Path(download_root) / "cifar-10-batches-py").mkdir()
        raise urllib.error.URLError("connection reset")

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", partial)
    (tmp_path / "mine.txt").write_text("not ours")
    with pytest.raises(DataError, match="connection reset"):
        load_dataset("cifar10", "train", tmp_path / "new" / "data", registries=registries())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]  # nothing left behind


def test_cifar10_download_happy_path(tmp_path, monkeypatch, capsys):
    import torchvision.datasets.utils as tv_utils

    archive = tmp_path / "local.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(SAMPLE, arcname="cifar-10-batches-py")
    calls = []

    def fake(url, download_root, md5=None, **kwargs):
        calls.append((url, md5))
        with tarfile.open(archive) as tar:
            tar.extractall(download_root, filter="data")

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", fake)
    monkeypatch.setenv("EXPLAINKIT_DATA_DIR", str(tmp_path / "cache"))
    ds = load_dataset("cifar10", "eval", registries=registries())
    assert ds.images.shape == (1017, 32, 32, 3)
    assert calls == [
        (
            "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
            "c58f30108f718f92721af3b95e74349a",
        )
    ]
    assert "Downloading" in capsys.readouterr().err
    load_dataset("cifar10", "train", registries=registries())  # already there: no second download
    assert len(calls) == 1


# --- shapes ----------------------------------------------------------------------------------


def test_shapes_deterministic_and_split_seeds():
    a = load_dataset("shapes", "train", limit=200, seed=3, registries=registries())
    b = load_dataset("shapes", "train", limit=200, seed=3, registries=registries())
    assert np.array_equal(a.images, b.images) and np.array_equal(a.masks, b.masks)
    assert not np.array_equal(
        a.images, load_dataset("shapes", "train", limit=200, registries=registries()).images
    )
    assert not np.array_equal(
        a.images, load_dataset("shapes", "eval", limit=200, seed=3, registries=registries()).images
    )
    full = load_dataset("shapes", "eval", registries=registries())
    assert full.images.shape == (1000, 32, 32, 3) and full.masks.shape == (1000, 32, 32)
    assert np.array_equal(
        load_dataset("shapes", "eval", limit=50, registries=registries()).images, full.images[:50]
    )
    assert np.bincount(full.targets).tolist() == [100] * 10
    assert len(full.classes) == 10 and full.name == "shapes"


def test_shapes_masks_mark_the_object():
    ds = load_dataset("shapes", "train", limit=300, image_size=40, registries=registries())
    assert ds.images.shape == (300, 40, 40, 3) and ds.masks.dtype == np.uint8
    assert set(np.unique(ds.masks)) == {0, 1}
    area = ds.masks.reshape(300, -1).mean(1)
    assert area.min() > 0.02 and area.max() < 0.6
    for img, mask in zip(ds.images.astype(float), ds.masks.astype(bool), strict=True):
        inside, outside = img[mask].mean(0), img[~mask].mean(0)
        assert np.abs(inside - outside).max() > 30


# --- folder ----------------------------------------------------------------------------------


def _png(path: Path, size: tuple[int, int], colour: tuple[int, int, int]) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def test_folder_tree_with_holdout_and_bad_files(tmp_path):
    for i in range(6):
        _png(tmp_path / "cat" / f"{i}.png", (20 + i, 10), (200, 0, 0))
        _png(tmp_path / "dog" / f"{i}.png", (8, 8), (0, 0, 200))
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    with pytest.warns(UserWarning, match="notes.txt"):
        train = load_dataset("folder", "train", tmp_path, image_size=16, registries=registries())
    with pytest.warns(UserWarning):
        test = load_dataset("folder", "eval", tmp_path, image_size=16, registries=registries())
    assert train.classes == ["cat", "dog"] and train.images.shape[1:] == (16, 16, 3)
    assert len(train) + len(test) == 12 and len(test) == 1
    assert not set(train.index) & set(test.index)
    cats = train.targets == 0
    assert np.all(train.images[cats][..., 0] == 200) and np.all(train.images[~cats][..., 2] == 200)
    assert {tuple(s) for s in train.sizes[~cats]} == {(8, 8)}
    assert all(s[0] == 10 for s in train.sizes[cats])

    (tmp_path / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.warns(UserWarning), pytest.raises(DataError, match="broken.png"):
        load_dataset("folder", "train", tmp_path, image_size=16, registries=registries())


def test_folder_train_val_layout(tmp_path):
    for split, n in (("train", 3), ("val", 2)):
        for cls in ("a", "b"):
            for i in range(n):
                _png(tmp_path / split / cls / f"{i}.png", (12, 12), (i * 10, 0, 0))
    train = load_dataset("folder", "train", tmp_path, image_size=8, registries=registries())
    val = load_dataset("folder", "eval", tmp_path, image_size=8, limit=3, registries=registries())
    assert len(train) == 6 and list(val.targets) == [0, 0, 1] and val.classes == ["a", "b"]
    shutil.rmtree(tmp_path / "train" / "b")
    with pytest.raises(DataError, match="class folders"):
        load_dataset("folder", "eval", tmp_path, registries=registries())


def _files_of(root: Path, paths: list[str]) -> list[tuple[int, int]]:
    """The (H, W) PIL reads from each of ``paths`` (relative to ``root``)."""
    from PIL import Image

    sizes = []
    for rel in paths:
        with Image.open(root / rel) as img:
            sizes.append((img.height, img.width))
    return sizes


def test_folder_paths_and_sizes_name_each_file(tmp_path):
    """Every image knows its file (relative to the data folder) and its original size."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 3)):
        for cls in ("cat", "dog"):
            for i in range(n):
                size = (int(rng.integers(9, 40)), int(rng.integers(9, 40)))  # PIL: (W, H)
                _png(tmp_path / split / cls / f"{cls} {i}.png", size, (i, 0, 0))
    train = load_dataset("folder", "train", tmp_path, image_size=8, registries=registries())
    val = load_dataset("folder", "eval", tmp_path, image_size=8, limit=4, registries=registries())
    assert train.paths[:2] == ["train/cat/cat 0.png", "train/cat/cat 1.png"]
    # A limit keeps a seeded class-balanced subset: two of each class, in file order.
    assert [p.split("/")[1] for p in val.paths] == ["cat", "cat", "dog", "dog"]
    assert val.paths == sorted(val.paths) and val.note == str(tmp_path / "val")
    for ds in (train, val):
        assert len(ds.paths) == len(ds) == len(ds.sizes)
        assert [tuple(s) for s in ds.sizes] == _files_of(tmp_path, ds.paths)
        assert ds.images.shape[1:3] == (8, 8)
    assert [p.split("/")[1] for p in val.paths] == [val.classes[t] for t in val.targets]
    kept = train.take(3)
    rows = [train.paths.index(p) for p in kept.paths]
    assert kept.sizes.tolist() == train.sizes[rows].tolist() and set(kept.targets) == {0, 1}


def test_folder_holdout_paths_are_disjoint_and_match_the_index(tmp_path):
    for i in range(15):
        _png(tmp_path / "a" / f"{i:02d}.png", (10 + i, 20), (0, 0, 0))
        _png(tmp_path / "b" / "deeper" / f"{i:02d}.jpg", (20, 10 + i), (0, 0, 0))
    train = load_dataset("folder", "train", tmp_path, seed=3, registries=registries())
    held = load_dataset("folder", "eval", tmp_path, seed=3, registries=registries())
    files = [f"a/{i:02d}.png" for i in range(15)] + [f"b/deeper/{i:02d}.jpg" for i in range(15)]
    assert train.paths == [files[i] for i in train.index]
    assert held.paths == [files[i] for i in held.index]
    assert not set(train.paths) & set(held.paths) and len(held) == 3
    assert [tuple(s) for s in held.sizes] == _files_of(tmp_path, held.paths)


def test_folder_paths_in_another_encoding_are_readable_text(tmp_path):
    from explainkit.store import create_store, open_store

    root = os.fsencode(tmp_path / "data")
    for folder in (b"caf\xe9", b"cafe"):
        os.makedirs(os.path.join(root, folder))
        for i in range(6):
            name = os.path.join(root, folder, b"\xfc%d.png" % i)  # Latin-1 'ü'
            _png(Path(os.fsdecode(name)), (9, 7), (i, 0, 0))
    held = load_dataset("folder", "eval", tmp_path / "data", image_size=8, registries=registries())
    ds = load_dataset("folder", "train", tmp_path / "data", image_size=8, registries=registries())
    expected = {f"{c}/ü{i}.png" for c in ("cafe", "café") for i in range(6)}
    assert set(ds.paths) | set(held.paths) == expected and len(ds) == 11
    create_store(
        tmp_path / "p.h5", images=ds.images, targets=ds.targets, index=ds.index,
        classes=ds.classes, dataset="folder", model={}, mean=(0.5,) * 3, std=(0.2,) * 3,
        paths=ds.paths, sizes=ds.sizes,
    )  # fmt: skip
    with open_store(tmp_path / "p.h5") as store:
        assert store.sources() == ds.paths
        assert store.sizes.tolist() == [[7, 9]] * len(ds)


def test_fixed_size_datasets_record_their_one_original_size():
    """CIFAR-10 images are 32x32 whatever --image-size resizes them to; shapes are drawn at it."""
    cifar = load_dataset(
        "cifar10", "eval", SAMPLE, image_size=16, download=False, limit=5, registries=registries()
    )
    assert cifar.images.shape[1:3] == (16, 16) and cifar.sizes.tolist() == [[32, 32]] * 5
    assert cifar.paths is None
    shapes = load_dataset("shapes", "train", image_size=24, limit=4, registries=registries())
    assert shapes.sizes.tolist() == [[24, 24]] * 4 and shapes.paths is None


def test_load_dataset_rejects_unknown_names(tmp_path):
    assert DATASETS == ("cifar10", "shapes", "scenes", "folder")
    with pytest.raises(DataError, match="cifar10"):
        load_dataset("mnist", "train", registries=registries())
    with pytest.raises(DataError, match="split"):
        load_dataset("shapes", "test", registries=registries())
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("folder", "train", tmp_path / "nope", registries=registries())


# --- stats -----------------------------------------------------------------------------------


def test_channel_stats_matches_numpy():
    images = np.random.default_rng(0).integers(0, 256, (5000, 4, 4, 3), dtype=np.uint8)
    mean, std = channel_stats(images)
    ref = images.reshape(-1, 3).astype(np.float64) / 255
    np.testing.assert_allclose(mean, ref.mean(0), rtol=1e-10)
    np.testing.assert_allclose(std, ref.std(0), rtol=1e-8)
    assert len(CIFAR10_MEAN) == 3


# --- augmentation ----------------------------------------------------------------------------


def _gen(seed: int = 0):
    import torch

    return torch.Generator().manual_seed(seed)


def test_random_crop_is_a_shifted_zero_padded_window():
    import torch

    from explainkit.data.augment import random_crop

    x = torch.rand(16, 3, 8, 8)
    assert torch.equal(random_crop(x, 0, _gen()), x)
    out = random_crop(x, 2, _gen(1))
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(16):  # every output is one of the 25 windows of its padded input
        windows = [padded[i, :, r : r + 8, c : c + 8] for r in range(5) for c in range(5)]
        assert any(torch.equal(out[i], w) for w in windows)
    u8 = (x * 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()  # NHWC
    out8 = random_crop(u8, 2, _gen(1))
    assert out8.shape == u8.shape and out8.dtype == torch.uint8
    same = random_crop(u8.permute(0, 3, 1, 2).float(), 2, _gen(1))  # same draws as float NCHW
    assert torch.equal(out8.permute(0, 3, 1, 2).float(), same)


def test_random_flip_twice_is_identity():
    import torch

    from explainkit.data.augment import random_flip

    x = torch.rand(32, 3, 6, 6)
    once = random_flip(x, _gen(5))
    assert once.shape == x.shape and not torch.equal(once, x)
    assert torch.equal(random_flip(once, _gen(5)), x)
    for i in range(32):
        assert torch.equal(once[i], x[i]) or torch.equal(once[i], x[i].flip(-1))


def test_cutout_zeroes_one_clipped_square():
    import torch

    from explainkit.data.augment import cutout

    x = torch.ones(64, 3, 32, 32)
    out = cutout(x, 16, _gen(2))
    assert out.shape == x.shape
    zero = out[:, 0] == 0
    assert torch.equal(zero[:, None].expand_as(out), out == 0)  # same square in every channel
    for m in zero:
        rows, cols = m.any(1), m.any(0)
        assert torch.equal(m, rows[:, None] & cols[None, :])  # a rectangle
        for line in (rows, cols):
            idx = line.nonzero().flatten()
            assert 8 <= len(idx) <= 16 and idx[-1] - idx[0] + 1 == len(idx)
            if 0 < idx[0] and idx[-1] < 31:
                assert len(idx) == 16  # not clipped: the full square
    u8 = torch.full((4, 32, 32, 3), 7, dtype=torch.uint8)
    assert (cutout(u8, 16, _gen(2)) == 0).any(-1).sum() > 0


def test_augment_deterministic_with_generator():
    import torch

    from explainkit.data.augment import Augment

    x = torch.rand(8, 3, 32, 32)
    aug = Augment.from_config({"crop_padding": 4, "flip": True, "cutout": 16})
    a, b = aug(x, _gen(7)), aug(x, _gen(7))
    assert a.shape == x.shape and torch.equal(a, b)
    assert not torch.equal(a, aug(x, _gen(8)))
    off = Augment(crop_padding=0, flip=False, cutout=0)
    assert not off.enabled and torch.equal(off(x, _gen()), x)


def test_folder_classes_named_in_another_encoding_reach_every_output(tmp_path):
    """b'caf\\xe9' (Latin-1 'café') on a UTF-8 system: a readable, distinct class name."""
    from PIL import Image

    root = os.fsencode(tmp_path / "data")
    for name in (b"caf\xe9", b"cafe"):
        folder = os.path.join(root, name)
        os.makedirs(folder)
        for i in range(12):
            pixels = np.full((10, 12, 3), 20 * i, np.uint8)
            Image.fromarray(pixels).save(os.path.join(folder, b"%d.png" % i))
    run = tmp_path / "run"
    trained = run_cli(
        "train", "--dataset", "folder", "--data-dir", str(tmp_path / "data"), "--width", "8",
        "--epochs", "1", "--device", "cpu", "--quiet", "--out", str(run),
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr
    classes = json.loads((run / "config.json").read_text())["data"]["classes"]
    assert classes == ["cafe", "café (Latin-1)"]
    analyzed = run_cli("analyze", str(run), "--plugin", "gallery", "--device", "cpu")
    assert analyzed.returncode == 0, analyzed.stderr


def test_folder_images_are_centre_cropped_not_stretched(tmp_path):
    """A 20x60 image of three equal bands: the centre square is the middle band alone."""
    from PIL import Image

    from explainkit.data.folder import read_image

    bands = np.zeros((20, 60, 3), np.uint8)
    bands[:, :20, 0] = bands[:, 20:40, 1] = bands[:, 40:, 2] = 255  # red | green | blue
    Image.fromarray(bands).save(tmp_path / "wide.png")
    image, size = read_image(tmp_path / "wide.png", 30)
    assert size == (20, 60) and image.shape == (30, 30, 3)
    green = (image[..., 1] > 128) & (image[..., 0] < 128) & (image[..., 2] < 128)
    assert green.mean() > 0.95  # stretched to a square, green would be one third
