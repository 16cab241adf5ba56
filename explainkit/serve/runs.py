"""One served run: its per-image columns in memory, everything else read from disk on demand.

A run of 50,000 images must start in seconds and stay small, so what is held is one short row
per image (true class, prediction, confidence, loss, top-5, quality scores: about 80 bytes);
images come from the store and maps from ``attributions.h5`` one request at a time. Every file
the server may read is found here, when the run opens, inside the run directory (a symlink
leading out of it is left out): a request names a run by its position, an image by its index
and a map by a key of :attr:`ServedRun.sources`, never a path.
"""

from __future__ import annotations

import csv
import hashlib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from explainkit.errors import ExplainkitError, RunError
from explainkit.rundir import RunDir

CHECKPOINT = re.compile(r"epoch_(\d{3,})\.pt")  # as explainkit.train.checkpoint names them
TOP_K = 5
LOGIT_ROWS = 4096  # logits rows turned into columns at a time (bounded for 1,000 classes)
SCORE_METRICS = ("deletion_auc", "insertion_auc", "pointing_game", "energy_in_mask")


@dataclass(frozen=True)
class MapSource:
    """Where one method's maps come from: an attributions file, or computed on demand."""

    key: str  # what URLs name: the analysis folder's name, or "live-METHOD"
    method: str  # a CAM method name (explainkit.explain.methods)
    label: str
    path: Path | None = None  # attributions.h5; None: computed on demand
    layer: str | None = None
    epoch: int | None = None
    target: str = "predicted"
    partial: bool = False  # a map for some images only (the captum analyzer's files)


@dataclass
class Filters:
    """What a grid request asks for; every value checked by :func:`parse_filters`."""

    true: int | None = None
    pred: int | None = None
    correct: bool | None = None
    conf_min: float = 0.0
    conf_max: float = 1.0
    ids: list[int] | None = None
    label: int | None = None  # task runs: images whose class set ``has`` holds this class
    has: str = "true"
    other: ServedRun | None = None  # compare: the other run and which outcome
    outcome: str | None = None
    sort: str = "index"
    desc: bool = False


OUTCOMES = ("only_this", "only_other", "both_right", "both_wrong")


def number(text: Any) -> int | None:
    """A request's whole number written plainly (ASCII digits, no leading zero, at most 12
    of them), else None: one URL per image, and nothing a parser could read otherwise."""
    text = str(text)
    if text.isascii() and text.isdigit() and len(text) <= 12 and (text == "0" or text[0] != "0"):
        return int(text)
    return None


@dataclass
class ServedRun:
    """A run directory opened read-only for the explorer."""

    position: int
    run: RunDir
    store: Any  # explainkit.store.StoreReader, open for the server's life
    name: str
    epoch: int  # whose recorded predictions the grid shows (the best, as `analyze` uses)
    targets: np.ndarray
    predicted: np.ndarray
    confidence: np.ndarray  # float32 probability of the predicted class
    loss: np.ndarray  # float32 cross-entropy of the true class
    top_idx: np.ndarray  # (N, TOP_K) classes, most probable first
    top_prob: np.ndarray
    sources: dict[str, MapSource] = field(default_factory=dict)
    scores: dict[str, np.ndarray] = field(default_factory=dict)  # "method:metric" -> (N,)
    checkpoints: list[int] = field(default_factory=list)
    eval_set: str = ""  # a digest of the eval split: two runs compare when theirs match
    config: dict[str, Any] = field(default_factory=dict)
    task_state: Any = None  # explainkit.serve.tasks.TaskState of a task run, else None
    items: Any = None  # explainkit.serve.items.RunItems of a task run: per-item maps

    @property
    def task(self) -> str:
        return str(self.store.task)

    @property
    def is_task(self) -> bool:
        return self.task_state is not None

    def task_columns(self) -> Any:
        """The task run's per-image columns (waiting for the pass that computes them)."""
        return self.task_state.get()

    @property
    def right(self) -> np.ndarray:
        """(N,) bool: each image right, as its task defines it (docs/explorer.md)."""
        if self.is_task:
            return self.task_columns().right
        return self.predicted == self.targets

    @property
    def classes(self) -> list[str]:
        return list(self.store.classes)

    @property
    def num_images(self) -> int:
        return int(self.store.num_images)

    def image_index(self, value: Any) -> int:
        """A request's image index, checked: an int in 0..N-1, else an error for that view."""
        text = str(value)
        i = number(text)
        if i is None:
            raise LookupError(
                f"image index {text[:40]!r} is not a number in 0..{self.num_images - 1}"
            )
        if i >= self.num_images:
            raise LookupError(
                f"image {i} is not in this run; it has images 0..{self.num_images - 1}"
            )
        return i

    def select(self, f: Filters) -> np.ndarray:
        """Store positions of the images that pass ``f``, in its sort order."""
        if self.is_task:
            keep = np.ones(self.num_images, bool)
            if f.label is not None:
                keep &= self.task_columns().member(f.has, f.label)
        else:
            keep = (self.confidence >= f.conf_min) & (self.confidence <= f.conf_max)
            if f.true is not None:
                keep &= self.targets == f.true
            if f.pred is not None:
                keep &= self.predicted == f.pred
        right = self.right
        if f.correct is not None:
            keep &= right == f.correct
        if f.ids is not None:
            chosen = np.zeros(self.num_images, bool)
            chosen[np.asarray(f.ids, dtype=np.int64)] = True
            keep &= chosen
        if f.other is not None and f.outcome:
            theirs = f.other.right
            keep &= {
                "only_this": right & ~theirs,
                "only_other": ~right & theirs,
                "both_right": right & theirs,
                "both_wrong": ~right & ~theirs,
            }[f.outcome]
        idx = np.flatnonzero(keep)
        if f.sort == "index":
            return idx[::-1] if f.desc else idx
        values = self.sort_column(f.sort)[idx].astype(np.float64)
        values = -values if f.desc else values
        values[np.isnan(values)] = np.inf  # images without a score come last either way
        return idx[np.argsort(values, kind="stable")]

    def sort_column(self, name: str) -> np.ndarray:
        if self.is_task:
            return self.task_columns().columns[name]
        if name == "confidence":
            return self.confidence
        if name == "loss":
            return self.loss
        return self.scores[name]

    @property
    def sorts(self) -> list[str]:
        if self.is_task:
            from explainkit.serve.tasks import COLUMNS

            return ["index", *COLUMNS[self.task]]
        return ["index", "confidence", "loss", *self.scores]

    def row(self, i: int, source: str) -> dict[str, Any]:
        """One image as the grid and the CSV show it."""
        classes = self.classes
        if self.is_task:
            return self._task_row(i, source)
        return {
            "index": i,
            "source": source,
            "true": classes[self.targets[i]],
            "predicted": classes[self.predicted[i]],
            "correct": bool(self.targets[i] == self.predicted[i]),
            "confidence": round(float(self.confidence[i]), 6),
            "loss": round(float(self.loss[i]), 6),
            "caption": f"{classes[self.targets[i]]} → {classes[self.predicted[i]]} "
            f"{100 * float(self.confidence[i]):.1f}%",
        }

    def _task_row(self, i: int, source: str) -> dict[str, Any]:
        from explainkit.serve.tasks import COUNTS, caption

        cols = self.task_columns()
        values: dict[str, Any] = {}
        for name, column in cols.columns.items():
            value = float(column[i])
            values[name] = None if math.isnan(value) else round(value, 6)
            if name in COUNTS:
                values[name] = int(value)
        shown = {k: (v if v is not None else math.nan) for k, v in values.items()}
        return {
            "index": i,
            "source": source,
            "correct": bool(cols.right[i]),
            **values,
            "caption": caption(self.task, shown),
        }

    def label_sets(self, i: int) -> dict[str, str]:
        """A task image's class sets as space-separated names (for the CSV)."""
        from explainkit.serve.tasks import SETS

        cols, classes = self.task_columns(), self.classes
        return {f"{s}_classes": " ".join(classes[c] for c in cols.classes_of(s, i)) for s in SETS}

    def confusion(self) -> np.ndarray:
        k = len(self.classes)
        return np.bincount(self.targets * k + self.predicted, minlength=k * k).reshape(k, k)

    def close(self) -> None:
        if self.task_state is not None:
            self.task_state.join()  # the pass reads the store: it ends before the store closes
        self.store.close()


def open_run(position: int, path: str | Path) -> ServedRun:
    """Open ``path`` for serving: the store, its per-image columns, the map files and the
    quality analyzer's per-image scores. A run without a store is a RunError."""
    from explainkit.store import open_store

    run = RunDir(path)
    if not run.path.is_dir():
        raise RunError(f"{run.path} is not a directory; give a run directory")
    if not run.has_store:
        raise RunError(f"{run.path} has no predictions.h5; train or evaluate into it first")
    store = open_store(run.path)
    try:
        epoch = store.best_epoch
        if epoch is None:
            raise RunError(f"{run.path} has no committed epoch yet; wait for one to finish")
        if store.task in ("classification", "multilabel"):
            columns = _columns(store, epoch)
        else:  # no logits: the task's own columns (serve/tasks.py) say what went wrong
            columns = _no_columns(store)
        config = run.read_config() if run.has_config else {}
    except BaseException:
        store.close()
        raise
    served = ServedRun(position, run, store, run.path.name, epoch, *columns, config=config)
    if store.task != "classification":
        from explainkit.serve.tasks import TaskState

        served.task_state = TaskState(store, epoch)
    try:
        served.sources, per_item = _map_sources(run, store)
        if served.is_task:
            from explainkit.serve.items import RunItems, item_sources

            layer = store.attrs.get("default_layer") or None
            served.items = RunItems(item_sources(per_item, store.task, layer))
        served.scores = _quality_scores(run, store.num_images)
        served.checkpoints = _checkpoint_epochs(run) if store.task in EPOCH_TASKS else []
        digest = hashlib.sha256(store.index.tobytes() + store.targets.tobytes())
    except BaseException:
        served.close()  # the task pass stops before the store closes
        raise
    served.eval_set = f"{store.task}:{store.num_images}:{digest.hexdigest()[:16]}"
    return served


def _checkpoint_epochs(run: RunDir) -> list[int]:
    """The epochs of ``checkpoints/epoch_NNN.pt`` (found without importing torch, so that
    the server starts in a second)."""
    if not run.checkpoints.is_dir():
        return []
    found = (CHECKPOINT.fullmatch(p.name) for p in run.checkpoints.iterdir())
    return sorted(int(m.group(1)) for m in found if m)


def _no_columns(store: Any) -> tuple[np.ndarray, ...]:
    """A segmentation or detection run's classifier columns: the targets (the largest
    object's class, which the eval-set digest reads), and nothing predicted."""
    n = store.num_images
    zeros = np.zeros(n, np.float32)
    return (
        store.targets,
        np.full(n, -1, np.int64),
        zeros,
        zeros,
        np.zeros((n, 0), np.int32),
        np.zeros((n, 0), np.float32),
    )


def _columns(store: Any, epoch: int) -> tuple[np.ndarray, ...]:
    """targets, predictions, confidence, loss and top-k of ``epoch``'s recorded logits, a
    block of rows at a time so that the float64 softmax stays small."""
    logits = store.logits(epoch)
    n, k = logits.shape
    top = min(TOP_K, k)
    predicted = np.empty(n, np.int64)
    confidence = np.empty(n, np.float32)
    loss = np.empty(n, np.float32)
    top_idx = np.empty((n, top), np.int32)
    top_prob = np.empty((n, top), np.float32)
    targets = store.targets
    for start in range(0, n, LOGIT_ROWS):
        z = logits[start : start + LOGIT_ROWS].astype(np.float64)
        z -= z.max(axis=1, keepdims=True)
        log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        rows = np.arange(len(z))
        order = np.argsort(-log_p, axis=1, kind="stable")[:, :top]
        predicted[start : start + len(z)] = order[:, 0]
        confidence[start : start + len(z)] = np.exp(log_p[rows, order[:, 0]])
        loss[start : start + len(z)] = -log_p[rows, targets[start : start + len(z)]]
        top_idx[start : start + len(z)] = order
        top_prob[start : start + len(z)] = np.exp(np.take_along_axis(log_p, order, axis=1))
    return targets, predicted, confidence, loss, top_idx, top_prob


def inside(run: RunDir, path: Path) -> bool:
    """Whether ``path``, symlinks resolved, is a file inside the run directory."""
    try:
        real = path.resolve(strict=True)
        return real.is_file() and real.is_relative_to(run.path.resolve(strict=True))
    except (OSError, RuntimeError):
        return False


def _map_sources(run: RunDir, store: Any) -> tuple[dict[str, MapSource], list[Any]]:
    """Every ``analyses/*/attributions.h5`` of this store (the gradcam analyzer's layout:
    ``maps`` (N, H, W) and its attributes) and ``analyses/*/attributions-METHOD.h5`` (the
    captum analyzer's, one per method, of the same form, for the images it explained), then
    each CAM method no complete file holds, computed on demand. A file that cannot be read is
    still listed: its view says what is wrong. Second: a task run's per-item files
    (:mod:`explainkit.serve.items`), whose rows are detections, regions or labels."""
    files = []
    for pattern in ("*/attributions.h5", "*/attributions-*.h5"):
        files += sorted(run.analyses.glob(pattern))
    found: dict[str, MapSource] = {}
    per_item: list[Any] = []
    for path in files:
        if not inside(run, path):
            continue  # a symlink out of the run: never served
        key = path.parent.name + path.stem.removeprefix("attributions")
        if not KEY.fullmatch(key):
            continue  # a file name no URL could name plainly
        source = _stored_source(key, path, store.num_images, store.task, store.best_epoch)
        if isinstance(source, MapSource):
            found[key] = source
        elif store.task != "classification":
            per_item.append(source)
    from explainkit.explain.methods import CAM_METHODS, METHODS

    complete = {s.method for s in found.values() if not s.partial}
    layer = store.attrs.get("default_layer") or None
    if store.task in LIVE_TASKS:
        for method in CAM_METHODS:
            if method not in complete:
                label = f"{METHODS[method].label} (computed here)"
                found[f"live-{method}"] = MapSource(f"live-{method}", method, label, None, layer)
    return found, per_item


KEY = re.compile(r"[A-Za-z0-9_.-]{1,80}")
LIVE_TASKS = ("classification",)  # whose maps of an image the engine computes (a class's logit)
EPOCH_TASKS = ("classification", "multilabel")  # Grad-CAM of the true class per saved epoch


def _stored_source(
    key: str, path: Path, n: int, task: str = "classification", best: int | None = None
) -> Any:
    """One attributions file as a map source, labelled from its attributes (an
    :class:`explainkit.serve.items.ItemSource` when its rows are a task run's items)."""
    import h5py

    from explainkit.explain.methods import METHODS

    attrs: dict[str, Any] = {}
    try:
        with h5py.File(path, "r") as f:
            attrs = dict(f.attrs)
    except (OSError, KeyError, ValueError):
        pass
    method = str(attrs.get("method", "gradcam"))
    if method not in METHODS:
        method = "gradcam"
    epoch = attrs.get("epoch")
    layer = str(attrs["layer"]) if "layer" in attrs else None
    from explainkit.serve.items import ItemSource, is_item_file

    if is_item_file(attrs) or (not attrs and task != "classification"):
        label = f"{METHODS[method].label} ({key}" + (f", {layer}" if layer else "")
        label += f", epoch {int(epoch)}" if epoch is not None else ""
        label += f", {attrs.get('target', 'predicted')} items)"
        at = int(epoch) if epoch is not None else best  # the epoch analyze explains by default
        target = str(attrs.get("target", "predicted"))
        return ItemSource(key, method, label, path, layer, at, target, bool(attrs))
    explained = attrs.get("explained")
    partial = isinstance(explained, (int, np.integer)) and int(explained) < n
    label = f"{METHODS[method].label} ({key}"
    label += f", {attrs['layer']}" if "layer" in attrs else ""
    label += f", epoch {int(epoch)}" if epoch is not None else ""
    label += f", {int(explained)} images)" if partial else ")"
    return MapSource(
        key,
        method,
        label,
        path,
        layer,
        int(epoch) if epoch is not None else None,
        str(attrs.get("target", "predicted")),
        partial,
    )


def _quality_scores(run: RunDir, n: int) -> dict[str, np.ndarray]:
    """``analyses/quality/per_image.csv`` as float32 columns (NaN for images the analyzer's
    sample left out); an unreadable file gives no scores rather than no server."""
    path = run.analysis("quality") / "per_image.csv"
    if not inside(run, path):
        return {}
    scores: dict[str, np.ndarray] = {}
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            names = [c for c in reader.fieldnames or [] if c.split(":")[-1] in SCORE_METRICS]
            scores = {c: np.full(n, np.nan, np.float32) for c in names}
            for row in reader:
                i = int(row["index"])
                if 0 <= i < n:
                    for c in names:
                        value = float(row[c]) if row[c] not in ("", None) else math.nan
                        scores[c][i] = value
    except (OSError, ValueError, KeyError, UnicodeDecodeError, csv.Error):
        return {}
    return scores


def check_comparable(a: ServedRun, b: ServedRun) -> None:
    if a.eval_set != b.eval_set:
        raise ExplainkitError(
            f"runs {a.name} and {b.name} were not evaluated on the same images; "
            "only runs with the same eval set compare"
        )
