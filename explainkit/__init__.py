"""explainkit: train image classifiers and explain what they learned.

Only the standard library and pluggy are imported here, so ``explainkit --help`` stays fast;
the public names below are looked up in their own modules on first use (PEP 562), so
``help(explainkit.analyze)`` shows the real function and importing the package stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

import pluggy

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("explainkit")
"""Marker for plugin hook implementations: ``@explainkit.hookimpl``."""

# Public name -> the module that defines it.
_PUBLIC = {
    "Analyzer": "explainkit.analyzer",
    "AnalysisContext": "explainkit.analyzer",
    "Option": "explainkit.analyzer",
    "analyze": "explainkit.runner",
    "evaluate": "explainkit.evaluation",
    "RunWriter": "explainkit.evaluation",
    "load_model": "explainkit.train.checkpoint",
    "open_store": "explainkit.store",
    "RunDir": "explainkit.rundir",
}

__all__ = ["__version__", "hookimpl", *_PUBLIC]


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'explainkit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])
