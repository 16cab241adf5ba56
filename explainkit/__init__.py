"""explainkit: train image classifiers and explain what they learned.

Only the standard library and pluggy are imported here, so ``explainkit --help`` stays fast;
the heavy public functions (``load_model``, ``open_store``, ``analyze``) import torch and h5py
when first called.
"""

from __future__ import annotations

from typing import Any

import pluggy

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("explainkit")
"""Marker for plugin hook implementations: ``@explainkit.hookimpl``."""

__all__ = ["__version__", "hookimpl", "load_model", "open_store", "analyze", "Analyzer"]


def load_model(path_or_run: Any, epoch: int | None = None, device: str = "cpu") -> Any:
    """Load a model from a checkpoint file or a run directory, in eval mode."""
    from explainkit.train.checkpoint import load_model as _load_model

    return _load_model(path_or_run, epoch=epoch, device=device)


def open_store(path: Any) -> Any:
    """Open a run's HDF5 prediction store (a file or a run directory) for reading."""
    from explainkit.store import open_store as _open_store

    return _open_store(path)


def analyze(run: Any, plugins: list[str] | None = None, **options: Any) -> list[dict]:
    """Run analyzers on a run directory from Python; returns their manifests."""
    from explainkit.analysis import analyze as _analyze

    return _analyze(run, plugins=plugins, **options)


def __getattr__(name: str) -> Any:
    if name == "Analyzer":
        from explainkit.analysis import Analyzer

        return Analyzer
    raise AttributeError(f"module 'explainkit' has no attribute {name!r}")
