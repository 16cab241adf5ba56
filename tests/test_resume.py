"""Kill a real training process at chosen points, resume it, and get the same bits."""

import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from explainkit.store import open_store
from explainkit.summary import summarize_run
from explainkit.train.checkpoint import load_checkpoint
from tests.conftest import run_cli

ARGS = (
    "--dataset shapes --width 8 --epochs 4 --batch-size 32 "
    "--limit-train 128 --limit-eval 32 --cutout 8 --device cpu --quiet"
).split()


def fingerprint(run):
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    with open_store(run) as store:
        logits = np.stack([store.logits(e) for e in store.epochs])
        history = store.history
    return state, logits, history


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    result = run_cli("train", *ARGS, "--out", str(out))
    assert result.returncode == 0, result.stderr
    return fingerprint(out)


def assert_same_as(reference, run):
    state, logits, history = fingerprint(run)
    ref_state, ref_logits, ref_history = reference
    assert state["epoch"] == 4
    for key, value in ref_state["state_dict"].items():
        assert torch.equal(value, state["state_dict"][key]), key
    assert np.array_equal(logits, ref_logits)
    assert np.array_equal(history["train_loss"], ref_history["train_loss"])


@pytest.mark.parametrize(
    "fault",
    # During an epoch, inside a store commit, inside a checkpoint write.
    ["step:2", "store-write:2", "checkpoint-write:3:last.pt"],
)
def test_killed_run_resumes_to_identical_bits(reference, tmp_path, fault):
    run = tmp_path / "run"
    killed = run_cli("train", *ARGS, "--out", str(run), env={"EXPLAINKIT_FAULT": fault})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    # Whatever was killed, the run dir reads back and inspect says it can resume.
    assert "resumable" in summarize_run(run)["state"]
    assert (run / ".lock").exists()  # stale: its owner is dead, and resume takes it over
    resumed = run_cli("train", "--resume", str(run), "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr
    assert_same_as(reference, run)


def test_sigterm_stops_at_a_safe_point_and_says_how_to_resume(reference, tmp_path):
    run = tmp_path / "run"
    args = [sys.executable, "-m", "explainkit", "train", *ARGS, "--out", str(run)]
    proc = subprocess.Popen(
        args,
        stderr=subprocess.PIPE,
        text=True,
        env={**__import__("os").environ, "EXPLAINKIT_LOAD_PLUGINS": ""},
    )
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if line.startswith("epoch   1/4"):
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.stderr.read()
    assert proc.wait(timeout=120) == 1
    assert "explainkit train --resume" in rest and "Traceback" not in rest
    resumed = run_cli("train", "--resume", str(run), "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_as(reference, run)


def test_resume_refuses_options_that_change_the_run(reference, tmp_path):
    run = tmp_path / "run"
    assert run_cli("train", *ARGS, "--epochs", "1", "--out", str(run)).returncode == 0
    result = run_cli("train", "--resume", str(run), "--width", "16")
    assert result.returncode == 1 and "--width would change the meaning" in result.stderr
    result = run_cli("train", "--resume", str(run), "--epochs", "2", "--quiet")
    assert result.returncode == 0, result.stderr
    with open_store(run) as store:
        assert store.epochs == [1, 2]
