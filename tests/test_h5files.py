"""explainkit/h5files.py: HDF5 files streamed through Python I/O, and what a full disk does.

The full-disk tests use a file-size limit (``RLIMIT_FSIZE`` with ``SIGXFSZ`` ignored): writes
fail with EFBIG, as on a full disk. A full disk under a whole analyzer is in
tests/test_hostile_files.py.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from explainkit.errors import StoreError
from explainkit.h5files import open_h5_for_writing
from tests.helpers import REPO, assert_clean_failure, limited


def write_streamed(path: Path, chunks: int, error=StoreError, hold=None) -> None:
    """Write ``chunks`` incompressible 256 KiB chunks, batch by batch, like an analyzer."""
    rng = np.random.default_rng(0)
    writer = open_h5_for_writing(path, error)
    with writer as f:
        f.attrs["what"] = "test"
        ds = f.create_dataset("x", shape=(chunks, 256, 256), dtype="f4", chunks=(1, 256, 256))
        for i in range(chunks):
            ds[i] = rng.random((256, 256), dtype=np.float32)
            writer.check()
            if hold is not None:
                hold(i)


def test_streamed_writes_reach_the_disk_before_the_end(tmp_path):
    """Memory stays bounded: the data is on disk while the file is still being written."""
    path = tmp_path / "out.h5"
    sizes = []

    def hold(i):
        (tmp,) = tmp_path.glob(".out.h5.tmp-*")  # the file appears only when complete
        sizes.append(tmp.stat().st_size)
        assert not path.exists()

    write_streamed(path, 80, hold=hold)
    # 20 MiB written; HDF5 keeps at most its chunk cache (8 MiB in HDF5 2, 1 MiB before).
    assert sizes[-1] > 8 * 2**20
    assert [p.name for p in tmp_path.iterdir()] == ["out.h5"]
    with h5py.File(path, "r") as f:
        assert f["x"].shape == (80, 256, 256) and f.attrs["what"] == "test"
        assert f["x"][79].std() > 0.2


def test_a_failed_writer_leaves_the_earlier_file(tmp_path):
    path = tmp_path / "out.h5"
    write_streamed(path, 2)
    before = path.read_bytes()

    def explode(i):
        if i == 1:
            raise ZeroDivisionError("boom")

    with pytest.raises(ZeroDivisionError):
        write_streamed(path, 4, hold=explode)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["out.h5"]


FULL_DISK_SCRIPT = """
import sys
import numpy as np
from explainkit.errors import AnalyzerError
from explainkit.h5files import open_h5_for_writing
writer = open_h5_for_writing(sys.argv[1], AnalyzerError)
try:
    with writer as f:
        ds = f.create_dataset("x", shape=(16, 256, 256), dtype="f4", chunks=(1, 256, 256))
        for i in range(16):
            ds[i] = np.random.default_rng(i).random((256, 256), dtype=np.float32)
            writer.check()
except AnalyzerError as e:
    print(f"Error: {e}", file=sys.stderr)
    sys.exit(1)
"""


@pytest.mark.parametrize("limit", [2_000, 1_000_000], ids=["at-once", "mid-stream"])
def test_streamed_writer_on_a_full_disk_says_so(tmp_path, limit):
    path = tmp_path / "out.h5"
    path.write_bytes(b"an earlier result")
    result = subprocess.run(
        [sys.executable, "-c", FULL_DISK_SCRIPT, str(path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        preexec_fn=limited(limit),
        timeout=120,
    )
    assert result.returncode == 1, (result.returncode, result.stderr)  # not a signal
    assert_clean_failure(result, (1,), f"cannot write {path}: File too large; free some disk")
    assert path.read_bytes() == b"an earlier result"
    assert [p.name for p in tmp_path.iterdir()] == ["out.h5"]
