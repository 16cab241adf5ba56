"""The checks of explainkit/store/validate.py: on open, and before a writer changes a store.

Each wrong value in a store that is ours is one sentence saying it is damaged (a file that is
not ours says so), and the store is left as it was.
"""

from __future__ import annotations

import re
from pathlib import Path

import h5py
import numpy as np
import pytest

from explainkit.errors import StoreError
from explainkit.store import (
    HISTORY_COLUMNS,
    append_epoch,
    epoch_file,
    epochs_folder,
    open_store,
    truncate_store,
)
from tests.helpers import PATHS, history_row, make_store, run_cli, store_bytes

N, K = 20, 3


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: p.write_bytes(b""), "empty"),
        (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "cannot be opened"),
        (lambda p: p.write_bytes(np.random.default_rng(1).bytes(4096)), "cannot be opened"),
    ],
)
def test_damaged_stores_are_refused_with_a_sentence(tmp_path, damage, message):
    path = tmp_path / "p.h5"
    make_store(path)
    damage(path)
    with pytest.raises(StoreError, match=message):
        open_store(path)


def test_hdf5_files_that_are_not_ours_are_refused(tmp_path):
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as f:
        f["x"] = np.arange(3)
    with pytest.raises(StoreError, match="not an explainkit prediction store"):
        open_store(path)


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "p.h5"
    make_store(path)
    with h5py.File(path, "r+") as f:
        f.attrs["schema_version"] = 99
    with pytest.raises(StoreError, match="newer than this explainkit"):
        open_store(path)


def as_pre_release_store(path: Path) -> None:
    """Rewrite a store in the one-file layout of a pre-release (schema 1): logits, history
    and a commit marker in the head, no store_id, no epoch files."""
    with open_store(path) as store:
        logits = np.stack([store.logits(e) for e in store.epochs])
        rows = np.zeros(len(store.epochs), [(n, t) for n, t in HISTORY_COLUMNS])
        for name, column in store.history.items():
            rows[name] = column
    for f in epochs_folder(path).iterdir():
        f.unlink()
    epochs_folder(path).rmdir()
    with h5py.File(path, "r+") as f:
        f.attrs["schema_version"] = 1
        del f.attrs["store_id"], f.attrs["task"]
        f["logits"], f["history"] = logits, rows
        f["committed_epochs"] = np.int64(len(rows))


def test_a_pre_release_store_is_refused_by_readers_and_writers(tmp_path):
    path = tmp_path / "p.h5"
    make_store(path)
    as_pre_release_store(path)
    before = store_bytes(path)
    expected = (
        f"{path} was written by a pre-release of explainkit (schema 1); "
        "train the run again with this version"
    )
    for action in (
        lambda: open_store(path),
        lambda: append_epoch(path, np.zeros((N, K), np.float32), history_row(3)),
        lambda: truncate_store(path, 1),
    ):
        with pytest.raises(StoreError) as caught:
            action()
        assert str(caught.value) == expected
    assert store_bytes(path) == before


def test_a_pre_release_run_is_one_sentence_through_the_cli(tiny_run):
    as_pre_release_store(tiny_run / "predictions.h5")
    for args in (["inspect"], ["analyze", "--device", "cpu", "--plugin", "losses"]):
        result = run_cli(*args[:1], str(tiny_run), *args[1:])
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        assert "written by a pre-release of explainkit (schema 1)" in result.stderr


def test_a_store_without_a_task_is_a_classification_store(tmp_path):
    path = tmp_path / "p.h5"
    logits = make_store(path)
    with h5py.File(path, "r+") as f:
        del f.attrs["task"]
    with open_store(path) as store:
        assert store.task == "classification"
        np.testing.assert_array_equal(store.logits(2), logits[1])


def test_a_task_this_version_cannot_read_says_upgrade(tmp_path):
    path = tmp_path / "p.h5"
    make_store(path)
    with h5py.File(path, "r+") as f:
        f.attrs["task"] = np.bytes_(b"keypoints")
    with pytest.raises(StoreError) as caught:
        open_store(path)
    text = str(caught.value)
    assert "holds results of the task 'keypoints'" in text and "upgrade explainkit" in text
    assert "damaged" not in text


# -- wrong values in the head ------------------------------------------------------------------


def _replace(name, value):
    def mutate(f):
        del f[name]
        f[name] = value

    return mutate


def _attr(name, value):
    def mutate(f):
        f.attrs[name] = value

    return mutate


def _delete(name):
    def mutate(f):
        del f[name]

    return mutate


FLOAT_IMAGES = np.zeros((20, 8, 8, 3), np.float32)
HOSTILE_STORES = {
    "float-images": (_replace("eval/images", FLOAT_IMAGES), "eval/images is float32"),
    "zero-std": (_attr("std", np.array([0.25, 0.0, 0.25])), "std attribute has a value that"),
    "one-value-mean": (_attr("mean", np.array([0.5])), "mean attribute has 1 value, not 3"),
    "scalar-mean": (_attr("mean", 0.5), "mean attribute is 0.5, not a list of numbers"),
    "nan-mean": (_attr("mean", np.array([0.5, np.nan, 0.5])), "mean attribute holds NaN"),
    "mean-in-0-255": (_attr("mean", np.array([125.0, 120.0, 110.0])), "outside [0, 1]"),
    "classes-not-json": (_attr("classes", np.bytes_(b"[a, b")), "classes attribute is not valid"),
    "classes-empty": (_attr("classes", np.bytes_(b"[]")), "not a non-empty list of class names"),
    "classes-twice": (_attr("classes", np.bytes_(b'["a", "a", "b"]')), "names a class twice"),
    "classes-fewer": (_attr("classes", np.bytes_(b'["a", "b"]')), "model has 3 classes"),
    "model-not-object": (_attr("model", np.bytes_(b"[1]")), "model attribute is not a JSON"),
    "input-shape": (_attr("input_shape", np.array([3, 32, 32])), "input_shape [3, 32, 32]"),
    "targets-out-of-range": (
        _replace("eval/targets", np.full(20, 3, np.int64)),
        "eval/targets holds a class outside 0..2",
    ),
    "float-targets": (_replace("eval/targets", np.zeros(20)), "eval/targets is float64"),
    "negative-index": (_replace("eval/index", np.full(20, -1)), "eval/index holds a negative"),
    "mask-shape": (_replace("eval/masks", np.zeros((20, 4, 4), np.uint8)), "eval/masks is uint8"),
    "schema-as-text": (_attr("schema_version", np.bytes_(b"1")), "schema_version is '1', not an"),
    "schema-0": (_attr("schema_version", 0), "schema version 0 is unknown"),
    "missing-targets": (_delete("eval/targets"), "it lacks eval/targets"),
    "missing-std": (lambda f: f.attrs.__delitem__("std"), "it lacks the std attribute"),
    "missing-store-id": (lambda f: f.attrs.__delitem__("store_id"), "lacks the store_id"),
    "empty-store-id": (_attr("store_id", np.bytes_(b"")), "the store_id attribute is empty"),
    "task-not-text": (_attr("task", 3), "the task attribute is 3, not text"),
    "targets-a-group": (
        lambda f: (f.__delitem__("eval/targets"), f.create_group("eval/targets")),
        "eval/targets is not a dataset",
    ),
    "eval-weights": (_attr("eval_weights", np.bytes_(b"best")), "eval_weights is 'best'"),
    "paths-count": (_replace("eval/paths", np.array([b"a.png"] * 19)), "expected (20,) UTF-8"),
    "paths-numbers": (_replace("eval/paths", np.arange(20)), "eval/paths is int64 (20,)"),
    "paths-variable-length": (
        lambda f: (
            f.__delitem__("eval/paths"),
            f.create_dataset("eval/paths", data=PATHS, dtype=h5py.string_dtype()),
        ),
        "eval/paths holds variable-length strings",
    ),
    "sizes-shape": (_replace("eval/sizes", np.ones((20, 3), np.int32)), "eval/sizes is int32"),
    "sizes-float": (_replace("eval/sizes", np.ones((20, 2))), "eval/sizes is float64 (20, 2)"),
    "sizes-zero": (_replace("eval/sizes", np.zeros((20, 2), np.int32)), "size below 1 pixel"),
}


@pytest.mark.parametrize("name", HOSTILE_STORES)
def test_wrong_values_are_refused_at_open_as_damage(tmp_path, name):
    """Each is ours (format attribute intact) but wrong: one sentence saying it is damaged."""
    mutate, message = HOSTILE_STORES[name]
    path = tmp_path / "p.h5"
    make_store(path)
    with h5py.File(path, "r+") as f:
        mutate(f)
    before = path.read_bytes()
    with pytest.raises(StoreError) as caught:
        open_store(path)
    text = str(caught.value)
    assert message in text and f"{path} is damaged: " in text, text
    assert "\n" not in text and not text.endswith(".") and "train the run again" in text
    assert "not an explainkit prediction store" not in text
    assert path.read_bytes() == before


# -- checked when read -------------------------------------------------------------------------


def test_paths_that_are_not_utf8_are_damage_when_read(tmp_path):
    path = tmp_path / "p.h5"
    make_store(path)
    with h5py.File(path, "r+") as f:
        del f["eval/paths"]
        f["eval/paths"] = np.array([b"a\xe9.png"] * 20, dtype=h5py.string_dtype("utf-8", 6))
    with open_store(path) as store:
        assert store.sizes is not None  # the rest of the store reads
        with pytest.raises(StoreError, match="eval/paths holds text that is not UTF-8"):
            store.sources([0])
        with pytest.raises(StoreError, match="is damaged: eval/paths"):
            store.verify()


def test_nan_logits_fail_the_epoch_that_holds_them(tmp_path):
    """Finiteness is checked when an epoch is read: other epochs still read."""
    path = tmp_path / "p.h5"
    logits = make_store(path)
    with h5py.File(epoch_file(path, 2), "r+") as f:
        f["logits"][4, 2] = np.inf
    with open_store(path) as store:
        np.testing.assert_array_equal(store.logits(1), logits[0])
        for read in (store.logits, store.predictions, store.probabilities):
            with pytest.raises(StoreError, match="the logits of epoch 2 hold NaN or infinity"):
                read(2)
        with pytest.raises(StoreError, match="epoch 2 hold NaN"):
            store.verify()


def test_masks_other_than_0_and_1_are_refused_when_read(tmp_path):
    path = tmp_path / "p.h5"
    make_store(path)
    with h5py.File(path, "r+") as f:
        f["eval/masks"][3, 0, 0] = 7
    with open_store(path) as store:
        assert store.epochs == [1, 2]
        with pytest.raises(StoreError, match="eval/masks holds values other than 0 and 1"):
            store.masks  # noqa: B018


def flip_bytes_in_logits(path: Path, epoch: int = 1) -> None:
    """Invert 16 bytes in the first chunk of an epoch's logits."""
    target = epoch_file(path, epoch)
    with h5py.File(target, "r") as f:
        offset = f["logits"].id.get_chunk_info(0).byte_offset
    data = bytearray(target.read_bytes())
    data[offset + 8 : offset + 24] = bytes(b ^ 0xFF for b in data[offset + 8 : offset + 24])
    target.write_bytes(bytes(data))


def test_flipped_bytes_in_an_epoch_fail_that_epoch_only(tmp_path):
    path = tmp_path / "p.h5"
    logits = make_store(path, epochs=2)
    flip_bytes_in_logits(path, 2)
    with open_store(path) as store:
        np.testing.assert_array_equal(store.logits(1), logits[0])
        with pytest.raises(
            StoreError, match="epoch_0002.h5: reading logits failed, the data is corrupt"
        ):
            store.logits(2)


def test_inspect_reports_damage_without_a_traceback(tiny_run):
    flip_bytes_in_logits(tiny_run / "predictions.h5")
    result = run_cli("inspect", str(tiny_run))
    assert result.returncode == 1
    assert "corrupt" in result.stderr and "Traceback" not in result.stderr
    (tiny_run / "predictions.h5").write_bytes((tiny_run / "predictions.h5").read_bytes()[:5000])
    result = run_cli("inspect", str(tiny_run))
    assert result.returncode == 1 and "truncated" in result.stderr


# -- damaged epoch files -----------------------------------------------------------------------


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


# -- before a writer changes a store -----------------------------------------------------------


def test_writers_refuse_a_damaged_store_and_leave_it_as_it_was(tmp_path):
    path = tmp_path / "p.h5"
    make_store(path)
    with h5py.File(path, "r+") as f:
        f.attrs["std"] = np.zeros(3)
    before = store_bytes(path)
    with pytest.raises(StoreError, match="is damaged: the std attribute"):
        append_epoch(path, np.zeros((20, 3), np.float32), history_row(3))
    with pytest.raises(StoreError, match="is damaged: the std attribute"):
        truncate_store(path, 1)
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
