"""Shared fixtures: tiny real runs trained once per session (width 8, a few hundred images)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.helpers import CIFAR_MINI, TRAINED, train_run  # sets EXPLAINKIT_LOAD_PLUGINS="" first


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


@pytest.fixture
def pm():
    """A plugin manager with the built-in plugins only (no entry points)."""
    from explainkit import manager

    return manager.get_plugin_manager(entrypoints=False, quiet=True)


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
