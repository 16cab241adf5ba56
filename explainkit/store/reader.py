"""Reading a store: a validated, read-only snapshot of its committed epochs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from explainkit.errors import StoreError
from explainkit.rundir import RunDir
from explainkit.store.history import recorded
from explainkit.store.schema import CHUNK_BYTES, HISTORY_COLUMNS, TASKS, optional_history
from explainkit.store.tasks import split_ragged, value_problem
from explainkit.store.validate import (
    DAMAGE_ERRORS,
    Layout,
    close_all,
    corrupt,
    damaged,
    open_validated,
    read_dataset,
)


class StoreReader:
    """Read-only view of a store's committed epochs. Use as a context manager or call close().

    Opening validates the store (validate.py); reading an epoch's logits checks that they are
    finite, reading the masks that they are 0 or 1, reading the source paths that they are
    UTF-8 text. Every complaint is a StoreError. The view is a snapshot: the head and every
    committed epoch file stay open, so epochs committed after it opened are not seen, and the
    files it opened stay readable while training goes on (or a resume replaces later epochs).
    """

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if path.is_dir():
            path = RunDir(path).store_path
        self.path = path
        self._f, layout = open_validated(path)
        self._layout: Layout = layout
        self.schema_version = layout.version
        self.task = layout.task
        self.committed = layout.committed
        self.attrs: dict[str, Any] = layout.attrs
        self.classes: list[str] = layout.classes
        self.mean = layout.mean
        self.std = layout.std
        self.num_images = layout.num_images
        self._paths: list[str] | None = None
        self._image_shape = layout.image_shape
        self._epochs = layout.epochs  # the open epoch files, 1..committed

    def _read(self, name: str, selection: Any = ()) -> np.ndarray:
        try:
            ds = self._f[name]
        except DAMAGE_ERRORS as e:
            raise corrupt(self.path, name, e) from e
        return read_dataset(ds, self.path, selection)

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

        An optional column (``OPTIONAL_HISTORY_COLUMNS``) is left out when its writer did not
        record it.
        """
        rows, optional = self._layout.history, optional_history(self.task)
        return {
            name: np.array(rows[name])
            for name, _ in HISTORY_COLUMNS
            if recorded(rows, name, optional)
        }

    @property
    def best_epoch(self) -> int | None:
        if not self.committed:
            return None
        history = self.history
        return int(history["epoch"][int(np.argmax(history["eval_acc"]))])

    @property
    def targets(self) -> np.ndarray:
        return self._layout.arrays["eval/targets"].copy()

    @property
    def index(self) -> np.ndarray:
        return self._layout.arrays["eval/index"].copy()

    @property
    def has_masks(self) -> bool:
        return "eval/masks" in self._layout.datasets

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
            raise damaged(self.path, "eval/masks holds values other than 0 and 1")
        return masks

    @property
    def has_paths(self) -> bool:
        """Whether the store records each image's source file (folder datasets)."""
        return "eval/paths" in self._layout.datasets

    @property
    def sizes(self) -> np.ndarray | None:
        """int64 (N, 2): each image's original (height, width) before resizing, or None for a
        store that does not record them."""
        sizes = self._layout.arrays.get("eval/sizes")
        return None if sizes is None else sizes.copy()

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
        if self.has_paths:
            paths = self._source_paths()
            return [paths[i] for i in idx]
        name = self.attrs.get("dataset") or "image"
        index = self._layout.arrays["eval/index"]
        return [f"{name} #{int(index[i])}" for i in idx]

    def _source_paths(self) -> list[str]:
        """``eval/paths`` decoded (read once): non-empty UTF-8 text, else the store is damaged."""
        if self._paths is None:
            try:
                paths = [bytes(p).decode("utf-8") for p in self._read("eval/paths")]
            except UnicodeDecodeError:
                raise damaged(self.path, "eval/paths holds text that is not UTF-8") from None
            if not all(paths):
                raise damaged(self.path, "eval/paths holds an empty path")
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
        if not any(spec.name == "logits" for spec in TASKS[self.task].epoch):
            raise StoreError(
                f"{self.path} is a {self.task} store: it records no logits; read its "
                f"{', '.join(spec.name for spec in TASKS[self.task].epoch)} with epoch_data"
            )
        return self.epoch_data("logits", epoch).astype(np.float32, copy=False)

    def epoch_data(self, name: str, epoch: int | None = None, selection: Any = ()) -> np.ndarray:
        """Dataset ``name`` of an epoch (default: the last committed one), its values checked
        (schema.TASKS: class ids in range, scores in [0, 1], finite boxes...)."""
        row = self._epoch_row(epoch)
        spec = next((s for s in TASKS[self.task].epoch if s.name == name), None)
        if spec is None:
            raise StoreError(f"a {self.task} store's epochs hold no {name!r}")
        f = self._epochs[row]
        try:
            ds = f[name]
        except DAMAGE_ERRORS as e:
            raise corrupt(Path(f.filename), name, e) from e
        data = read_dataset(ds, Path(f.filename), selection)
        problem = value_problem(spec, data, len(self.classes))
        if problem and spec.check == "finite":
            problem = f"the {name} of epoch {row + 1} hold NaN or infinity"
        elif problem:
            problem = f"in epoch {row + 1}, {problem}"
        if problem:
            raise damaged(self.path, problem)
        return data

    def truth(self, name: str, selection: Any = ()) -> np.ndarray:
        """Ground-truth dataset ``name`` of a task store (``eval/labels``, ``eval/boxes``...),
        its values checked."""
        spec = next((s for s in TASKS[self.task].truth if s.name == name), None)
        if spec is None:
            raise StoreError(f"a {self.task} store holds no ground truth {name!r}")
        data = self._read(name, selection)
        problem = value_problem(spec, data, len(self.classes))
        if problem:
            raise damaged(self.path, problem)
        return data

    def scores(self, epoch: int | None = None) -> np.ndarray:
        """float32 (N, classes) per-class scores of an epoch: a classifier's or multi-label
        model's logits, a segmenter's share of each class; a detection store has none."""
        name = TASKS[self.task].scores
        if not name:
            raise StoreError(f"{self.path} is a {self.task} store: it records no per-image scores")
        return self.epoch_data(name, epoch).astype(np.float32, copy=False)

    def boxes(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """A detection store's ground truth: per image its (boxes (n, 4), labels (n,))."""
        counts = self.truth("eval/box_counts")
        return split_ragged(counts, self.truth("eval/boxes"), self.truth("eval/box_labels"))

    def detections(self, epoch: int | None = None) -> list[tuple[np.ndarray, ...]]:
        """A detection store's epoch: per image its (boxes (n, 4), scores (n,), labels (n,))."""
        counts = self.epoch_data("box_counts", epoch)
        tables = [self.epoch_data(n, epoch) for n in ("boxes", "box_scores", "box_labels")]
        return split_ragged(counts, *tables)

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
        for batch in self.batches(max(1, (16 * CHUNK_BYTES) // (h * w * c))):
            self.images(batch)
            if self.has_masks:
                self.read_masks(batch)
        if self.has_paths:
            self._paths = None
            self._source_paths()
        for name in (spec.name for spec in TASKS[self.task].truth[1:]):
            self.truth(name)
        for epoch in self.epochs:
            for spec in TASKS[self.task].epoch:
                self.epoch_data(spec.name, epoch)

    def close(self) -> None:
        close_all(self._epochs)
        self._f.close()

    def __enter__(self) -> StoreReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_store(path: str | Path) -> StoreReader:
    """Open a store (a ``predictions.h5`` file or a run directory) for reading."""
    return StoreReader(path)
