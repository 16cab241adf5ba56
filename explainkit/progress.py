"""Progress bars with throughput and time left, on a terminal and in a notebook alike.

tqdm's own rule (``disable=None``) hides a bar whenever stderr is not a terminal, which is
always the case in Jupyter; there ``tqdm.auto`` draws a widget instead, so bars are shown in
a terminal or a notebook kernel and nowhere else (logs, CI, pipes).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

__all__ = ["duration", "progress", "showing_progress"]


def showing_progress() -> bool:
    """Whether a person is watching: a terminal on stderr, or a Jupyter kernel."""
    return sys.stderr.isatty() or "ipykernel" in sys.modules


def progress(
    iterable: Iterable[Any] | None = None,
    desc: str | None = None,
    total: int | None = None,
    unit: str = "it",
    quiet: bool = False,
) -> Any:
    """A tqdm bar (``tqdm.auto``: a widget in notebooks) that goes away when done."""
    from tqdm.auto import tqdm

    return tqdm(
        iterable,
        desc=desc,
        total=total,
        unit=unit,
        leave=False,
        dynamic_ncols=True,
        disable=quiet or not showing_progress(),
    )


def duration(seconds: float) -> str:
    """``12 s``, ``3 min``, ``1.5 h``: how long something takes, for a person."""
    if seconds < 90:
        return f"{max(seconds, 1):.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
