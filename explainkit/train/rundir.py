"""Run directories: creation without clobbering, and a lock so two trainers never share one."""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from explainkit.errors import RunError

LOCK_NAME = ".lock"
RUN_FILES = ("config.json", "predictions.h5", "checkpoints", "analyses", "report.html")


def default_run_dir(root: str | Path = "runs") -> Path:
    """A new, not yet existing, timestamped folder under ``root``."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path(root) / stamp
    n = 1
    while path.exists():
        n += 1
        path = Path(root) / f"{stamp}-{n}"
    return path


def is_run_dir(path: Path) -> bool:
    return (path / "config.json").is_file() or (path / "predictions.h5").is_file()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """An exclusive lock file holding the owner's pid; a dead owner's lock is taken over."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self.held = False

    def acquire(self) -> None:
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = read_lock_owner(self.path.parent)
                if owner is not None and pid_alive(owner):
                    raise RunError(
                        f"{self.path.parent} is in use by another explainkit process "
                        f"(pid {owner}); wait for it to finish or use another --out"
                    ) from None
                # Stale lock from a killed process: remove and retry once.
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump({"pid": os.getpid(), "host": os.uname().nodename}, f)
            self.held = True
            return
        raise RunError(f"could not lock {self.path.parent}; remove {self.path} if no run uses it")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def read_lock_owner(run_dir: Path) -> int | None:
    try:
        data: Any = json.loads((Path(run_dir) / LOCK_NAME).read_text())
        return int(data["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def prepare_run_dir(out: Path, overwrite: bool) -> None:
    """Create ``out``, or with ``overwrite`` empty a previous run there; other data is kept."""
    if out.exists() and not out.is_dir():
        raise RunError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        owner = read_lock_owner(out)
        if owner is not None and pid_alive(owner):
            raise RunError(
                f"{out} is in use by another explainkit process (pid {owner}); "
                "wait for it to finish or use another --out"
            )
        if not overwrite:
            raise RunError(
                f"{out} already exists; pass --overwrite to replace it, --resume to continue it, "
                "or choose another --out"
            )
        if not is_run_dir(out):
            raise RunError(
                f"{out} is not empty and is not an explainkit run; refusing to delete it even "
                "with --overwrite"
            )
        for name in RUN_FILES + ("predictions.h5.tmp",):
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        if e.errno == errno.EEXIST:  # pragma: no cover
            raise RunError(f"{out} exists and is not a directory") from e
        raise
