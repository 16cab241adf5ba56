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
    # explaining a model in a notebook
    "compute_cam": "explainkit.explain.gradcam",
    "compute_cams": "explainkit.explain.gradcam",
    "explain_image": "explainkit.explain.image",
    "load_image": "explainkit.explain.image",
    "CAMResult": "explainkit.explain.cam_result",
    # runs: evaluate a model, analyze and read a run
    "analyze": "explainkit.api",
    "evaluate": "explainkit.api",
    "write_report": "explainkit.api",
    "RunWriter": "explainkit.api",
    "load_model": "explainkit.api",
    "load_registries": "explainkit.api",
    "open_store": "explainkit.store",
    "RunDir": "explainkit.rundir",
    "TrainConfig": "explainkit.config",
    "EvalConfig": "explainkit.config",
    # what plugin authors subclass or register
    "Analyzer": "explainkit.analyzer",
    "AnalysisContext": "explainkit.analyzer",
    "Option": "explainkit.analyzer",
    "ModelEntry": "explainkit.hookspecs",
    "ModelFamily": "explainkit.hookspecs",
    "DatasetEntry": "explainkit.hookspecs",
    "Dataset": "explainkit.data",
    "Registries": "explainkit.registries",
    # errors, each a one-sentence message
    "ExplainkitError": "explainkit.errors",
    "ConfigError": "explainkit.errors",
    "DataError": "explainkit.errors",
    "RunError": "explainkit.errors",
    "UntrustedImport": "explainkit.errors",
    "StoreError": "explainkit.errors",
    "CheckpointError": "explainkit.errors",
    "PluginError": "explainkit.errors",
    "AnalyzerError": "explainkit.errors",
    "AnalysisFailed": "explainkit.errors",
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
