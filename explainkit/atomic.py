"""Atomic file replacement: a reader (or a crash) sees the old file or the new one, never part."""

from __future__ import annotations

import os
from pathlib import Path

from explainkit.errors import ExplainkitError, write_failed
from explainkit.faults import fault_point


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (the directory entry itself is flushed)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(
    path: str | Path,
    data: bytes | memoryview | str,
    error: type[ExplainkitError] = ExplainkitError,
    tmp: Path | None = None,
    fault: str | None = None,
) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync it, rename it over ``path``.

    Args:
        path: The file to create or replace.
        data: Its whole content (text is written as UTF-8).
        error: Raised, with one sentence naming ``path``, when the write fails (disk full).
        tmp: The temporary file (default ``.<name>.tmp-<pid>`` beside ``path``).
        fault: Name of the fault point between the write and the rename (tests kill there).
    """
    path = Path(path)
    tmp = tmp or path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if isinstance(data, str):
        data = data.encode("utf-8")
    try:
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise error(write_failed(path, e)) from e
        if fault:
            fault_point(fault)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
