"""What tests share besides fixtures: paths, tiny runs, the CLI in a subprocess, models."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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


def registries():
    """The built-in plugins' registries (tests load no installed third-party plugin)."""
    from explainkit.manager import load_registries

    return load_registries()


def build_model(arch: str = "resnet18-s8", num_classes: int = 10, **kwargs):
    """An untrained model of a registered name, built as a run builds it."""
    return registries().build_model(arch, num_classes, **kwargs)


def train_run(out: Path, overwrite: bool = False, **overrides) -> Path:
    from explainkit.config import TrainConfig
    from explainkit.train.trainer import train

    values = {"dataset": "shapes", "device": "cpu", **TINY, **overrides}
    return train(TrainConfig(**values), registries(), out=out, overwrite=overwrite, quiet=True)


def minimal_payload(num_classes: int = 3, width: int = 8) -> dict:
    """The least a checkpoint holds: a model spec and weights that fit it, and an epoch."""
    spec = {"arch": "resnet18-s8", "width": width, "num_classes": num_classes}
    model = build_model(spec["arch"], num_classes=num_classes, width=width)
    return {"model": spec, "state_dict": model.state_dict(), "epoch": 1}


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
