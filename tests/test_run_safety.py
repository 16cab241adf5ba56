"""A run is never lost, never shared by two writers, and never changed by a refused command.

Tested the way these promises break: processes released together by a barrier, SIGKILLs at
random moments of a run's whole life (its setup included) followed by what a user would do
next, and commands that must refuse before they write.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from explainkit.run_summary import summarize_run
from explainkit.rundir import RunDir, RunLock
from explainkit.store import open_store
from explainkit.train.checkpoint import load_checkpoint
from tests.helpers import registries, run_cli

ARGS = (
    "--dataset shapes --width 8 --epochs 3 --batch-size 32 --limit-train 96 --limit-eval 32 "
    "--cutout 8 --device cpu --quiet"
).split()


def fingerprint(run: Path):
    state = load_checkpoint(run / "checkpoints" / "last.pt", registries())
    with open_store(run) as store:
        logits = np.stack([store.logits(e) for e in store.epochs])
        history = store.history
    return state, logits, history


def assert_identical(run: Path, reference) -> None:
    state, logits, history = fingerprint(run)
    ref_state, ref_logits, ref_history = reference
    assert state["epoch"] == ref_state["epoch"]
    for key, value in ref_state["state_dict"].items():
        assert torch.equal(value, state["state_dict"][key]), key
    assert np.array_equal(logits, ref_logits)
    assert np.array_equal(history["train_loss"], ref_history["train_loss"])


def digest(run: Path) -> dict[str, str]:
    """Every file of a run and a hash of its bytes (the lock file aside)."""
    return {
        str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(run.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    start = time.perf_counter()
    result = run_cli("train", *ARGS, "--out", str(out))
    assert result.returncode == 0, result.stderr
    return fingerprint(out), time.perf_counter() - start


# -- the lock ----------------------------------------------------------------------------------


def _contend(run: str, barrier, holders, most, acquired, rounds: int) -> None:
    """Race for the lock many times; count how many processes held it at once."""
    lock = RunLock(run)
    for _ in range(rounds):
        barrier.wait()
        try:
            lock.acquire()
        except Exception:
            continue
        with holders.get_lock():
            holders.value += 1
            most.value = max(most.value, holders.value)
        acquired.value += 1
        time.sleep(0.002)
        with holders.get_lock():
            holders.value -= 1
        lock.release()


def test_racing_processes_never_hold_the_lock_together(tmp_path):
    ctx = multiprocessing.get_context("fork")
    n, rounds = 6, 40
    barrier = ctx.Barrier(n)
    holders, most, acquired = ctx.Value("i", 0), ctx.Value("i", 0), ctx.Value("i", 0, lock=True)
    procs = [
        ctx.Process(target=_contend, args=(str(tmp_path), barrier, holders, most, acquired, rounds))
        for _ in range(n)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert most.value == 1, f"{most.value} processes held the lock at once"
    assert acquired.value >= rounds  # at least one winner per round, usually more
    assert not (tmp_path / ".lock").exists()


def test_a_lock_file_left_by_a_killed_process_blocks_nobody(tmp_path):
    child = subprocess.Popen(
        [sys.executable, "-c",
         f"from explainkit.rundir import RunLock; RunLock({str(tmp_path)!r}).acquire(); "
         "print('held', flush=True); import time; time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert child.stdout.readline().strip() == "held"
    assert RunDir(tmp_path).is_locked()
    with pytest.raises(Exception, match=f"in use by another explainkit process \\(pid {child.pid}"):
        RunLock(tmp_path).acquire()
    child.kill()
    child.wait()
    assert (tmp_path / ".lock").exists() and not RunDir(tmp_path).is_locked()
    with RunLock(tmp_path):  # taken over at once
        assert RunDir(tmp_path).is_locked()


def test_concurrent_trainers_never_share_a_run(reference, tmp_path):
    """Three trainers on one --out, released together: one trains, the others refuse."""
    run, go = tmp_path / "run", tmp_path / "go"
    waiter = (
        "import os, sys, time\n"
        "import explainkit.train.trainer  # the heavy imports before the start line\n"
        "from explainkit.cli import main\n"
        f"while not os.path.exists({str(go)!r}): time.sleep(0.001)\n"
        "sys.argv = ['explainkit', *sys.argv[1:]]\n"
        "main()\n"
    )
    env = {**os.environ, "EXPLAINKIT_LOAD_PLUGINS": ""}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", waiter, "train", *ARGS, "--out", str(run)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )  # fmt: skip
        for _ in range(3)
    ]
    time.sleep(3)  # all three are waiting at the line
    go.touch()
    results = [(p.wait(300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 1, 1], results
    for code, err in results:
        assert "Traceback" not in err
        if code == 1:
            assert "in use by another explainkit process" in err or "already exists" in err, err
    assert_identical(run, reference[0])


# -- kills at any moment -------------------------------------------------------------------------


def recover(run: Path) -> subprocess.CompletedProcess:
    """What a user does after a crash: resume; if the run never got its config, start over."""
    resumed = run_cli("train", "--resume", str(run), "--quiet")
    if resumed.returncode != 0 and "--overwrite" in resumed.stderr:
        return run_cli("train", *ARGS, "--out", str(run), "--overwrite")
    if resumed.returncode != 0 and "does not exist" in resumed.stderr:
        return run_cli("train", *ARGS, "--out", str(run))
    return resumed


@pytest.mark.parametrize("fault", ["setup:locked", "setup:config", "store-write:1"])
def test_a_kill_during_setup_is_recovered_to_identical_bits(reference, tmp_path, fault):
    run = tmp_path / "run"
    killed = run_cli("train", *ARGS, "--out", str(run), env={"EXPLAINKIT_FAULT": fault})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    result = recover(run)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert_identical(run, reference[0])


def test_kills_at_random_moments_are_recovered_to_identical_bits(reference, tmp_path):
    ref, seconds = reference
    rng = random.Random(int(os.environ.get("EXPLAINKIT_KILL_SEED", "16")))
    moments = sorted(rng.uniform(0.3, seconds) for _ in range(4))
    env = {**os.environ, "EXPLAINKIT_LOAD_PLUGINS": ""}
    for i, moment in enumerate(moments):
        run = tmp_path / f"run{i}"
        proc = subprocess.Popen(
            [sys.executable, "-m", "explainkit", "train", *ARGS, "--out", str(run)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
        )  # fmt: skip
        time.sleep(moment)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        result = recover(run)
        assert result.returncode == 0, (moment, result.stderr)
        assert "Traceback" not in result.stderr
        assert_identical(run, ref)


def test_a_failed_checkpoint_in_the_last_epoch_is_not_called_complete(reference, tmp_path):
    """The store has all 3 epochs, but last.pt (the resume point) still holds epoch 2."""
    run = tmp_path / "run"
    fault = "checkpoint-write:3:epoch_003.pt"
    killed = run_cli("train", *ARGS, "--out", str(run), env={"EXPLAINKIT_FAULT": fault})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    with open_store(run) as store:
        assert store.epochs == [1, 2, 3]
    state = summarize_run(run, registries())["state"]
    assert "complete" not in state and "after epoch 2" in state and "resumable" in state
    assert run_cli("train", "--resume", str(run), "--quiet").returncode == 0
    assert summarize_run(run, registries())["state"] == "complete"
    assert_identical(run, reference[0])


def test_sigterm_before_the_first_epoch_says_nothing_was_saved(tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "EXPLAINKIT_LOAD_PLUGINS": "", "EXPLAINKIT_FAULT": "none"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "explainkit", "train", *ARGS, "--epochs", "50", "--out", str(run)],
        stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    while not (run / "predictions.h5").exists():
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 1, err
    assert "no epoch was finished yet" in err and "1..0" not in err
    assert "--resume" in err and "Traceback" not in err


# -- refused commands write nothing --------------------------------------------------------------


def test_a_refused_resume_leaves_every_file_as_it_was(tiny_run):
    last = tiny_run / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # a damaged resume point
    before = digest(tiny_run)
    result = run_cli("train", "--resume", str(tiny_run), "--epochs", "5", "--quiet")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert "last.pt" in result.stderr
    assert digest(tiny_run) == before


def test_report_out_never_replaces_an_existing_file_silently(tiny_run, tmp_path):
    target = tmp_path / "mine.html"
    target.write_text("my notes")
    refused = run_cli("report", str(tiny_run), "--out", str(target))
    assert refused.returncode == 1 and "already exists" in refused.stderr
    assert target.read_text() == "my notes"
    done = run_cli("report", str(tiny_run), "--out", str(target), "--overwrite")
    assert done.returncode == 0, done.stderr
    assert target.read_text().startswith("<!DOCTYPE html>")


def test_a_diverging_run_stops_before_saving_nonsense(tmp_path):
    run = tmp_path / "run"
    diverge = ["--lr", "100", "--momentum", "0.99", "--ema", "0"]
    result = run_cli("train", *ARGS, *diverge, "--out", str(run))
    assert result.returncode == 1, result.stderr
    assert "non-finite" in result.stderr and "lower --lr" in result.stderr
    assert "Traceback" not in result.stderr
    with open_store(run) as store:  # nothing non-finite was committed
        for epoch in store.epochs:
            assert np.isfinite(store.logits(epoch)).all()


# -- plugins that exit ---------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["import", "run"])
def test_a_plugin_calling_sys_exit_is_contained_and_named(tiny_run, tmp_path, where):
    folder = tmp_path / "plugins"
    folder.mkdir()
    body = "import sys\nsys.exit(3)\n" if where == "import" else ""
    (folder / "quitter.py").write_text(
        body + "from explainkit import Analyzer, hookimpl\n\n"
        "class Quitter(Analyzer):\n"
        "    name = 'quitter'\n"
        "    def run(self, context):\n"
        "        import sys\n"
        "        sys.exit(0)\n\n"
        "@hookimpl\n"
        "def register_analyzers(register):\n"
        "    register(Quitter)\n"
    )
    result = run_cli(
        "analyze", str(tiny_run), "--plugins-dir", str(folder), "--plugin", "losses",
        *(["--plugin", "quitter"] if where == "run" else []), "--device", "cpu",
    )  # fmt: skip
    assert "Traceback" not in result.stderr
    assert "quitter" in result.stderr and "sys.exit" in result.stderr, result.stderr
    assert (tiny_run / "analyses" / "losses" / "manifest.json").is_file()  # the others ran
    if where == "run":
        assert result.returncode == 1
        manifest = json.loads((tiny_run / "analyses/quitter/manifest.json").read_text())
        assert manifest["status"] == "failed" and "sys.exit(0)" in manifest["error"]
    else:
        assert result.returncode == 0


def test_a_weights_only_last_checkpoint_is_refused_by_resume(tiny_run):
    from explainkit.train.checkpoint import save_checkpoint

    last = tiny_run / "checkpoints" / "last.pt"
    data = load_checkpoint(last, registries())
    save_checkpoint(last, {k: v for k, v in data.items() if k not in ("optimizer", "rng")})
    before = digest(tiny_run)
    result = run_cli("train", "--resume", str(tiny_run), "--epochs", "4", "--quiet")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert "optimizer, rng state" in result.stderr
    assert digest(tiny_run) == before
