"""Kill a real training process at chosen points, resume it, and get the same bits."""

import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from explainkit.config import RESUMABLE, TrainConfig
from explainkit.errors import RunError
from explainkit.run_summary import summarize_run
from explainkit.rundir import RunDir
from explainkit.store import open_store
from explainkit.train.checkpoint import load_checkpoint
from explainkit.train.trainer import Trainer, resume_config, train
from tests.helpers import registries, run_cli, train_run

ARGS = (
    "--dataset shapes --width 8 --epochs 4 --batch-size 32 "
    "--limit-train 128 --limit-eval 32 --cutout 8 --device cpu --quiet"
).split()


def fingerprint(run):
    state = load_checkpoint(run / "checkpoints" / "last.pt", registries())
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
    for weights in ("state_dict", "state_dict_ema"):  # the raw weights and their average
        assert state[weights].keys() == ref_state[weights].keys()
        for key, value in ref_state[weights].items():
            assert torch.equal(value, state[weights][key]), (weights, key)
    assert state["ema_updates"] == ref_state["ema_updates"]
    assert np.array_equal(logits, ref_logits)
    assert np.array_equal(history["train_loss"], ref_history["train_loss"])
    assert np.array_equal(history["train_ce"], ref_history["train_ce"])


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
    assert "resumable" in summarize_run(run, registries())["state"]
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


def saved_files(run):
    """The bytes of what a refused resume must leave alone."""
    r = RunDir(run)
    return {p.name: p.read_bytes() for p in (r.config_path, r.checkpoint("last"), r.store_path)}


@pytest.fixture
def plain_run(tmp_path):
    """A run trained without a moving average (``--ema 0``)."""
    return train_run(tmp_path / "plain", epochs=1, limit_train=64, limit_eval=16, ema=0.0)


@pytest.mark.parametrize("has_ema", [True, False], ids=["ema-run", "plain-run"])
def test_resume_refuses_to_switch_ema_and_leaves_the_run_alone(has_ema, request):
    """Switching --ema would load the average as training weights, or find none to load."""
    run = request.getfixturevalue("tiny_run" if has_ema else "plain_run")
    saved = RunDir(run).read_config()["config"]
    assert (
        "state_dict_ema" in load_checkpoint(RunDir(run).checkpoint("last"), registries())
    ) == has_ema
    before = saved_files(run)
    other = "0" if has_ema else "0.999"
    result = run_cli("train", "--resume", str(run), "--ema", other, "--epochs", "3", "--quiet")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "--ema would change the meaning" in errors[0], result.stderr
    assert saved_files(run) == before
    # The library refuses the same, before it writes anything.
    config = TrainConfig.from_dict({**saved, "ema": float(other), "epochs": 3})
    with pytest.raises(RunError, match="--ema would change the meaning"):
        train(config, registries(), out=run, resume=True, quiet=True)
    assert saved_files(run) == before


def _different(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    return 1 if value is None else value + "-other"


def test_only_the_allow_list_may_change_on_resume(tiny_run):
    saved = TrainConfig.from_dict(RunDir(tiny_run).read_config()["config"])
    allowed = {"epochs": 5, "device": "cpu", "compile": True, "amp": False}
    allowed.update(channels_last=False, keep_checkpoints=2)
    assert set(allowed) == set(RESUMABLE)
    config = resume_config(tiny_run, allowed, registries())
    assert all(getattr(config, k) == v for k, v in allowed.items())
    for name, value in saved.to_dict().items():
        if name not in RESUMABLE:
            flag = "--" + name.replace("_", "-")
            with pytest.raises(RunError, match=f"^{flag} would change the meaning"):
                resume_config(tiny_run, {name: _different(value)}, registries())
    with pytest.raises(RunError, match="^--preset, --tta would change the meaning") as e:
        resume_config(tiny_run, {"preset": "seed", "tta": False, "epochs": 9}, registries())
    assert "only --epochs, --device" in str(e.value) and "\n" not in str(e.value)


def test_a_checkpoint_never_loads_into_a_trainer_with_another_ema(tiny_run, tmp_path):
    config = TrainConfig.from_dict({**RunDir(tiny_run).read_config()["config"], "ema": 0.0})
    trainer = Trainer(config, tmp_path / "elsewhere", registries(), quiet=True)
    with pytest.raises(RunError, match="trained with --ema"):
        trainer.load_state(load_checkpoint(RunDir(tiny_run).checkpoint("last"), registries()))
