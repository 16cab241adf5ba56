"""Store v2: the streamed head, one file per epoch, kills, truncation, damage, v1 runs.

The v1/v2 behaviour both schemas share (round trips, head validation, writer refusals) is in
tests/test_store.py, parametrized over both; this file covers what only v2 has.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from explainkit.errors import StoreError
from explainkit.rundir import RunDir
from explainkit.store import (
    HISTORY_COLUMNS,
    StoreBuilder,
    append_epoch,
    create_store,
    create_v1_store,
    epoch_file,
    epochs_folder,
    open_store,
    truncate_store,
)
from tests.helpers import REPO, run_cli
from tests.test_store import history_row, make_store, store_bytes

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


# -- damaged epoch files ------------------------------------------------------------------------


def _write(data: bytes):
    def damage(path: Path) -> None:
        epoch_file(path, 2).write_bytes(data)

    return damage


def _half(path: Path) -> None:
    target = epoch_file(path, 2)
    target.write_bytes(target.read_bytes()[:1000])


def _foreign(path: Path) -> None:
    target = epoch_file(path, 2)
    target.unlink()
    with h5py.File(target, "w") as f:
        f["logits"] = np.zeros((N, K), np.float32)


def _other_store(path: Path) -> None:
    other = path.with_name("other.h5")
    make_store(other, epochs=2)
    epoch_file(path, 2).write_bytes(epoch_file(other, 2).read_bytes())


def _edit(mutate):
    def damage(path: Path) -> None:
        with h5py.File(epoch_file(path, 2), "r+") as f:
            mutate(f)

    return damage


def _history(column, value):
    def mutate(f):
        rows = f["history"][...]
        rows[column] = value
        f["history"][...] = rows

    return mutate


def _replace(name, value):
    def mutate(f):
        del f[name]
        f[name] = value

    return mutate


DAMAGED_EPOCHS = {
    "zero-bytes": (_write(b""), "epoch_0002.h5 is empty (0 bytes)"),
    "truncated": (_half, "epoch_0002.h5 cannot be opened as HDF5"),
    "random-bytes": (_write(np.random.default_rng(3).bytes(3000)), "cannot be opened as HDF5"),
    "not-ours": (_foreign, "epoch_0002.h5 is not an explainkit epoch file"),
    "other-store": (_other_store, "belongs to another store"),
    "wrong-epoch": (_edit(lambda f: f.attrs.__setitem__("epoch", 5)), "says it holds epoch 5"),
    "epoch-as-text": (_edit(lambda f: f.attrs.__setitem__("epoch", b"2")), "not an integer"),
    "schema-1": (_edit(lambda f: f.attrs.__setitem__("schema_version", 1)), "schema version 1"),
    "no-store-id": (_edit(lambda f: f.attrs.__delitem__("store_id")), "lacks store_id"),
    "logits-shape": (
        _edit(_replace("logits", np.zeros((N, 4), np.float32))),
        "expected floats of shape (20, 3) for 20 images and 3 classes",
    ),
    "integer-logits": (_edit(_replace("logits", np.zeros((N, K), np.int32))), "are int32"),
    "logits-a-group": (
        _edit(lambda f: (f.__delitem__("logits"), f.create_group("logits"))),
        "is not a dataset",
    ),
    "history-two-rows": (
        _edit(_replace("history", np.zeros(2, [(n, t) for n, t in HISTORY_COLUMNS]))),
        "lacks its numeric columns",
    ),
    "history-epoch": (_edit(_history("epoch", 7)), "epoch column is [7], not 2"),
    "history-nan": (_edit(_history("eval_acc", np.nan)), "eval_acc column holds NaN"),
    "history-negative": (_edit(_history("lr", -1.0)), "lr column holds a negative value"),
    "train-ce-in-one-epoch-only": (
        _edit(_history("train_ce", np.nan)),
        "train_ce column holds NaN or infinity",
    ),
    "gap": (lambda p: epoch_file(p, 1).unlink(), "epoch_0002.h5 exists but epoch_0001.h5 does"),
}


@pytest.mark.parametrize("name", DAMAGED_EPOCHS)
def test_damaged_epoch_files_are_one_damage_sentence(tmp_path, name):
    damage, message = DAMAGED_EPOCHS[name]
    path = tmp_path / "p.h5"
    make_store(path, epochs=2)
    damage(path)
    before = store_bytes(path)
    for action in (
        lambda: open_store(path),
        lambda: truncate_store(path, 1),
    ):
        with pytest.raises(StoreError) as caught:
            action()
        text = str(caught.value)
        assert message in text and f"{path} is damaged: " in text, text
        assert "\n" not in text and not text.endswith(".") and "train the run again" in text
    assert store_bytes(path) == before


@pytest.mark.parametrize("name", ["not-ours", "other-store", "wrong-epoch", "history-nan"])
def test_append_refuses_after_a_damaged_latest_epoch(tmp_path, name):
    damage, message = DAMAGED_EPOCHS[name]
    path = tmp_path / "p.h5"
    make_store(path, epochs=2)
    damage(path)
    before = store_bytes(path)
    with pytest.raises(StoreError, match=re.escape(message)):
        append_epoch(path, np.zeros((N, K), np.float32), history_row(3))
    assert store_bytes(path) == before


def test_flipped_bytes_in_an_epoch_fail_that_epoch_only(tmp_path):
    path = tmp_path / "p.h5"
    logits = make_store(path, epochs=2)
    target = epoch_file(path, 2)
    with h5py.File(target) as f:
        offset = f["logits"].id.get_chunk_info(0).byte_offset
    data = bytearray(target.read_bytes())
    data[offset + 8 : offset + 24] = bytes(b ^ 0xFF for b in data[offset + 8 : offset + 24])
    target.write_bytes(bytes(data))
    with open_store(path) as store:
        np.testing.assert_array_equal(store.logits(1), logits[0])
        with pytest.raises(StoreError, match="epoch_0002.h5: reading logits failed, the data is"):
            store.logits(2)


# -- run directories and v1 runs ----------------------------------------------------------------


def test_the_run_directory_knows_the_epochs_folder(tmp_path):
    run = RunDir(tmp_path / "run")
    assert run.store_epochs == epochs_folder(run.store_path)
    assert RunDir.STORE_EPOCHS in RunDir.OWNED


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


def as_v1_store(run: Path) -> list[np.ndarray]:
    """Rewrite a run's store as explainkit wrote it before store v2 (same data, schema v1)."""
    path = RunDir(run).store_path
    with open_store(path) as store:
        masks = store.masks
        arrays = dict(
            images=store.images(), targets=store.targets, index=store.index,
            classes=store.classes, dataset=store.attrs["dataset"], model=store.attrs["model"],
            mean=store.mean, std=store.std, eval_weights=store.attrs["eval_weights"],
            eval_tta=bool(store.attrs["eval_tta"]), masks=masks,
        )  # fmt: skip
        epochs = [(store.logits(e), {k: v[e - 1] for k, v in store.history.items()})
                  for e in store.epochs]  # fmt: skip
    create_v1_store(path, **arrays)
    for logits, row in epochs:
        append_epoch(path, logits, row)
    for f in epochs_folder(path).iterdir():
        f.unlink()
    epochs_folder(path).rmdir()
    return [logits for logits, _ in epochs]


def test_a_v1_run_opens_and_resumes_as_v1(tiny_run):
    logits = as_v1_store(tiny_run)
    with h5py.File(tiny_run / "predictions.h5") as f:
        assert f.attrs["schema_version"] == 1 and "store_id" not in f.attrs
    inspected = run_cli("inspect", str(tiny_run))
    assert inspected.returncode == 0 and "schema v1" in inspected.stdout, inspected.stderr
    analyzed = run_cli("analyze", str(tiny_run), "--device", "cpu", "--plugin", "losses")
    assert analyzed.returncode == 0, analyzed.stderr
    resumed = run_cli("train", "--resume", str(tiny_run), "--epochs", "3", "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    with open_store(tiny_run) as store:
        assert store.schema_version == 1 and store.epochs == [1, 2, 3]
        for epoch, expected in enumerate(logits, 1):
            np.testing.assert_array_equal(store.logits(epoch), expected)
        assert list(store.history["epoch"]) == [1, 2, 3]
    assert not epochs_folder(tiny_run / "predictions.h5").exists()


def test_upgrade_converts_a_v1_store_without_loss(tmp_path):
    from explainkit.store import upgrade_store

    v1, v2 = tmp_path / "v1.h5", tmp_path / "v2.h5"
    make_store(v1, version=1, epochs=3)
    make_store(v2, version=1, epochs=3)
    assert upgrade_store(v2) and not upgrade_store(v2)
    with open_store(v1) as old, open_store(v2) as new:
        assert (old.schema_version, new.schema_version) == (1, 2)
        assert new.epochs == old.epochs == [1, 2, 3]
        for epoch in old.epochs:
            np.testing.assert_array_equal(new.logits(epoch), old.logits(epoch))
        for name, column in old.history.items():
            np.testing.assert_array_equal(new.history[name], column)
        np.testing.assert_array_equal(new.images(), old.images())
        np.testing.assert_array_equal(new.masks, old.masks)
        assert new.sources() == old.sources() and (new.sizes == old.sizes).all()
        assert new.attrs["model"] == old.attrs["model"] and new.classes == old.classes
        assert (new.targets == old.targets).all() and (new.index == old.index).all()
        new.verify()
    append_epoch(v2, np.zeros((N, K), np.float32), history_row(4))
    with open_store(v2) as store:
        assert store.epochs == [1, 2, 3, 4]


UPGRADE_KILL = """
import sys
from explainkit.store import upgrade_store
upgrade_store(sys.argv[1])
"""


@pytest.mark.parametrize("fault", ["store-write:1", "store-write:3"])
def test_a_kill_during_an_upgrade_leaves_the_v1_store(tmp_path, fault):
    from explainkit.store import upgrade_store

    path = tmp_path / "p.h5"
    logits = make_store(path, version=1, epochs=3)
    before = path.read_bytes()
    killed = subprocess.run(
        [sys.executable, "-c", UPGRADE_KILL, str(path)],
        cwd=REPO,
        env={**os.environ, "EXPLAINKIT_FAULT": fault},
        capture_output=True,
        timeout=120,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert path.read_bytes() == before
    with open_store(path) as store:
        assert store.schema_version == 1 and store.epochs == [1, 2, 3]
    assert upgrade_store(path)
    with open_store(path) as store:
        assert store.schema_version == 2
        np.testing.assert_array_equal(store.logits(3), logits[2])


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
    from tests.test_reliability import limited

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


OPEN_FILE_LIMIT = """
import resource
import sys
from explainkit.errors import StoreError
from explainkit.store import open_store
limit = int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
try:
    with open_store(sys.argv[1]) as store:
        print(store.epochs[-1])
except StoreError as e:
    print(f"Error: {e}", file=sys.stderr)
    sys.exit(1)
"""


@pytest.mark.parametrize("limit, works", [(300, True), (45, True), (30, False)])
def test_a_reader_needs_an_open_file_per_epoch_and_says_so(tmp_path, limit, works):
    path = tmp_path / "p.h5"
    make_store(path, epochs=3)
    result = subprocess.run(
        [sys.executable, "-c", OPEN_FILE_LIMIT, str(path), str(limit)],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    if works:
        assert result.returncode == 0 and result.stdout.strip() == "3", result.stderr
    else:
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        assert "has 3 epoch files but this process may open only 30 files" in result.stderr
        assert "ulimit -n 259" in result.stderr
