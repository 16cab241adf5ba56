"""The HDF5 prediction store, ``RUN/predictions.h5`` (schema in docs/store-format.md).

The store holds what analyzers need so they never touch the dataset: the evaluation images,
targets and source indices, optional object masks, per-epoch logits and the training history.

Schema v2 (written now) is two kinds of files. ``predictions.h5``, the head, holds the root
attributes and the evaluation split (``eval/*``); :class:`StoreBuilder` streams it to a
temporary file batch by batch and renames it into place, and nothing changes it afterwards.
Each epoch is its own small file, ``predictions.epochs/epoch_0001.h5`` (its logits and
history row), written whole to a temporary file, fsynced and renamed: so a commit costs that
epoch's logits, never the images or earlier epochs. The committed epochs are the files
1..E; a rename is atomic, so a kill at any moment leaves exactly the committed epochs, and a
reader that opened them keeps them (open files survive a rename or an unlink).

Schema v1 stores (everything in ``predictions.h5``, commits copy-on-write, marker
``committed_epochs``) still open and read as before, and a resumed v1 run keeps committing
copy-on-write: any v1 store was built in memory by its writer, so that stays as cheap as it
was for it. :func:`upgrade_store` converts one to v2 without loss.

Every store is validated when it is opened and before a writer changes it (the "Validation"
section of docs/store-format.md): attributes, shapes, dtypes and ranges, in the head and in
every epoch file, so that a wrong value is one :class:`StoreError` sentence instead of
confident nonsense in a figure. A file that is not ours says so; a file that is ours but
wrong says it is damaged.

Other HDF5 files (analyzer outputs) are written with :func:`open_h5_for_writing`: streamed to
disk through Python I/O, so a full disk is one sentence instead of a crash inside libhdf5.
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from explainkit import __version__
from explainkit.atomic import fsync_dir, write_atomic
from explainkit.errors import ExplainkitError, StoreError
from explainkit.rundir import RunDir

FORMAT_NAME = "explainkit-predictions"
EPOCH_FORMAT_NAME = "explainkit-epoch"
SCHEMA_VERSION = 2

HISTORY_COLUMNS: tuple[tuple[str, str], ...] = (
    ("epoch", "i8"),
    ("train_loss", "f8"),  # the training objective (label smoothing included)
    ("train_ce", "f8"),  # plain cross-entropy of the same training logits
    ("train_acc", "f8"),
    ("eval_loss", "f8"),
    ("eval_acc", "f8"),
    ("lr", "f8"),
    ("seconds", "f8"),
    ("images_per_s", "f8"),
)
HISTORY_DTYPE = np.dtype(list(HISTORY_COLUMNS))
# Columns added after the first stores were written: a store without one still opens (its
# history lacks the column), and an epoch row without one stores it as not recorded (NaN in
# every row; a column recorded for some epochs only is damage).
OPTIONAL_HISTORY_COLUMNS = ("train_ce",)

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
    "store_id",
)
DATASETS = (  # in the head, predictions.h5
    "eval/images",
    "eval/targets",
    "eval/index",
    "eval/masks",
    "eval/paths",
    "eval/sizes",
)
EPOCH_ATTRIBUTES = ("format", "schema_version", "store_id", "epoch")
EPOCH_DATASETS = ("logits", "history")
V1_DATASETS = ("logits", "history", "committed_epochs")  # in a v1 predictions.h5 only
# What a reader cannot do without (the rest is optional or has a default).
REQUIRED_ATTRIBUTES = ("schema_version", "classes", "model", "mean", "std", "input_shape")
OPTIONAL_DATASETS = ("eval/masks", "eval/paths", "eval/sizes")
REQUIRED_DATASETS = tuple(name for name in DATASETS if name not in OPTIONAL_DATASETS)
EVAL_WEIGHTS = ("trained", "ema")

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
_CHUNK_BYTES = 1 << 20  # about 1 MiB per chunk: cheap random reads, few chunks per epoch
_FILE_OPTIONS = {"libver": ("v110", "latest")}
_REMEDY = "restore it from a backup or train the run again"
_EPOCH_NAME = re.compile(r"epoch_(\d+)\.h5")
_EPOCH_TMP = re.compile(r"\.epoch_\d+\.h5\.tmp-(\d+)")


def epochs_folder(path: str | Path) -> Path:
    """The folder of a v2 store's epoch files: ``predictions.h5`` -> ``predictions.epochs``.

    Derived from the store's name, so two stores in one folder never share epochs; in a run
    directory it is ``RunDir.store_epochs``.
    """
    path = Path(path)
    return path.with_name(path.name.removesuffix(".h5") + ".epochs")


def epoch_file(path: str | Path, epoch: int) -> Path:
    """Where epoch ``epoch`` of the v2 store ``path`` is committed."""
    return epochs_folder(path) / _epoch_name(epoch)


def _epoch_name(epoch: int) -> str:
    return f"epoch_{epoch:04d}.h5"


def _blank_row() -> np.ndarray:
    """One history row (shape (1,)) with every number not recorded (NaN) and epoch 0."""
    row = np.zeros(1, HISTORY_DTYPE)
    for name, _ in HISTORY_COLUMNS[1:]:
        row[name] = np.nan
    return row


def _rows_per_chunk(n: int, row_bytes: int) -> int:
    return max(1, min(n, _CHUNK_BYTES // max(1, row_bytes)))


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


# -- validation --------------------------------------------------------------------------------


class _Damage(Exception):
    """What is wrong with a store that is ours, as a phrase; becomes one StoreError sentence."""


def _damaged(path: Path, detail: str) -> StoreError:
    return StoreError(f"{path} is damaged: {detail}; {_REMEDY}")


def _corrupt(path: Path, name: str, e: BaseException) -> StoreError:
    return StoreError(
        f"{path}: reading {name} failed, the data is corrupt ({_short(e)}); {_REMEDY}"
    )


def _read_dataset(ds: h5py.Dataset, path: Path, selection: Any = ()) -> np.ndarray:
    try:
        return ds[selection]
    except _DAMAGE_ERRORS as e:
        raise _corrupt(path, ds.name.lstrip("/"), e) from e


def _describe(value: Any) -> str:
    """A stored value in a few words, for a message."""
    if isinstance(value, np.ndarray) and value.ndim > 0:
        return f"a {value.dtype} array of shape {value.shape}"
    text = repr(_decode(value)) if isinstance(value, np.generic | bytes) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _as_int(value: Any, what: str) -> int:
    """A stored integer scalar as ``int``; a bool, a float, a string or an array is damage."""
    if isinstance(value, np.ndarray) and value.shape == ():
        value = value[()]
    if isinstance(value, bool | np.bool_) or not isinstance(value, int | np.integer):
        raise _Damage(f"{what} is {_describe(value)}, not an integer")
    return int(value)


def _text_attr(attrs: dict[str, Any], name: str) -> str | None:
    """A text attribute (fixed-length bytes or str), or None when absent."""
    if name not in attrs:
        return None
    value = attrs[name]
    if isinstance(value, np.ndarray) and value.shape == ():
        value = value[()]
    if isinstance(value, np.bytes_ | bytes):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise _Damage(f"the {name} attribute is not UTF-8 text") from None
    if isinstance(value, str):
        return value
    raise _Damage(f"the {name} attribute is {_describe(value)}, not text")


def _json_attr(attrs: dict[str, Any], name: str) -> Any:
    try:
        return json.loads(_text_attr(attrs, name) or "")
    except ValueError:  # JSONDecodeError
        raise _Damage(f"the {name} attribute is not valid JSON") from None


def _numbers_attr(
    attrs: dict[str, Any], name: str, length: int, why: str, kinds: str = "iuf"
) -> np.ndarray:
    """A 1-D numeric attribute of ``length`` finite values (``why``: where the length is from)."""
    value = np.asarray(attrs[name])
    if value.ndim != 1 or value.dtype.kind not in kinds:
        noun = "integers" if kinds == "iu" else "numbers"
        raise _Damage(f"the {name} attribute is {_describe(attrs[name])}, not a list of {noun}")
    if len(value) != length:
        count = f"{len(value)} value{'' if len(value) == 1 else 's'}"
        raise _Damage(f"the {name} attribute has {count}, not {length} ({why})")
    value = value.astype(np.float64)
    if not np.isfinite(value).all():
        raise _Damage(f"the {name} attribute holds NaN or infinity")
    return value


def _check_shape(ds: h5py.Dataset, name: str, kinds: str, shape: tuple[int, ...], what: str):
    """``ds`` must have a dtype of one of ``kinds`` (numpy kind letters) and ``shape``."""
    if ds.dtype.kind not in kinds or ds.shape != shape:
        raise _Damage(f"{name} is {ds.dtype} {ds.shape}; expected {what} of shape {shape}")


@dataclass
class _Layout:
    """What a validated store holds (all checked by :func:`_inspect`)."""

    attrs: dict[str, Any]
    version: int
    store_id: str | None  # v2: the id every epoch file must carry
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_images: int
    image_shape: tuple[int, ...]
    has_masks: bool
    has_paths: bool
    sizes: np.ndarray | None  # original (H, W) of each image, when recorded
    targets: np.ndarray
    index: np.ndarray
    committed: int = 0
    history: np.ndarray = field(default_factory=lambda: np.zeros(0, HISTORY_DTYPE))
    epochs: list[h5py.File] = field(default_factory=list)  # v2: the open epoch files, 1..E


def _inspect_head(f: h5py.File, path: Path) -> _Layout:
    """Check a store's attributes and ``eval/*`` datasets; read what is small.

    Raises StoreError for a file that is not ours, a newer schema or a corrupt chunk, and
    ``_Damage`` (or an h5py/numpy error) for anything else wrong with one of ours. The cost
    is a few dozen metadata reads plus targets, index and sizes (about 8 bytes per image
    each): it does not grow with the image size or the number of epochs. Masks and paths are
    checked when read.
    """
    if _decode(f.attrs.get("format")) != FORMAT_NAME:
        raise StoreError(
            f"{path} is an HDF5 file but not an explainkit prediction store; "
            "point explainkit at a run directory written by explainkit train"
        )
    raw = {key: f.attrs[key] for key in f.attrs}
    if "schema_version" not in raw:
        raise _Damage("it lacks the schema_version attribute")
    version = _as_int(raw["schema_version"], "schema_version")
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"{path} has store schema v{version}, newer than this explainkit "
            f"(v{SCHEMA_VERSION}); upgrade explainkit to read it"
        )
    if version < 1:
        raise _Damage(f"its store schema version {version} is unknown")
    required = REQUIRED_DATASETS + (V1_DATASETS if version == 1 else ())
    missing = [name for name in required if name not in f]
    missing += [f"the {name} attribute" for name in REQUIRED_ATTRIBUTES if name not in raw]
    if version >= 2 and "store_id" not in raw:
        missing.append("the store_id attribute")
    if missing:
        raise _Damage(f"it lacks {', '.join(missing)}")
    ds: dict[str, h5py.Dataset] = {}
    for name in DATASETS + (V1_DATASETS if version == 1 else ()):
        if name in f:
            obj = f[name]
            if not isinstance(obj, h5py.Dataset):
                raise _Damage(f"{name} is not a dataset")
            ds[name] = obj

    images = ds["eval/images"]
    if images.dtype != np.uint8 or images.ndim != 4:
        raise _Damage(f"eval/images is {images.dtype} {images.shape}, not uint8 (N, H, W, C)")
    n, h, w, c = images.shape
    if n < 1:
        raise _Damage("it holds no eval images")
    if min(h, w, c) < 1:
        raise _Damage(f"eval/images has the empty image shape {images.shape[1:]}")

    classes = _json_attr(raw, "classes")
    if not (isinstance(classes, list) and classes and all(isinstance(x, str) for x in classes)):
        raise _Damage("the classes attribute is not a non-empty list of class names")
    if len(set(classes)) != len(classes):
        raise _Damage("the classes attribute names a class twice")
    k = len(classes)
    model = _json_attr(raw, "model")
    if not isinstance(model, dict):
        raise _Damage("the model attribute is not a JSON object")
    spec_classes = model.get("num_classes", k)
    if isinstance(spec_classes, bool) or spec_classes != k:
        raise _Damage(f"the model has {spec_classes!r} classes but the store names {k}")
    mean = _numbers_attr(raw, "mean", c, f"the images have {c} channels")
    std = _numbers_attr(raw, "std", c, f"the images have {c} channels")
    if ((mean < 0) | (mean > 1)).any():
        raise _Damage("the mean attribute is outside [0, 1] (pixel units)")
    if (std <= 0).any():
        raise _Damage("the std attribute has a value that is not positive")
    input_shape = _numbers_attr(raw, "input_shape", 3, "C, H, W", kinds="iu")
    if tuple(input_shape) != (c, h, w):
        raise _Damage(
            f"input_shape {[int(v) for v in input_shape]} does not match the images (C, H, W) "
            f"= {[c, h, w]}"
        )
    for name in ("dataset", "explainkit_version", "default_layer", "store_id"):
        _text_attr(raw, name)
    store_id = _text_attr(raw, "store_id") if version >= 2 else None
    if version >= 2 and not store_id:
        raise _Damage("the store_id attribute is empty")
    if _text_attr(raw, "eval_weights") not in (None, *EVAL_WEIGHTS):
        raise _Damage(f"eval_weights is {_describe(raw['eval_weights'])}, not trained or ema")
    if "eval_tta" in raw and not isinstance(raw["eval_tta"], bool | np.bool_):
        raise _Damage(f"eval_tta is {_describe(raw['eval_tta'])}, not true or false")
    attrs: dict[str, Any] = {key: _decode(value) for key, value in raw.items()}
    attrs.update(classes=classes, model=model)

    _check_shape(ds["eval/targets"], "eval/targets", "iu", (n,), "integers")
    _check_shape(ds["eval/index"], "eval/index", "iu", (n,), "integers")
    if "eval/masks" in ds:
        _check_shape(ds["eval/masks"], "eval/masks", "ub", (n, h, w), "uint8 masks")
    if "eval/paths" in ds:
        _check_paths(ds["eval/paths"], n)
    if "eval/sizes" in ds:
        _check_shape(ds["eval/sizes"], "eval/sizes", "iu", (n, 2), "integers")
    targets = _read_dataset(ds["eval/targets"], path).astype(np.int64)
    if targets.min() < 0 or targets.max() >= k:
        raise _Damage(f"eval/targets holds a class outside 0..{k - 1}")
    index = _read_dataset(ds["eval/index"], path).astype(np.int64)
    if index.min() < 0:
        raise _Damage("eval/index holds a negative position")
    sizes = None
    if "eval/sizes" in ds:
        sizes = _read_dataset(ds["eval/sizes"], path).astype(np.int64)
        if sizes.min() < 1:
            raise _Damage("eval/sizes holds a size below 1 pixel")
    return _Layout(
        attrs=attrs,
        version=version,
        store_id=store_id,
        classes=list(classes),
        mean=tuple(float(v) for v in mean),
        std=tuple(float(v) for v in std),
        num_images=n,
        image_shape=(h, w, c),
        has_masks="eval/masks" in ds,
        has_paths="eval/paths" in ds,
        sizes=sizes,
        targets=targets,
        index=index,
    )


def _check_history(rows: np.ndarray, first: int, where: str = "the history") -> None:
    """The ``rows`` of epochs ``first``, ``first + 1``, ...: numbered so, finite, >= 0.

    An optional column (``OPTIONAL_HISTORY_COLUMNS``) may be absent, or NaN in every row (not
    recorded); NaN in some rows only is damage.
    """
    names = rows.dtype.names or ()
    expected = np.arange(first, first + len(rows))
    if not np.array_equal(rows["epoch"], expected):
        shown = ", ".join(f"{v:g}" for v in rows["epoch"][:5].astype(np.float64))
        span = f"{first}..{first + len(rows) - 1}" if len(rows) != 1 else str(first)
        raise _Damage(f"{where}'s epoch column is [{shown}], not {span}")
    for name, _ in HISTORY_COLUMNS[1:]:
        if name not in names:
            continue  # an optional column this older store does not have
        column = rows[name].astype(np.float64)
        if name in OPTIONAL_HISTORY_COLUMNS and column.size and np.isnan(column).all():
            continue  # not recorded by the writer
        if not np.isfinite(column).all():
            raise _Damage(f"{where}'s {name} column holds NaN or infinity")
        if (column < 0).any():
            raise _Damage(f"{where}'s {name} column holds a negative value")


def _check_history_table(history: h5py.Dataset, length: int | None, what: str) -> None:
    """``history`` must be a 1-D table with the numeric columns (``length`` rows if given)."""
    names = history.dtype.names or ()
    if (
        history.ndim != 1
        or (length is not None and history.shape != (length,))
        or any(
            (name not in names and name not in OPTIONAL_HISTORY_COLUMNS)
            or (name in names and history.dtype[name].kind not in "iuf")
            for name, _ in HISTORY_COLUMNS
        )
    ):
        raise _Damage(f"{what} lacks its numeric columns")


def _inspect_v1(f: h5py.File, path: Path, layout: _Layout) -> _Layout:
    """The epochs of a v1 store: ``logits`` (E, N, C), ``history`` rows and the marker."""
    n, k = layout.num_images, len(layout.classes)
    logits = f["logits"]
    if logits.dtype.kind != "f" or logits.ndim != 3 or logits.shape[1:] != (n, k):
        raise _Damage(
            f"logits are {logits.dtype} {logits.shape}; expected floats of shape "
            f"(epochs, {n}, {k}) for {n} images and {k} classes"
        )
    history = f["history"]
    _check_history_table(history, None, "the history table")
    marker = f["committed_epochs"]
    if marker.shape != () or marker.dtype.kind not in "iu":
        raise _Damage(f"committed_epochs is {marker.dtype} {marker.shape}, not an integer")
    committed = int(_read_dataset(marker, path))
    if committed < 0:
        raise _Damage(f"committed_epochs is {committed}, not 0 or more")
    held = min(logits.shape[0], history.shape[0])
    if committed > held:
        raise _Damage(f"it claims {committed} committed epochs but holds {held}")
    rows = _read_dataset(history, path, slice(0, committed))
    _check_history(rows, 1)
    layout.committed, layout.history = committed, rows
    return layout


def _epoch_numbers(path: Path) -> list[int]:
    """The committed epochs of the v2 store ``path``: 1..E, the files that exist.

    Epoch files are only ever added as E + 1 and removed from the highest down, so a gap
    (a later file without an earlier one) means someone deleted a file: damage.
    """
    folder = epochs_folder(path)
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    except OSError as e:
        raise StoreError(f"cannot read {folder}: {e.strerror or e}; is the run intact?") from e
    found = set()
    for name in names:
        match = _EPOCH_NAME.fullmatch(name)
        if match and int(match[1]) >= 1 and _epoch_name(int(match[1])) == name:
            found.add(int(match[1]))
    committed = 0
    while committed + 1 in found:
        committed += 1
    if len(found) > committed:
        later = min(found - set(range(1, committed + 1)))
        raise _Damage(
            f"{epoch_file(path, later).name} exists but "
            f"{epoch_file(path, committed + 1).name} does not (an epoch file was deleted)"
        )
    return list(range(1, committed + 1))


def _open_epoch(path: Path, epoch: int) -> h5py.File:
    where = epoch_file(path, epoch)
    name = f"{where.parent.name}/{where.name}"
    try:
        if where.stat().st_size == 0:
            raise _Damage(f"{name} is empty (0 bytes)")
        return h5py.File(where, "r")
    except OSError as e:
        raise _Damage(
            f"{name} cannot be opened as HDF5 (truncated or not an HDF5 file): {_short(e)}"
        ) from None


def _inspect_epoch(f: h5py.File, path: Path, layout: _Layout, epoch: int) -> np.ndarray:
    """Check one epoch file of a v2 store; its history row (HISTORY_DTYPE, shape (1,)).

    Every complaint names the file, so the user knows which one is damaged.
    """
    where = epoch_file(path, epoch)
    name = f"{where.parent.name}/{where.name}"
    try:
        return _check_epoch_file(f, where, name, layout, epoch)
    except _Damage as e:
        raise _Damage(str(e) if name in str(e) else f"{name}: {e}") from None
    except _DAMAGE_ERRORS as e:
        raise _Damage(f"{name}: {_short(e)}") from e


def _check_epoch_file(
    f: h5py.File, where: Path, name: str, layout: _Layout, epoch: int
) -> np.ndarray:
    if _decode(f.attrs.get("format")) != EPOCH_FORMAT_NAME:
        raise _Damage(f"{name} is not an explainkit epoch file")
    raw = {key: f.attrs[key] for key in f.attrs}
    missing = [a for a in EPOCH_ATTRIBUTES if a not in raw]
    missing += [d for d in EPOCH_DATASETS if d not in f]
    if missing:
        raise _Damage(f"{name} lacks {', '.join(missing)}")
    version = _as_int(raw["schema_version"], f"the schema_version of {name}")
    if version != layout.version:
        raise _Damage(f"{name} has schema version {version}, not {layout.version}")
    if _text_attr(raw, "store_id") != layout.store_id:
        raise _Damage(f"{name} belongs to another store (its store_id differs)")
    number = _as_int(raw["epoch"], f"the epoch of {name}")
    if number != epoch:
        raise _Damage(f"{name} says it holds epoch {number}")
    logits, history = f["logits"], f["history"]
    if not isinstance(logits, h5py.Dataset) or not isinstance(history, h5py.Dataset):
        raise _Damage(f"the logits or history of {name} is not a dataset")
    n, k = layout.num_images, len(layout.classes)
    if logits.dtype.kind != "f" or logits.shape != (n, k):
        raise _Damage(
            f"the logits of {name} are {logits.dtype} {logits.shape}; expected floats of "
            f"shape ({n}, {k}) for {n} images and {k} classes"
        )
    _check_history_table(history, 1, f"the history of {name}")
    stored = _read_dataset(history, where)
    row = _blank_row()
    for column, _ in HISTORY_COLUMNS:
        if column in (stored.dtype.names or ()):
            row[column] = stored[column]
    _check_history(row, epoch, f"the history of {name}")
    return row


def _inspect_epochs(path: Path, layout: _Layout, epochs: list[int]) -> _Layout:
    """Open and check the epoch files ``epochs`` (consecutive) of a v2 store; they stay open
    in the layout (a reader's snapshot: an open file survives a later rename or unlink)."""
    _allow_open_files(path, len(epochs))
    rows = []
    try:
        for epoch in epochs:
            layout.epochs.append(_open_epoch(path, epoch))
            rows.append(_inspect_epoch(layout.epochs[-1], path, layout, epoch))
        history = np.concatenate(rows) if rows else np.zeros(0, HISTORY_DTYPE)
        _check_history(history, epochs[0] if epochs else 1)
    except BaseException:
        _close_all(layout.epochs)
        raise
    layout.committed, layout.history = (epochs[-1] if epochs else 0), history
    return layout


def _allow_open_files(path: Path, count: int) -> None:
    """Make sure this process may hold ``count`` more files open (a reader holds every epoch
    file open: its snapshot), raising the soft limit towards the hard one if needed."""
    import resource

    wanted = count + 256  # room for what else a process has open: libraries, other stores
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return
    target = wanted if hard == resource.RLIM_INFINITY else min(hard, wanted)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if target < count + 32:
        raise StoreError(
            f"{path} has {count} epoch files but this process may open only {target} files; "
            f"raise the limit (ulimit -n {wanted}) and try again"
        )


def _close_all(files: list[h5py.File]) -> None:
    for f in files:
        try:
            f.close()
        except Exception:  # noqa: S110 - closing a damaged file must not hide why it failed
            pass
    files.clear()


def _inspect(f: h5py.File, path: Path) -> _Layout:
    """The whole store: head, then every committed epoch (v1 rows or v2 epoch files)."""
    layout = _inspect_head(f, path)
    if layout.version == 1:
        return _inspect_v1(f, path, layout)
    return _inspect_epochs(path, layout, _epoch_numbers(path))


def _check_paths(ds: h5py.Dataset, n: int) -> None:
    """``eval/paths`` must be N fixed-length strings (their text is checked when read)."""
    info = h5py.check_string_dtype(ds.dtype)
    if info is not None and info.length is None:
        raise _Damage("eval/paths holds variable-length strings, not fixed-length UTF-8 text")
    if info is None or ds.shape != (n,):
        raise _Damage(f"eval/paths is {ds.dtype} {ds.shape}; expected ({n},) UTF-8 strings")


def _validated(check: Callable[[], Any], path: Path) -> Any:
    """``check()``, with every complaint about the store ``path`` as one StoreError sentence."""
    try:
        return check()
    except StoreError:
        raise
    except _Damage as e:
        raise _damaged(path, str(e)) from None
    except _DAMAGE_ERRORS as e:
        raise _damaged(path, _short(e)) from e


# -- writing the store ---------------------------------------------------------------------------


def _check_split(
    n: int,
    channels: int,
    targets: Any,
    index: Any,
    classes: list[str],
    mean: tuple[float, ...],
    std: tuple[float, ...],
    eval_weights: str,
    paths: list[str] | None,
    sizes: Any,
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Refuse an evaluation split that readers would refuse; the encoded paths and sizes."""
    if np.shape(targets) != (n,) or np.shape(index) != (n,):
        raise ValueError(f"targets and index must have one entry per image ({n})")
    if not classes or len(set(classes)) != len(classes):
        raise ValueError("classes must be distinct names, at least one")
    if len(mean) != channels or len(std) != channels or min(std) <= 0:
        raise ValueError(f"mean and std need {channels} values each, std positive")
    if eval_weights not in EVAL_WEIGHTS:
        raise ValueError(f"eval_weights must be one of {', '.join(EVAL_WEIGHTS)}")
    encoded_paths = None if paths is None else _encode_paths(paths, n)
    if sizes is not None:
        sizes = np.asarray(sizes)
        if sizes.shape != (n, 2) or sizes.dtype.kind not in "iu":
            raise ValueError(f"sizes must be integers of shape ({n}, 2), got {sizes.shape}")
        if n and (sizes.min() < 1 or sizes.max() > np.iinfo(np.int32).max):
            raise ValueError("sizes must be positive heights and widths that fit int32")
        sizes = sizes.astype(np.int32)
    return encoded_paths, sizes


def _write_root_attributes(
    f: h5py.File,
    *,
    version: int,
    dataset: str,
    classes: list[str],
    model: dict[str, Any],
    mean: tuple[float, ...],
    std: tuple[float, ...],
    image_shape: tuple[int, int, int],
    eval_weights: str,
    eval_tta: bool,
) -> None:
    # HDF5 >= 1.10 object headers carry checksums, and fixed-length (not variable-length)
    # strings keep text inside them: damaged metadata is then refused instead of crashing or
    # hanging libhdf5 (the global heap of variable-length strings has no checksum).
    h, w, c = image_shape
    f.attrs["format"] = _text(FORMAT_NAME)
    f.attrs["schema_version"] = version
    f.attrs["explainkit_version"] = _text(__version__)
    f.attrs["dataset"] = _text(dataset)
    f.attrs["classes"] = _text(json.dumps(list(classes)))
    f.attrs["model"] = _text(json.dumps(model))
    f.attrs["mean"] = np.asarray(mean, dtype="f8")
    f.attrs["std"] = np.asarray(std, dtype="f8")
    f.attrs["input_shape"] = np.asarray([c, h, w], "i8")
    f.attrs["default_layer"] = _text(model.get("default_layer", "layer4"))
    f.attrs["eval_weights"] = _text(eval_weights)
    f.attrs["eval_tta"] = bool(eval_tta)


class StoreBuilder:
    """Write a new (v2) store's head, streaming the evaluation images in batches.

    ::

        with StoreBuilder(path, targets=..., index=..., classes=..., dataset=..., model=...,
                          mean=..., std=..., image_shape=(H, W, C)) as builder:
            for images, masks in batches:
                builder.add_images(images, masks)

    Images (and masks) go to disk as they come, so memory stays one batch plus HDF5's chunk
    cache however many images there are. The head is written to ``predictions.h5.tmp`` and
    renamed over ``path`` only when the ``with`` block ends normally and all ``len(targets)``
    images were added; on an exception nothing is published and an older store at ``path``
    is left as it was. Publishing a new store removes the epoch files of the one it replaces.
    Arguments that would make a store its readers refuse raise ValueError at once.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        targets: np.ndarray,
        index: np.ndarray,
        classes: list[str],
        dataset: str,
        model: dict[str, Any],
        mean: tuple[float, ...],
        std: tuple[float, ...],
        image_shape: tuple[int, int, int],
        has_masks: bool = False,
        paths: list[str] | None = None,
        sizes: np.ndarray | None = None,
        eval_weights: str = "trained",
        eval_tta: bool = False,
    ) -> None:
        self.path = Path(path)
        shape = tuple(int(v) for v in image_shape)
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"image_shape must be (H, W, C) of positive sizes, got {shape}")
        self.image_shape: tuple[int, int, int] = shape  # type: ignore[assignment]
        self.num_images = n = len(targets)
        if n < 1:
            raise ValueError("a store needs at least one eval image")
        self._paths, self._sizes = _check_split(
            n, shape[2], targets, index, classes, mean, std, eval_weights, paths, sizes
        )
        self._targets = np.asarray(targets, "i8")
        self._index = np.asarray(index, "i8")
        if self._targets.min() < 0 or self._targets.max() >= len(classes):
            raise ValueError(f"targets must be classes 0..{len(classes) - 1}")
        if self._index.min() < 0:
            raise ValueError("index must hold positions of 0 or more")
        self.has_masks = bool(has_masks)
        self._attributes = dict(
            dataset=dataset,
            classes=list(classes),
            model=model,
            mean=tuple(mean),
            std=tuple(std),
            image_shape=shape,
            eval_weights=eval_weights,
            eval_tta=eval_tta,
        )
        self.added = 0
        self.store_id = uuid.uuid4().hex  # what this store's epoch files will carry
        self._writer: H5Writer | None = None
        self._file: h5py.File | None = None
        # upgrade_store: (logits, history row) of epochs 1, 2, ... to write before publishing
        self._epochs_to_publish: Iterable[tuple[np.ndarray, np.ndarray]] = ()

    def __enter__(self) -> StoreBuilder:
        n, shape = self.num_images, self.image_shape
        self._writer = H5Writer(
            self.path,
            StoreError,
            tmp=self.path.with_name(self.path.name + ".tmp"),
            before_replace=self._remove_replaced_epochs,
            rdcc_nbytes=4 * _CHUNK_BYTES,
        )
        f = self._file = self._writer.__enter__()
        try:
            _write_root_attributes(f, version=SCHEMA_VERSION, **self._attributes)
            f.attrs["store_id"] = _text(self.store_id)
            rows = _rows_per_chunk(n, int(np.prod(shape)))
            f.create_dataset(
                "eval/images", (n, *shape), "u1", chunks=(rows, *shape), **_COMPRESSION
            )
            f.create_dataset("eval/targets", data=self._targets, **_COMPRESSION)
            f.create_dataset("eval/index", data=self._index, **_COMPRESSION)
            if self.has_masks:
                rows = _rows_per_chunk(n, shape[0] * shape[1])
                f.create_dataset(
                    "eval/masks", (n, *shape[:2]), "u1", chunks=(rows, *shape[:2]), **_COMPRESSION
                )
            if self._paths is not None:
                f.create_dataset("eval/paths", data=self._paths, **_COMPRESSION)
            if self._sizes is not None:
                f.create_dataset("eval/sizes", data=self._sizes, **_COMPRESSION)
            self._writer.check()
        except BaseException as e:
            self._writer.__exit__(type(e), e, None)
            raise
        return self

    def add_images(self, images: np.ndarray, masks: np.ndarray | None = None) -> None:
        """Append a batch: uint8 (B, H, W, C) images, and (B, H, W) masks of 0 and 1 when the
        store has masks. Written to disk now; ValueError if it does not fit the store."""
        if self._file is None:
            raise RuntimeError("add_images needs an open StoreBuilder (use it in a with block)")
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.shape[1:] != self.image_shape:
            raise ValueError(
                f"images must be uint8 (B, {', '.join(map(str, self.image_shape))}), got "
                f"{images.dtype} {images.shape}"
            )
        b = len(images)
        if self.added + b > self.num_images:
            raise ValueError(f"more images than the {self.num_images} targets given")
        if self.has_masks:
            if masks is None:
                raise ValueError("this store has masks: pass the batch's masks too")
            masks = np.asarray(masks)
            if masks.shape != images.shape[:3]:
                raise ValueError(f"masks must have shape {images.shape[:3]}, got {masks.shape}")
            if masks.size and (masks.min() < 0 or masks.max() > 1):
                raise ValueError("masks must hold only 0 and 1")
            self._file["eval/masks"][self.added : self.added + b] = masks.astype(np.uint8)
        elif masks is not None:
            raise ValueError("masks given to a store made with has_masks=False")
        self._file["eval/images"][self.added : self.added + b] = images
        self.added += b
        assert self._writer is not None
        self._writer.check()

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        writer, self._writer, self._file = self._writer, None, None
        if writer is None:
            return
        if exc is None and self.added != self.num_images:
            short = ValueError(
                f"{self.added} images were added but the store has {self.num_images} targets"
            )
            writer.__exit__(ValueError, short, None)
            raise short
        writer.__exit__(exc_type, exc, tb)

    def _remove_replaced_epochs(self) -> None:
        """The old store's epochs go before the new head replaces it (the highest first: a
        kill meanwhile leaves the old store with fewer epochs, never a mismatched one); then
        the epochs an upgraded v1 store brings (a v1 head ignores them until it is replaced)."""
        _remove_epochs_after(self.path, 0)
        for epoch, (logits, row) in enumerate(self._epochs_to_publish, 1):
            _write_epoch(self.path, self.store_id, epoch, logits, row)


def _remove_epochs_after(path: Path, keep: int) -> None:
    """Delete the epoch files past ``keep``, highest first, and leftover temporary files."""
    folder = epochs_folder(path)
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return
    except OSError as e:
        raise StoreError(f"cannot read {folder}: {e.strerror or e}; is the run intact?") from e
    numbers = sorted(
        (int(m[1]) for m in map(_EPOCH_NAME.fullmatch, names) if m and int(m[1]) > keep),
        reverse=True,
    )
    try:
        for number in numbers:
            epoch_file(path, number).unlink(missing_ok=True)
            fsync_dir(folder)
        for name in names:
            match = _EPOCH_TMP.fullmatch(name)
            if match and int(match[1]) != os.getpid():
                (folder / name).unlink(missing_ok=True)
    except OSError as e:
        raise StoreError(f"cannot remove old epochs in {folder}: {e.strerror or e}") from e


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
    paths: list[str] | None = None,
    sizes: np.ndarray | None = None,
) -> Path:
    """Write a new store with the evaluation split and no epochs yet (atomically).

    The arrays at once, through :class:`StoreBuilder`. ``paths`` (each image's source file,
    relative to the data folder) and ``sizes`` (its original height and width before
    resizing) are optional. Raises ValueError for arguments that would make a store its
    readers refuse.
    """
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError("images must be uint8 (N,H,W,C)")
    if masks is not None and masks.shape != images.shape[:3]:
        raise ValueError(f"masks must have shape {images.shape[:3]}, got {masks.shape}")
    builder = StoreBuilder(
        path,
        targets=targets,
        index=index,
        classes=classes,
        dataset=dataset,
        model=model,
        mean=mean,
        std=std,
        image_shape=images.shape[1:],
        has_masks=masks is not None,
        paths=paths,
        sizes=sizes,
        eval_weights=eval_weights,
        eval_tta=eval_tta,
    )
    step = _rows_per_chunk(len(images), int(np.prod(images.shape[1:]))) * 8
    with builder:
        for start in range(0, len(images), step):
            part = slice(start, start + step)
            builder.add_images(images[part], None if masks is None else masks[part])
    return Path(path)


def create_v1_store(
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
    paths: list[str] | None = None,
    sizes: np.ndarray | None = None,
) -> Path:
    """Write a schema v1 store, as explainkit wrote them before v2 (everything in memory, in
    one file). Kept so that tests and benchmarks/scale.py can make the stores of runs from
    earlier versions; :func:`append_epoch` continues such a store copy-on-write."""
    path = Path(path)
    n = len(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError("images must be uint8 (N,H,W,C)")
    if masks is not None and masks.shape != images.shape[:3]:
        raise ValueError(f"masks must have shape {images.shape[:3]}, got {masks.shape}")
    encoded_paths, sizes = _check_split(
        n, images.shape[3], targets, index, classes, mean, std, eval_weights, paths, sizes
    )
    buffer = io.BytesIO()
    with h5py.File(buffer, "w", **_FILE_OPTIONS) as f:
        _write_root_attributes(
            f,
            version=1,
            dataset=dataset,
            classes=classes,
            model=model,
            mean=mean,
            std=std,
            image_shape=images.shape[1:],
            eval_weights=eval_weights,
            eval_tta=eval_tta,
        )
        chunk = (max(1, min(n, 256)),) + images.shape[1:]
        f.create_dataset("eval/images", data=images, chunks=chunk, **_COMPRESSION)
        f.create_dataset("eval/targets", data=np.asarray(targets, "i8"), **_COMPRESSION)
        f.create_dataset("eval/index", data=np.asarray(index, "i8"), **_COMPRESSION)
        if masks is not None:
            mchunk = (max(1, min(n, 256)),) + masks.shape[1:]
            f.create_dataset(
                "eval/masks", data=masks.astype(np.uint8), chunks=mchunk, **_COMPRESSION
            )
        if encoded_paths is not None:
            f.create_dataset("eval/paths", data=encoded_paths, **_COMPRESSION)
        if sizes is not None:
            f.create_dataset("eval/sizes", data=sizes, **_COMPRESSION)
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


def _encode_paths(paths: list[str], n: int) -> np.ndarray:
    """``paths`` as fixed-length UTF-8 strings: stored inline, covered by chunk checksums."""
    if len(paths) != n or not all(isinstance(p, str) and p for p in paths):
        raise ValueError(f"paths must be {n} non-empty strings, one per image")
    try:
        encoded = [p.encode("utf-8") for p in paths]
    except UnicodeEncodeError:
        raise ValueError("paths must be UTF-8 text") from None
    if any(b"\0" in e for e in encoded):
        raise ValueError("paths must not contain NUL characters")
    length = max([1, *(len(e) for e in encoded)])
    return np.array(encoded, dtype=h5py.string_dtype("utf-8", length))


def _open_copy(path: Path) -> io.BytesIO:
    """An in-memory copy of a v1 store about to be changed (the file itself is never touched)."""
    try:
        return io.BytesIO(path.read_bytes())
    except OSError as e:
        raise StoreError(
            f"cannot read {path}: {e.strerror or e}; is the run directory intact?"
        ) from e


def _open_h5(source: io.BytesIO | Path, path: Path, mode: str = "r+") -> h5py.File:
    if isinstance(source, Path):
        if not source.exists():
            raise StoreError(f"no prediction store at {path}; is this a run directory?")
        if source.stat().st_size == 0:
            raise StoreError(f"{path} is empty (0 bytes); the store is damaged, {_REMEDY}")
    try:
        return h5py.File(source, mode)
    except OSError as e:
        raise StoreError(
            f"{path} cannot be opened as HDF5 (truncated or not an HDF5 file): {_short(e)}; "
            f"{_REMEDY}"
        ) from e


def append_epoch(path: str | Path, logits: np.ndarray, history_row: dict[str, float]) -> int:
    """Commit one epoch's logits and history row; returns the number of committed epochs.

    The store is validated first (the head, and the latest epoch whose history the new row
    continues), and the new epoch must fit it (logits of shape (N, classes), finite; the row's
    epoch one past the committed ones; finite, non-negative numbers): otherwise StoreError,
    and the store is left as it was. A v2 commit writes one epoch file (cost: this epoch's
    logits); a v1 store is rewritten copy-on-write, as the version that made it did.
    """
    path = Path(path)
    with _open_h5(path, path, "r") as f:
        layout = _validated(lambda: _inspect_head(f, path), path)
    if layout.version == 1:
        return _append_v1(path, logits, history_row)
    epochs = _validated(lambda: _epoch_numbers(path), path)
    if epochs:
        _validated(lambda: _inspect_epochs(path, layout, epochs[-1:]), path)
        _close_all(layout.epochs)
    row = _check_new_epoch(path, layout, logits, history_row)
    epoch = layout.committed + 1
    _remove_epochs_after(path, layout.committed)  # a killed writer's temporary files
    _write_epoch(path, layout.store_id or "", epoch, logits, row)
    return epoch


def _write_epoch(path: Path, store_id: str, epoch: int, logits: np.ndarray, row: np.ndarray):
    """Write epoch file ``epoch``: built in memory, then temp file, fsync, rename, fsync."""
    buffer = io.BytesIO()
    n, k = np.shape(logits)
    with h5py.File(buffer, "w", **_FILE_OPTIONS) as f:
        f.attrs["format"] = _text(EPOCH_FORMAT_NAME)
        f.attrs["schema_version"] = SCHEMA_VERSION
        f.attrs["store_id"] = _text(store_id)
        f.attrs["epoch"] = epoch
        f.create_dataset(  # not gzipped: float logits shrink ~10% for 6x the commit time
            "logits",
            data=np.asarray(logits, dtype="f4"),
            chunks=(_rows_per_chunk(n, 4 * k), k),
            fletcher32=True,
        )
        f.create_dataset("history", data=row, chunks=(1,), fletcher32=True)
    folder = epochs_folder(path)
    if not folder.is_dir():
        try:
            folder.mkdir()
        except OSError as e:
            raise StoreError(f"cannot create {folder}: {e.strerror or e}") from e
        fsync_dir(folder.parent)
    write_atomic(epoch_file(path, epoch), buffer.getbuffer(), StoreError, fault=_fault(epoch))


def _fault(epoch: int) -> str:
    """The fault point inside the commit of ``epoch``: written, not yet renamed into place."""
    return f"store-write:{epoch}"


def _append_v1(path: Path, logits: np.ndarray, history_row: dict[str, float]) -> int:
    """Copy-on-write commit of a v1 store: copy, append, fsync, rename over the original."""
    buffer = _open_copy(path)
    with _open_h5(buffer, path) as f:
        layout = _validated(lambda: _inspect(f, path), path)
        committed = layout.committed
        row = _check_new_epoch(path, layout, logits, history_row)
        _truncate(f, committed)
        ds = f["logits"]
        ds.resize(committed + 1, axis=0)
        ds[committed] = np.asarray(logits, dtype="f4")
        hist = f["history"]
        hist.resize(committed + 1, axis=0)
        stored = np.zeros(1, dtype=hist.dtype)  # an older store lacks the optional columns
        for name in hist.dtype.names:
            stored[name] = row[name]
        hist[committed] = stored[0]
        f["committed_epochs"][()] = committed + 1
    _commit(path, buffer, fault=_fault(committed + 1))
    return committed + 1


def _check_new_epoch(
    path: Path, layout: _Layout, logits: np.ndarray, history_row: dict[str, float]
) -> np.ndarray:
    """Refuse an epoch that the store's readers would refuse (the store stays as it was).

    Returns the history row to store (HISTORY_DTYPE, shape (1,)): an optional column the
    store's earlier epochs do not record is not recorded in this one either (NaN).
    """
    expected = (layout.num_images, len(layout.classes))
    shape = np.shape(logits)
    if shape != expected:
        raise StoreError(
            f"cannot add an epoch to {path}: its logits have shape {shape} but the store holds "
            f"{expected[0]} images of {expected[1]} classes; train this run with its own data"
        )
    values = np.asarray(logits)
    if values.dtype.kind not in "fiu" or not np.isfinite(values).all():
        raise StoreError(
            f"cannot add an epoch to {path}: its logits hold NaN or infinity; "
            "lower the learning rate and train again"
        )
    missing = [
        name
        for name, _ in HISTORY_COLUMNS
        if name not in history_row and name not in OPTIONAL_HISTORY_COLUMNS
    ]
    if missing:
        raise StoreError(f"cannot add an epoch to {path}: its history row lacks {missing}")
    epoch = history_row["epoch"]
    if epoch != layout.committed + 1:
        raise StoreError(
            f"cannot add epoch {epoch!r} to {path}: it holds {layout.committed} epochs, so the "
            f"next is {layout.committed + 1}; the store and the checkpoints disagree, train "
            "the run again with --overwrite"
        )
    row = _blank_row()
    row["epoch"] = layout.committed + 1
    for name, _ in HISTORY_COLUMNS[1:]:
        if name not in history_row:
            continue  # optional: stored as not recorded
        try:
            value = float(history_row[name])
        except (TypeError, ValueError, OverflowError):
            value = float("nan")
        if not (np.isfinite(value) and value >= 0):
            raise StoreError(
                f"cannot add epoch {epoch} to {path}: its {name} is {history_row[name]!r}, "
                "not a finite number of 0 or more"
            )
        row[name] = value
    for name in OPTIONAL_HISTORY_COLUMNS:
        if not layout.committed:
            continue
        if not _recorded(layout.history, name):
            row[name] = np.nan  # the run's earlier epochs did not record it: neither does this
        elif name not in history_row:
            raise StoreError(
                f"cannot add epoch {epoch} to {path}: its history row lacks {name}, which "
                "the earlier epochs record"
            )
    return row


def truncate_store(path: str | Path, epochs: int) -> None:
    """Keep only the first ``epochs`` committed epochs (used by resume).

    The store is validated first. A v2 store loses its later epoch files, the highest first
    (a kill meanwhile leaves a shorter but whole store); a v1 store is rewritten.
    """
    path = Path(path)
    if isinstance(epochs, bool) or not isinstance(epochs, int | np.integer) or epochs < 0:
        raise ValueError(f"epochs must be an integer of 0 or more, got {epochs!r}")
    with StoreReader(path) as store:
        version, committed = store.schema_version, store.committed
    keep = min(committed, int(epochs))
    if version >= 2:
        _remove_epochs_after(path, keep)
        return
    buffer = _open_copy(path)
    with _open_h5(buffer, path) as f:
        _validated(lambda: _inspect(f, path), path)
        _truncate(f, keep)
        f["committed_epochs"][()] = keep
    _commit(path, buffer)


def upgrade_store(path: str | Path) -> bool:
    """Convert a v1 store to v2 without loss; False when it already is v2 (nothing done).

    The v1 store is validated and read (images and masks in batches); the v2 epoch files are
    written first, then the new head is renamed over the v1 file. Until that rename a v1
    reader sees the v1 store, which ignores the epochs folder; a kill at any moment leaves one
    whole store, v1 or v2, and an upgrade run again starts over.
    """
    path = Path(path)
    with StoreReader(path) as old:
        if old.schema_version >= SCHEMA_VERSION:
            return False
        attrs = old.attrs
        builder = StoreBuilder(
            path,
            targets=old.targets,
            index=old.index,
            classes=old.classes,
            dataset=str(attrs.get("dataset", "")),
            model=attrs["model"],
            mean=old.mean,
            std=old.std,
            image_shape=old.images([0]).shape[1:],
            has_masks=old.has_masks,
            paths=old.sources() if old.has_paths else None,
            sizes=old.sizes,
            eval_weights=str(attrs.get("eval_weights", "trained")),
            eval_tta=bool(attrs.get("eval_tta", False)),
        )
        history = old.history

        def epochs() -> Iterator[tuple[np.ndarray, np.ndarray]]:
            for epoch in old.epochs:  # one at a time: memory is one epoch's logits
                row = _blank_row()
                for name, column in history.items():
                    row[name] = column[epoch - 1]
                yield old.logits(epoch), row

        builder._epochs_to_publish = epochs()
        h, w, c = builder.image_shape
        with builder:
            for batch in old.batches(max(1, _CHUNK_BYTES * 16 // (h * w * c))):
                builder.add_images(
                    old.images(batch), old.read_masks(batch) if old.has_masks else None
                )
    return True


def _truncate(f: h5py.File, epochs: int) -> None:
    if f["logits"].shape[0] > epochs:
        f["logits"].resize(epochs, axis=0)
    if f["history"].shape[0] > epochs:
        f["history"].resize(epochs, axis=0)


# -- reading the store ---------------------------------------------------------------------------


class StoreReader:
    """Read-only view of a store's committed epochs. Use as a context manager or call close().

    Opening validates the store (see :func:`_inspect`); reading an epoch's logits checks that
    they are finite, reading the masks that they are 0 or 1, reading the source paths that they
    are UTF-8 text. Every complaint is a StoreError. The view is a snapshot: epochs committed
    after it opened are not seen, and the files it opened stay readable while training goes
    on (or a resume replaces later epochs).
    """

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if path.is_dir():
            path = RunDir(path).store_path
        self.path = path
        if not path.exists():
            raise StoreError(f"no prediction store at {path}; is this a run directory?")
        if path.stat().st_size == 0:
            raise StoreError(f"{path} is empty (0 bytes); the store is damaged, {_REMEDY}")
        try:
            self._f = h5py.File(path, "r")
        except OSError as e:
            raise StoreError(
                f"{path} cannot be opened as HDF5 (truncated or not an HDF5 file): {_short(e)}"
            ) from e
        try:
            layout: _Layout = _validated(lambda: _inspect(self._f, path), path)
        except BaseException:
            self._f.close()
            raise
        self.schema_version = layout.version
        self.committed = layout.committed
        self.attrs: dict[str, Any] = layout.attrs
        self.classes: list[str] = layout.classes
        self.mean = layout.mean
        self.std = layout.std
        self.num_images = layout.num_images
        self._has_masks = layout.has_masks
        self._has_paths = layout.has_paths
        self._paths: list[str] | None = None
        self._sizes = layout.sizes
        self._image_shape = layout.image_shape
        self._history = layout.history
        self._targets = layout.targets
        self._index = layout.index
        self._epochs = layout.epochs  # v2: open epoch files, 1..committed

    def _read(self, name: str, selection: Any = ()) -> np.ndarray:
        try:
            ds = self._f[name]
        except _DAMAGE_ERRORS as e:
            raise _corrupt(self.path, name, e) from e
        return _read_dataset(ds, self.path, selection)

    @property
    def epochs(self) -> list[int]:
        return list(range(1, self.committed + 1))

    @property
    def last_epoch(self) -> int | None:
        return self.committed or None

    @property
    def size_bytes(self) -> int:
        """The bytes on disk of the head and the committed epoch files."""
        files = [Path(f.filename) for f in self._epochs]
        return sum(p.stat().st_size for p in [self.path, *files] if p.exists())

    @property
    def history(self) -> dict[str, np.ndarray]:
        """The committed history rows, one array per column (checked when the store opened).

        An optional column (``OPTIONAL_HISTORY_COLUMNS``) is left out when the store has none
        (written by an older explainkit) or its writer did not record it.
        """
        return {
            name: np.array(self._history[name])
            for name, _ in HISTORY_COLUMNS
            if _recorded(self._history, name)
        }

    @property
    def best_epoch(self) -> int | None:
        if not self.committed:
            return None
        history = self.history
        return int(history["epoch"][int(np.argmax(history["eval_acc"]))])

    @property
    def targets(self) -> np.ndarray:
        return self._targets.copy()

    @property
    def index(self) -> np.ndarray:
        return self._index.copy()

    @property
    def has_masks(self) -> bool:
        return self._has_masks

    @property
    def masks(self) -> np.ndarray | None:
        """Every mask, uint8 (N, H, W) of 0 and 1, or None; :meth:`read_masks` reads some."""
        return self.read_masks() if self.has_masks else None

    def read_masks(self, indices: Any = None) -> np.ndarray:
        """uint8 (n, H, W) masks of ``indices`` (any 1-D integer selection, order kept; None
        for all), checked to hold only 0 and 1. StoreError for a store without masks."""
        if not self.has_masks:
            raise StoreError(f"{self.path} has no masks; its dataset records none")
        masks = self._select("eval/masks", indices, self._image_shape[:2])
        if masks.size and masks.max() > 1:
            raise _damaged(self.path, "eval/masks holds values other than 0 and 1")
        return masks

    @property
    def has_paths(self) -> bool:
        """Whether the store records each image's source file (folder datasets)."""
        return self._has_paths

    @property
    def sizes(self) -> np.ndarray | None:
        """int64 (N, 2): each image's original (height, width) before resizing, or None for a
        store that does not record them (written before explainkit recorded sizes)."""
        return None if self._sizes is None else self._sizes.copy()

    def sources(self, indices: Any = None) -> list[str]:
        """Where each image came from, as text for tables: its file relative to the data folder
        when the store records paths (folder datasets), else ``"{dataset} #{index}"`` with its
        position in the source split (``eval/index``), e.g. ``"cifar10 #417"``.

        ``indices``: store positions, any 1-D integer selection (order kept); None for all.
        """
        if indices is None:
            idx = np.arange(self.num_images)
        else:
            idx = np.asarray(indices, dtype=np.int64)
            if idx.ndim != 1:
                raise ValueError(f"indices must be 1-D, got shape {idx.shape}")
            if idx.size and (idx.min() < 0 or idx.max() >= self.num_images):
                raise IndexError(f"image indices must be in 0..{self.num_images - 1}")
        if self._has_paths:
            paths = self._source_paths()
            return [paths[i] for i in idx]
        name = self.attrs.get("dataset") or "image"
        return [f"{name} #{int(self._index[i])}" for i in idx]

    def _source_paths(self) -> list[str]:
        """``eval/paths`` decoded (read once): non-empty UTF-8 text, else the store is damaged."""
        if self._paths is None:
            try:
                paths = [bytes(p).decode("utf-8") for p in self._read("eval/paths")]
            except UnicodeDecodeError:
                raise _damaged(self.path, "eval/paths holds text that is not UTF-8") from None
            if not all(paths):
                raise _damaged(self.path, "eval/paths holds an empty path")
            self._paths = paths
        return self._paths

    def images(self, indices: Any = None) -> np.ndarray:
        """uint8 (n,H,W,C) images; ``indices`` any 1-D integer selection (order kept)."""
        return self._select("eval/images", indices, self._image_shape)

    def _select(self, name: str, indices: Any, shape: tuple[int, ...]) -> np.ndarray:
        """Rows ``indices`` of dataset ``name`` (all for None), in the order asked."""
        if indices is None:
            return self._read(name)
        idx = np.asarray(indices, dtype=np.int64)
        if idx.ndim != 1:
            raise ValueError(f"indices must be 1-D, got shape {idx.shape}")
        if idx.size == 0:
            return np.zeros((0, *shape), np.uint8)
        if idx.min() < 0 or idx.max() >= self.num_images:
            raise IndexError(f"image indices must be in 0..{self.num_images - 1}")
        order = np.argsort(idx, kind="stable")
        uniq, inverse = np.unique(idx[order], return_inverse=True)
        if len(uniq) == uniq[-1] - uniq[0] + 1:  # a contiguous run: one slice, chunk by chunk
            data = self._read(name, slice(int(uniq[0]), int(uniq[-1]) + 1))
        else:
            data = self._read(name, uniq)
        out = np.empty((len(idx), *data.shape[1:]), data.dtype)
        out[order] = data[inverse]
        return out

    def batches(self, size: int) -> list[np.ndarray]:
        """Consecutive store positions in runs of ``size`` (the last may be shorter), for
        reading images, masks and logits in bounded memory."""
        if size < 1:
            raise ValueError(f"size must be 1 or more, got {size}")
        return [
            np.arange(s, min(s + size, self.num_images)) for s in range(0, self.num_images, size)
        ]

    def _epoch_row(self, epoch: int | None) -> int:
        if not self.committed:
            raise StoreError(
                f"{self.path} has no committed epochs yet; wait for the first epoch to finish"
            )
        if epoch is None:
            return self.committed - 1
        if not 1 <= epoch <= self.committed:
            raise StoreError(
                f"epoch {epoch} is not in the store; it has epochs 1..{self.committed}"
            )
        return epoch - 1

    def logits(self, epoch: int | None = None) -> np.ndarray:
        """float32 (N, classes) logits of an epoch (default: the last committed one).

        Checked to be finite here, not when the store opens: the check costs what the read
        costs, and a damaged epoch fails only the analyzers that read it.
        """
        row = self._epoch_row(epoch)
        if self._epochs:
            f = self._epochs[row]
            try:
                ds = f["logits"]
            except _DAMAGE_ERRORS as e:
                raise _corrupt(Path(f.filename), "logits", e) from e
            data = _read_dataset(ds, Path(f.filename))
        else:
            data = self._read("logits", row)
        data = data.astype(np.float32, copy=False)
        if not np.isfinite(data).all():
            raise _damaged(self.path, f"the logits of epoch {row + 1} hold NaN or infinity")
        return data

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
        """Read every committed byte so checksum (fletcher32) errors surface now; the images
        and masks in batches, so memory stays bounded however many there are."""
        for name in ("eval/targets", "eval/index"):
            self._read(name)
        h, w, c = self._image_shape
        for batch in self.batches(max(1, (16 * _CHUNK_BYTES) // (h * w * c))):
            self.images(batch)
            if self.has_masks:
                self.read_masks(batch)
        if self._has_paths:
            self._paths = None
            self._source_paths()
        for epoch in self.epochs:
            self.logits(epoch)

    def close(self) -> None:
        _close_all(self._epochs)
        self._f.close()

    def __enter__(self) -> StoreReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _recorded(rows: np.ndarray, name: str) -> bool:
    """Whether the history ``rows`` hold column ``name`` (an optional one may be absent or
    all NaN, which means not recorded)."""
    if name not in (rows.dtype.names or ()):
        return False
    if name in OPTIONAL_HISTORY_COLUMNS and len(rows):
        return not np.isnan(rows[name].astype(np.float64)).all()
    return True


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text[:200]


def open_store(path: str | Path) -> StoreReader:
    """Open a store (a ``predictions.h5`` file or a run directory) for reading."""
    return StoreReader(path)


# -- other HDF5 files: streamed through Python I/O -----------------------------------------------


class _GuardedFile:
    """A file object for h5py's ``fileobj`` driver that never lets a write error into libhdf5.

    libhdf5 does not survive a failed write: the file cannot be closed, and the process
    crashes when the handle is freed (at the latest at exit). So the first OSError is kept
    here, later writes are dropped (and reads past what reached the disk see zeros), libhdf5
    closes its file normally, and :class:`H5Writer` raises the kept error as one sentence.
    The file is unbuffered: every write reaches the disk (memory stays bounded by HDF5's
    chunk cache) and fails where it happens.
    """

    def __init__(self, raw: io.FileIO) -> None:
        self._raw = raw
        self._pos = 0
        self.error: OSError | None = None

    def _fail(self, e: OSError) -> None:
        if self.error is None:
            self.error = e

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        try:
            self._pos = self._raw.seek(offset, whence)
        except OSError as e:
            self._fail(e)
            if whence == io.SEEK_SET:
                self._pos = offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        done = 0
        try:
            self._raw.seek(self._pos)
            while done < len(view):
                got = self._raw.readinto(view[done:])
                if not got:
                    break
                done += got
        except OSError as e:
            self._fail(e)
        if done < len(view) and self.error is not None:
            view[done:] = bytes(len(view) - done)  # what was dropped reads as zeros
            done = len(view)
        self._pos += done
        return done

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            size = max(0, os.fstat(self._raw.fileno()).st_size - self._pos)
        buffer = bytearray(size)
        return bytes(buffer[: self.readinto(buffer)])

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        if self.error is None:
            done = 0
            try:
                self._raw.seek(self._pos)
                while done < len(view):
                    wrote = self._raw.write(view[done:])
                    if not wrote:
                        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                    done += wrote
            except OSError as e:
                self._fail(e)
        self._pos += len(view)
        return len(view)

    def truncate(self, size: int | None = None) -> int:
        size = self._pos if size is None else size
        if self.error is None:
            try:
                self._raw.truncate(size)
            except OSError as e:
                self._fail(e)
        return size

    def flush(self) -> None:
        pass  # unbuffered: nothing is held here

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True


class H5Writer:
    """Context manager of :func:`open_h5_for_writing`; ``with`` gives the ``h5py.File``."""

    def __init__(
        self,
        path: str | Path,
        error: type[ExplainkitError] = StoreError,
        *,
        tmp: Path | None = None,
        before_replace: Callable[[], None] | None = None,
        **options: Any,
    ) -> None:
        self.path = Path(path)
        self._error = error
        self._options = {**_FILE_OPTIONS, **options}
        self._tmp = tmp or self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self._before_replace = before_replace  # runs once the file is complete and fsynced
        self._raw: io.FileIO | None = None
        self._guard: _GuardedFile | None = None
        self._file: h5py.File | None = None

    def _sentence(self, e: BaseException) -> ExplainkitError:
        reason = getattr(e, "strerror", None) or _short(e)
        return self._error(
            f"cannot write {self.path}: {reason}; free some disk space and try again"
        )

    def check(self) -> None:
        """Raise now if a write has failed (call it once per batch to stop early)."""
        if self._guard is not None and self._guard.error is not None:
            raise self._sentence(self._guard.error) from self._guard.error

    def __enter__(self) -> h5py.File:
        try:
            self._raw = open(self._tmp, "w+b", buffering=0)  # closed by _finish
        except OSError as e:
            raise self._sentence(e) from e
        self._guard = _GuardedFile(self._raw)
        try:
            self._file = h5py.File(self._guard, "w", **self._options)
        except BaseException as e:
            self._finish(e)
            raise
        return self._file

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        self._finish(exc)
        return False

    def _finish(self, exc: BaseException | None) -> None:
        """Close everything; publish the file only when all of it reached the disk."""
        assert self._raw is not None and self._guard is not None
        guard, raw = self._guard, self._raw
        closing: Exception | None = None
        try:
            if self._file is not None:
                try:
                    self._file.close()
                except Exception as e:  # not a write error (those are kept by the guard)
                    closing = e
            if guard.error is None and closing is None and exc is None:
                try:
                    os.fsync(raw.fileno())
                except OSError as e:
                    guard._fail(e)
            raw.close()
            if guard.error is not None:
                raise self._sentence(guard.error) from guard.error
            if closing is not None:
                raise self._sentence(closing) from closing
            if exc is None:
                if self._before_replace is not None:
                    self._before_replace()
                os.replace(self._tmp, self.path)
                fsync_dir(self.path.parent)
        finally:
            self._tmp.unlink(missing_ok=True)


def open_h5_for_writing(
    path: str | Path, error: type[ExplainkitError] = StoreError, **options: Any
) -> H5Writer:
    """Open a new HDF5 file for streamed writing through Python I/O.

    Use as ``with open_h5_for_writing(path, AnalyzerError) as f:`` and write datasets batch by
    batch as with ``h5py.File(path, "w")``. Data goes to disk as HDF5 evicts chunks from its
    cache, so memory stays bounded however large the file grows. The file is written beside
    ``path`` and renamed over it only when complete: a failure leaves an older ``path`` as it
    was. A failed write (a full disk, a file-size limit) raises ``error`` with one sentence
    when the ``with`` block ends, or at once from ``writer.check()``; libhdf5 never sees it,
    so it cannot crash the process. ``options`` go to ``h5py.File`` (default
    ``libver=("v110", "latest")``: checksummed metadata, as in the prediction store).
    """
    return H5Writer(path, error, **options)
