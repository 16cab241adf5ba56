import re
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from explainkit.errors import StoreError
from explainkit.store import (
    DATASETS,
    HISTORY_COLUMNS,
    ROOT_ATTRIBUTES,
    append_epoch,
    create_store,
    open_store,
)
from tests.conftest import run_cli

DOC = (Path(__file__).resolve().parents[1] / "docs" / "store-format.md").read_text()


def make_store(path, n=20, classes=3, epochs=2):
    rng = np.random.default_rng(0)
    create_store(
        path,
        images=rng.integers(0, 255, (n, 8, 8, 3), dtype=np.uint8),
        targets=np.arange(n) % classes,
        index=np.arange(n) + 100,
        classes=[f"c{i}" for i in range(classes)],
        dataset="test",
        model={"arch": "resnet18-s8", "width": 8, "num_classes": classes},
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        masks=(rng.random((n, 8, 8)) > 0.5).astype(np.uint8),
    )
    logits = []
    for e in range(1, epochs + 1):
        lg = rng.standard_normal((n, classes)).astype(np.float32)
        logits.append(lg)
        append_epoch(path, lg, {name: float(e) for name, _ in HISTORY_COLUMNS})
    return logits


def test_store_round_trips_every_field(tmp_path):
    path = tmp_path / "p.h5"
    logits = make_store(path)
    with open_store(path) as store:
        assert store.epochs == [1, 2]
        np.testing.assert_array_equal(store.logits(1), logits[0])
        np.testing.assert_array_equal(store.predictions(2), logits[1].argmax(1))
        assert store.index[0] == 100 and store.masks.shape == (20, 8, 8)
        assert store.classes == ["c0", "c1", "c2"]
        picked = store.images([5, 2, 5])
        np.testing.assert_array_equal(picked[0], store.images()[5])
        np.testing.assert_array_equal(picked[1], store.images()[2])


def test_documented_names_are_the_ones_written(tmp_path):
    path = tmp_path / "p.h5"
    make_store(path)
    with h5py.File(path) as f:
        written = set(f.attrs)
        f.visit(lambda name: written.add(name))
    documented = set(re.findall(r"^\| `([^`]+)` \|", DOC, flags=re.M))
    assert written - {"eval"} == documented
    assert set(ROOT_ATTRIBUTES) | set(DATASETS) == documented
    for name, _ in HISTORY_COLUMNS:
        assert f"`{name}`" in DOC


def test_readers_ignore_data_past_the_commit_marker(tmp_path):
    """A writer killed after growing logits but before the marker leaves epochs unseen."""
    path = tmp_path / "p.h5"
    make_store(path, epochs=2)
    with h5py.File(path, "r+") as f:
        f["logits"].resize(3, axis=0)
        f["logits"][2] = 7.0
        f["committed_epochs"][()] = 2
    with open_store(path) as store:
        assert store.epochs == [1, 2]
        with pytest.raises(StoreError, match="epochs 1..2"):
            store.logits(3)


def test_a_leftover_temporary_copy_does_not_matter(tmp_path):
    path = tmp_path / "p.h5"
    make_store(path, epochs=1)
    shutil.copyfile(path, tmp_path / "p.h5.tmp")
    (tmp_path / "p.h5.tmp").write_bytes(b"half written")
    append_epoch(path, np.zeros((20, 3), np.float32), {n: 2.0 for n, _ in HISTORY_COLUMNS})
    with open_store(path) as store:
        assert store.epochs == [1, 2]


def test_an_open_reader_keeps_its_snapshot_while_epochs_are_added(tmp_path):
    path = tmp_path / "p.h5"
    make_store(path, epochs=1)
    with open_store(path) as store:
        append_epoch(path, np.zeros((20, 3), np.float32), {n: 2.0 for n, _ in HISTORY_COLUMNS})
        assert store.epochs == [1]
        store.verify()
    with open_store(path) as store:
        assert store.epochs == [1, 2]


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


def flip_bytes_in_logits(path: Path) -> None:
    with h5py.File(path, "r") as f:
        offset = f["logits"].id.get_chunk_info(0).byte_offset
    data = bytearray(path.read_bytes())
    for i in range(offset + 8, offset + 24):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_flipped_bytes_are_caught_by_the_checksum(tmp_path):
    path = tmp_path / "p.h5"
    make_store(path)
    flip_bytes_in_logits(path)
    with open_store(path) as store, pytest.raises(StoreError, match="corrupt"):
        store.logits(1)


def test_inspect_reports_damage_without_a_traceback(tiny_run):
    flip_bytes_in_logits(tiny_run / "predictions.h5")
    result = run_cli("inspect", str(tiny_run))
    assert result.returncode == 1
    assert "corrupt" in result.stderr and "Traceback" not in result.stderr
    (tiny_run / "predictions.h5").write_bytes((tiny_run / "predictions.h5").read_bytes()[:5000])
    result = run_cli("inspect", str(tiny_run))
    assert result.returncode == 1 and "truncated" in result.stderr


def test_inspect_summarizes_a_run(tiny_run):
    result = run_cli("inspect", str(tiny_run))
    assert result.returncode == 0, result.stderr
    assert "state        complete" in result.stdout
    assert "epochs       2/2" in result.stdout
    assert "epoch_002.pt" in result.stdout
