"""Data that does not fit in memory: lazy folder images, batch streaming, and training,
evaluating and analyzing a 224-px folder in bounded memory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from explainkit import hookimpl
from explainkit.data import Dataset, DatasetEntry, channel_stats, iter_batches, load_dataset
from explainkit.data.batches import WORKERS_ENV
from explainkit.data.folder import FolderImages
from explainkit.data.lazy import MEMORY_ENV, LazyImages, is_lazy, memory_budget
from explainkit.errors import DataError
from explainkit.manager import build_registries
from explainkit.store import open_store
from explainkit.train.checkpoint import load_checkpoint
from tests.helpers import registries, run_cli


def make_folder(
    root: Path, count: int, size: int, classes: int = 3, seed: int = 0, distinct: int = 0
) -> Path:
    """An ImageFolder of ``count`` JPEG and PNG files, about ``size`` pixels, sizes varying
    (only the first ``distinct`` files are drawn when given; the others copy them, which is
    faster to make and decodes to as many pixels)."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        folder = root / f"class{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        if distinct and i >= distinct:
            source = root / f"class{i % distinct % classes}" / f"img{i % distinct:05d}.jpg"
            (folder / f"img{i:05d}.jpg").write_bytes(source.read_bytes())
            continue
        h, w = size + int(rng.integers(0, 9)), size + int(rng.integers(0, 17))
        yy, xx = np.mgrid[0:h, 0:w]
        pixels = np.stack([(xx * (i % classes + 1)) % 256, (yy * 3 + i) % 256, (xx + yy) % 256], -1)
        noisy = (pixels + rng.integers(0, 24, pixels.shape)).clip(0, 255).astype(np.uint8)
        png = i % 4 == 0 and not distinct
        name = folder / f"img{i:05d}.{'png' if png else 'jpg'}"
        Image.fromarray(noisy).save(name)
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("folder"), 40, 30)


def load(folder: Path, split: str, budget: str | None, **kwargs) -> Dataset:
    old = os.environ.pop(MEMORY_ENV, None)
    try:
        if budget is not None:
            os.environ[MEMORY_ENV] = budget
        return load_dataset(
            "folder", split, folder, **{"image_size": 24, **kwargs}, registries=registries()
        )
    finally:
        os.environ.pop(MEMORY_ENV, None)
        if old is not None:
            os.environ[MEMORY_ENV] = old


@pytest.fixture(scope="module")
def both(folder) -> tuple[Dataset, Dataset]:
    """The train split of ``folder`` in memory and lazy."""
    return load(folder, "train", None), load(folder, "train", "0")


# --- the choice --------------------------------------------------------------------------------


def test_a_split_larger_than_the_budget_stays_lazy_and_a_small_one_is_decoded(both):
    eager, lazy = both
    assert isinstance(eager.images, np.ndarray)
    assert isinstance(lazy.images, FolderImages) and is_lazy(lazy.images)
    assert lazy.images.shape == eager.images.shape and lazy.images.dtype == np.uint8
    assert len(lazy.images) == len(eager) == 36  # 40 files, 10% held out for eval
    assert lazy.paths == eager.paths
    assert np.array_equal(lazy.sizes, eager.sizes)  # from the headers, equal to the decoded
    assert np.array_equal(lazy.targets, eager.targets)
    assert np.array_equal(np.asarray(lazy.images), eager.images)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("", 1 << 30), ("0", 0), ("123", 123), ("500M", 500 << 20), ("2GiB", 2 << 30)],
)
def test_the_budget_reads_sizes_with_units(monkeypatch, text, expected):
    monkeypatch.setenv(MEMORY_ENV, text)
    assert memory_budget() == expected


def test_a_budget_that_is_not_a_size_is_one_sentence(monkeypatch, folder):
    monkeypatch.setenv(MEMORY_ENV, "lots")
    with pytest.raises(DataError, match="is not a size; give bytes"):
        load_dataset("folder", "eval", folder, image_size=24, registries=registries())


# --- lazy images read as the eager array -------------------------------------------------------

N = 36
rows = st.integers(-N, N - 1)
keys = st.one_of(
    rows,
    st.builds(
        slice,
        st.none() | st.integers(-N - 3, N + 3),
        st.none() | st.integers(-N - 3, N + 3),
        st.none() | st.integers(-5, 5).filter(bool),
    ),
    st.lists(rows, max_size=12).map(lambda v: np.asarray(v, dtype=np.int64)),
    st.lists(st.booleans(), min_size=N, max_size=N).map(np.asarray),
)


@settings(max_examples=60, deadline=None)
@given(key=keys, channel=st.none() | st.integers(0, 2))
def test_any_selection_of_lazy_images_equals_the_eager_load(both, key, channel):
    eager, lazy = both
    full = key if channel is None else (key, slice(None), slice(None), channel)
    got, want = lazy.images[full], eager.images[full]
    assert got.dtype == np.uint8 and got.shape == want.shape
    assert np.array_equal(got, want)


def test_out_of_range_rows_raise_index_error_as_an_array_does(both):
    _, lazy = both
    with pytest.raises(IndexError):
        lazy.images[N]
    with pytest.raises(IndexError):
        lazy.images[np.asarray([0, -N - 1])]


def test_limit_and_take_keep_lazy_images_lazy(folder, both):
    eager, lazy = both
    limited = load(folder, "train", "0", limit=7)
    taken = lazy.take(7)
    for ds in (limited, taken):  # the same seeded class-balanced subset, still lazy
        rows = [eager.paths.index(p) for p in ds.paths]
        assert is_lazy(ds.images) and len(ds.images) == 7 and rows == sorted(rows)
        assert np.array_equal(ds.images[:], eager.images[rows])
    assert np.array_equal(taken.images[[6, 0, 3]], eager.images[[rows[6], rows[0], rows[3]]])


def test_a_lazy_split_asked_at_another_size_is_resized_as_it_is_read(both):
    eager, lazy = both
    from explainkit.data import fit_images

    resized = lazy.images.resized(16)
    assert is_lazy(resized) and resized.shape == (N, 16, 16, 3)
    assert np.array_equal(resized[[3, 1]], fit_images(eager.images[[3, 1]], 16))


class Gradients(LazyImages):
    """A plugin's own lazy images: 20 x 30 horizontal gradients, brighter row by row."""

    def __init__(self, count: int) -> None:
        super().__init__(count, 20, 30)

    def read(self, rows: np.ndarray) -> np.ndarray:
        ramp = np.linspace(0, 200, 30).astype(np.uint8)[None, None, :, None]
        return np.broadcast_to(
            ramp + rows[:, None, None, None].astype(np.uint8), (len(rows), 20, 30, 3)
        ).copy()


class GradientsPlugin:
    @hookimpl
    def register_datasets(self, register):
        def load(split):
            n = 10
            targets = np.arange(n) % 2
            return Dataset(Gradients(n), targets, ["a", "b"], np.arange(n))

        register(DatasetEntry("gradients", load, "Gradients."))


def test_a_plugin_dataset_may_return_lazy_images_of_another_size():
    from explainkit import manager

    pm = manager.get_plugin_manager(entrypoints=False, quiet=True)
    pm.register(GradientsPlugin(), name="gradients-plugin")
    ds = load_dataset("gradients", "train", image_size=16, limit=6, registries=build_registries(pm))
    assert is_lazy(ds.images) and ds.images.shape == (6, 16, 16, 3)
    assert ds.sizes.tolist() == [[20, 30]] * 6
    from explainkit.data import fit_images

    rows = ds.index[[5, 2]]  # the seeded class-balanced subset a limit keeps
    assert sorted(np.bincount(ds.targets).tolist()) == [3, 3]
    assert np.array_equal(ds.images[[5, 2]], fit_images(Gradients(10)[rows], 16))


def test_a_row_reader_streams_an_open_store_in_the_calling_process(tmp_path, both):
    from explainkit.data.lazy import RowReader
    from explainkit.store import create_store

    eager, _ = both
    model = {"arch": "resnet18-s8", "num_classes": 3}
    path = create_store(
        tmp_path / "predictions.h5", images=eager.images, targets=eager.targets,
        index=eager.index, classes=eager.classes, dataset="folder", model=model,
        mean=(0.5,) * 3, std=(0.25,) * 3,
    )  # fmt: skip
    with open_store(path) as store:
        images = RowReader(store.images, (24, 24), store.num_images)
        assert images.shape == eager.images.shape and not images.workers_allowed
        assert np.array_equal(images[[5, 1, 30]], eager.images[[5, 1, 30]])
        assert channel_stats(images) == channel_stats(eager.images)
        batches = [b.numpy() for _, b in iter_batches(images, 10, workers=4)]
    assert np.array_equal(np.concatenate(batches), eager.images)


def test_channel_stats_of_lazy_images_equal_the_in_memory_ones(both):
    eager, lazy = both
    assert channel_stats(lazy.images) == channel_stats(eager.images)


def test_channel_stats_of_a_large_lazy_split_come_from_a_seeded_sample(both, monkeypatch):
    import explainkit.data as data

    eager, lazy = both
    monkeypatch.setattr(data, "STATS_SAMPLE", 10)
    sample = np.sort(np.random.default_rng(3).choice(N, 10, replace=False))
    assert channel_stats(lazy.images, seed=3) == channel_stats(eager.images[sample])
    assert channel_stats(lazy.images, seed=3) != channel_stats(lazy.images, seed=4)
    assert channel_stats(eager.images, seed=3) == channel_stats(eager.images)  # all, in memory


# --- iter_batches ------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("batch_size", [1, 5, 36, 50])
def test_iter_batches_yields_every_image_once_in_order(both, workers, batch_size):
    eager, lazy = both
    for ds in (eager, lazy):
        starts, parts = [], []
        for start, images in iter_batches(ds, batch_size, workers=workers):
            assert isinstance(images, torch.Tensor) and images.dtype == torch.uint8
            assert images.shape[1:] == (24, 24, 3) and 0 < len(images) <= batch_size
            starts.append(start)
            parts.append(images.numpy())
        assert starts == list(range(0, N, batch_size))
        assert np.array_equal(np.concatenate(parts), eager.images)


def test_iter_batches_takes_images_alone_and_refuses_an_empty_batch(both):
    eager, lazy = both
    (start, images), *_ = iter_batches(lazy.images, 4, pin_memory=True)  # pinned only on CUDA
    assert start == 0 and np.array_equal(images.numpy(), eager.images[:4])
    with pytest.raises(DataError, match="batch_size must be a positive"):
        next(iter_batches(eager, 0))


def test_an_image_that_breaks_while_streaming_is_one_data_error(tmp_path):
    make_folder(tmp_path / "data" / "train", 12, 120)  # every file in the train split
    victim = sorted(tmp_path.rglob("*.jpg"))[3]
    whole = victim.read_bytes()
    victim.write_bytes(whole[: len(whole) * 3 // 4])  # the header reads, the pixels do not
    ds = load(tmp_path / "data", "train", "0")
    with pytest.raises(DataError, match="cannot decode image .*; remove or replace the file"):
        for _ in iter_batches(ds, 4, workers=1):
            pass


# --- training on lazy data ---------------------------------------------------------------------


def test_the_trainer_streams_a_lazy_split_and_puts_an_in_memory_one_on_the_device(
    tmp_path, monkeypatch
):
    from explainkit.config import TrainConfig
    from explainkit.train.device_data import DeviceData, Split
    from explainkit.train.streamed_data import StreamedSplit

    data = make_folder(tmp_path / "data", 40, 30)
    config = TrainConfig(dataset="folder", data_dir=str(data), image_size=24, device="cpu")
    cpu = torch.device("cpu")
    memory = DeviceData(config, registries(), cpu, channels_last=False)
    monkeypatch.setenv(MEMORY_ENV, "0")
    lazy = DeviceData(config, registries(), cpu, channels_last=False)
    assert isinstance(memory.train, Split) and isinstance(memory.eval, Split)
    assert isinstance(lazy.train, StreamedSplit) and isinstance(lazy.eval, StreamedSplit)
    assert (lazy.mean, lazy.std) == (memory.mean, memory.std)
    assert torch.equal(lazy.train.targets, memory.train.targets)
    order = torch.randperm(lazy.num_train, generator=torch.Generator().manual_seed(1))
    got, want = list(lazy.train.batches(order, 8, 3)), list(memory.train.batches(order, 8, 3))
    assert len(got) == len(want) == 3
    for streamed, placed in zip(got, want, strict=True):
        assert streamed.shape == (8, 3, 24, 24) and streamed.is_contiguous()
        assert torch.equal(streamed, placed)
    evals = torch.arange(lazy.num_eval)
    assert torch.equal(torch.cat(list(lazy.eval.batches(evals, 3))), memory.eval.images)


TRAIN = (
    "--dataset folder --image-size 24 --width 8 --epochs 2 --batch-size 16 "
    "--cutout 4 --device cpu --quiet"
).split()


def fingerprint(run: Path) -> tuple[dict, np.ndarray, np.ndarray]:
    state = load_checkpoint(run / "checkpoints" / "last.pt", registries())
    with open_store(run) as store:
        logits = np.stack([store.logits(e) for e in store.epochs])
        images = store.images()
    return state["state_dict"], logits, images


def test_lazy_training_killed_and_resumed_gives_the_in_memory_bits(tmp_path):
    data = make_folder(tmp_path / "data", 54, 30)  # 49 train images: 3 steps of 16
    args = [*TRAIN, "--data-dir", str(data)]
    memory, lazy = tmp_path / "memory", tmp_path / "lazy"
    done = run_cli("train", *args, "--out", str(memory))
    assert done.returncode == 0, done.stderr
    killed = run_cli(
        "train", *args, "--out", str(lazy), env={MEMORY_ENV: "0", "EXPLAINKIT_FAULT": "step:2"}
    )
    assert killed.returncode < 0, killed.stderr  # killed in the middle of epoch 2
    resumed = run_cli("train", "--resume", str(lazy), "--quiet", env={MEMORY_ENV: "0"})
    assert resumed.returncode == 0, resumed.stderr
    ref_weights, ref_logits, ref_images = fingerprint(memory)
    weights, logits, images = fingerprint(lazy)
    assert weights.keys() == ref_weights.keys()
    assert all(torch.equal(weights[k], ref_weights[k]) for k in weights)
    assert np.array_equal(logits, ref_logits) and len(logits) == 2
    assert np.array_equal(images, ref_images)


# --- the proof: a folder larger than the memory allowed ----------------------------------------

TINY_MODEL = """
from collections import OrderedDict

from explainkit import hookimpl
from explainkit.hookspecs import ModelEntry


def build(num_classes):
    from torch import nn

    return nn.Sequential(OrderedDict(
        stem=nn.Conv2d(3, 8, 8, stride=8), act=nn.ReLU(),
        features=nn.Conv2d(8, 16, 3, stride=2, padding=1), relu=nn.ReLU(),
        pool=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(), head=nn.Linear(16, num_classes),
    ))


@hookimpl
def register_models(register):
    register(ModelEntry("tiny224", build, default_layer="features"))
"""


def peak_rss(args: list[str], env: dict[str, str]) -> int:
    """Run the CLI and return its peak resident memory in bytes (its workers included)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "explainkit", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=False,
    )
    stderr = proc.stderr.read() if proc.stderr else b""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.returncode == 0, stderr.decode(errors="replace")[-2000:]
    return usage.ru_maxrss * 1024


def train_and_analyze(data: Path, run: Path, env: dict[str, str]) -> int:
    """Train one epoch on ``data`` at 224 px and run Grad-CAM: the higher peak RSS."""
    train = peak_rss(
        [
            "train", "--dataset", "folder", "--data-dir", str(data), "--image-size", "224",
            "--model", "tiny224", "--epochs", "1", "--batch-size", "16", "--device", "cpu",
            "--quiet", "--out", str(run),
        ],
        env,
    )  # fmt: skip
    analyze = peak_rss(["analyze", str(run), "--plugin", "gradcam", "--device", "cpu"], env)
    return max(train, analyze)


def test_a_224px_folder_larger_than_its_memory_trains_evaluates_and_is_analyzed(tmp_path):
    """Two folders that differ by 1,000 eval images (150 MB decoded) at 224 px: the larger
    one may use no more than a third of that on top of the smaller one's peak. An in-memory
    split holds those 150 MB at least twice (the array and its tensor), so this fails if any
    step of train, evaluate, store or analyze holds the split whole.

    Images are decoded in the CLI's own process (no workers), so that both folders reach the
    same few batches in memory at once; worker decoding is checked above."""
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "tiny224.py").write_text(TINY_MODEL)
    env = {
        **os.environ,
        "EXPLAINKIT_LOAD_PLUGINS": "",
        "EXPLAINKIT_PLUGINS_DIR": str(plugins),
        MEMORY_ENV: "8M",  # both splits of both folders are above it: all lazy
        WORKERS_ENV: "0",
    }
    small, large = 300, 1300
    peaks = {}
    for count in (small, large):
        data = tmp_path / f"data{count}"
        make_folder(data / "train", 32, 224, seed=1, distinct=12)
        make_folder(data / "val", count, 224, seed=2, distinct=12)
        run = tmp_path / f"run{count}"
        peaks[count] = train_and_analyze(data, run, env)
        with open_store(run) as store:
            assert store.num_images == count and store.epochs == [1]
            first = load(data, "eval", "0", image_size=224).images[[0, count - 1]]
            assert np.array_equal(store.images([0, count - 1]), first)
        assert (run / "analyses" / "gradcam" / "attributions.h5").is_file()
    decoded = (large - small) * 224 * 224 * 3
    growth = peaks[large] - peaks[small]
    assert growth < decoded / 3, (peaks, decoded)
