"""The HDF5 prediction store, ``RUN/predictions.h5`` (schema in docs/store-format.md).

The store holds what analyzers need so they never touch the dataset: the evaluation images,
targets and source indices, optional object masks, per-epoch logits and the training history.

Commits are copy-on-write: an epoch is appended to an in-memory copy of the store, the copy is
written next to the original, flushed, fsynced and renamed over it. So a killed run leaves
either the old or the new file, never a half-written one, and a reader that has the store
open keeps a consistent snapshot while training goes on. ``committed_epochs`` is the commit
marker; readers ignore anything past it.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from explainkit import __version__
from explainkit.atomic import write_atomic
from explainkit.errors import StoreError
from explainkit.rundir import RunDir

FORMAT_NAME = "explainkit-predictions"
SCHEMA_VERSION = 1

HISTORY_COLUMNS: tuple[tuple[str, str], ...] = (
    ("epoch", "i8"),
    ("train_loss", "f8"),
    ("train_acc", "f8"),
    ("eval_loss", "f8"),
    ("eval_acc", "f8"),
    ("lr", "f8"),
    ("seconds", "f8"),
    ("images_per_s", "f8"),
)
HISTORY_DTYPE = np.dtype(list(HISTORY_COLUMNS))

# Every name written to the store, checked against docs/store-format.md by a test.
ROOT_ATTRIBUTES = (
    "format",
    "schema_version",
    "explainkit_version",
    "dataset",
    "classes",
    "model",
    "mean",
    "std",
    "input_shape",
    "default_layer",
    "eval_weights",
    "eval_tta",
)
DATASETS = (
    "eval/images",
    "eval/targets",
    "eval/index",
    "eval/masks",
    "logits",
    "history",
    "committed_epochs",
)

# What h5py and numpy raise on a damaged file (checked by tests/test_fuzz.py): each becomes a
# StoreError, so a corrupt store is one sentence, never a traceback.
_DAMAGE_ERRORS = (
    OSError,
    RuntimeError,
    KeyError,
    ValueError,
    TypeError,
    IndexError,
    ArithmeticError,
    MemoryError,
)

_COMPRESSION = {"compression": "gzip", "compression_opts": 1, "fletcher32": True}


def _text(value: str) -> np.bytes_:
    """A fixed-length UTF-8 string attribute (stored inline, covered by header checksums)."""
    return np.bytes_(str(value).encode("utf-8"))


def _decode(value: Any) -> Any:
    """Attribute value as Python data: fixed-length strings come back as bytes."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        value = value.item()
    return value.decode("utf-8") if isinstance(value, bytes) else value


def _commit(path: Path, buffer: io.BytesIO, fault: str | None = None) -> None:
    """Write a finished in-memory HDF5 image over ``path``.

    h5py builds files in memory (``io.BytesIO``) and only plain Python I/O touches the disk:
    HDF5 itself crashes the process when a write fails at close (disk full, file-size limit),
    while ``open().write`` raises an ``OSError`` that becomes one sentence.
    """
    tmp = path.with_name(path.name + ".tmp")  # a leftover from a kill is simply replaced
    write_atomic(path, buffer.getbuffer(), StoreError, tmp=tmp, fault=fault)


def create_store(
    path: str | Path,
    *,
    images: np.ndarray,
    targets: np.ndarray,
    index: np.ndarray,
    classes: list[str],
    dataset: str,
    model: dict[str, Any],
    mean: tuple[float, ...],
    std: tuple[float, ...],
    masks: np.ndarray | None = None,
    eval_weights: str = "trained",
    eval_tta: bool = False,
) -> Path:
    """Write a new store with the evaluation split and no epochs yet (atomically)."""
    path = Path(path)
    n = len(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError("images must be uint8 (N,H,W,C)")
    buffer = io.BytesIO()
    # HDF5 >= 1.10 object headers carry checksums, and fixed-length (not variable-length)
    # strings keep text inside them: damaged metadata is then refused instead of crashing or
    # hanging libhdf5 (the global heap of variable-length strings has no checksum).
    with h5py.File(buffer, "w", libver=("v110", "latest")) as f:
        f.attrs["format"] = _text(FORMAT_NAME)
        f.attrs["schema_version"] = SCHEMA_VERSION
        f.attrs["explainkit_version"] = _text(__version__)
        f.attrs["dataset"] = _text(dataset)
        f.attrs["classes"] = _text(json.dumps(list(classes)))
        f.attrs["model"] = _text(json.dumps(model))
        f.attrs["mean"] = np.asarray(mean, dtype="f8")
        f.attrs["std"] = np.asarray(std, dtype="f8")
        f.attrs["input_shape"] = np.asarray(
            [images.shape[3], images.shape[1], images.shape[2]], "i8"
        )
        f.attrs["default_layer"] = _text(model.get("default_layer", "layer4"))
        f.attrs["eval_weights"] = _text(eval_weights)
        f.attrs["eval_tta"] = bool(eval_tta)
        chunk = (max(1, min(n, 256)),) + images.shape[1:]
        f.create_dataset("eval/images", data=images, chunks=chunk, **_COMPRESSION)
        f.create_dataset("eval/targets", data=np.asarray(targets, "i8"), **_COMPRESSION)
        f.create_dataset("eval/index", data=np.asarray(index, "i8"), **_COMPRESSION)
        if masks is not None:
            mchunk = (max(1, min(n, 256)),) + masks.shape[1:]
            f.create_dataset(
                "eval/masks", data=masks.astype(np.uint8), chunks=mchunk, **_COMPRESSION
            )
        c = len(classes)
        f.create_dataset(
            "logits",
            shape=(0, n, c),
            maxshape=(None, n, c),
            dtype="f4",
            chunks=(1, max(1, min(n, 8192)), c),
            **_COMPRESSION,
        )
        f.create_dataset(
            "history",
            shape=(0,),
            maxshape=(None,),
            dtype=HISTORY_DTYPE,
            chunks=(64,),
            fletcher32=True,
        )
        f.create_dataset("committed_epochs", data=np.int64(0))
    _commit(path, buffer)
    return path


def append_epoch(path: str | Path, logits: np.ndarray, history_row: dict[str, float]) -> int:
    """Commit one epoch's logits and history row; returns the number of committed epochs."""
    path = Path(path)
    buffer = io.BytesIO(path.read_bytes())
    with h5py.File(buffer, "r+") as f:
        committed = int(f["committed_epochs"][()])
        _truncate(f, committed)
        ds = f["logits"]
        ds.resize(committed + 1, axis=0)
        ds[committed] = np.asarray(logits, dtype="f4")
        hist = f["history"]
        hist.resize(committed + 1, axis=0)
        row = np.zeros((), dtype=HISTORY_DTYPE)
        for name, _ in HISTORY_COLUMNS:
            row[name] = history_row[name]
        hist[committed] = row
        f["committed_epochs"][()] = committed + 1
    _commit(path, buffer, fault=f"store-write:{committed + 1}")
    return committed + 1


def truncate_store(path: str | Path, epochs: int) -> None:
    """Keep only the first ``epochs`` committed epochs (used by resume)."""
    path = Path(path)
    buffer = io.BytesIO(path.read_bytes())
    with h5py.File(buffer, "r+") as f:
        committed = int(f["committed_epochs"][()])
        keep = min(committed, epochs)
        _truncate(f, keep)
        f["committed_epochs"][()] = keep
    _commit(path, buffer)


def _truncate(f: h5py.File, epochs: int) -> None:
    if f["logits"].shape[0] > epochs:
        f["logits"].resize(epochs, axis=0)
    if f["history"].shape[0] > epochs:
        f["history"].resize(epochs, axis=0)


class StoreReader:
    """Read-only view of a store's committed epochs. Use as a context manager or call close()."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if path.is_dir():
            path = RunDir(path).store_path
        self.path = path
        if not path.exists():
            raise StoreError(f"no prediction store at {path}; is this a run directory?")
        if path.stat().st_size == 0:
            raise StoreError(f"{path} is empty (0 bytes); the store is damaged")
        try:
            self._f = h5py.File(path, "r")
        except OSError as e:
            raise StoreError(
                f"{path} cannot be opened as HDF5 (truncated or not an HDF5 file): {_short(e)}"
            ) from e
        try:
            self._check()
        except StoreError:
            self._f.close()
            raise
        except _DAMAGE_ERRORS as e:
            self._f.close()
            raise StoreError(f"{path} is damaged: {_short(e)}") from e

    def _check(self) -> None:
        f = self._f
        if _decode(f.attrs.get("format")) != FORMAT_NAME:
            raise StoreError(f"{self.path} is an HDF5 file but not an explainkit prediction store")
        version = int(f.attrs.get("schema_version", -1))
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path} has store schema v{version}, newer than this explainkit "
                f"(v{SCHEMA_VERSION}); upgrade explainkit to read it"
            )
        if version < 1:
            raise StoreError(f"{self.path} has an unknown store schema version {version}")
        missing = [n for n in DATASETS if n != "eval/masks" and n not in f]
        if missing:
            raise StoreError(f"{self.path} is missing {', '.join(missing)}; the store is damaged")
        self.committed = int(f["committed_epochs"][()])
        if f["logits"].shape[0] < self.committed or f["history"].shape[0] < self.committed:
            raise StoreError(f"{self.path} claims more epochs than it holds; the store is damaged")
        self.attrs: dict[str, Any] = {}
        for key, value in f.attrs.items():
            value = _decode(value)
            if key in ("classes", "model"):
                value = json.loads(value)
            self.attrs[key] = value
        self.classes: list[str] = list(self.attrs["classes"])
        self.mean = tuple(self.attrs["mean"])
        self.std = tuple(self.attrs["std"])
        self.num_images = int(f["eval/targets"].shape[0])
        self._has_masks = "eval/masks" in f
        self._image_shape = tuple(f["eval/images"].shape[1:])

    def _read(self, name: str, selection: Any = ()) -> np.ndarray:
        try:
            return self._f[name][selection]
        except _DAMAGE_ERRORS as e:
            raise StoreError(
                f"{self.path}: reading {name} failed, the data is corrupt ({_short(e)})"
            ) from e

    @property
    def epochs(self) -> list[int]:
        return list(range(1, self.committed + 1))

    @property
    def last_epoch(self) -> int | None:
        return self.committed or None

    @property
    def history(self) -> dict[str, np.ndarray]:
        rows = self._read("history", slice(0, self.committed))
        try:
            return {name: np.asarray(rows[name]) for name, _ in HISTORY_COLUMNS}
        except (ValueError, KeyError, IndexError) as e:
            raise StoreError(
                f"{self.path}: the history table lacks its columns; the store is damaged"
            ) from e

    @property
    def best_epoch(self) -> int | None:
        if not self.committed:
            return None
        acc = self.history["eval_acc"]
        return int(self.history["epoch"][int(np.argmax(acc))])

    @property
    def targets(self) -> np.ndarray:
        return self._read("eval/targets")

    @property
    def index(self) -> np.ndarray:
        return self._read("eval/index")

    @property
    def has_masks(self) -> bool:
        return self._has_masks

    @property
    def masks(self) -> np.ndarray | None:
        return self._read("eval/masks") if self.has_masks else None

    def images(self, indices: Any = None) -> np.ndarray:
        """uint8 (n,H,W,C) images; ``indices`` any 1-D integer selection (order kept)."""
        if indices is None:
            return self._read("eval/images")
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size == 0:
            return np.zeros((0,) + self._image_shape, np.uint8)
        if idx.min() < 0 or idx.max() >= self.num_images:
            raise IndexError(f"image indices must be in 0..{self.num_images - 1}")
        order = np.argsort(idx, kind="stable")
        uniq, inverse = np.unique(idx[order], return_inverse=True)
        data = self._read("eval/images", uniq)
        out = np.empty((len(idx),) + data.shape[1:], np.uint8)
        out[order] = data[inverse]
        return out

    def _epoch_row(self, epoch: int | None) -> int:
        if not self.committed:
            raise StoreError(f"{self.path} has no committed epochs yet")
        if epoch is None:
            return self.committed - 1
        if not 1 <= epoch <= self.committed:
            raise StoreError(
                f"epoch {epoch} is not in the store; it has epochs 1..{self.committed}"
            )
        return epoch - 1

    def logits(self, epoch: int | None = None) -> np.ndarray:
        """float32 (N, classes) logits of an epoch (default: the last committed one)."""
        return self._read("logits", self._epoch_row(epoch))

    def predictions(self, epoch: int | None = None) -> np.ndarray:
        """The run's recorded prediction of each eval image: what every analyzer calls
        "predicted" (with the run's eval weights and TTA, as stored)."""
        return self.logits(epoch).argmax(axis=1).astype(np.int64)

    def probabilities(self, epoch: int | None = None) -> np.ndarray:
        """Softmax of the recorded logits, in float64 (the row maximum subtracted first)."""
        z = self.logits(epoch).astype(np.float64)
        z -= z.max(axis=1, keepdims=True)
        np.exp(z, out=z)
        z /= z.sum(axis=1, keepdims=True)
        return z

    def verify(self) -> None:
        """Read every committed byte so checksum (fletcher32) errors surface now."""
        for name in ("eval/images", "eval/targets", "eval/index"):
            self._read(name)
        if self.has_masks:
            self._read("eval/masks")
        if self.committed:
            self._read("logits", slice(0, self.committed))
        self.history  # noqa: B018 - reads and checks the table

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> StoreReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text[:200]


def open_store(path: str | Path) -> StoreReader:
    """Open a store (a ``predictions.h5`` file or a run directory) for reading."""
    return StoreReader(path)
