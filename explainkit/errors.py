"""Errors a user can act on, and the one style their messages are written in.

Messages are one lowercase sentence: what failed, then what to do (``unknown analyzer
'gradcm'; did you mean 'gradcam'? available: ...``). The CLI prints them as one line and exits
with the error's ``exit_code``: 1 for failures, 2 for bad input values (``ConfigError``) as
for click's usage errors.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable
from typing import Any

BRIEF = 60  # characters of a value shown in an error message


class ExplainkitError(Exception):
    """Base class: the message says what failed and what to do next."""

    exit_code = 1


class ConfigError(ExplainkitError):
    """A config file or option value is invalid (a usage error: the CLI exits 2)."""

    exit_code = 2


class DataError(ExplainkitError):
    """A dataset could not be read or is not what it claims to be."""


class RunError(ExplainkitError):
    """A run directory is missing, in use, damaged or of an unknown version."""


class StoreError(RunError):
    """The HDF5 prediction store is missing, damaged or not ours."""


class CheckpointError(RunError):
    """A checkpoint is missing, damaged, unsafe or not an explainkit checkpoint."""


class UntrustedImport(RunError):
    """A run names a model whose module would be imported without the user's consent
    (explainkit.trust)."""


class PluginError(ExplainkitError):
    """A plugin failed to load or registered something invalid."""


class AnalyzerError(ExplainkitError):
    """An analyzer could not run on this run directory."""


class AnalysisFailed(AnalyzerError):
    """An analyzer failed in ``analyze(collect_failures=False)``; ``results`` has every
    manifest, the failed ones with their error and traceback."""

    def __init__(self, results: list[dict[str, Any]]) -> None:
        failed = [m for m in results if m["status"] != "ok"]
        what = "; ".join(f"{m['analyzer']}: {m['error']}" for m in failed)
        super().__init__(
            f"{len(failed)} of {len(results)} analyzers failed ({what}); pass "
            "collect_failures=True to get their manifests instead"
        )
        self.results = results


class TrainingInterrupted(ExplainkitError):
    """SIGINT/SIGTERM stopped training at a safe point; completed epochs are kept."""


class TrainingDiverged(ExplainkitError):
    """The loss or the logits became NaN or infinite; the epoch was not committed."""


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


def write_failed(path: object, e: BaseException) -> str:
    """``cannot write PATH: REASON; WHAT TO DO``: the advice fits the reason (a full disk is
    not a missing folder or a read-only file system)."""
    import errno

    reason = getattr(e, "strerror", None) or first_line(e, limit=200) or type(e).__name__
    code = getattr(e, "errno", None)
    if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        advice = "free some disk space and try again"
    elif code in (errno.EACCES, errno.EPERM):
        advice = "check the permissions of its folder or choose another path"
    elif code == errno.EROFS:
        advice = "the file system is read-only; choose another path"
    elif code in (errno.ENOENT, errno.ENOTDIR):
        advice = "its folder does not exist or cannot hold files; choose another path"
    else:
        advice = "choose another path"
    return f"cannot write {path}: {reason}; {advice}"


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


# -- showing values in messages ------------------------------------------------------------


def brief(value: Any, limit: int = BRIEF) -> str:
    """``repr(value)`` cut to about ``limit`` characters, safe on any value: a huge integer
    (whose repr would raise), a deep list (whose repr would recurse) or a megabyte string."""
    text = _short_repr(value, 3, limit + 1)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def describe(value: Any, limit: int = BRIEF) -> str:
    """The value's type and a short repr: ``str 'many'``, ``list [1, 2]``."""
    if value is None:
        return "None"
    return f"{type(value).__name__} {brief(value, limit)}"


def _short_repr(value: Any, depth: int, budget: int) -> str:
    if isinstance(value, bool) or value is None or isinstance(value, float):
        return repr(value)
    if isinstance(value, int):
        if value.bit_length() > 256:  # repr of a 5,000-digit int raises ValueError
            digits = int(value.bit_length() * math.log10(2)) + 1
            return f"<an integer of about {digits} digits>"
        return repr(value)
    if isinstance(value, str):
        return repr(value[:budget])
    if isinstance(value, (list, tuple, dict)):
        if not value:
            return repr(type(value)())
        if depth == 0:
            return "[…]" if not isinstance(value, dict) else "{…}"
        items = value.items() if isinstance(value, dict) else value
        parts: list[str] = []
        used = 2
        for item in items:
            if used >= budget:
                parts.append("…")
                break
            if isinstance(value, dict):
                k, v = item
                text = _short_repr(k, depth - 1, budget - used)
                text += ": " + _short_repr(v, depth - 1, budget - used - len(text))
            else:
                text = _short_repr(item, depth - 1, budget - used)
            parts.append(text)
            used += len(text) + 2
        inner = ", ".join(parts)
        return "{" + inner + "}" if isinstance(value, dict) else "[" + inner + "]"
    return f"<{type(value).__name__}>"


def cut_text(text: str, limit: int = 80) -> str:
    """A foreign message (PyYAML's) on one line, cut at a word boundary."""
    text = " ".join(str(text).split())
    if len(text) > limit:
        text = text[:limit].rsplit(" ", 1)[0].rstrip(",;:(") + " …"
    return text


def unknown_options_message(
    unknown: list[Any], names: set[str], command: str = "explainkit train"
) -> str:
    """``unknown option 'epoch'; did you mean 'epochs'?`` for keys of a config mapping."""
    shown = ", ".join(brief(k, 30) for k in unknown[:3])
    more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
    text = f"unknown option{'s' if len(unknown) > 1 else ''} {shown}{more}"
    first = unknown[0]
    close = did_you_mean(first, sorted(names)) if isinstance(first, str) and len(first) < 50 else []
    if close:
        return f"{text}; did you mean {close[0]!r}?"
    return f"{text}; the options are the long flags of `{command} --help`"


def size_text(n: float) -> str:
    """``1.5 GiB``: a byte count for a message."""
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError  # pragma: no cover
