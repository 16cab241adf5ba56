"""Errors a user can act on, and the one style their messages are written in.

Messages are one lowercase sentence: what failed, then what to do (``unknown analyzer
'gradcm'; did you mean 'gradcam'? available: ...``). The CLI prints them as one line and exits
with the error's ``exit_code``: 1 for failures, 2 for bad input values (``ConfigError``) as
for click's usage errors.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class ExplainkitError(Exception):
    """Base class: the message says what failed and what to do next."""

    exit_code = 1


class DataError(ExplainkitError):
    """A dataset could not be read or is not what it claims to be."""


class RunError(ExplainkitError):
    """A run directory is missing, in use, damaged or of an unknown version."""


class StoreError(RunError):
    """The HDF5 prediction store is missing, damaged or not ours."""


class CheckpointError(RunError):
    """A checkpoint is missing, damaged, unsafe or not an explainkit checkpoint."""


class PluginError(ExplainkitError):
    """A plugin failed to load or registered something invalid."""


class AnalyzerError(ExplainkitError):
    """An analyzer could not run on this run directory."""


def first_line(exc: BaseException, limit: int | None = None) -> str:
    """The first non-empty line of an exception's message, cut at a word boundary if long."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    if limit is not None and len(text) > limit:
        text = text[:limit].rsplit(" ", 1)[0].rstrip(",;:") + " …"
    return text


def error_sentence(exc: BaseException, plain: tuple[type[BaseException], ...] = ()) -> str:
    """One line for a user: explainkit's (and ``plain``) errors as they are, others typed.

    An error we raised already says what to do; anything else is shown with its type
    (``ValueError: ...``) so that a bug reads as one.
    """
    if isinstance(exc, SystemExit):
        return f"it called sys.exit({exc.code!r}); raise an exception instead"
    if isinstance(exc, (ExplainkitError, *plain)):
        return first_line(exc) or type(exc).__name__
    text = first_line(exc, limit=300)  # a foreign message can be a whole dump
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def did_you_mean(name: str, known: Iterable[str], n: int = 1) -> list[str]:
    """The known names closest to a mistyped one (possibly none)."""
    return difflib.get_close_matches(str(name), list(known), n=n, cutoff=0.6)


def unknown_name_message(kind: str, name: str, known: Iterable[str]) -> str:
    """``unknown analyzer 'gradcm'; did you mean 'gradcam'? available: ...``."""
    known = list(known)
    msg = f"unknown {kind} {name!r}"
    close = did_you_mean(name, known)
    if close:
        msg += f"; did you mean {close[0]!r}?"
    msg += f" available: {', '.join(known) if known else 'none'}"
    return msg
