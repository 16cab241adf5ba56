"""Deprecated: the analyzer contract moved to :mod:`explainkit.analyzer`, the host to
:mod:`explainkit.runner`. Importing from here still works for plugins written against
explainkit 0.1, with a DeprecationWarning naming the new home.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

_MOVED = {
    "Option": "explainkit.analyzer",
    "Analyzer": "explainkit.analyzer",
    "AnalysisContext": "explainkit.analyzer",
    "ARTIFACT_KINDS": "explainkit.analyzer",
    "NEEDS": "explainkit.analyzer",
    "analyze": "explainkit.runner",
}


def __getattr__(name: str) -> Any:
    if name not in _MOVED:
        raise AttributeError(f"module 'explainkit.analysis' has no attribute {name!r}")
    home = _MOVED[name]
    warnings.warn(
        f"explainkit.analysis.{name} moved to {home}.{name}; import it from there "
        "(or from explainkit)",
        DeprecationWarning,
        stacklevel=2,
    )
    return getattr(importlib.import_module(home), name)
