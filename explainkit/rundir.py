"""RunDir: the one place that knows a run directory's layout, its lock and its config.

Every module that reads or writes a run goes through a :class:`RunDir`, so a file name is
spelled once and every reader validates the same way::

    runs/NAME/
      config.json       resolved config, model spec, data facts (read_config validates it)
      checkpoints/      epoch_NNN.pt, last.pt, best.pt
      predictions.h5    the HDF5 prediction store
      analyses/NAME/    one folder per analyzer, with its manifest.json
      report.html       explainkit report RUN
      train.log         the per-epoch lines train printed
      .lock             flock'ed by the process writing the run (and its pid)
      .setup            written when explainkit starts making the run, removed once
                        config.json is written: what alone makes a folder a half-made run

Only the standard library and explainkit's config dataclasses are imported here: analysis
commands validate a run without torch.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from explainkit.arguments import plain_kwargs
from explainkit.config import IMAGE_SIZE_MAX, WIDTH_MAX, EvalConfig, TrainConfig
from explainkit.errors import ConfigError, RunError, brief, describe, write_failed
from explainkit.files import read_regular_file

__all__ = [
    "COMMANDS",
    "CONFIG_FORMAT",
    "CONFIG_VERSION",
    "RunDir",
    "RunLock",
    "check_run_config",
    "pid_alive",
    "remove_stale_tmp",
]

CONFIG_FORMAT = "explainkit-run"
CONFIG_VERSION = 1
# What wrote a run (config.json's "command"), and the options its config section holds.
COMMANDS = {"train": TrainConfig, "evaluate": EvalConfig}


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (on this host)."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError, ValueError):  # gone, or no pid at all
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
    STORE_EPOCHS = "predictions.epochs"  # the store's epoch files (store.epochs_folder)
    CHECKPOINTS = "checkpoints"
    ANALYSES = "analyses"
    REPORT = "report.html"
    LOG = "train.log"
    LOCK = ".lock"
    SETUP = ".setup"  # explainkit is making this run: see is_half_made
    MANIFEST = "manifest.json"  # inside each analyses/NAME/ folder
    # What ``--overwrite`` may delete: the files a run writes, and nothing else.
    OWNED = (CONFIG, STORE, STORE_EPOCHS, CHECKPOINTS, ANALYSES, REPORT, LOG, STORE + ".tmp", SETUP)

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
    def store_epochs(self) -> Path:
        """The folder of the store's epoch files (schema v2), one per committed epoch."""
        return self.path / self.STORE_EPOCHS

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
    def log_path(self) -> Path:
        """The per-epoch training log, the lines ``train`` prints, appended as they come."""
        return self.path / self.LOG

    @property
    def lock_path(self) -> Path:
        return self.path / self.LOCK

    @property
    def setup_path(self) -> Path:
        """The half-made marker: explainkit began this run and has not written its config."""
        return self.path / self.SETUP

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
        """The pid recorded in the lock file, or None when there is none to read."""
        try:
            data: Any = json.loads(self.lock_path.read_text())
            return int(data["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def is_locked(self) -> bool:
        """Whether a live process holds the run's lock (the kernel knows; no pid guessing)."""
        try:
            fd = os.open(self.lock_path, os.O_RDONLY)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # closing drops the probe's shared lock
        return False

    def foreign_entries(self) -> list[str]:
        """Names in the folder that no run writes (a user's files, another program's)."""
        return sorted(p.name for p in self.path.iterdir() if not _is_run_file(p.name))

    def is_half_made(self) -> bool:
        """A folder explainkit began to make a run in and was stopped: its own marker says
        so (``.setup``), and there is no config yet. Nothing else makes a folder half-made:
        a user's ``checkpoints/`` or ``train.log`` is the user's."""
        return self.setup_path.is_file() and not self.has_config and not self.has_store

    def mark_setup(self) -> None:
        """Write the half-made marker (a new run, before its first file)."""
        # Not atomic on purpose: the name is the marker, so a write cut short still marks.
        try:
            self.setup_path.write_text(json.dumps({"pid": os.getpid()}) + "\n")
        except OSError as e:
            raise RunError(write_failed(self.setup_path, e)) from e

    def end_setup(self) -> None:
        """Remove the half-made marker: config.json now says what the folder is."""
        self.setup_path.unlink(missing_ok=True)

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
        if not path.is_file() and self.is_half_made():
            raise RunError(
                f"{self.path} was stopped during setup, before its config was written; "
                "start it again with the same options and --overwrite"
            )
        if not path.is_file():
            raise RunError(f"{self.path} has no config.json; is it an explainkit run directory?")
        raw = read_regular_file(path, "run config", RunError)  # bounded; no FIFO, no device
        try:
            data = json.loads(raw.decode("utf-8"))
        except (ValueError, RecursionError) as e:  # bad JSON or UTF-8, 5,000-digit ints, depth
            raise RunError(f"{path} is not valid JSON; the run directory is damaged") from e
        if not isinstance(data, dict) or data.get("format") != CONFIG_FORMAT:
            raise RunError(f"{path} is not an explainkit run config")
        version = data.get("format_version", 0)
        if not isinstance(version, int) or isinstance(version, bool):
            raise RunError(f"{path} has an invalid format_version; the run directory is damaged")
        if version > CONFIG_VERSION:
            raise RunError(f"{path} is from a newer explainkit; upgrade explainkit to read it")
        return check_run_config(data, path)

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

    def create(self, overwrite: bool) -> RunLock:
        """Make the run directory (or with ``overwrite`` empty a previous run) and lock it.

        The lock is taken before anything is checked or deleted, so two processes started
        together can never both pass the checks. The folder must be empty, a run (replaced
        only with ``overwrite``), or half-made by explainkit's own marker (taken over like an
        empty one). Any other folder that is not empty is refused, deleting nothing: without
        ``overwrite`` always; with it, when it holds a name no run writes. Then the marker
        is written; config.json replaces it (:meth:`end_setup`).

        Returns:
            The held lock; release it when the run is done.
        """
        if self.path.exists() and not self.path.is_dir():
            raise RunError(f"{self.path} exists and is not a directory; choose another --out")
        self.path.mkdir(parents=True, exist_ok=True)
        lock = RunLock(self)
        lock.acquire()
        try:
            self._clear_for_new_run(overwrite)
            self.mark_setup()
        except BaseException:
            lock.release()
            raise
        return lock

    def _looks_ours(self) -> bool:
        """Whether config.json or predictions.h5 are explainkit's, not a user's files that
        carry those names: our config names its format in its first line, our store is HDF5
        (a damaged run of ours still passes; read_config says what is wrong with it)."""
        try:
            if self.has_config:
                with open(self.config_path, "rb") as f:
                    return f'"{CONFIG_FORMAT}"'.encode() in f.read(4096)
            with open(self.store_path, "rb") as f:
                return f.read(8) == b"\x89HDF\r\n\x1a\n"
        except OSError:
            return False

    def _clear_for_new_run(self, overwrite: bool) -> None:
        entries = [p.name for p in self.path.iterdir() if p.name != self.LOCK]
        if not entries:
            return
        if self.is_run() and self._looks_ours():
            if not overwrite:
                raise RunError(
                    f"{self.path} already exists; pass --overwrite to replace it, --resume "
                    "to continue it, or choose another --out"
                )
        elif not self.is_half_made():
            shown = ", ".join(brief(n, 40) for n in sorted(entries)[:3])
            more = ", ..." if len(entries) > 3 else ""
            foreign = self.foreign_entries()
            if foreign or not overwrite:
                hint = "" if foreign else ", or pass --overwrite to delete and replace them"
                raise ConfigError(
                    f"--out {self.path} is not empty ({shown}{more}) and is not an explainkit "
                    f"run; nothing was deleted: choose an empty or new --out{hint}"
                )
        for entry in self.path.iterdir():  # a run's own files only; a half-made run's too
            if _is_run_file(entry.name) and entry.name != self.LOCK:
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()

    def open_existing(self) -> RunLock:
        """Lock an existing run to continue it; RunError when there is none to continue."""
        if not self.path.is_dir():
            self.read_config()  # says what is wrong with the path
        lock = RunLock(self)
        lock.acquire()
        try:
            self.read_config()
        except BaseException:
            lock.release()
            raise
        return lock


_STALE = re.compile(r"\.(.+)\.(tmp|old|parts)-(\d+)(-.*)?")


def remove_stale_tmp(analyses: Path, name: str | None = None) -> None:
    """Remove the temporary folders that killed ``analyze`` processes (or torchrun ranks)
    left in ``analyses/`` (``.<analyzer>.tmp-<pid>``, ``.old-``, ``.parts-``; their pid is
    gone), of every analyzer, not only ``name``'s: the next analyze clears them all."""
    if not analyses.is_dir():
        return
    for path in analyses.iterdir():
        m = _STALE.fullmatch(path.name)
        if m is None or not path.is_dir():
            continue
        pid = int(m.group(3))
        if pid != os.getpid() and not pid_alive(pid):
            shutil.rmtree(path, ignore_errors=True)


def _is_run_file(name: str) -> bool:
    """Whether a run writes a file of this name (its own files, lock and temporary files)."""
    if name in RunDir.OWNED or name == RunDir.LOCK:
        return True
    return bool(re.fullmatch(r"\.(config\.json|report\.html)\.tmp-\d+", name))


class RunLock:
    """The writer lock of a run: ``flock`` on ``RUN/.lock``, which also records the pid.

    The kernel holds the lock for the process and drops it when the process dies, however
    it dies, so a stale lock file never blocks anyone. The file is removed on release; a
    process that locked a file which was removed meanwhile (its inode is no longer the one
    at the path) lets go and tries again, so two processes can never both hold the lock.
    """

    def __init__(self, run: RunDir | str | os.PathLike[str]) -> None:
        self.run = run if isinstance(run, RunDir) else RunDir(run)
        self.path = self.run.lock_path
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                owner = self.run.lock_owner()
                who = f" (pid {owner})" if owner else ""
                raise RunError(
                    f"{self.run.path} is in use by another explainkit process{who}; wait for "
                    "it to finish or use another --out"
                ) from None
            if _same_file(fd, self.path):
                break
            os.close(fd)  # the holder removed this file as we locked it: take the new one
        owner = json.dumps({"pid": os.getpid(), "host": os.uname().nodename})
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, owner.encode(), 0)
        except OSError as e:  # a full disk: say which file, and hold nothing
            os.close(fd)
            raise RunError(write_failed(self.path, e)) from e
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                self.path.unlink(missing_ok=True)  # while still locked: no one holds it next
            finally:
                os.close(fd)  # closing releases the flock

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def check_run_config(data: Any, path: str | os.PathLike[str]) -> dict[str, Any]:
    """Validate a whole ``RUN/config.json`` document; RunError with one sentence otherwise.

    ``command`` says what wrote the run: ``"train"`` (the default; older runs lack the key) or
    ``"evaluate"`` (``explainkit evaluate``, ``explainkit.evaluate``, ``RunWriter``). The
    ``config`` section goes through that command's rules, TrainConfig's or EvalConfig's (types,
    ranges, choices; keys it lacks take their defaults, without the memory check: a run
    trained elsewhere is readable here; names are not checked against the registries, so a
    run stays readable without the plugin that trained it). ``model`` needs arch, num_classes,
    input_shape (3 positive ints) and default_layer, and may hold width, kwargs (the model's
    build arguments) and reshape; ``data`` needs classes (one name per class) and mean/std
    (finite, std > 0).
    Returns the document with its ``command`` and its complete ``config`` section (every
    field of the command's config).
    """
    where = str(path)

    def fail(problem: str) -> RunError:
        return RunError(f"{where}: {problem}; the run directory is damaged")

    if not isinstance(data, dict):
        raise fail(f"the document must be a JSON object, got {type(data).__name__}")
    sections = {}
    for name in ("config", "model", "data"):
        section = data.get(name)
        if not isinstance(section, dict) or not section:
            got = "nothing" if section is None else describe(section)
            raise fail(f"the {name} section must be a non-empty object, got {got}")
        sections[name] = section
    version = data.get("format_version", 0)
    if isinstance(version, bool) or not isinstance(version, int):
        raise fail(f"format_version must be int, got {describe(version)}")

    command = data.get("command", "train")
    if command not in COMMANDS:
        raise fail(f"command must be one of {', '.join(COMMANDS)}, got {describe(command)}")
    options = COMMANDS[command]
    try:
        labels = {name: f"config.{name}" for name in options.fields_by_name()}
        config = options.from_dict(sections["config"], source="config", labels=labels)
        config.check_values(labels)
    except ConfigError as e:
        raise fail(str(e)) from None

    model = sections["model"]
    _run_text(fail, model, "model.arch")
    if "width" in model:  # explainkit's ResNets; other models have none
        _run_int(fail, model, "model.width", 1, WIDTH_MAX)
    kwargs = model.get("kwargs", {})
    if not isinstance(kwargs, dict) or not plain_kwargs(kwargs):
        raise fail(f"model.kwargs must map names to plain values, got {describe(kwargs)}")
    if "reshape" in model:
        _run_text(fail, model, "model.reshape")
    num_classes = _run_int(fail, model, "model.num_classes", 1, 1_000_000)
    shape = model.get("input_shape")
    if (
        not isinstance(shape, list)
        or len(shape) != 3
        or not all(_is_int(v) and 1 <= v <= IMAGE_SIZE_MAX for v in shape)
    ):
        raise fail(
            f"model.input_shape must be a list of 3 ints from 1 to {IMAGE_SIZE_MAX}, "
            f"got {describe(shape)}"
        )
    _run_text(fail, model, "model.default_layer")

    info = sections["data"]
    classes = info.get("classes")
    if not isinstance(classes, list) or not classes:
        raise fail(f"data.classes must be a non-empty list of names, got {describe(classes)}")
    if not all(isinstance(c, str) for c in classes):
        bad = next(c for c in classes if not isinstance(c, str))
        raise fail(f"data.classes must hold names (str), got {describe(bad)}")
    if len(classes) != num_classes:
        raise fail(
            f"data.classes names {len(classes)} classes but model.num_classes is {num_classes}"
        )
    for key in ("mean", "std"):
        values = info.get(key)
        if (
            not isinstance(values, list)
            or len(values) != shape[0]
            or not all(_is_number(v) and math.isfinite(v) for v in values)
        ):
            raise fail(
                f"data.{key} must be a list of {shape[0]} finite numbers, got {describe(values)}"
            )
    if not all(v > 0 for v in info["std"]):
        raise fail(f"data.std must be positive, got {brief(info['std'])}")
    if "dataset" in info:
        _run_text(fail, info, "data.dataset")
    for key in ("num_train", "num_eval"):
        if key in info:
            _run_int(fail, info, f"data.{key}", 0, 10**12)
    if "environment" in data and not isinstance(data["environment"], dict):
        raise fail(f"environment must be an object, got {describe(data['environment'])}")
    if "world_size" in data:
        _run_int(fail, data, "world_size", 1, 1_000_000)
    return {**data, "command": command, "config": config.to_dict()}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _run_int(
    fail: Callable[[str], RunError], section: dict[str, Any], key: str, low: int, high: int
) -> int:
    value = section.get(key.rsplit(".", 1)[-1])
    if not _is_int(value) or not low <= value <= high:
        raise fail(f"{key} must be an int from {low} to {high}, got {describe(value)}")
    return value


def _run_text(fail: Callable[[str], RunError], section: dict[str, Any], key: str) -> str:
    value = section.get(key.rsplit(".", 1)[-1])
    if not isinstance(value, str) or not value or len(value) > 200:
        raise fail(f"{key} must be a name (non-empty str), got {describe(value)}")
    return value
