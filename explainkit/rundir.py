"""RunDir: the one place that knows a run directory's layout, its lock and its config.

Every module that reads or writes a run goes through a :class:`RunDir`, so a file name is
spelled once and every reader validates the same way::

    runs/NAME/
      config.json       resolved config, model spec, data facts (read_config validates it)
      checkpoints/      epoch_NNN.pt, last.pt, best.pt
      predictions.h5    the HDF5 prediction store
      analyses/NAME/    one folder per analyzer, with its manifest.json
      report.html       explainkit report RUN
      .lock             the pid of the process writing the run

Only the standard library is imported here: analysis commands validate a run without torch.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from explainkit.errors import RunError

__all__ = ["RunDir", "RunLock", "CONFIG_FORMAT", "CONFIG_VERSION", "pid_alive"]

CONFIG_FORMAT = "explainkit-run"
CONFIG_VERSION = 1


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (on this host)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunDir:
    """A run directory: where each of its files lives, and the checks every reader needs.

    Args:
        path: The run directory (it need not exist yet).
    """

    CONFIG = "config.json"
    STORE = "predictions.h5"
    CHECKPOINTS = "checkpoints"
    ANALYSES = "analyses"
    REPORT = "report.html"
    LOCK = ".lock"
    MANIFEST = "manifest.json"  # inside each analyses/NAME/ folder
    # What ``--overwrite`` may delete: the files a run writes, and nothing else.
    OWNED = (CONFIG, STORE, CHECKPOINTS, ANALYSES, REPORT, STORE + ".tmp")

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __fspath__(self) -> str:
        return os.fspath(self.path)

    # -- layout ----------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.path / self.CONFIG

    @property
    def store_path(self) -> Path:
        return self.path / self.STORE

    @property
    def checkpoints(self) -> Path:
        return self.path / self.CHECKPOINTS

    @property
    def analyses(self) -> Path:
        return self.path / self.ANALYSES

    @property
    def report_path(self) -> Path:
        return self.path / self.REPORT

    @property
    def lock_path(self) -> Path:
        return self.path / self.LOCK

    def analysis(self, name: str) -> Path:
        """The output folder of analyzer ``name``."""
        return self.analyses / name

    def manifests(self) -> list[Path]:
        """The manifest.json of every published analysis, sorted by analyzer name."""
        return sorted(self.analyses.glob(f"*/{self.MANIFEST}"))

    def checkpoint(self, epoch: int | str) -> Path:
        """``checkpoints/epoch_NNN.pt`` for an epoch number, or a named one (``"last"``)."""
        if isinstance(epoch, int):
            return self.checkpoints / f"epoch_{epoch:03d}.pt"
        return self.checkpoints / f"{epoch}.pt"

    # -- state -----------------------------------------------------------------------------
    @property
    def has_config(self) -> bool:
        return self.config_path.is_file()

    @property
    def has_store(self) -> bool:
        return self.store_path.is_file()

    def is_run(self) -> bool:
        """Whether the folder holds an explainkit run (a config or a prediction store)."""
        return self.has_config or self.has_store

    def lock_owner(self) -> int | None:
        """The pid recorded in the lock file, or None when there is no readable lock."""
        try:
            data: Any = json.loads(self.lock_path.read_text())
            return int(data["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def in_use_by(self) -> int | None:
        """The pid of a live process writing this run, or None."""
        owner = self.lock_owner()
        return owner if owner is not None and pid_alive(owner) else None

    # -- checks ----------------------------------------------------------------------------
    def check(self) -> RunDir:
        """Return self when this is a readable run directory; RunError saying why otherwise."""
        where = str(self.path)
        if not self.path.exists():
            raise RunError(f"run directory {where!r} does not exist; pass a trained run")
        if not self.path.is_dir():
            raise RunError(f"{where!r} is a file, not a run directory")
        if not self.is_run():
            raise RunError(
                f"{where!r} is not an explainkit run (no config.json or predictions.h5); "
                "create one with `explainkit train`"
            )
        if self.has_config:
            self.read_config()  # refuses a damaged config or one from a newer explainkit
        return self

    def read_config(self) -> dict[str, Any]:
        """The run's config.json, validated; RunError with one sentence otherwise."""
        if not self.path.exists():
            raise RunError(f"run directory {self.path} does not exist")
        if not self.path.is_dir():
            raise RunError(f"{self.path} is not a directory; give the run directory of a run")
        path = self.config_path
        if not path.is_file():
            raise RunError(f"{self.path} has no config.json; is it an explainkit run directory?")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RunError(f"{path} is not valid JSON; the run directory is damaged") from e
        if not isinstance(data, dict) or data.get("format") != CONFIG_FORMAT:
            raise RunError(f"{path} is not an explainkit run config")
        version = data.get("format_version", 0)
        if not isinstance(version, int) or isinstance(version, bool):
            raise RunError(f"{path} has an invalid format_version; the run directory is damaged")
        if version > CONFIG_VERSION:
            raise RunError(f"{path} is from a newer explainkit; upgrade explainkit to read it")
        if not isinstance(data.get("config"), dict) or not isinstance(data.get("model"), dict):
            raise RunError(
                f"{path} lacks its config or model section; the run directory is damaged"
            )
        return data

    # -- creation --------------------------------------------------------------------------
    @staticmethod
    def new_default(root: str | Path = "runs") -> RunDir:
        """A new, not yet existing, timestamped folder under ``root``."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = Path(root) / stamp
        n = 1
        while path.exists():
            n += 1
            path = Path(root) / f"{stamp}-{n}"
        return RunDir(path)

    def prepare(self, overwrite: bool) -> None:
        """Create the folder, or with ``overwrite`` empty a previous run there.

        Files a run does not own are never deleted, and a folder that holds anything but a
        run is refused even with ``overwrite``.
        """
        out = self.path
        if out.exists() and not out.is_dir():
            raise RunError(f"{out} exists and is not a directory")
        if out.is_dir() and any(out.iterdir()):
            owner = self.in_use_by()
            if owner is not None:
                raise RunError(
                    f"{out} is in use by another explainkit process (pid {owner}); "
                    "wait for it to finish or use another --out"
                )
            if not overwrite:
                raise RunError(
                    f"{out} already exists; pass --overwrite to replace it, --resume to "
                    "continue it, or choose another --out"
                )
            if not self.is_run():
                raise RunError(
                    f"{out} is not empty and is not an explainkit run; refusing to delete it "
                    "even with --overwrite"
                )
            for name in self.OWNED:
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

    def lock(self) -> RunLock:
        """The run's writer lock (not yet acquired)."""
        return RunLock(self)


class RunLock:
    """An exclusive lock file holding the owner's pid; a dead owner's lock is taken over."""

    def __init__(self, run: RunDir | str | os.PathLike[str]) -> None:
        self.run = run if isinstance(run, RunDir) else RunDir(run)
        self.path = self.run.lock_path
        self.held = False

    def acquire(self) -> None:
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self.run.in_use_by()
                if owner is not None:
                    raise RunError(
                        f"{self.run.path} is in use by another explainkit process "
                        f"(pid {owner}); wait for it to finish or use another --out"
                    ) from None
                # Stale lock from a killed process: remove and retry once.
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump({"pid": os.getpid(), "host": os.uname().nodename}, f)
            self.held = True
            return
        raise RunError(f"could not lock {self.run.path}; remove {self.path} if no run uses it")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
