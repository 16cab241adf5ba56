"""Small tables and JSON files that analyzers write (public API).

Rows are classes, epochs or methods, not images: these files are for people and reports.
Every CSV has a header row; floats are written so they read back exactly.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["write_csv", "write_json"]


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> Path:
    """Write ``header`` then ``rows``; numpy scalars become plain numbers."""
    if not header:
        raise ValueError("a CSV table needs a header row")
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for row in rows:
            writer.writerow([_cell(v) for v in row])
    return path


def _cell(value: Any) -> Any:
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return repr(value)  # round-trips exactly
    return value


def write_json(path: Path, data: Any) -> Path:
    """Write ``data`` as indented JSON; numpy scalars and arrays become lists and numbers."""
    with open(path, "w") as f:
        json.dump(data, f, indent=2, default=_json_default)
        f.write("\n")
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")
