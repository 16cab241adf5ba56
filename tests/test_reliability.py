"""Bad input, hostile files, full disks and concurrent use, through the real CLI in subprocesses.

Every failure must be one ``Error:`` sentence on stderr, exit 1 (failure) or 2 (usage), no
traceback, and every file that was in the run directory before is byte-for-byte unchanged.
The promises are listed in docs/reliability.md with the test that checks each one. Unit-level
cases already covered elsewhere (tests/store/, tests/test_checkpoint.py,
tests/test_data.py, tests/test_train.py) are not repeated here.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from tests.helpers import (
    CIFAR_MINI,
    assert_clean_failure,
    assert_unchanged,
    checksums,
    limited,
    run_cli,
)

SENTINEL_NAME = "PWNED"


# -- helpers ---------------------------------------------------------------------------------


def analyze(run: Path, *args: str) -> subprocess.CompletedProcess:
    return run_cli("analyze", str(run), "--device", "cpu", *args)


class Sentinel:
    """Unpickling this runs ``touch``: proof that code from a file ran."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def flip_chunk_bytes(path: Path, dataset: str) -> None:
    """Invert 16 bytes inside every stored chunk of ``dataset`` (fletcher32 must catch it)."""
    with h5py.File(path, "r") as f:
        ds = f[dataset].id
        offsets = [ds.get_chunk_info(i).byte_offset for i in range(ds.get_num_chunks())]
    data = bytearray(path.read_bytes())
    for offset in offsets:
        for i in range(offset + 8, offset + 24):
            data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def run_cli_limited(max_bytes: int, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "explainkit", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "EXPLAINKIT_LOAD_PLUGINS": ""},
        preexec_fn=limited(max_bytes),
        stdin=subprocess.DEVNULL,
        timeout=300,
    )


TRAIN_TINY = (
    "--dataset shapes --width 8 --batch-size 32 --limit-train 64 --limit-eval 32 "
    "--cutout 0 --device cpu --quiet"
).split()


# -- run directories -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: None, "does not exist"),
        (lambda p: p.mkdir(), "is not an explainkit run"),
        (lambda p: p.write_text("hello"), "is a file, not a run directory"),
    ],
    ids=["missing", "empty", "not-a-dir"],
)
def test_bad_run_dirs_get_one_sentence(tmp_path, make, message):
    run = tmp_path / "run"
    make(run)
    assert_clean_failure(analyze(run, "--plugin", "losses"), (1,), message)


def test_runs_from_a_newer_explainkit_are_refused(tiny_run):
    config = json.loads((tiny_run / "config.json").read_text())
    config["format_version"] = 99
    (tiny_run / "config.json").write_text(json.dumps(config))
    before = checksums(tiny_run)
    for command in ("analyze", "inspect"):
        args = ("--plugin", "losses", "--device", "cpu") if command == "analyze" else ()
        result = run_cli(command, str(tiny_run), *args)
        assert_clean_failure(result, (1,), "newer explainkit", "upgrade")
    assert not (tiny_run / "analyses").exists()
    assert_unchanged(before, tiny_run)


def test_a_store_with_a_newer_schema_is_refused(tiny_run):
    with h5py.File(tiny_run / "predictions.h5", "r+") as f:
        f.attrs["schema_version"] = 99
    before = checksums(tiny_run)
    assert_clean_failure(analyze(tiny_run, "--plugin", "losses"), (1,), "schema v99", "upgrade")
    assert_unchanged(before, tiny_run)


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _zero(p: Path) -> None:
    p.write_bytes(b"")


def _random(p: Path) -> None:
    p.write_bytes(np.random.default_rng(0).bytes(p.stat().st_size))


def epoch_files(store: Path) -> list[Path]:
    """The epoch files of a v2 store (``predictions.epochs/epoch_NNNN.h5``)."""
    from explainkit.store import epochs_folder

    return sorted(epochs_folder(store).glob("epoch_*.h5"))


def _flip_history(p: Path) -> None:
    flip_chunk_bytes(epoch_files(p)[0], "history")


def _foreign(p: Path) -> None:
    p.unlink()
    with h5py.File(p, "w") as f:
        f["weights"] = np.arange(10)
        f.attrs["format"] = "someone-elses"


@pytest.mark.parametrize(
    "damage, message",
    [
        (_truncate, "truncated"),
        (_zero, "empty (0 bytes)"),
        (_random, "cannot be opened as HDF5"),
        (_flip_history, "corrupt"),
        (_foreign, "not an explainkit prediction store"),
    ],
    ids=["truncated", "zero-bytes", "random-bytes", "flipped-chunk", "not-ours"],
)
def test_damaged_stores_fail_cleanly_through_the_cli(tiny_run, damage, message):
    damage(tiny_run / "predictions.h5")
    before = checksums(tiny_run)
    result = analyze(tiny_run, "--plugin", "losses")
    assert_clean_failure(result, (1,), message)
    assert_unchanged(before, tiny_run)


def test_flipped_logits_fail_the_analyzer_that_reads_them(tiny_run):
    for path in epoch_files(tiny_run / "predictions.h5"):
        flip_chunk_bytes(path, "logits")
    before = checksums(tiny_run)
    result = analyze(tiny_run, "--plugin", "gallery")
    assert_clean_failure(result, (1,), "the data is corrupt", "1 of 1 analyzers failed")
    assert_unchanged(before, tiny_run)


# -- checkpoints -----------------------------------------------------------------------------


def _ckpt_truncated(p: Path, sentinel: Path) -> None:
    p.write_bytes(p.read_bytes()[:5000])


def _ckpt_state_dict(p: Path, sentinel: Path) -> None:
    torch.save(torch.load(p, weights_only=True)["state_dict"], p)


def _ckpt_timm(p: Path, sentinel: Path) -> None:
    data = torch.load(p, weights_only=True)
    torch.save({"state_dict": data["state_dict"], "epoch": data["epoch"], "arch": "resnet18"}, p)


def _ckpt_code(p: Path, sentinel: Path) -> None:
    torch.save({"format": "explainkit-checkpoint", "state_dict": Sentinel(sentinel)}, p)


@pytest.mark.parametrize(
    "damage, message",
    [
        (_ckpt_truncated, "truncated or damaged"),
        (_ckpt_state_dict, "not an explainkit checkpoint"),
        (_ckpt_timm, "not an explainkit checkpoint"),
        (_ckpt_code, "explainkit never unpickles those"),
    ],
    ids=["truncated", "plain-state-dict", "timm-style", "reduce-sentinel"],
)
def test_bad_checkpoints_are_refused_and_never_run_code(tiny_run, tmp_path, damage, message):
    sentinel = tmp_path / SENTINEL_NAME
    for path in (tiny_run / "checkpoints").glob("*.pt"):
        damage(path, sentinel)
    before = checksums(tiny_run)
    result = analyze(tiny_run, "--plugin", "gradcam")
    assert_clean_failure(result, (1,), message, "1 of 1 analyzers failed: gradcam")
    assert not sentinel.exists()
    assert_unchanged(before, tiny_run)


def test_a_hostile_cifar_pickle_never_runs(tmp_path):
    folder = tmp_path / "cifar" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    source = CIFAR_MINI / "cifar-10-batches-py"
    shutil.copyfile(source / "batches.meta", folder / "batches.meta")
    shutil.copyfile(source / "test_batch", folder / "test_batch")
    sentinel = tmp_path / SENTINEL_NAME
    payload = {"data": Sentinel(sentinel), "labels": [0]}
    (folder / "data_batch_1").write_bytes(pickle.dumps(payload))
    out = tmp_path / "run"
    result = run_cli(
        "train", *TRAIN_TINY, "--dataset", "cifar10", "--data-dir", str(folder.parent),
        "--epochs", "1", "--out", str(out),
    )  # fmt: skip
    assert_clean_failure(result, (1,), "data_batch_1 is not a valid CIFAR-10 batch", "refused")
    assert not sentinel.exists()
    assert not (out / "predictions.h5").exists()


# -- plugins, layers, epochs, numbers --------------------------------------------------------

RAISING_PLUGIN = """
from explainkit import hookimpl
from explainkit.analyzer import Analyzer

class Explodes(Analyzer):
    name = "explodes"
    summary = "Always raises."
    order = 1

    def run(self, context):
        raise ZeroDivisionError("boom at the first image")

@hookimpl
def register_analyzers(register):
    register(Explodes)
"""


def test_unknown_plugin_is_a_usage_error_with_a_suggestion(tiny_run):
    result = analyze(tiny_run, "--plugin", "lossez")
    assert_clean_failure(result, (2,), "unknown analyzer 'lossez'; did you mean 'losses'?")
    assert not (tiny_run / "analyses").exists()


def test_a_raising_plugin_fails_alone(tiny_run, tmp_path):
    plugdir = tmp_path / "plugdir"
    plugdir.mkdir()
    (plugdir / "explodes.py").write_text(RAISING_PLUGIN)
    result = analyze(
        tiny_run, "--plugins-dir", str(plugdir), "--plugin", "explodes", "--plugin", "losses"
    )
    assert_clean_failure(result, (1,), "failed  explodes: ZeroDivisionError: boom", "1 of 2")
    assert (
        json.loads((tiny_run / "analyses" / "losses" / "manifest.json").read_text())["status"]
        == "ok"
    )
    failed = json.loads((tiny_run / "analyses" / "explodes" / "manifest.json").read_text())
    assert failed["status"] == "failed" and "Traceback" in failed["traceback"]


def test_a_wrong_layer_is_one_sentence(tiny_run):
    from explainkit.manager import get_analyzers, load_plugins

    if "gradcam" not in get_analyzers(load_plugins()):
        pytest.skip("the gradcam analyzer (plugins/gradcam.py) is not installed in this checkout")
    before = checksums(tiny_run)
    result = analyze(tiny_run, "--plugin", "gradcam", "--gradcam-layer", "nope")
    assert_clean_failure(result, (1,), "unknown target layer 'nope'", "layer4")
    assert_unchanged(before, tiny_run)


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["--epoch", "99"], 1, "epoch 99 is not in"),
        (["--epoch", "-3"], 2, "Invalid value for '--epoch'"),
        (["--batch-size", "0"], 2, "Invalid value for '--batch-size'"),
    ],
    ids=["epoch-99", "negative-epoch", "batch-size-0"],
)
def test_bad_analyze_numbers(tiny_run, args, code, message):
    # train's --batch-size 0 / --epochs -1: tests/test_train.py::test_bad_numbers_get_one_sentence
    result = analyze(tiny_run, "--plugin", "losses", *args)
    assert_clean_failure(result, (code,), message)
    assert not (tiny_run / "analyses").exists()


def _image_folder(root: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in ("circle", "square"):
        (root / name).mkdir(parents=True)
        for i in range(6):
            pixels = rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")


def test_non_image_files_in_an_image_folder(tmp_path):
    root = tmp_path / "images"
    _image_folder(root)
    (root / "circle" / "notes.txt").write_text("not an image")
    (root / "square" / "broken.png").write_text("not a png either")
    out = tmp_path / "run"
    result = run_cli(
        "train", *TRAIN_TINY, "--dataset", "folder", "--data-dir", str(root), "--epochs", "1",
        "--out", str(out),
    )  # fmt: skip
    assert_clean_failure(result, (1,), "cannot decode image", "broken.png")
    # A file without an image extension is skipped with a one-line warning, not an error.
    assert "warning: Skipping" in result.stderr and "notes.txt" in result.stderr
    assert "UserWarning" not in result.stderr
    assert not (out / "predictions.h5").exists()


# -- full disks ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "limit, what",
    [(50_000, "predictions.h5"), (1_000_000, "epoch_001.pt")],
    ids=["store-write", "checkpoint-write"],
)
def test_train_on_a_full_disk_says_so(tmp_path, limit, what):
    out = tmp_path / "run"
    result = run_cli_limited(limit, "train", *TRAIN_TINY, "--epochs", "1", "--out", str(out))
    assert_clean_failure(result, (1,), f"cannot write {out}", what, "File too large")
    assert not list(out.rglob("*.tmp*")), "temporary files left behind"
    assert not (out / ".lock").exists()


def test_analyze_on_a_full_disk_keeps_earlier_results(tiny_run):
    first = analyze(tiny_run, "--plugin", "losses")
    assert first.returncode == 0, first.stderr
    before = checksums(tiny_run)
    result = run_cli_limited(2_000, "analyze", str(tiny_run), "--plugin", "losses")
    assert_clean_failure(result, (1,), "File too large")
    assert_unchanged(before, tiny_run)
    assert sorted(p.name for p in (tiny_run / "analyses").iterdir()) == ["losses"]


# -- concurrency -----------------------------------------------------------------------------


def test_inspect_and_analyze_during_training_see_committed_epochs(tmp_path):
    run = tmp_path / "live"
    epochs = 3
    trainer = subprocess.Popen(
        [sys.executable, "-m", "explainkit", "train", *TRAIN_TINY, "--epochs", str(epochs),
         "--out", str(run)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "EXPLAINKIT_LOAD_PLUGINS": ""},
    )  # fmt: skip
    seen: list[int] = []
    analyzed = 0
    try:
        deadline = time.monotonic() + 240
        while trainer.poll() is None and time.monotonic() < deadline:
            if not (run / "predictions.h5").is_file():
                time.sleep(0.2)
                continue
            result = run_cli("inspect", str(run), "--json")
            if result.returncode != 0:  # only before the store exists
                assert "no prediction store" in result.stderr, result.stderr
                continue
            summary = json.loads(result.stdout)
            done = summary["epochs_done"]
            assert summary["history"]["epoch"] == list(range(1, done + 1))
            assert not seen or done >= seen[-1]
            seen.append(done)
            if done >= 1 and not analyzed:
                result = analyze(run, "--plugin", "losses")
                assert result.returncode == 0, result.stderr
                rows = (run / "analyses" / "losses" / "history.csv").read_text().splitlines()
                assert 1 <= len(rows) - 1 <= epochs
                analyzed += 1
        assert trainer.wait(timeout=240) == 0, trainer.stderr.read()
    finally:
        if trainer.poll() is None:
            trainer.kill()
            trainer.wait()
    assert seen, "inspect never ran while training"
    final = run_cli("inspect", str(run), "--json")
    assert final.returncode == 0, final.stderr
    summary = json.loads(final.stdout)
    assert summary["epochs_done"] == epochs and summary["state"] == "complete"


def test_two_concurrent_analyze_runs_do_not_clobber(tiny_run):
    env = {**os.environ, "EXPLAINKIT_LOAD_PLUGINS": ""}
    cmd = [sys.executable, "-m", "explainkit", "analyze", str(tiny_run), "--device", "cpu",
           "--plugin", "gallery"]  # fmt: skip
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=240) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err
    folder = tiny_run / "analyses" / "gallery"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["status"] == "ok"
    for artifact in manifest["artifacts"]:
        path = folder / artifact["path"]
        assert path.is_file() and path.stat().st_size > 0
        if path.suffix == ".png":
            from PIL import Image

            with Image.open(path) as img:
                img.verify()
    leftovers = [p.name for p in (tiny_run / "analyses").iterdir() if p.name != "gallery"]
    assert not leftovers
