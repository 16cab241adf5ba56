"""Reading files a user hands over without letting them block, flood or crash a command.

A path given on the command line or found in a run directory may be a FIFO, a device, a
directory or a gigabyte of garbage: :func:`read_regular_file` reads only regular files and only
up to a bound, so a bad path is one sentence instead of a hang or an exhausted memory.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from explainkit.errors import ConfigError, ExplainkitError, size_text

__all__ = ["MAX_CONFIG_BYTES", "read_regular_file"]

MAX_CONFIG_BYTES = 1 << 20  # a config file holds a few dozen values; more is not a config


def _file_kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a named pipe"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def read_regular_file(
    path: str | os.PathLike[str],
    what: str = "config file",
    error: type[ExplainkitError] = ConfigError,
    limit: int = MAX_CONFIG_BYTES,
) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes; ``error`` with one sentence for
    anything else. A FIFO, a device (/dev/zero) or a directory is refused before it is opened
    (and again after, on the open file), so reading never blocks nor eats memory."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist; check the path") from None
    except (OSError, ValueError) as e:
        reason = getattr(e, "strerror", None) or "not a valid path"
        raise error(f"cannot read {what} {path}: {reason}") from None
    if not stat.S_ISREG(mode):
        raise error(f"{what} {path} is {_file_kind(mode)}; give a regular JSON or YAML file")
    flags = os.O_RDONLY
    for name in ("O_NONBLOCK", "O_NOCTTY", "O_CLOEXEC"):
        flags |= getattr(os, name, 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise error(f"cannot read {what} {path}: {e.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):  # swapped for something else since the check above
            raise error(f"{what} {path} is {_file_kind(mode)}; give a regular JSON or YAML file")
        chunks: list[bytes] = []
        size = 0
        while size <= limit:
            chunk = os.read(fd, limit + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as e:
        raise error(f"cannot read {what} {path}: {e.strerror}") from None
    finally:
        os.close(fd)
    if size > limit:
        raise error(
            f"{what} {path} is larger than {size_text(limit)}; a config file holds a few "
            "option values"
        )
    return b"".join(chunks)
