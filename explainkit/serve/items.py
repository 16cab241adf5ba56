"""Per-item maps of a task run: each detection, class region or label of an image.

A task run's gradcam analysis (:mod:`explainkit.task_cams`) writes ``attributions.h5`` with one
row per *item* (datasets ``image``, ``class``, ``box``, ``recorded_score``, ``correct``,
``maps``...), not one per image. The detail view of a task image lists that image's items and
shows each one's map: read from the file a row at a time (the file's ``image`` column, 8 bytes
per item, finds an image's rows), or computed on demand with the analyzer's own target
(:func:`explainkit.task_explain.item_target` on :func:`~explainkit.task_explain.explained_model`)
for that one image. An image no file lists gets its items from
:func:`~explainkit.task_explain.choose_items` run over a one-image view of the store
(:class:`OneImage`), so they are the items the analyzer would explain.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from explainkit.errors import ExplainkitError

ITEM_COLUMNS = ("image", "class", "box", "recorded_score", "correct")
CACHE_ITEMS = 256  # images whose item list is kept


class ItemError(ExplainkitError):
    """An item file that cannot be read: an error on its view, not a dead server."""


@dataclass(frozen=True)
class Item:
    """One explained thing of one image, as the analyzer defines it."""

    index: int  # its position among the image's items (what URLs name)
    target: str  # "predicted" or "true": which side of the run it comes from
    epoch: int  # whose predictions chose it (and whose checkpoint explains it)
    cls: int
    box: tuple[float, float, float, float] | None  # x1, y1, x2, y2; None for a label
    score: float | None  # the run's recorded score (None for ground truth)
    correct: bool

    @property
    def key(self) -> tuple:
        return (self.epoch, self.target, self.cls, self.box)


@dataclass
class ItemSource:
    """Where one method's item maps come from: a per-item attributions file, or computed."""

    key: str
    method: str
    label: str
    path: Path | None = None
    layer: str | None = None
    epoch: int | None = None
    target: str = "predicted"
    readable: bool = True  # its attributes could be read (else its views say what is wrong)
    _image: np.ndarray | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def rows(self, i: int, num_images: int) -> range:
        """The file's rows of image ``i`` (its ``image`` column is sorted, read once)."""
        with self._lock:
            if self._image is None:
                self._image = self._read_index(num_images)
            image = self._image
        lo, hi = np.searchsorted(image, [i, i + 1])
        return range(int(lo), int(hi))

    def _read_index(self, num_images: int) -> np.ndarray:
        import h5py

        name = f"{self.key}/attributions.h5"
        try:
            with h5py.File(self.path, "r") as f:
                missing = [c for c in (*ITEM_COLUMNS, "maps") if c not in f]
                if missing:
                    raise ItemError(f"{name} lacks {', '.join(missing)}; analyze the run again")
                image = np.asarray(f["image"][:], dtype=np.int64)
                m, maps = len(image), f["maps"]
                if maps.ndim != 3 or maps.shape[0] != m or f["class"].shape != (m,):
                    raise ItemError(
                        f"{name} holds {m} items but maps of shape {maps.shape}; it is damaged"
                    )
                if int(f.attrs.get("num_images", num_images)) != num_images:
                    raise ItemError(
                        f"{name} explains {int(f.attrs['num_images'])} images, this run has "
                        f"{num_images}; it belongs to another store"
                    )
        except ItemError:
            raise
        except (OSError, KeyError, ValueError, TypeError) as e:
            raise ItemError(f"{name} cannot be read: {e}") from e
        if m and (np.any(np.diff(image) < 0) or image[0] < 0 or image[-1] >= num_images):
            raise ItemError(f"{name}'s image column is not sorted store positions; it is damaged")
        return image

    def items(self, i: int, num_images: int) -> list[Item]:
        """Image ``i``'s items as this file lists them."""
        import h5py

        rows = self.rows(i, num_images)
        if not len(rows):
            return []
        part = slice(rows.start, rows.stop)
        try:
            with h5py.File(self.path, "r") as f:
                cls, box = f["class"][part], f["box"][part]
                score, correct = f["recorded_score"][part], f["correct"][part]
        except (OSError, KeyError, ValueError, TypeError) as e:
            raise ItemError(f"{self.key}/attributions.h5 cannot be read: {e}") from e
        return [
            make_item(j, self.target, int(self.epoch or 1), cls[j], box[j], score[j], correct[j])
            for j in range(len(rows))
        ]

    def row_of(self, i: int, item: Item, num_images: int) -> int | None:
        """The file's row explaining ``item`` of image ``i`` (same class, box, target and
        epoch), else None."""
        if self.target != item.target or (self.epoch is not None and self.epoch != item.epoch):
            return None
        rows = self.rows(i, num_images)
        listed = self.items(i, num_images)
        same = [j for j, t in enumerate(listed) if t.cls == item.cls and t.box == item.box]
        if not same:
            return None
        return rows.start + (item.index if item.index in same else same[0])

    def read_map(self, row: int) -> np.ndarray:
        """One row of ``maps``: one chunk read, never the whole set."""
        import h5py

        try:
            with h5py.File(self.path, "r") as f:
                return np.asarray(f["maps"][row], dtype=np.float32)
        except (OSError, KeyError, ValueError, TypeError) as e:
            raise ItemError(f"{self.key}/attributions.h5 cannot be read: {e}") from e


def make_item(j: int, target: str, epoch: int, cls: Any, box: Any, score: Any, ok: Any) -> Item:
    box = np.asarray(box, np.float32)
    return Item(
        j,
        target,
        epoch,
        int(cls),
        None if np.isnan(box).any() else tuple(float(v) for v in box),
        None if np.isnan(score) else float(score),
        bool(ok),
    )


def is_item_file(attrs: dict[str, Any]) -> bool:
    """Whether an attributions file's attributes are task_cams' (one row per item)."""
    return "num_items" in attrs


def item_sources(stored: list[ItemSource], task: str, default_layer: str | None) -> dict:
    """The stored per-item files, then every CAM method none of them holds, computed here."""
    from explainkit.explain.gradcam import CAM_CLASSES
    from explainkit.explain.methods import METHODS

    found = {s.key: s for s in stored}
    held = {s.method for s in stored if s.readable}
    for method in CAM_CLASSES:
        if method not in held and method in METHODS:
            label = f"{METHODS[method].label} (computed here)"
            key = f"live-{method}"
            found[key] = ItemSource(key, method, label, None, default_layer)
    return found


class RunItems:
    """A task run's item sources and a bounded cache of image item lists."""

    def __init__(self, sources: dict[str, ItemSource]) -> None:
        self.sources = sources
        self._cache: OrderedDict[int, tuple[list[Item], str | None, str | None]] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def listing(self) -> ItemSource | None:
        """The file whose items the detail view lists: the first of the run's predictions."""
        stored = [s for s in self.sources.values() if s.path is not None]
        preferred = [s for s in stored if s.target == "predicted"]
        return (preferred or stored or [None])[0]

    @property
    def layer(self) -> str | None:
        """The layer computed maps explain: the listing file's, else the run's default."""
        source = self.listing
        if source is not None and source.layer:
            return source.layer
        return next((s.layer for s in self.sources.values() if s.layer), None)

    def of(self, run: Any, i: int) -> tuple[list[Item], str | None, str | None]:
        """Image ``i``'s items, the key of the file that lists them (None: chosen here) and
        why that file could not be read (None when it could)."""
        with self._lock:
            if i in self._cache:
                self._cache.move_to_end(i)
                return self._cache[i]
        source, error = self.listing, None
        found: tuple[list[Item], str | None, str | None] | None = None
        if source is not None:
            try:
                found = (source.items(i, run.num_images), source.key, None)
            except ItemError as e:
                error = str(e)
        if found is None:
            found = (chosen_items(run, i, run.epoch), None, error)
        with self._lock:
            self._cache[i] = found
            while len(self._cache) > CACHE_ITEMS:
                self._cache.popitem(last=False)
        return found

    def item(self, run: Any, i: int, j: int | None, text: str) -> Item:
        """Item ``j`` of image ``i`` (``text``: how the request wrote it; None: not a plain
        number)."""
        items = self.of(run, i)[0]
        if j is None or j >= len(items):
            have = f"items 0..{len(items) - 1}" if items else "no items"
            raise LookupError(f"image {i} has {have}, not {text[:20]!r}")
        return items[j]


class OneImage:
    """The store as if it held image ``i`` only: what choose_items and target_regions read,
    one image's rows each (a detection's from the epoch's box counts)."""

    def __init__(self, store: Any, i: int) -> None:
        self.store, self.i = store, i
        self.task, self.classes, self.num_images = store.task, store.classes, 1

    def _rows(self, selection: Any) -> slice:
        whole = isinstance(selection, tuple) and not selection
        first = isinstance(selection, slice) and (selection.start or 0) == 0
        if not (whole or first or selection is None):
            raise ItemError(f"the one-image view of the store cannot select {selection!r}")
        return slice(self.i, self.i + 1)

    def __getattr__(self, name: str) -> Any:
        raise ItemError(
            f"the explorer's one-image view of the store has no {name!r}; the items of this "
            "image cannot be chosen here (analyze the run with --plugin gradcam)"
        )

    def images(self, indices: Any) -> np.ndarray:
        return self.store.images(np.asarray(indices, np.int64) + self.i)

    def batches(self, size: int) -> list[np.ndarray]:
        return [np.arange(1)]

    def epoch_data(self, name: str, epoch: Any = None, selection: Any = ()) -> np.ndarray:
        return self.store.epoch_data(name, epoch, self._rows(selection))

    def truth(self, name: str, selection: Any = ()) -> np.ndarray:
        return self.store.truth(name, self._rows(selection))

    def logits(self, epoch: Any = None) -> np.ndarray:
        return self.epoch_data("logits", epoch).astype(np.float32, copy=False)

    def _ragged(self, counts: np.ndarray, names: tuple[str, ...], read: Any) -> tuple:
        start = int(counts[: self.i].sum())
        part = slice(start, start + int(counts[self.i]))
        return tuple(read(n, part) for n in names)

    def boxes(self) -> list[tuple[np.ndarray, ...]]:
        counts = self.store.truth("eval/box_counts")
        names = ("eval/boxes", "eval/box_labels")
        return [self._ragged(counts, names, self.store.truth)]

    def detections(self, epoch: Any = None) -> list[tuple[np.ndarray, ...]]:
        counts = self.store.epoch_data("box_counts", epoch)
        names = ("boxes", "box_scores", "box_labels")
        return [self._ragged(counts, names, lambda n, p: self.store.epoch_data(n, epoch, p))]


def chosen_items(run: Any, i: int, epoch: int, target: str = "predicted") -> list[Item]:
    """Image ``i``'s items as the gradcam analyzer would choose them."""
    from explainkit.task_explain import choose_items

    items = choose_items(OneImage(run.store, i), epoch, target)
    return [
        make_item(j, target, epoch, items.cls[j], items.box[j], items.score[j], items.correct[j])
        for j in range(len(items))
    ]


def as_items(task: str, items: list[Item]) -> Any:
    """Items of one image as task_explain's ``Items`` (the image at position 0 of a one-image
    batch); they share a target and an epoch."""
    from explainkit.task_explain import Items

    nan = (np.nan,) * 4
    return Items(
        task,
        items[0].target,
        np.zeros(len(items), np.int64),
        np.array([t.cls for t in items], np.int64),
        np.array([nan if t.box is None else t.box for t in items], np.float32).reshape(-1, 4),
        np.array([np.nan if t.score is None else t.score for t in items], np.float32),
        np.array([t.correct for t in items], bool),
    )


def describe(task: str, classes: list[str], item: Item) -> str:
    """The item in a few words: "circle 0.82 [3, 4, 20, 22] · right"."""
    name = classes[item.cls] if 0 <= item.cls < len(classes) else f"class {item.cls}"
    true = item.target == "true"
    if task == "detection":
        box = "[" + ", ".join(f"{v:.0f}" for v in item.box or ()) + "]"
        score = "true box" if true else f"{item.score:.2f}"
        agree = ("found" if item.correct else "missed") if true else (
            "right" if item.correct else "false")  # fmt: skip
        return f"{name} {score} {box} · {agree}"
    if task == "segmentation":
        share = "" if item.score is None else f" ({100 * item.score:.0f}% of pixels)"
        agree = ("predicted" if item.correct else "not predicted") if true else (
            "in the truth" if item.correct else "not in the truth")  # fmt: skip
        return f"class {name} region{share} · {agree}"
    score = "" if item.score is None else f" {item.score:.2f}"
    agree = ("predicted" if item.correct else "missed") if true else (
        "true" if item.correct else "false")  # fmt: skip
    return f"label {name}{score} · {agree}"


def regions(run: Any, i: int, items: list[Item]) -> list[np.ndarray]:
    """(H, W) bool per segmentation item of image ``i``: the pixels its target sums over."""
    from explainkit.task_explain import target_regions

    one = OneImage(run.store, i)
    return [target_regions(one, t.epoch, as_items(run.task, [t]))[0] > 0 for t in items]


def outline_path(mask: np.ndarray) -> str:
    """An SVG path along the border of ``mask`` (pixel edges between inside and outside), in
    the image's pixel coordinates: one segment per run of border along a row or column."""
    p = np.pad(np.asarray(mask, bool), 1)
    horizontal = p[:-1, 1:-1] != p[1:, 1:-1]  # (H+1, W): edge above pixel row y
    vertical = (p[1:-1, :-1] != p[1:-1, 1:]).T  # (W+1, H): edge left of pixel column x
    parts: list[str] = []
    for lines, across in ((horizontal, False), (vertical, True)):
        for at, line in enumerate(lines):
            if not line.any():
                continue
            edges = np.diff(np.concatenate([[0], line.astype(np.int8), [0]]))
            for a, b in zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1), strict=True):
                parts.append(f"M{at} {a}V{b}" if across else f"M{a} {at}H{b}")
    return "".join(parts)


def item_detail(run: Any, i: int) -> dict[str, Any]:
    """A task image's items (what its maps explain, each with its box or region outline)
    and the methods that map them."""
    items, listed_by, error = run.items.of(run, i)
    outlines: list[str | None] = [None] * len(items)
    if run.task == "detection":
        outlines = [box_path(t.box) for t in items]
    elif run.task == "segmentation" and items:
        outlines = [outline_path(r) for r in regions(run, i, items)]
    classes = run.classes
    return {
        "items": [
            {
                "index": t.index,
                "label": describe(run.task, classes, t),
                "class": classes[t.cls],
                "target": t.target,
                "epoch": t.epoch,
                "score": t.score,
                "box": list(t.box) if t.box is not None else None,
                "correct": t.correct,
                "outline": outline,
                "maps": f"/map/{run.position}/{i}/item/{t.index}/",
            }
            for t, outline in zip(items, outlines, strict=True)
        ],
        "items_from": listed_by,
        "items_error": error,
        "item_methods": [
            {"key": s.key, "label": s.label, "stored": s.path is not None}
            for s in run.items.sources.values()
        ],
    }


def box_path(box: Any) -> str:
    """An SVG path around a box ``x1, y1, x2, y2`` (image pixels)."""
    x0, y0, x1, y1 = (f"{v:.2f}".rstrip("0").rstrip(".") for v in box)
    return f"M{x0} {y0}H{x1}V{y1}H{x0}Z"


def layer_reshape(config: dict[str, Any], layer: str) -> str:
    """As the analyzer's ``layer_reshape``: the run's recorded layout for its default layer."""
    spec = (config or {}).get("model", {})
    recorded = spec.get("reshape") if isinstance(spec, dict) else None
    if isinstance(spec, dict) and layer == spec.get("default_layer") and recorded in (
        "nchw", "vit", "swin"):  # fmt: skip
        return str(recorded)
    return "auto"


def explain_item(run: Any, model: Any, i: int, item: Item, method: str, layer: Any) -> Any:
    """The ``method`` map of one item of image ``i``: the analyzer's target, engine and
    layer, for that one image on the model's device."""
    import torch

    from explainkit.explain.gradcam import CAM_CLASSES
    from explainkit.explain.layers import target_layer
    from explainkit.task_explain import explained_model, item_target, target_regions

    device = next(model.parameters()).device
    x = torch.from_numpy(run.store.images([i])).to(device).permute(0, 3, 1, 2).float().div_(255)
    mean = torch.tensor(run.store.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(run.store.std, device=device).view(1, -1, 1, 1)
    x = (x - mean) / std
    modules = dict(model.named_modules())
    if layer is None:
        layer = target_layer(model, None, torch.zeros_like(x)).name
    if layer not in modules:
        raise ItemError(f"layer {layer!r} is not a module of the run's model")
    items = as_items(run.task, [item])
    masks = target_regions(OneImage(run.store, i), item.epoch, items)
    engine = CAM_CLASSES[method](explained_model(model, run.task), modules[layer],
                                 layer_reshape(run.config, layer))  # fmt: skip
    with engine as cam:
        res = cam(x, target=item_target(items, masks))
    return res.maps[0].detach().float().cpu().numpy()
