"""explainkit/store/reader.py: what a StoreReader gives back, and the snapshot it keeps."""

from __future__ import annotations

import subprocess
import sys

import h5py
import numpy as np
import pytest

from explainkit.store import append_epoch, open_store
from tests.helpers import PATHS, REPO, history_row, make_store, run_cli


def test_store_round_trips_every_field(tmp_path):
    path = tmp_path / "p.h5"
    logits = make_store(path)
    with open_store(path) as store:
        assert store.epochs == [1, 2] and store.schema_version == 2
        np.testing.assert_array_equal(store.logits(1), logits[0])
        np.testing.assert_array_equal(store.predictions(2), logits[1].argmax(1))
        assert store.index[0] == 100 and store.masks.shape == (20, 8, 8)
        assert store.classes == ["c0", "c1", "c2"]
        picked = store.images([5, 2, 5])
        np.testing.assert_array_equal(picked[0], store.images()[5])
        np.testing.assert_array_equal(picked[1], store.images()[2])
        assert store.has_paths and store.sources() == PATHS
        assert store.sources(np.array([5, 2, 5])) == [PATHS[5], PATHS[2], PATHS[5]]
        assert store.sources([]) == []
        np.testing.assert_array_equal(store.sizes, np.arange(40).reshape(20, 2) + 1)
    with h5py.File(path) as f:  # fixed-length UTF-8 text, inside checksummed chunks
        info = h5py.check_string_dtype(f["eval/paths"].dtype)
        assert info.encoding == "utf-8" and info.length == max(len(p.encode()) for p in PATHS)
        assert f["eval/paths"].fletcher32 and f["eval/sizes"].dtype == np.int32


def test_a_store_without_paths_and_sizes_still_opens(tmp_path):
    """Paths and sizes are optional: sources then name the dataset and the index."""
    path = tmp_path / "p.h5"
    make_store(path, sources=False)
    with open_store(path) as store:
        assert not store.has_paths and store.sizes is None
        assert store.sources([0, 3]) == ["test #100", "test #103"]
        assert len(store.sources()) == 20
        store.verify()


@pytest.mark.parametrize("indices", [[20], [-1], [[0, 1]]])
def test_sources_refuses_positions_outside_the_store(tmp_path, indices):
    path = tmp_path / "p.h5"
    make_store(path, epochs=0)
    with open_store(path) as store, pytest.raises((IndexError, ValueError)):
        store.sources(indices)


def test_an_open_reader_keeps_its_snapshot_while_epochs_are_added(tmp_path):
    path = tmp_path / "p.h5"
    make_store(path, epochs=1)
    with open_store(path) as store:
        append_epoch(path, np.zeros((20, 3), np.float32), history_row(2))
        assert store.epochs == [1]
        store.verify()
    with open_store(path) as store:
        assert store.epochs == [1, 2]


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


def test_inspect_summarizes_a_run(tiny_run):
    result = run_cli("inspect", str(tiny_run))
    assert result.returncode == 0, result.stderr
    assert "state        complete" in result.stdout
    assert "epochs       2/2" in result.stdout
    assert "epoch_002.pt" in result.stdout and "schema v2" in result.stdout
