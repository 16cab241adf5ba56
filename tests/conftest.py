"""Shared fixtures: tiny real runs trained once per session (width 8, a few hundred images)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _find_cifar_mini() -> Path:
    """The real CIFAR-10 sample: $EXPLAINKIT_CIFAR_MINI, else a shared/ folder beside the repo."""
    candidates = [os.environ.get("EXPLAINKIT_CIFAR_MINI", "")]
    candidates += [str(p / "shared" / "data" / "cifar10-mini") for p in REPO.parents]
    candidates.append("/work/shared/data/cifar10-mini")
    for candidate in candidates:
        if candidate and (Path(candidate) / "cifar-10-batches-py").is_dir():
            return Path(candidate)
    return REPO.parent / "shared" / "data" / "cifar10-mini"


CIFAR_MINI = _find_cifar_mini()

# Keep a developer's installed third-party plugins out of the tests.
os.environ.setdefault("EXPLAINKIT_LOAD_PLUGINS", "")

TINY = dict(width=8, epochs=2, batch_size=64, limit_train=256, limit_eval=64, cutout=0)


def train_run(out: Path, overwrite: bool = False, **overrides) -> Path:
    from explainkit.config import TrainConfig
    from explainkit.train.trainer import train

    values = {"dataset": "shapes", "device": "cpu", **TINY, **overrides}
    return train(TrainConfig(**values), out=out, overwrite=overwrite, quiet=True)


def minimal_payload(num_classes: int = 3, width: int = 8) -> dict:
    """The least a checkpoint holds: a model spec and weights that fit it, and an epoch."""
    from explainkit.models import build_model

    spec = {"arch": "resnet18-s8", "width": width, "num_classes": num_classes}
    model = build_model(spec["arch"], num_classes=num_classes, width=width)
    return {"model": spec, "state_dict": model.state_dict(), "epoch": 1}


@pytest.fixture
def fresh_plugins(monkeypatch):
    """Each test reads the environment afresh and sees no developer-installed plugins."""
    from explainkit import manager

    monkeypatch.setenv("EXPLAINKIT_LOAD_PLUGINS", "")
    for name in ("EXPLAINKIT_RAISE_ERRORS", "EXPLAINKIT_TRACE_PLUGINS", "EXPLAINKIT_PLUGINS_DIR"):
        monkeypatch.delenv(name, raising=False)
    manager.reset_plugins()
    yield
    manager.reset_plugins()


@pytest.fixture(scope="session")
def tiny_run_master(tmp_path_factory) -> Path:
    return train_run(tmp_path_factory.mktemp("runs") / "shapes")


@pytest.fixture
def tiny_run(tiny_run_master, tmp_path) -> Path:
    """A private copy of a trained shapes run (2 epochs), safe to write analyses into."""
    return Path(shutil.copytree(tiny_run_master, tmp_path / "run"))


@pytest.fixture(scope="session")
def cifar_run_master(tmp_path_factory) -> Path:
    if not CIFAR_MINI.is_dir():
        pytest.fail(f"the CIFAR-10 sample is missing at {CIFAR_MINI}")
    return train_run(
        tmp_path_factory.mktemp("runs") / "cifar",
        dataset="cifar10",
        data_dir=str(CIFAR_MINI),
        limit_train=256,
        limit_eval=128,
    )


@pytest.fixture
def cifar_run(cifar_run_master, tmp_path) -> Path:
    return Path(shutil.copytree(cifar_run_master, tmp_path / "cifar_run"))


# A run that has learned the shapes (about 90% eval accuracy), for properties of explanations.
TRAINED = dict(
    dataset="shapes",
    device="cpu",
    width=8,
    epochs=6,
    batch_size=64,
    limit_train=1500,
    limit_eval=128,
    cutout=0,
    lr=0.05,
)


@pytest.fixture(scope="session")
def trained_shapes_run(tmp_path_factory) -> Path:
    """A shapes run that has learned (trained once per session; read-only, copy to write)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: one thread is faster than oversubscribing
    try:
        return train_run(tmp_path_factory.mktemp("trained") / "run", **TRAINED)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_thread():
    """Explanation tests run faster on one thread than on oversubscribed shared cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_cli(*args: str, env: dict | None = None, cwd: Path | None = None, timeout: int = 600):
    """Run the real ``explainkit`` CLI in a subprocess."""
    full_env = {**os.environ, "EXPLAINKIT_LOAD_PLUGINS": "", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "explainkit", *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
