"""Writing a store: the head once (streamed), then one file per committed epoch.

``predictions.h5``, the head, holds the root attributes and the evaluation split (``eval/*``);
:class:`StoreBuilder` streams it to a temporary file batch by batch and renames it into place,
and nothing changes it afterwards. Each epoch is its own small file,
``predictions.epochs/epoch_0001.h5`` (its logits and history row), written whole to a
temporary file, fsynced and renamed: a commit costs that epoch's logits, never the images or
earlier epochs. The committed epochs are the files 1..E; a rename is atomic, so a kill at any
moment leaves exactly the committed epochs.

The store is validated (validate.py) before a writer changes it, and arguments that would make
a store its readers refuse are refused here before anything is written.
"""

from __future__ import annotations

import io
import json
import os
import uuid
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from explainkit import __version__
from explainkit.atomic import fsync_dir, write_atomic
from explainkit.errors import StoreError
from explainkit.h5files import H5Writer
from explainkit.store.history import recorded
from explainkit.store.schema import (
    CHUNK_BYTES,
    COMPRESSION,
    DEFAULT_TASK,
    EPOCH_FORMAT_NAME,
    EPOCH_NAME,
    EPOCH_TMP,
    EVAL_WEIGHTS,
    FILE_OPTIONS,
    FORMAT_NAME,
    HISTORY_COLUMNS,
    MAX_SEGMENTATION_CLASSES,
    SCHEMA_VERSION,
    TASKS,
    blank_row,
    epoch_file,
    epochs_folder,
    optional_history,
    rows_per_chunk,
)
from explainkit.store.tasks import check_arrays, check_batch, per_pixel, truth_names
from explainkit.store.validate import (
    Layout,
    close_all,
    epoch_numbers,
    inspect_epochs,
    inspect_head,
    open_head,
    open_validated,
    validated,
)


def _text(value: str) -> np.bytes_:
    """A fixed-length UTF-8 string attribute (stored inline, covered by header checksums)."""
    return np.bytes_(str(value).encode("utf-8"))


# -- the head ----------------------------------------------------------------------------------


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


def _write_root_attributes(
    f: h5py.File,
    *,
    dataset: str,
    classes: list[str],
    model: dict[str, Any],
    mean: tuple[float, ...],
    std: tuple[float, ...],
    image_shape: tuple[int, int, int],
    eval_weights: str,
    eval_tta: bool,
    task: str = DEFAULT_TASK,
) -> None:
    # Fixed-length (not variable-length) strings keep text inside the checksummed object
    # headers: damaged metadata is then refused instead of crashing or hanging libhdf5 (the
    # global heap of variable-length strings has no checksum).
    h, w, c = image_shape
    f.attrs["format"] = _text(FORMAT_NAME)
    f.attrs["schema_version"] = SCHEMA_VERSION
    f.attrs["explainkit_version"] = _text(__version__)
    f.attrs["task"] = _text(task)
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
    """Write a new store's head, streaming the evaluation images in batches.

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
        task: str = DEFAULT_TASK,
        truth: dict[str, np.ndarray] | None = None,
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
        self._task_truth(task, truth or {}, len(classes))
        self._attributes = dict(
            task=task,
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

    def _task_truth(self, task: str, truth: dict[str, Any], k: int) -> None:
        """Check the task and its ground truth: the per-pixel kind comes with the images."""
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
        if task == "segmentation" and k > MAX_SEGMENTATION_CLASSES:
            raise ValueError(
                f"a segmentation store holds at most {MAX_SEGMENTATION_CLASSES} classes"
            )
        self.task, self.per_pixel = task, per_pixel(task)
        fixed = {name: truth[name] for name in truth_names(task) if name not in self.per_pixel}
        extra = sorted(set(truth) - set(truth_names(task)))
        if extra:
            raise ValueError(f"a {task} store holds no {', '.join(extra)}")
        for name in self.per_pixel:  # given whole to create_store: checked batch by batch
            fixed.pop(name, None)
        dims = {"N": self.num_images, "K": k, "H": self.image_shape[0], "W": self.image_shape[1]}
        names = [n for n in truth_names(task) if n not in self.per_pixel]
        self._truth = check_arrays(task, fixed, dims, epoch=False, names=names)

    def __enter__(self) -> StoreBuilder:
        self._writer = H5Writer(
            self.path,
            StoreError,
            tmp=self.path.with_name(self.path.name + ".tmp"),
            before_replace=lambda: _remove_epochs_after(self.path, 0),
            rdcc_nbytes=4 * CHUNK_BYTES,
            **FILE_OPTIONS,
        )
        f = self._file = self._writer.__enter__()
        try:
            _write_root_attributes(f, **self._attributes)
            f.attrs["store_id"] = _text(self.store_id)
            self._create_datasets(f)
            self._writer.check()
        except BaseException as e:
            self._writer.__exit__(type(e), e, None)
            raise
        return self

    def _create_datasets(self, f: h5py.File) -> None:
        n, shape = self.num_images, self.image_shape
        rows = rows_per_chunk(n, int(np.prod(shape)))
        f.create_dataset("eval/images", (n, *shape), "u1", chunks=(rows, *shape), **COMPRESSION)
        f.create_dataset("eval/targets", data=self._targets, **COMPRESSION)
        f.create_dataset("eval/index", data=self._index, **COMPRESSION)
        if self.has_masks:
            rows = rows_per_chunk(n, shape[0] * shape[1])
            f.create_dataset(
                "eval/masks", (n, *shape[:2]), "u1", chunks=(rows, *shape[:2]), **COMPRESSION
            )
        if self._paths is not None:
            f.create_dataset("eval/paths", data=self._paths, **COMPRESSION)
        if self._sizes is not None:
            f.create_dataset("eval/sizes", data=self._sizes, **COMPRESSION)
        for name, values in self._truth.items():
            f.create_dataset(name, data=values, **COMPRESSION)
        for name in self.per_pixel:
            rows = rows_per_chunk(n, shape[0] * shape[1])
            f.create_dataset(name, (n, *shape[:2]), "u1", chunks=(rows, *shape[:2]), **COMPRESSION)

    def add_images(
        self,
        images: np.ndarray,
        masks: np.ndarray | None = None,
        truth: dict[str, np.ndarray] | None = None,
    ) -> None:
        """Append a batch: uint8 (B, H, W, C) images, and (B, H, W) masks of 0 and 1 when the
        store has masks, and the batch's per-pixel ``truth`` (a segmentation store's
        ``eval/segmentation``). Written to disk now; ValueError if it does not fit the store."""
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
        truth = truth or {}
        if set(truth) != set(self.per_pixel):
            wanted = ", ".join(self.per_pixel) or "no per-pixel truth"
            raise ValueError(f"a {self.task} store takes {wanted} with each batch of images")
        k = len(self._attributes["classes"])
        for name in self.per_pixel:
            values = check_batch(self.task, name, truth[name], images.shape[:3], k)
            self._file[name][self.added : self.added + b] = values
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
    task: str = DEFAULT_TASK,
    truth: dict[str, np.ndarray] | None = None,
) -> Path:
    """Write a new store with the evaluation split and no epochs yet (atomically).

    The arrays at once, through :class:`StoreBuilder`. ``paths`` (each image's source file,
    relative to the data folder) and ``sizes`` (its original height and width before
    resizing) are optional. A ``task`` store (schema.TASKS) takes its ground ``truth``
    (docs/store-format.md names it). Raises ValueError for arguments that would make a
    store its readers refuse.
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
        task=task,
        truth=truth,
    )
    truth = truth or {}
    step = rows_per_chunk(len(images), int(np.prod(images.shape[1:]))) * 8
    with builder:
        for start in range(0, len(images), step):
            part = slice(start, start + step)
            pixels = {name: truth[name][part] for name in builder.per_pixel if name in truth}
            builder.add_images(images[part], None if masks is None else masks[part], pixels)
    return Path(path)


# -- epochs ------------------------------------------------------------------------------------


def append_epoch(
    path: str | Path, logits: np.ndarray | dict[str, np.ndarray], history_row: dict[str, float]
) -> int:
    """Commit one epoch's logits and history row; returns the number of committed epochs.

    A store of another task takes its epoch's results as a dict instead of the logits
    (schema.TASKS names them: a detector's counts, boxes, scores and labels).

    The store is validated first (the head, and the latest epoch whose history the new row
    continues), and the new epoch must fit it (logits of shape (N, classes), finite; the row's
    epoch one past the committed ones; finite, non-negative numbers): otherwise StoreError,
    and the store is left as it was. A commit writes one epoch file (cost: this epoch's
    logits).
    """
    path = Path(path)
    with open_head(path) as f:
        layout = validated(lambda: inspect_head(f, path), path)
    epochs = validated(lambda: epoch_numbers(path), path)
    if epochs:
        validated(lambda: inspect_epochs(path, layout, epochs[-1:]), path)
        close_all(layout.epochs)
    results = _check_results(path, layout, logits)
    row = _check_new_epoch(path, layout, results.get("logits"), history_row)
    epoch = layout.committed + 1
    _remove_epochs_after(path, layout.committed)  # a killed writer's temporary files
    _write_epoch(path, layout.store_id, epoch, results, row)
    return epoch


def _check_results(path: Path, layout: Layout, results: Any) -> dict[str, np.ndarray]:
    """The epoch's datasets: the logits of a classification store, a task's own dict."""
    logits_only = [f.name for f in TASKS[layout.task].epoch] == ["logits"]
    if not isinstance(results, dict):
        if not logits_only:
            raise StoreError(
                f"cannot add an epoch to {path}: it is a {layout.task} store, which takes "
                f"its results as a dict of {', '.join(f.name for f in TASKS[layout.task].epoch)}"
            )
        return {"logits": results}
    if logits_only and set(results) == {"logits"}:
        return dict(results)
    dims = {**layout.dims}
    try:
        return check_arrays(layout.task, results, dims, epoch=True)
    except ValueError as e:
        raise StoreError(f"cannot add an epoch to {path}: {e}; nothing was written") from None


def _check_new_epoch(
    path: Path, layout: Layout, logits: np.ndarray, history_row: dict[str, float]
) -> np.ndarray:
    """Refuse an epoch that the store's readers would refuse (the store stays as it was).

    Returns the history row to store (HISTORY_DTYPE, shape (1,)): an optional column the
    store's earlier epochs do not record is not recorded in this one either (NaN).
    """
    expected = (layout.num_images, len(layout.classes))
    shape = np.shape(logits)
    if logits is not None and shape != expected:
        raise StoreError(
            f"cannot add an epoch to {path}: its logits have shape {shape} but the store holds "
            f"{expected[0]} images of {expected[1]} classes; train this run with its own data"
        )
    values = np.zeros(0) if logits is None else np.asarray(logits)
    if values.dtype.kind not in "fiu" or not np.isfinite(values).all():
        raise StoreError(
            f"cannot add an epoch to {path}: its logits hold NaN or infinity; "
            "lower the learning rate and train again"
        )
    optional = optional_history(layout.task)
    missing = [
        name for name, _ in HISTORY_COLUMNS if name not in history_row and name not in optional
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
    row = blank_row()
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
    for name in optional:
        if not layout.committed:
            continue
        if not recorded(layout.history, name, optional):
            row[name] = np.nan  # the run's earlier epochs did not record it: neither does this
        elif name not in history_row:
            raise StoreError(
                f"cannot add epoch {epoch} to {path}: its history row lacks {name}, which "
                "the earlier epochs record"
            )
    return row


def _write_epoch(
    path: Path, store_id: str, epoch: int, results: dict[str, np.ndarray], row: np.ndarray
):
    """Write epoch file ``epoch``: built in memory, then temp file, fsync, rename, fsync."""
    buffer = io.BytesIO()
    with h5py.File(buffer, "w", **FILE_OPTIONS) as f:
        f.attrs["format"] = _text(EPOCH_FORMAT_NAME)
        f.attrs["schema_version"] = SCHEMA_VERSION
        f.attrs["store_id"] = _text(store_id)
        f.attrs["epoch"] = epoch
        for name, values in results.items():
            # Floats are not gzipped (they shrink ~10% for 6x the commit time); class-id
            # masks are, as they shrink many times over.
            values = np.asarray(values, dtype="f4" if name == "logits" else values.dtype)
            row_bytes = max(1, values[:1].nbytes)
            pack = COMPRESSION if values.ndim == 3 else {"fletcher32": True}
            chunks = (rows_per_chunk(max(1, len(values)), row_bytes), *values.shape[1:])
            f.create_dataset(name, data=values, chunks=chunks if len(values) else None, **pack)
        f.create_dataset("history", data=row, chunks=(1,), fletcher32=True)
    folder = epochs_folder(path)
    if not folder.is_dir():
        try:
            folder.mkdir()
        except OSError as e:
            raise StoreError(f"cannot create {folder}: {e.strerror or e}") from e
        fsync_dir(folder.parent)
    fault = f"store-write:{epoch}"  # written, not yet renamed into place (tests kill there)
    write_atomic(epoch_file(path, epoch), buffer.getbuffer(), StoreError, fault=fault)


def _remove_epochs_after(path: Path, keep: int) -> None:
    """Delete the epoch files past ``keep``, highest first, and leftover temporary files.

    The highest first: a kill meanwhile leaves a store with fewer epochs, never one with a
    gap or epochs of another store.
    """
    folder = epochs_folder(path)
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return
    except OSError as e:
        raise StoreError(f"cannot read {folder}: {e.strerror or e}; is the run intact?") from e
    numbers = sorted(
        (int(m[1]) for m in map(EPOCH_NAME.fullmatch, names) if m and int(m[1]) > keep),
        reverse=True,
    )
    try:
        for number in numbers:
            epoch_file(path, number).unlink(missing_ok=True)
            fsync_dir(folder)
        for name in names:
            match = EPOCH_TMP.fullmatch(name)
            if match and int(match[1]) != os.getpid():
                (folder / name).unlink(missing_ok=True)
    except OSError as e:
        raise StoreError(f"cannot remove old epochs in {folder}: {e.strerror or e}") from e


def truncate_store(path: str | Path, epochs: int) -> None:
    """Keep only the first ``epochs`` committed epochs (used by resume).

    The whole store is validated first; then the later epoch files go, the highest first (a
    kill meanwhile leaves a shorter but whole store).
    """
    path = Path(path)
    if isinstance(epochs, bool) or not isinstance(epochs, int | np.integer) or epochs < 0:
        raise ValueError(f"epochs must be an integer of 0 or more, got {epochs!r}")
    f, layout = open_validated(path)
    close_all(layout.epochs)
    f.close()
    _remove_epochs_after(path, min(layout.committed, int(epochs)))
