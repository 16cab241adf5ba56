"""RunWriter and the Lightning callback: a hand-written training loop writes the run directory
that `explainkit train` writes, one epoch at a time, and every analyzer reads it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import explainkit
from explainkit.errors import ExplainkitError, RunError
from explainkit.rundir import RunDir
from explainkit.store import open_store
from tests.helpers import run_cli

TESTS = Path(__file__).resolve().parent
CLASSES = ["dark", "light"]


def _data(n: int = 24, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Dark and light 16-pixel squares with a bright blob: a task a tiny net learns at once."""
    rng = np.random.default_rng(seed)
    targets = np.arange(n) % 2
    images = rng.integers(0, 60, (n, 16, 16, 3), dtype=np.uint8)
    images[targets == 1] += 150
    return images, targets


def _cli(*args: str):
    """The real CLI in a subprocess that can import tests/evaluate_models.py, and may (the
    runs name it: explainkit.trust)."""
    env = {"PYTHONPATH": str(TESTS), "EXPLAINKIT_TRUST_IMPORTS": "evaluate_models"}
    return run_cli(*args, env=env)


def _train_epoch(model, optimizer, images, targets) -> tuple[float, float]:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    y = torch.from_numpy(targets)
    model.train()
    optimizer.zero_grad()
    logits = model(x)
    loss = torch.nn.functional.cross_entropy(logits, y)
    loss.backward()
    optimizer.step()
    return float(loss.detach()), float((logits.argmax(1) == y).float().mean())


def test_a_hand_written_loop_writes_a_run_every_analyzer_reads(tmp_path):
    from evaluate_models import TinyNet

    torch.manual_seed(0)
    model = TinyNet(num_classes=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    images, targets = _data()
    losses = []
    with explainkit.RunWriter(
        tmp_path / "mine", model, (images, targets), classes=CLASSES, device="cpu"
    ) as writer:
        for _ in range(3):
            loss, acc = _train_epoch(model, optimizer, images, targets)
            losses.append(loss)
            row = writer.log_epoch(train_loss=loss, train_acc=acc, lr=0.5)
            assert model.training  # the writer restores the loop's mode
    run = writer.path
    with open_store(RunDir(run).store_path) as store:
        assert store.epochs == [1, 2, 3]
        np.testing.assert_allclose(store.history["train_loss"], losses)
        assert store.history["eval_acc"][-1] == row["eval_acc"]
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
        mean, std = torch.tensor(store.mean).view(1, 3, 1, 1), torch.tensor(store.std)
        with torch.no_grad():
            expected = model.eval()((x - mean) / std.view(1, 3, 1, 1)).numpy()
        np.testing.assert_allclose(store.logits(3), expected, rtol=1e-5, atol=1e-5)
    config = RunDir(run).read_config()
    assert config["command"] == "evaluate" and "epochs" not in config["config"]
    assert config["model"]["arch"] == "import:evaluate_models:TinyNet"
    names = sorted(p.name for p in RunDir(run).checkpoints.iterdir())
    assert names == ["best.pt", "epoch_001.pt", "epoch_002.pt", "epoch_003.pt", "last.pt"]

    inspected = _cli("inspect", str(run))
    assert inspected.returncode == 0, inspected.stderr
    analyzed = _cli("analyze", str(run), "--device", "cpu", "--batch-size", "8")
    assert analyzed.returncode == 0, analyzed.stderr
    done = {p.parent.name for p in RunDir(run).analyses.glob("*/manifest.json")}
    assert {"gradcam", "evolution", "losses", "gallery", "model", "quality"} <= done
    failed = [
        p.parent.name
        for p in RunDir(run).analyses.glob("*/manifest.json")
        if json.loads(p.read_text()).get("status") == "failed"
    ]
    assert not failed
    reported = _cli("report", str(run))
    assert reported.returncode == 0, reported.stderr


KILLED_LOOP = """
import os, signal, sys
import numpy as np, torch
import explainkit
from evaluate_models import TinyNet

rng = np.random.default_rng(0)
images = rng.integers(0, 256, (12, 16, 16, 3), dtype=np.uint8)
targets = np.arange(12) % 2
model = TinyNet(num_classes=2)
writer = explainkit.RunWriter(sys.argv[1], model, (images, targets), classes=["a", "b"],
                              device="cpu")
for epoch in range(5):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    writer.log_epoch(train_loss=1.0 / (epoch + 1))
    if epoch + 1 == int(sys.argv[2]):
        os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_loop_killed_after_an_epoch_keeps_every_committed_epoch(tmp_path):
    script = tmp_path / "loop.py"
    script.write_text(textwrap.dedent(KILLED_LOOP))
    env = {**os.environ, "PYTHONPATH": str(TESTS), "EXPLAINKIT_LOAD_PLUGINS": ""}
    run = tmp_path / "killed"
    done = subprocess.run([sys.executable, str(script), str(run), "2"], env=env, timeout=300)
    assert done.returncode == -signal.SIGKILL
    with open_store(RunDir(run).store_path) as store:
        assert store.epochs == [1, 2]
        np.testing.assert_allclose(store.history["train_loss"], [1.0, 0.5])
    assert explainkit.load_model(run, epoch=2) is not None
    analyzed = _cli("analyze", str(run), "--plugin", "gradcam", "--device", "cpu")
    assert analyzed.returncode == 0, analyzed.stderr


def test_a_run_in_use_is_refused_and_a_failing_model_leaves_nothing(tmp_path):
    from evaluate_models import TinyNet

    images, targets = _data(8)
    first = explainkit.RunWriter(
        tmp_path / "busy", TinyNet(2), (images, targets), classes=CLASSES, device="cpu"
    )
    with pytest.raises(RunError, match="in use"):
        explainkit.RunWriter(
            tmp_path / "busy", TinyNet(2), (images, targets), classes=CLASSES, device="cpu"
        )
    first.log_epoch()
    first.close()
    with pytest.raises(ExplainkitError, match="closed"):
        first.log_epoch()

    wrong = TinyNet(num_classes=3)  # three outputs for two classes
    with pytest.raises(ExplainkitError, match=r"outputs of shape \[8, 3\]"):
        explainkit.evaluate(wrong, (images, targets), tmp_path / "none", classes=CLASSES)
    assert not (tmp_path / "none").exists()


def test_the_lightning_callback_writes_one_epoch_per_training_epoch(tmp_path):
    lightning = pytest.importorskip("lightning")
    from evaluate_models import TinyNet

    from explainkit.lightning import ExplainkitCallback

    class Module(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = TinyNet(num_classes=2)

        def training_step(self, batch, _):
            x, y = batch
            logits = self.net(x)
            loss = torch.nn.functional.cross_entropy(logits, y)
            self.log("train_loss", loss, on_epoch=True, on_step=False)
            self.log("train_acc", (logits.argmax(1) == y).float().mean(), on_epoch=True)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.3)

    torch.manual_seed(0)
    images, targets = _data(16)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, torch.from_numpy(targets)), batch_size=8
    )
    callback = ExplainkitCallback(
        tmp_path / "lit", (images, targets), classes=CLASSES, model="net",
        mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
    )  # fmt: skip
    trainer = lightning.Trainer(
        max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[callback],
    )  # fmt: skip
    module = Module()
    trainer.fit(module, loader)
    run = tmp_path / "lit"
    with open_store(RunDir(run).store_path) as store:
        assert store.epochs == [1, 2]
        assert (store.history["train_loss"] > 0).all()
        with torch.no_grad():
            expected = module.net.eval()(x).numpy()
        np.testing.assert_allclose(store.logits(2), expected, rtol=1e-5, atol=1e-5)
    assert RunDir(run).read_config()["model"]["arch"] == "import:evaluate_models:TinyNet"
    analyzed = _cli("analyze", str(run), "--plugin", "evolution", "--device", "cpu")
    assert analyzed.returncode == 0, analyzed.stderr
