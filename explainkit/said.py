"""What an analyzer said while it ran: its warnings, kept for its manifest and the page.

A warning printed to stderr is lost once the terminal scrolls, and a report that says "ok"
over all-zero heatmaps misleads. So the host records, while each analyzer runs, every Python
warning shown (``warnings.warn``, from the analyzer or the libraries it calls) and every
warning on explainkit's logger, and writes them into the analyzer's ``manifest.json``. Each is
tied to the first of the analyzer's files that did not exist yet when it was raised: the
figure that the warned-about computation went into, so the page shows it next to that figure.

Nothing is silenced: the warnings are still printed as before. Python's filters still decide
what is shown (``ignore`` stays ignored), and a message repeated word for word is kept once,
with a count.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

__all__ = ["Said", "MAX_WARNINGS", "MAX_MESSAGE"]

MAX_WARNINGS = 20  # distinct warnings kept per analyzer run; the rest are counted
MAX_MESSAGE = 1000  # characters kept of one message


class _LogHandler(logging.Handler):
    def __init__(self, said: Said, echo: bool) -> None:
        super().__init__(logging.WARNING)
        self.said, self.echo = said, echo

    def emit(self, record: logging.LogRecord) -> None:
        self.said.add(record.getMessage(), "log")
        if self.echo and logging.lastResort is not None:  # printed as it was without us
            logging.lastResort.handle(record)


class Said:
    """Records warnings while in a ``with`` block; ``records(artifacts)`` for the manifest.

    Args:
        folder: The analyzer's output folder, to tell which of its files exist at each
            warning.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._seen: dict[tuple[str, str], dict[str, Any]] = {}
        self.omitted = 0
        self._saved: Any = None

    def add(self, message: str, category: str) -> None:
        key = (category, message)
        if key in self._seen:
            self._seen[key]["count"] += 1
            return
        if len(self._seen) >= MAX_WARNINGS:
            self.omitted += 1
            return
        text = message if len(message) <= MAX_MESSAGE else message[: MAX_MESSAGE - 1] + "…"
        self._seen[key] = {"message": text, "category": category, "count": 1,
                           "_before": self._files()}  # fmt: skip

    def _files(self) -> set[str]:
        try:
            return {str(p.relative_to(self.folder)) for p in self.folder.rglob("*")}
        except OSError:
            return set()

    def __enter__(self) -> Said:
        catcher = warnings.catch_warnings()  # restores the filters and showwarning on exit
        catcher.__enter__()
        shown = warnings.showwarning

        def record(message: Any, category: Any, *args: Any, **kwargs: Any) -> None:
            self.add(str(message), category.__name__)
            shown(message, category, *args, **kwargs)

        warnings.showwarning = record
        logger = logging.getLogger("explainkit")
        handler = _LogHandler(self, echo=not logger.hasHandlers())
        logger.addHandler(handler)
        self._saved = (catcher, logger, handler)
        return self

    def __exit__(self, *exc: object) -> None:
        catcher, logger, handler = self._saved
        logger.removeHandler(handler)
        catcher.__exit__(*exc)

    def records(self, artifacts: list[dict]) -> list[dict[str, Any]]:
        """The warnings in order, each with ``artifact``: the first of ``artifacts`` (in the
        manifest's order) not yet written when it was raised, or None."""
        out = []
        for item in self._seen.values():
            before = item["_before"]
            concerns = next(
                (a["path"] for a in artifacts if str(a.get("path")) not in before), None
            )
            out.append({k: v for k, v in item.items() if k != "_before"} | {"artifact": concerns})
        return out
