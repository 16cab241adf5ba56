"""Two CPU processes under torchrun (gloo): one store, one checkpoint, the right logits."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from explainkit import load_model
from explainkit.store import open_store

ARGS = (
    "--dataset shapes --width 8 --batch-size 32 --limit-train 130 "
    "--limit-eval 37 --device cpu --quiet --cutout 0 --preset seed"
).split()


def torchrun(*args: str) -> subprocess.CompletedProcess:
    torchrun_bin = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "EXPLAINKIT_LOAD_PLUGINS": "", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [str(torchrun_bin), "--standalone", "--nproc-per-node", "2", "-m", "explainkit", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        stdin=subprocess.DEVNULL,
    )


def test_two_process_gloo_run_writes_one_consistent_run(tmp_path):
    run = tmp_path / "ddp"
    result = torchrun("train", *ARGS, "--epochs", "2", "--out", str(run))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("epoch   2/2") == 1  # only rank 0 logs
    config = __import__("json").loads((run / "config.json").read_text())
    assert config["world_size"] == 2
    model = load_model(run / "checkpoints" / "last.pt")
    with open_store(run) as store:
        assert store.epochs == [1, 2]
        assert store.num_images == 37  # the eval set once, in order, no padding rows
        x = torch.from_numpy(store.images()).permute(0, 3, 1, 2).float() / 255
        mean = torch.tensor(store.mean).view(1, 3, 1, 1)
        std = torch.tensor(store.std).view(1, 3, 1, 1)
        with torch.no_grad():
            single = model((x - mean) / std).numpy()
        np.testing.assert_allclose(store.logits(2), single, rtol=1e-4, atol=1e-4)

    resumed = torchrun("train", "--resume", str(run), "--epochs", "3", "--quiet")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    with open_store(run) as store:
        assert store.epochs == [1, 2, 3]
