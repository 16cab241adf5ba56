"""Every check of a store: when it is opened, and before a writer changes it.

A wrong value becomes one :class:`StoreError` sentence instead of confident nonsense in a
figure ("Validation" in docs/store-format.md). A file that is not ours says so; a file that
is ours but wrong says it is damaged. The layout checked against is schema.py's.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from explainkit.errors import StoreError, first_line
from explainkit.store.history import Damage, check_history, check_history_table
from explainkit.store.schema import (
    COUNTED,
    DEFAULT_TASK,
    EPOCH_ATTRIBUTES,
    EPOCH_FORMAT_NAME,
    EPOCH_NAME,
    EVAL_WEIGHTS,
    FORMAT_NAME,
    HISTORY_COLUMNS,
    HISTORY_DTYPE,
    IMAGES,
    MAX_SEGMENTATION_CLASSES,
    REQUIRED_ATTRIBUTES,
    SCHEMA_VERSION,
    TASKS,
    Field,
    blank_row,
    epoch_fields,
    epoch_file,
    epoch_name,
    epochs_folder,
    head_fields,
    optional_history,
)

REMEDY = "restore it from a backup or train the run again"
# What h5py and numpy raise on a damaged file (checked by tests/test_fuzz.py): each becomes a
# StoreError, so a corrupt store is one sentence, never a traceback.
DAMAGE_ERRORS = (
    OSError,
    RuntimeError,
    KeyError,
    ValueError,
    TypeError,
    IndexError,
    ArithmeticError,
    MemoryError,
)
# Value checks (schema.Field.check) done when the store opens: a few bytes per image.
OPEN_CHECKS = ("class", "position", "size", "count")


def damaged(path: Path, detail: str) -> StoreError:
    return StoreError(f"{path} is damaged: {detail}; {REMEDY}")


def corrupt(path: Path, name: str, e: BaseException) -> StoreError:
    return StoreError(f"{path}: reading {name} failed, the data is corrupt ({short(e)}); {REMEDY}")


def short(e: BaseException) -> str:
    return first_line(e, limit=200) or type(e).__name__


def validated(check: Callable[[], Any], path: Path) -> Any:
    """``check()``, with every complaint about the store ``path`` as one StoreError sentence."""
    try:
        return check()
    except StoreError:
        raise
    except Damage as e:
        raise damaged(path, str(e)) from None
    except DAMAGE_ERRORS as e:
        raise damaged(path, short(e)) from e


def read_dataset(ds: h5py.Dataset, path: Path, selection: Any = ()) -> np.ndarray:
    try:
        return ds[selection]
    except DAMAGE_ERRORS as e:
        raise corrupt(path, ds.name.lstrip("/"), e) from e


# -- attributes --------------------------------------------------------------------------------


def decode(value: Any) -> Any:
    """Attribute value as Python data: fixed-length strings come back as bytes."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        value = value.item()
    return value.decode("utf-8") if isinstance(value, bytes) else value


def _describe(value: Any) -> str:
    """A stored value in a few words, for a message."""
    if isinstance(value, np.ndarray) and value.ndim > 0:
        return f"a {value.dtype} array of shape {value.shape}"
    text = repr(decode(value)) if isinstance(value, np.generic | bytes) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _as_int(value: Any, what: str) -> int:
    """A stored integer scalar as ``int``; a bool, a float, a string or an array is damage."""
    if isinstance(value, np.ndarray) and value.shape == ():
        value = value[()]
    if isinstance(value, bool | np.bool_) or not isinstance(value, int | np.integer):
        raise Damage(f"{what} is {_describe(value)}, not an integer")
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
            raise Damage(f"the {name} attribute is not UTF-8 text") from None
    if isinstance(value, str):
        return value
    raise Damage(f"the {name} attribute is {_describe(value)}, not text")


def _json_attr(attrs: dict[str, Any], name: str) -> Any:
    try:
        return json.loads(_text_attr(attrs, name) or "")
    except ValueError:  # JSONDecodeError
        raise Damage(f"the {name} attribute is not valid JSON") from None


def _numbers_attr(
    attrs: dict[str, Any], name: str, length: int, why: str, kinds: str = "iuf"
) -> np.ndarray:
    """A 1-D numeric attribute of ``length`` finite values (``why``: where the length is from)."""
    value = np.asarray(attrs[name])
    if value.ndim != 1 or value.dtype.kind not in kinds:
        noun = "integers" if kinds == "iu" else "numbers"
        raise Damage(f"the {name} attribute is {_describe(attrs[name])}, not a list of {noun}")
    if len(value) != length:
        count = f"{len(value)} value{'' if len(value) == 1 else 's'}"
        raise Damage(f"the {name} attribute has {count}, not {length} ({why})")
    value = value.astype(np.float64)
    if not np.isfinite(value).all():
        raise Damage(f"the {name} attribute holds NaN or infinity")
    return value


def _schema_version(raw: dict[str, Any], path: Path) -> int:
    if "schema_version" not in raw:
        raise Damage("it lacks the schema_version attribute")
    version = _as_int(raw["schema_version"], "schema_version")
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"{path} has store schema v{version}, newer than this explainkit "
            f"(v{SCHEMA_VERSION}); upgrade explainkit to read it"
        )
    if 1 <= version < SCHEMA_VERSION:
        raise StoreError(
            f"{path} was written by a pre-release of explainkit (schema {version}); "
            "train the run again with this version"
        )
    if version < 1:
        raise Damage(f"its store schema version {version} is unknown")
    return version


def _task(raw: dict[str, Any], path: Path) -> str:
    """The store's task (schema.TASKS); a store that records none is a classification one."""
    task = _text_attr(raw, "task")
    if task is None:
        return DEFAULT_TASK
    if task not in TASKS:
        raise StoreError(
            f"{path} holds results of the task {task!r}, which this explainkit cannot read "
            f"(it reads {', '.join(TASKS)}); upgrade explainkit to read it"
        )
    return task


def _check_attributes(
    raw: dict[str, Any], dims: dict[str, int]
) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """The root attributes decoded, mean and std; sets ``dims["K"]``, the number of classes."""
    classes = _json_attr(raw, "classes")
    if not (isinstance(classes, list) and classes and all(isinstance(x, str) for x in classes)):
        raise Damage("the classes attribute is not a non-empty list of class names")
    if len(set(classes)) != len(classes):
        raise Damage("the classes attribute names a class twice")
    dims["K"] = k = len(classes)
    model = _json_attr(raw, "model")
    if not isinstance(model, dict):
        raise Damage("the model attribute is not a JSON object")
    spec_classes = model.get("num_classes", k)
    if isinstance(spec_classes, bool) or spec_classes != k:
        raise Damage(f"the model has {spec_classes!r} classes but the store names {k}")
    c, h, w = dims["C"], dims["H"], dims["W"]
    mean = _numbers_attr(raw, "mean", c, f"the images have {c} channels")
    std = _numbers_attr(raw, "std", c, f"the images have {c} channels")
    if ((mean < 0) | (mean > 1)).any():
        raise Damage("the mean attribute is outside [0, 1] (pixel units)")
    if (std <= 0).any():
        raise Damage("the std attribute has a value that is not positive")
    input_shape = _numbers_attr(raw, "input_shape", 3, "C, H, W", kinds="iu")
    if tuple(input_shape) != (c, h, w):
        raise Damage(
            f"input_shape {[int(v) for v in input_shape]} does not match the images (C, H, W) "
            f"= {[c, h, w]}"
        )
    for name in ("dataset", "explainkit_version", "default_layer"):
        _text_attr(raw, name)
    if not _text_attr(raw, "store_id"):
        raise Damage("the store_id attribute is empty")
    if _text_attr(raw, "eval_weights") not in (None, *EVAL_WEIGHTS):
        raise Damage(f"eval_weights is {_describe(raw['eval_weights'])}, not trained or ema")
    if "eval_tta" in raw and not isinstance(raw["eval_tta"], bool | np.bool_):
        raise Damage(f"eval_tta is {_describe(raw['eval_tta'])}, not true or false")
    attrs: dict[str, Any] = {key: decode(value) for key, value in raw.items()}
    attrs.update(classes=classes, model=model)
    return attrs, mean, std


# -- datasets ----------------------------------------------------------------------------------


def check_field(ds: h5py.Dataset, spec: Field, dims: dict[str, int], label: str) -> None:
    """``ds`` must have the type and shape ``spec`` says; ``label`` begins the complaint
    ("eval/targets is", "the logits of epoch_0002.h5 are")."""
    shape = tuple(dims[d] if isinstance(d, str) else d for d in spec.shape)
    if spec.check == "text":
        info = h5py.check_string_dtype(ds.dtype)
        if info is not None and info.length is None:
            raise Damage(f"{spec.name} holds variable-length strings, not fixed-length UTF-8 text")
        if info is None or ds.shape != shape:
            raise Damage(f"{label} {ds.dtype} {ds.shape}; expected {shape} {spec.what}")
        return
    if ds.dtype.kind not in spec.accepted_kinds or ds.shape != shape:
        counted = [f"{dims[d]} {COUNTED[d]}" for d in spec.shape if d in COUNTED]
        why = f" for {' and '.join(counted)}" if counted else ""
        raise Damage(f"{label} {ds.dtype} {ds.shape}; expected {spec.what} of shape {shape}{why}")


def _check_values(spec: Field, values: np.ndarray, dims: dict[str, int]) -> None:
    """The value checks done at open (OPEN_CHECKS); ``values`` holds at least one."""
    if spec.check == "class" and (values.min() < 0 or values.max() >= dims["K"]):
        raise Damage(f"{spec.name} holds a class outside 0..{dims['K'] - 1}")
    if spec.check == "position" and values.min() < 0:
        raise Damage(f"{spec.name} holds a negative position")
    if spec.check == "size" and values.min() < 1:
        raise Damage(f"{spec.name} holds a size below 1 pixel")
    if spec.check == "count" and values.min() < 0:
        raise Damage(f"{spec.name} holds a negative count")


def check_fields(
    group: Any, specs: tuple[Field, ...], dims: dict[str, int], task: str, label: str, path: Path
) -> dict[str, np.ndarray]:
    """Check ``specs`` in ``group`` (type, shape, the open checks); returns what was read.

    A ragged dimension (G, D) is set in ``dims`` from its counts dataset, which comes before
    the datasets shaped by it. ``label`` formats the complaint's start from a dataset's name.
    """
    counted = {name: dim for dim, name in TASKS[task].counts}
    arrays = {}
    for spec in specs:
        if spec.name not in group:
            continue
        check_field(group[spec.name], spec, dims, label.format(spec.name))
        if spec.check in OPEN_CHECKS:
            arrays[spec.name] = read_dataset(group[spec.name], path).astype(np.int64)
            if arrays[spec.name].size:
                _check_values(spec, arrays[spec.name], dims)
        if spec.name in counted:
            dims[counted[spec.name]] = int(arrays[spec.name].sum())
    return arrays


def _image_dims(images: h5py.Dataset) -> dict[str, int]:
    """N, H, W, C from ``eval/images``, which every other shape is checked against."""
    if images.dtype != np.uint8 or images.ndim != 4:
        raise Damage(f"eval/images is {images.dtype} {images.shape}, not uint8 (N, H, W, C)")
    n, h, w, c = images.shape
    if n < 1:
        raise Damage("it holds no eval images")
    if min(h, w, c) < 1:
        raise Damage(f"eval/images has the empty image shape {images.shape[1:]}")
    return {"N": n, "H": h, "W": w, "C": c}


@dataclass
class Layout:
    """What a validated store holds (all checked by :func:`inspect_store`)."""

    attrs: dict[str, Any]
    version: int
    task: str
    store_id: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    dims: dict[str, int]  # N images of H x W x C, K classes
    datasets: set[str]  # the head's datasets, optional ones included when present
    arrays: dict[str, np.ndarray]  # what OPEN_CHECKS read (targets, index, sizes), as int64
    committed: int = 0
    history: np.ndarray = field(default_factory=lambda: np.zeros(0, HISTORY_DTYPE))
    epochs: list[h5py.File] = field(default_factory=list)  # the open epoch files, 1..E

    @property
    def num_images(self) -> int:
        return self.dims["N"]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.dims["H"], self.dims["W"], self.dims["C"]

    @property
    def classes(self) -> list[str]:
        return list(self.attrs["classes"])


def inspect_head(f: h5py.File, path: Path) -> Layout:
    """Check a store's attributes and ``eval/*`` datasets; read what is small.

    Raises StoreError for a file that is not ours, a newer or pre-release schema, an unknown
    task or a corrupt chunk, and ``Damage`` (or an h5py/numpy error) for anything else wrong
    with one of ours. The cost is a few dozen metadata reads plus targets, index and sizes
    (about 8 bytes per image each): it does not grow with the image size or the number of
    epochs. Masks and paths are checked when read.
    """
    if decode(f.attrs.get("format")) != FORMAT_NAME:
        raise StoreError(
            f"{path} is an HDF5 file but not an explainkit prediction store; "
            "point explainkit at a run directory written by explainkit train"
        )
    raw = {key: f.attrs[key] for key in f.attrs}
    version = _schema_version(raw, path)
    task = _task(raw, path)
    specs = head_fields(task)
    missing = [spec.name for spec in specs if not spec.optional and spec.name not in f]
    missing += [f"the {name} attribute" for name in REQUIRED_ATTRIBUTES if name not in raw]
    if missing:
        raise Damage(f"it lacks {', '.join(missing)}")
    found = {spec.name: f[spec.name] for spec in specs if spec.name in f}
    for name, obj in found.items():
        if not isinstance(obj, h5py.Dataset):
            raise Damage(f"{name} is not a dataset")
    dims = _image_dims(found[IMAGES.name])
    attrs, mean, std = _check_attributes(raw, dims)
    if task == "segmentation" and dims["K"] > MAX_SEGMENTATION_CLASSES:
        raise Damage(f"a segmentation store has at most {MAX_SEGMENTATION_CLASSES} classes")
    arrays = check_fields(f, specs[1:], dims, task, "{} is", path)
    return Layout(
        attrs=attrs,
        version=version,
        task=task,
        store_id=str(_text_attr(raw, "store_id")),
        mean=tuple(float(v) for v in mean),
        std=tuple(float(v) for v in std),
        dims=dims,
        datasets=set(found),
        arrays=arrays,
    )


# -- epoch files -------------------------------------------------------------------------------


def epoch_numbers(path: Path) -> list[int]:
    """The committed epochs of the store ``path``: 1..E, the files that exist.

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
        match = EPOCH_NAME.fullmatch(name)
        if match and int(match[1]) >= 1 and epoch_name(int(match[1])) == name:
            found.add(int(match[1]))
    committed = 0
    while committed + 1 in found:
        committed += 1
    if len(found) > committed:
        later = min(found - set(range(1, committed + 1)))
        raise Damage(
            f"{epoch_file(path, later).name} exists but "
            f"{epoch_file(path, committed + 1).name} does not (an epoch file was deleted)"
        )
    return list(range(1, committed + 1))


def _open_epoch(path: Path, epoch: int) -> h5py.File:
    where = epoch_file(path, epoch)
    name = f"{where.parent.name}/{where.name}"
    try:
        if where.stat().st_size == 0:
            raise Damage(f"{name} is empty (0 bytes)")
        return h5py.File(where, "r")
    except OSError as e:
        raise Damage(
            f"{name} cannot be opened as HDF5 (truncated or not an HDF5 file): {short(e)}"
        ) from None


def _inspect_epoch(f: h5py.File, path: Path, layout: Layout, epoch: int) -> np.ndarray:
    """Check one epoch file; its history row (HISTORY_DTYPE, shape (1,)).

    Every complaint names the file, so the user knows which one is damaged.
    """
    where = epoch_file(path, epoch)
    name = f"{where.parent.name}/{where.name}"
    try:
        return _check_epoch_file(f, where, name, layout, epoch)
    except Damage as e:
        raise Damage(str(e) if name in str(e) else f"{name}: {e}") from None
    except DAMAGE_ERRORS as e:
        raise Damage(f"{name}: {short(e)}") from e


def _check_epoch_file(
    f: h5py.File, where: Path, name: str, layout: Layout, epoch: int
) -> np.ndarray:
    if decode(f.attrs.get("format")) != EPOCH_FORMAT_NAME:
        raise Damage(f"{name} is not an explainkit epoch file")
    raw = {key: f.attrs[key] for key in f.attrs}
    specs = epoch_fields(layout.task)
    missing = [a for a in EPOCH_ATTRIBUTES if a not in raw]
    missing += [d for d in (*(spec.name for spec in specs), "history") if d not in f]
    if missing:
        raise Damage(f"{name} lacks {', '.join(missing)}")
    version = _as_int(raw["schema_version"], f"the schema_version of {name}")
    if version != layout.version:
        raise Damage(f"{name} has schema version {version}, not {layout.version}")
    if _text_attr(raw, "store_id") != layout.store_id:
        raise Damage(f"{name} belongs to another store (its store_id differs)")
    number = _as_int(raw["epoch"], f"the epoch of {name}")
    if number != epoch:
        raise Damage(f"{name} says it holds epoch {number}")
    for dataset in (*(spec.name for spec in specs), "history"):
        if not isinstance(f[dataset], h5py.Dataset):
            raise Damage(f"the {dataset} of {name} is not a dataset")
    optional = optional_history(layout.task)
    dims = dict(layout.dims)
    check_fields(f, specs, dims, layout.task, f"the {{}} of {name} are", where)
    check_history_table(f["history"], 1, f"the history of {name}", optional)
    stored = read_dataset(f["history"], where)
    row = blank_row()
    for column, _ in HISTORY_COLUMNS:
        if column in (stored.dtype.names or ()):
            row[column] = stored[column]
    check_history(row, epoch, f"the history of {name}", optional)
    return row


def inspect_epochs(path: Path, layout: Layout, epochs: list[int]) -> Layout:
    """Open and check the epoch files ``epochs`` (consecutive); they stay open in the layout
    (a reader's snapshot: an open file survives a later rename or unlink)."""
    _allow_open_files(path, len(epochs))
    rows = []
    try:
        for epoch in epochs:
            layout.epochs.append(_open_epoch(path, epoch))
            rows.append(_inspect_epoch(layout.epochs[-1], path, layout, epoch))
        history = np.concatenate(rows) if rows else np.zeros(0, HISTORY_DTYPE)
        check_history(history, epochs[0] if epochs else 1, optional=optional_history(layout.task))
    except BaseException:
        close_all(layout.epochs)
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


def close_all(files: list[h5py.File]) -> None:
    for f in files:
        try:
            f.close()
        except Exception:  # noqa: S110 - closing a damaged file must not hide why it failed
            pass
    files.clear()


# -- the whole store ---------------------------------------------------------------------------


def open_head(path: Path) -> h5py.File:
    """The store's ``predictions.h5``, open for reading; StoreError if it cannot be."""
    if not path.exists():
        raise StoreError(f"no prediction store at {path}; is this a run directory?")
    if path.stat().st_size == 0:
        raise StoreError(f"{path} is empty (0 bytes); the store is damaged, {REMEDY}")
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise StoreError(
            f"{path} cannot be opened as HDF5 (truncated or not an HDF5 file): {short(e)}; {REMEDY}"
        ) from e


def open_validated(path: Path) -> tuple[h5py.File, Layout]:
    """Open and check the head and every committed epoch file; all of them stay open."""
    f = open_head(path)
    try:
        layout = validated(lambda: inspect_head(f, path), path)
        validated(lambda: inspect_epochs(path, layout, epoch_numbers(path)), path)
    except BaseException:
        f.close()
        raise
    return f, layout
