"""``torchrun -m explainkit analyze`` with 2 CPU processes (gloo) gives what one process gives."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest

from explainkit.errors import AnalyzerError
from explainkit.manager import build_registries
from explainkit.runner import analyze
from explainkit.sharding import block, merge_h5_parts
from tests.helpers import train_run

NUM_IMAGES = 37  # odd: the two ranks get 19 and 18 images, in batches of 8 that straddle them
TIMING = {"seconds", "images_per_s", "processes"}

SHARDED_PLUGIN = '''
import os

import numpy as np

from explainkit import hookimpl
from explainkit.analyzer import Analyzer
from explainkit.errors import AnalyzerError
from explainkit.h5files import open_h5_for_writing


class Brightness(Analyzer):
    """A third party's shardable analyzer: one number per image, written by its owner rank."""

    name = "brightness"
    summary = "Mean brightness of each eval image."
    shardable = True

    def run(self, context):
        shard = context.shard
        if shard.rank == 1 and os.environ.get("BRIGHTNESS_FAIL_RANK_1"):
            raise ValueError("rank one broke on purpose")
        images = context.store.images(np.arange(shard.start, shard.stop))
        with open_h5_for_writing(shard.part_path("brightness.h5"), AnalyzerError) as f:
            f.attrs["what"] = "mean of uint8 pixels"
            f.create_dataset("mean", data=images.reshape(len(images), -1).mean(axis=1))
        reports = shard.merge("brightness.h5", rows=shard.size)
        if not shard.is_main:
            return []
        assert sum(r["rows"] for r in reports) == context.store.num_images
        return [context.artifact("brightness.h5", "Brightness", "h5")]


@hookimpl
def register_analyzers(register):
    register(Brightness)
'''


def torchrun(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    torchrun_bin = Path(sys.executable).with_name("torchrun")
    full_env = {**os.environ, "EXPLAINKIT_LOAD_PLUGINS": "", "OMP_NUM_THREADS": "1", **(env or {})}
    # torchrun stops the other ranks when one dies; give them time to say why first.
    launch = ["--standalone", "--nproc-per-node", "2", "--monitor-interval", "2"]
    return subprocess.run(
        [str(torchrun_bin), *launch, "-m", "explainkit", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture(scope="module")
def odd_run(tmp_path_factory) -> Path:
    """A trained shapes run with an odd number of eval images (read-only: copy to write)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("odd") / "run"
        return train_run(out, epochs=1, limit_train=128, limit_eval=NUM_IMAGES)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def plugins_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("plugins")
    (folder / "brightness.py").write_text(textwrap.dedent(SHARDED_PLUGIN))
    return folder


@pytest.fixture(scope="module")
def one_process(odd_run, plugins_dir, tmp_path_factory) -> Path:
    """The run analyzed in one process: what torchrun must reproduce."""
    from explainkit.manager import load_plugins

    run = Path(shutil.copytree(odd_run, tmp_path_factory.mktemp("one") / "run"))
    manifests = analyze(
        run,
        plugins=["gradcam", "brightness", "losses"],
        device="cpu",
        batch_size=8,
        registries=build_registries(load_plugins(plugins_dir)),
    )
    assert [m["status"] for m in manifests] == ["ok"] * 3
    return run


def read_h5(path: Path) -> tuple[dict, dict]:
    with h5py.File(path, "r") as f:
        data = {name: f[name][:] for name in f}
        attrs = {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in f.attrs.items()}
        attrs["filters"] = {name: (f[name].compression, f[name].fletcher32) for name in f}
    return data, attrs


def assert_same_analysis(one: Path, two: Path) -> None:
    a, a_attrs = read_h5(one / "analyses" / "gradcam" / "attributions.h5")
    b, b_attrs = read_h5(two / "analyses" / "gradcam" / "attributions.h5")
    assert a_attrs == b_attrs  # the merged file is compressed and checksummed like the parts
    assert set(a_attrs["filters"].values()) == {("gzip", True)}
    assert sorted(a) == sorted(b) == ["maps", "model_predicted", "predicted", "raw", "targets"]
    assert b["maps"].shape == (NUM_IMAGES, 32, 32) and b["maps"].dtype == np.float16
    np.testing.assert_allclose(b["maps"], a["maps"], atol=2e-3)
    np.testing.assert_allclose(b["raw"], a["raw"], rtol=1e-4, atol=1e-6)
    for name in ("targets", "predicted", "model_predicted"):
        np.testing.assert_array_equal(b[name], a[name])
    summary_a = json.loads((one / "analyses" / "gradcam" / "gradcam.json").read_text())
    summary_b = json.loads((two / "analyses" / "gradcam" / "gradcam.json").read_text())
    assert (summary_a["processes"], summary_b["processes"]) == (1, 2)
    for key in TIMING:
        summary_a.pop(key), summary_b.pop(key)
    assert summary_a == summary_b
    shown = [run / "analyses" / "gradcam" / "shown.csv" for run in (one, two)]
    assert shown[0].read_text() == shown[1].read_text()
    assert (two / "analyses" / "gradcam" / "gradcam.png").stat().st_size > 1000
    manifest_a = json.loads((one / "analyses" / "gradcam" / "manifest.json").read_text())
    manifest_b = json.loads((two / "analyses" / "gradcam" / "manifest.json").read_text())
    captions = [(x["path"], x["kind"], x["title"]) for x in manifest_a["artifacts"]]
    assert captions == [(x["path"], x["kind"], x["title"]) for x in manifest_b["artifacts"]]


def test_two_processes_write_what_one_process_writes(one_process, odd_run, plugins_dir, tmp_path):
    run = Path(shutil.copytree(odd_run, tmp_path / "run"))
    result = torchrun(
        "analyze", str(run), "--device", "cpu", "--batch-size", "8",
        "--plugins-dir", str(plugins_dir),
        "--plugin", "gradcam", "--plugin", "brightness", "--plugin", "losses",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    # Rank 0 speaks for the job: one status line per analyzer, one manifest path each.
    assert result.stderr.count("ok      gradcam") == 1
    assert result.stderr.count("no layer given") == 1
    assert sorted(result.stdout.split()) == sorted(
        str(run / "analyses" / name / "manifest.json")
        for name in ("gradcam", "brightness", "losses")
    )
    assert_same_analysis(one_process, run)
    a, a_attrs = read_h5(one_process / "analyses" / "brightness" / "brightness.h5")
    b, b_attrs = read_h5(run / "analyses" / "brightness" / "brightness.h5")
    np.testing.assert_array_equal(b["mean"], a["mean"])
    assert b["mean"].shape == (NUM_IMAGES,) and a_attrs == b_attrs
    # losses is not shardable: rank 0 ran it alone, and it is the same.
    history = [r / "analyses" / "losses" / "history.csv" for r in (one_process, run)]
    assert history[0].read_text() == history[1].read_text()
    # No part files or temporary folders are left behind.
    assert sorted(p.name for p in (run / "analyses").iterdir()) == [
        "brightness", "gradcam", "losses",
    ]  # fmt: skip


def test_a_killed_rank_publishes_nothing_and_keeps_the_earlier_result(one_process, tmp_path):
    run = Path(shutil.copytree(one_process, tmp_path / "run"))
    before = {p.name: p.read_bytes() for p in (run / "analyses" / "gradcam").iterdir()}
    result = torchrun(
        "analyze", str(run), "--device", "cpu", "--batch-size", "8", "--plugin", "gradcam",
        env={"EXPLAINKIT_FAULT": "analyze-sync:1"},  # rank 1 dies after writing its part
    )  # fmt: skip
    assert result.returncode != 0
    # Rank 0 says one sentence (torchrun's own report with its traceback follows it).
    assert "Error: another process of this torchrun job stopped" in result.stderr
    assert re.search(r'File "[^"]*explainkit/', result.stderr) is None
    after = {p.name: p.read_bytes() for p in (run / "analyses" / "gradcam").iterdir()}
    assert after.keys() == before.keys() | {"failed.json"}
    assert all(after[name] == data for name, data in before.items())
    failure = json.loads(after["failed.json"])
    assert failure["status"] == "failed" and "stopped before finishing" in failure["error"]
    assert not [p.name for p in (run / "analyses").iterdir() if p.name.startswith(".")]


def test_rank_0_killed_while_joining_publishes_nothing_and_the_next_run_cleans_up(
    one_process, tmp_path
):
    from explainkit.manager import load_plugins

    run = Path(shutil.copytree(one_process, tmp_path / "run"))
    good = (run / "analyses" / "gradcam" / "attributions.h5").read_bytes()
    result = torchrun(
        "analyze", str(run), "--device", "cpu", "--batch-size", "8", "--plugin", "gradcam",
        env={"EXPLAINKIT_FAULT": "analyze-merge"},  # rank 0 dies after joining one part
    )  # fmt: skip
    assert result.returncode != 0
    assert (run / "analyses" / "gradcam" / "attributions.h5").read_bytes() == good
    left = sorted(p.name.split("-")[0] for p in (run / "analyses").iterdir())
    assert left == [".gradcam.parts", ".gradcam.tmp", "brightness", "gradcam", "losses"]
    # The next analysis (one process) removes what the killed one left and publishes anew.
    (manifest,) = analyze(
        run,
        plugins=["gradcam"],
        device="cpu",
        batch_size=8,
        registries=build_registries(load_plugins()),
    )
    assert manifest["status"] == "ok"
    assert sorted(p.name for p in (run / "analyses").iterdir()) == [
        "brightness", "gradcam", "losses",
    ]  # fmt: skip


def test_a_failing_rank_fails_the_analyzer_with_its_sentence(odd_run, plugins_dir, tmp_path):
    run = Path(shutil.copytree(odd_run, tmp_path / "run"))
    result = torchrun(
        "analyze", str(run), "--device", "cpu", "--plugins-dir", str(plugins_dir),
        "--plugin", "brightness",
        env={"BRIGHTNESS_FAIL_RANK_1": "1"},
    )  # fmt: skip
    assert result.returncode == 1, result.stderr[-3000:]
    assert (
        "failed  brightness: rank 1 of 2 failed: ValueError: rank one broke on purpose"
        in result.stderr
    )
    assert re.search(r'File "[^"]*explainkit/', result.stderr) is None  # torchrun's own only
    folder = run / "analyses" / "brightness"
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json"]
    assert json.loads((folder / "manifest.json").read_text())["status"] == "failed"
    assert sorted(p.name for p in (run / "analyses").iterdir()) == ["brightness"]


@pytest.mark.parametrize("world", [1, 2, 3, 5])
@pytest.mark.parametrize("n", [0, 1, 2, 7, 37])
def test_blocks_tile_the_images_in_order(n, world):
    blocks = [block(rank, world, n) for rank in range(world)]
    assert blocks[0][0] == 0 and blocks[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:], strict=False))
    sizes = [stop - start for start, stop in blocks]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def write_part(path: Path, values: np.ndarray, rows_per_chunk: int = 2) -> None:
    with h5py.File(path, "w") as f:
        f.attrs["kind"] = "test"
        f.create_dataset(
            "x", data=values, chunks=(rows_per_chunk, *values.shape[1:]), compression="gzip"
        )
        f.create_dataset("g/y", data=values[:, 0] * 2)


def test_merge_copies_parts_in_order_and_refuses_parts_that_do_not_fit(tmp_path, monkeypatch):
    import explainkit.sharding

    monkeypatch.setattr(explainkit.sharding, "COPY_BYTES", 24)  # a few rows per copy step
    values = np.arange(7 * 3, dtype=np.float32).reshape(7, 3)
    write_part(tmp_path / "a.h5", values[:4])
    write_part(tmp_path / "b.h5", values[4:])
    parts = [(tmp_path / "a.h5", 0, 4), (tmp_path / "b.h5", 4, 7), (tmp_path / "c.h5", 7, 7)]
    merge_h5_parts(parts, tmp_path / "out.h5", 7)
    with h5py.File(tmp_path / "out.h5", "r") as f:
        np.testing.assert_array_equal(f["x"][:], values)
        np.testing.assert_array_equal(f["g/y"][:], values[:, 0] * 2)
        assert f.attrs["kind"] == "test" and f["x"].compression == "gzip"

    write_part(tmp_path / "b.h5", values[4:, :2])
    with pytest.raises(AnalyzerError, match="the ranks disagree"):
        merge_h5_parts(parts, tmp_path / "bad.h5", 7)
    (tmp_path / "b.h5").unlink()
    with pytest.raises(AnalyzerError, match="b.h5 of missing.h5 are missing"):
        merge_h5_parts(parts, tmp_path / "missing.h5", 7)
    assert not (tmp_path / "bad.h5").exists() and not (tmp_path / "missing.h5").exists()
