"""explainkit/store/writer.py: the streamed head, one file per epoch, kills and truncation."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest

from explainkit.errors import StoreError
from explainkit.rundir import RunDir
from explainkit.store import (
    StoreBuilder,
    append_epoch,
    create_store,
    epoch_file,
    epochs_folder,
    open_store,
    truncate_store,
)
from tests.helpers import PATHS, REPO, history_row, limited, make_store, run_cli, store_bytes

N, K = 20, 3
SPLIT = dict(
    targets=np.arange(N) % K,
    index=np.arange(N) + 100,
    classes=["a", "b", "c"],
    dataset="test",
    model={"arch": "resnet18-s8", "width": 8, "num_classes": K},
    mean=(0.5, 0.5, 0.5),
    std=(0.25, 0.25, 0.25),
)


def pictures(n: int = N, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 255, (n, 8, 8, 3), dtype=np.uint8)
    return images, (rng.random((n, 8, 8)) > 0.5).astype(np.uint8)


# -- the streamed head --------------------------------------------------------------------------


def test_builder_streams_batches_to_disk_and_publishes_at_the_end(tmp_path):
    path = tmp_path / "predictions.h5"
    images, masks = pictures()
    tmp = tmp_path / "predictions.h5.tmp"
    sizes = []
    with StoreBuilder(path, **SPLIT, image_shape=(8, 8, 3), has_masks=True) as builder:
        for start in range(0, N, 6):  # batches that do not line up with chunks
            builder.add_images(images[start : start + 6], masks[start : start + 6])
            sizes.append(tmp.stat().st_size)
            assert not path.exists()
    assert sizes[-1] > 0 and not tmp.exists()
    with open_store(path) as store:
        assert store.schema_version == 2 and store.epochs == []
        np.testing.assert_array_equal(store.images(), images)
        np.testing.assert_array_equal(store.masks, masks)
        np.testing.assert_array_equal(store.read_masks([7, 2, 7]), masks[[7, 2, 7]])
        np.testing.assert_array_equal(store.images(np.arange(3, 9)), images[3:9])
        batches = store.batches(8)
        assert [len(b) for b in batches] == [8, 8, 4]
        np.testing.assert_array_equal(np.concatenate(batches), np.arange(N))
        store.verify()


def test_a_failed_builder_publishes_nothing_and_keeps_the_older_store(tmp_path):
    path = tmp_path / "predictions.h5"
    make_store(path)
    before = store_bytes(path)
    images, _ = pictures(seed=1)
    with pytest.raises(ZeroDivisionError):
        with StoreBuilder(path, **SPLIT, image_shape=(8, 8, 3)) as builder:
            builder.add_images(images[:10])
            raise ZeroDivisionError("the data loader failed")
    with pytest.raises(ValueError, match="10 images were added but the store has 20 targets"):
        with StoreBuilder(path, **SPLIT, image_shape=(8, 8, 3)) as builder:
            builder.add_images(images[:10])
    assert store_bytes(path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["predictions.epochs", "predictions.h5"]


def test_a_new_store_replaces_the_old_one_and_its_epochs(tmp_path):
    path = tmp_path / "predictions.h5"
    make_store(path, epochs=3)
    images, _ = pictures(seed=2)
    create_store(path, images=images, **SPLIT)
    with open_store(path) as store:
        assert store.epochs == [] and not store.has_masks
        np.testing.assert_array_equal(store.images(), images)
    assert not list(epochs_folder(path).glob("*.h5"))


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda b: b.add_images(np.zeros((2, 8, 8, 3), np.float32)), "images must be uint8"),
        (lambda b: b.add_images(np.zeros((2, 8, 9, 3), np.uint8)), "(B, 8, 8, 3)"),
        (lambda b: b.add_images(np.zeros((21, 8, 8, 3), np.uint8)), "more images than the 20"),
        (
            lambda b: b.add_images(np.zeros((2, 8, 8, 3), np.uint8), np.zeros((2, 8, 8))),
            "masks given to a store made with has_masks=False",
        ),
    ],
    ids=["float", "shape", "too-many", "unexpected-masks"],
)
def test_builder_refuses_batches_that_do_not_fit(tmp_path, call, message):
    path = tmp_path / "predictions.h5"
    with pytest.raises(ValueError, match=re.escape(message)):
        with StoreBuilder(path, **SPLIT, image_shape=(8, 8, 3)) as builder:
            call(builder)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "change, message",
    [
        ({"targets": np.full(N, 3)}, "targets must be classes 0..2"),
        ({"index": np.full(N, -1)}, "index must hold positions of 0 or more"),
        ({"targets": np.zeros(0, int), "index": np.zeros(0, int)}, "at least one eval image"),
        ({"image_shape": (8, 8)}, "image_shape must be (H, W, C)"),
        ({"mean": (0.5,)}, "mean and std need 3 values each"),
    ],
)
def test_builder_refuses_a_split_readers_would_refuse(tmp_path, change, message):
    arguments = {**SPLIT, "image_shape": (8, 8, 3), **change}
    with pytest.raises(ValueError, match=re.escape(message)):
        StoreBuilder(tmp_path / "predictions.h5", **arguments)


def test_masks_must_be_0_or_1(tmp_path):
    images, masks = pictures()
    with pytest.raises(ValueError, match="masks must hold only 0 and 1"):
        create_store(tmp_path / "p.h5", images=images, masks=masks * 255, **SPLIT)
    with pytest.raises(ValueError, match="pass the batch's masks too"):
        with StoreBuilder(tmp_path / "p.h5", **SPLIT, image_shape=(8, 8, 3), has_masks=True) as b:
            b.add_images(images)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"paths": PATHS[:19]}, "paths must be 20 non-empty strings"),
        ({"paths": ["", *PATHS[1:]]}, "paths must be 20 non-empty strings"),
        ({"paths": ["bad\udce9.png", *PATHS[1:]]}, "paths must be UTF-8 text"),
        ({"sizes": np.ones((20, 3), np.int64)}, "sizes must be integers of shape (20, 2)"),
        ({"sizes": np.ones((20, 2), np.float32)}, "sizes must be integers of shape (20, 2)"),
        ({"sizes": np.zeros((20, 2), np.int64)}, "sizes must be positive"),
        ({"sizes": np.full((20, 2), 2**31, np.int64)}, "fit int32"),
    ],
)
def test_create_store_refuses_paths_and_sizes_readers_would_refuse(tmp_path, extra, message):
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match=re.escape(message)):
        create_store(
            tmp_path / "p.h5",
            images=rng.integers(0, 255, (20, 8, 8, 3), dtype=np.uint8),
            targets=np.zeros(20, np.int64),
            index=np.arange(20),
            classes=["a"],
            dataset="test",
            model={"num_classes": 1},
            mean=(0.5, 0.5, 0.5),
            std=(0.25, 0.25, 0.25),
            **extra,
        )
    assert not (tmp_path / "p.h5").exists()


BUILD_ON_A_FULL_DISK = """
import sys
import numpy as np
from explainkit.errors import StoreError
from explainkit.store import StoreBuilder
n = 400
rng = np.random.default_rng(0)
try:
    with StoreBuilder(sys.argv[1], targets=np.zeros(n, int), index=np.arange(n), classes=["a"],
                      dataset="t", model={}, mean=(0.5,) * 3, std=(0.2,) * 3,
                      image_shape=(32, 32, 3)) as builder:
        for _ in range(4):
            builder.add_images(rng.integers(0, 256, (100, 32, 32, 3), dtype=np.uint8))
except StoreError as e:
    print(f"Error: {e}", file=sys.stderr)
    sys.exit(1)
"""


def test_a_builder_on_a_full_disk_says_so_and_keeps_the_older_store(tmp_path):
    path = tmp_path / "predictions.h5"
    make_store(path)
    before = store_bytes(path)
    result = subprocess.run(
        [sys.executable, "-c", BUILD_ON_A_FULL_DISK, str(path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        preexec_fn=limited(200_000),  # the head of 400 random images is 1.2 MB
        timeout=120,
    )
    assert result.returncode == 1, (result.returncode, result.stderr)  # never a segfault
    assert "Traceback" not in result.stderr
    assert f"cannot write {path}: File too large; free some disk" in result.stderr
    assert store_bytes(path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["predictions.epochs", "predictions.h5"]


# -- commits ------------------------------------------------------------------------------------


def test_a_commit_writes_one_new_file_and_touches_nothing_else(tmp_path):
    """What makes a commit flat in the images and the earlier epochs (timed by
    benchmarks/scale.py): the head and the earlier epoch files keep their inode and bytes."""
    path = tmp_path / "p.h5"
    make_store(path, epochs=2)
    files = [path, epoch_file(path, 1), epoch_file(path, 2)]
    before = {p: (p.stat().st_ino, p.read_bytes()) for p in files}
    append_epoch(path, np.ones((N, K), np.float32), history_row(3))
    assert {p: (p.stat().st_ino, p.read_bytes()) for p in files} == before
    assert sorted(p.name for p in epochs_folder(path).iterdir()) == [
        "epoch_0001.h5",
        "epoch_0002.h5",
        "epoch_0003.h5",
    ]


@pytest.mark.parametrize(
    "logits, row, message",
    [
        (np.zeros((20, 4), np.float32), history_row(3), "shape (20, 4) but the store holds"),
        (np.full((20, 3), np.nan, np.float32), history_row(3), "logits hold NaN or infinity"),
        (np.zeros((20, 3), np.float32), history_row(5), "the next is 3"),
        (np.zeros((20, 3), np.float32), {**history_row(3), "lr": -0.1}, "its lr is -0.1"),
    ],
    ids=["class-count", "nan", "epoch-gap", "negative-lr"],
)
def test_an_epoch_that_does_not_fit_is_not_committed(tmp_path, logits, row, message):
    path = tmp_path / "p.h5"
    make_store(path)
    before = store_bytes(path)
    with pytest.raises(StoreError, match=re.escape(message)):
        append_epoch(path, logits, row)
    assert store_bytes(path) == before


def test_a_leftover_temporary_copy_does_not_matter(tmp_path):
    path = tmp_path / "p.h5"
    make_store(path, epochs=1)
    (tmp_path / "p.h5.tmp").write_bytes(b"half written")
    leftover = epoch_file(path, 2).with_name(".epoch_0002.h5.tmp-999999")
    leftover.write_bytes(b"half written")
    append_epoch(path, np.zeros((20, 3), np.float32), history_row(2))
    with open_store(path) as store:
        assert store.epochs == [1, 2]
    assert not leftover.exists()


KILL_SCRIPT = """
import sys
import numpy as np
from explainkit.store import HISTORY_COLUMNS, append_epoch
row = {name: 1.0 for name, _ in HISTORY_COLUMNS}
row["epoch"] = 3
append_epoch(sys.argv[1], np.full((20, 3), 7.0, np.float32), row)
"""


def test_a_kill_inside_a_commit_leaves_the_committed_epochs(tmp_path):
    path = tmp_path / "p.h5"
    logits = make_store(path, epochs=2)
    killed = subprocess.run(
        [sys.executable, "-c", KILL_SCRIPT, str(path)],
        cwd=REPO,
        env={**os.environ, "EXPLAINKIT_FAULT": "store-write:3"},
        capture_output=True,
        timeout=120,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    (leftover,) = epochs_folder(path).glob(".epoch_0003.h5.tmp-*")  # written, not renamed
    with open_store(path) as store:
        assert store.epochs == [1, 2]
        np.testing.assert_array_equal(store.logits(2), logits[1])
    assert append_epoch(path, np.zeros((N, K), np.float32), history_row(3)) == 3
    assert not leftover.exists()


def test_truncation_removes_later_epochs_and_open_readers_keep_theirs(tmp_path):
    path = tmp_path / "p.h5"
    logits = make_store(path, epochs=3)
    with open_store(path) as early:
        truncate_store(path, 1)
        with open_store(path) as store:
            assert store.epochs == [1] and list(store.history["epoch"]) == [1]
        append_epoch(path, np.full((N, K), 5.0, np.float32), history_row(2))
        assert early.epochs == [1, 2, 3]  # the snapshot it opened, still readable
        np.testing.assert_array_equal(early.logits(2), logits[1])
        np.testing.assert_array_equal(early.logits(3), logits[2])
    with open_store(path) as store:
        assert store.epochs == [1, 2] and (store.logits(2) == 5.0).all()
    truncate_store(path, 9)  # more than it holds: nothing changes
    truncate_store(path, 0)
    with open_store(path) as store:
        assert store.epochs == [] and store.last_epoch is None


def test_a_row_without_train_ce_after_rows_with_it_is_refused(tmp_path):
    path = tmp_path / "p.h5"
    make_store(path, epochs=1)
    row = {k: v for k, v in history_row(2).items() if k != "train_ce"}
    with pytest.raises(StoreError, match="lacks train_ce, which the earlier epochs record"):
        append_epoch(path, np.zeros((N, K), np.float32), row)


def test_train_ce_not_recorded_stays_not_recorded(tmp_path):
    path = tmp_path / "p.h5"
    make_store(path, epochs=0)
    first = {k: v for k, v in history_row(1).items() if k != "train_ce"}
    append_epoch(path, np.zeros((N, K), np.float32), first)
    append_epoch(path, np.zeros((N, K), np.float32), history_row(2))  # recorded now: dropped
    with open_store(path) as store:
        assert "train_ce" not in store.history and store.epochs == [1, 2]


def test_overwrite_removes_the_epochs_of_the_old_run(tiny_run):
    assert (tiny_run / "predictions.epochs" / "epoch_0002.h5").is_file()
    assert RunDir(tiny_run).foreign_entries() == []
    result = run_cli(
        "train", "--dataset", "shapes", "--width", "8", "--epochs", "1", "--batch-size", "32",
        "--limit-train", "32", "--limit-eval", "16", "--device", "cpu", "--quiet",
        "--out", str(tiny_run), "--overwrite",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tiny_run / "predictions.epochs").iterdir()) == ["epoch_0001.h5"]
    with open_store(tiny_run) as store:
        assert store.epochs == [1] and store.num_images == 16
