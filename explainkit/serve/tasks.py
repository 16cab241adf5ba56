"""What the explorer shows of a multi-label, segmentation or detection run.

A task run has no single predicted class, so its grid is about each image's mistakes: per
image a few numbers to sort by (wrong labels, mean IoU, missed objects...), whether it is
right (every label right; every object found and no false detection; mean IoU at least 0.5)
and four class sets to filter by: the classes in its truth, in its prediction, missed (in the
truth, not predicted) and false (predicted, not in the truth). The sets are bit-packed, so a
run of 50,000 images and 1,000 classes holds 25 MB of them.

The columns cost a pass over the store's masks or boxes, so :class:`TaskState` computes them
in a background thread, a batch at a time, when the run opens: the server starts at once and
the first request that needs them waits for the pass. The detail view reads one image's boxes
or masks on demand (:func:`detail`).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

MIN_SCORE = 0.3  # detections scored below are neither counted nor drawn by default
IOU = 0.5  # a detection matches a truth of its class at this IoU (as task_mistakes does)
RIGHT_IOU = 0.5  # a segmentation is right at this mean IoU or more
SETS = ("true", "pred", "missed", "false")
COUNTS = ("wrong", "missed", "false", "objects")  # columns that count: shown as integers
BLOCK = 256  # images per read of the pass

RIGHT_MEANS = {
    "multilabel": "every label right (a label is predicted where its logit is above 0)",
    "segmentation": f"mean IoU over the image's classes of {RIGHT_IOU} or more",
    "detection": f"every object found and no false detection (IoU {IOU}, score {MIN_SCORE} "
    "or more, the same class)",
}
# per task: its sortable columns, in the grid's order
COLUMNS = {
    "multilabel": ("wrong", "missed", "false", "loss"),
    "segmentation": ("mean_iou", "pixel_accuracy"),
    "detection": ("missed", "false", "worst_iou", "top_score", "objects"),
}


@dataclass
class TaskColumns:
    """Per image: right or wrong, the sortable numbers, and the four packed class sets."""

    right: np.ndarray
    columns: dict[str, np.ndarray]
    sets: dict[str, np.ndarray]  # name -> uint8 (N, ceil(K / 8)), np.packbits of each row
    k: int
    truth_offsets: np.ndarray | None = None  # detection: image i's boxes are rows [o[i], o[i+1])
    det_offsets: np.ndarray | None = None
    per_class: dict[str, np.ndarray] = field(default_factory=dict)

    def member(self, name: str, c: int) -> np.ndarray:
        """(N,) bool: whether class ``c`` is in each image's set ``name``."""
        return ((self.sets[name][:, c >> 3] >> (7 - (c & 7))) & 1).astype(bool)

    def classes_of(self, name: str, i: int) -> list[int]:
        return np.flatnonzero(np.unpackbits(self.sets[name][i])[: self.k]).tolist()

    def counts(self) -> dict[str, np.ndarray]:
        """Per class, how many images hold it in each set (read in blocks of rows)."""
        if not self.per_class:
            n = len(self.right)
            for name in SETS:
                total = np.zeros(self.k, np.int64)
                for start in range(0, n, 4096):
                    bits = np.unpackbits(self.sets[name][start : start + 4096], axis=1)
                    total += bits[:, : self.k].sum(0, dtype=np.int64)
                self.per_class[name] = total
        return self.per_class


class TaskState:
    """The columns of a task run, computed once in a background thread."""

    def __init__(self, store: Any, epoch: int) -> None:
        self.store, self.epoch = store, epoch
        self._done = threading.Event()
        self._stop = threading.Event()
        self._result: TaskColumns | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="explainkit-task-columns")
        self._thread.daemon = True
        self._thread.start()

    def _run(self) -> None:
        try:
            self._result = COMPUTE[self.store.task](self.store, self.epoch, self._stopped)
        except BaseException as e:  # kept: every view that needs the columns says it
            self._error = e
        finally:
            self._done.set()

    def get(self) -> TaskColumns:
        self._done.wait()
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    def _stopped(self) -> None:
        if self._stop.is_set():
            raise RuntimeError("the server stopped before the task columns were computed")

    def join(self) -> None:
        """Stop the pass at its next batch and wait for it (before the store closes)."""
        self._stop.set()
        self._done.wait()


def _packed(n: int, k: int) -> dict[str, np.ndarray]:
    return {name: np.zeros((n, (k + 7) // 8), np.uint8) for name in SETS}


def _put_sets(sets: dict, rows: slice, true: np.ndarray, pred: np.ndarray) -> None:
    """Fill the four sets of a block of images from its (n, K) bool truth and prediction."""
    for name, bits in (
        ("true", true),
        ("pred", pred),
        ("missed", true & ~pred),
        ("false", pred & ~true),
    ):
        sets[name][rows] = np.packbits(bits, axis=1)


def _multilabel(store: Any, epoch: int, check: Any = lambda: None) -> TaskColumns:
    """A label is predicted where its logit is above 0 (task_metrics' threshold)."""
    n, k = store.num_images, len(store.classes)
    sets = _packed(n, k)
    cols = {name: np.zeros(n, np.float32) for name in COLUMNS["multilabel"]}
    for start in range(0, n, BLOCK * 16):
        check()
        rows = slice(start, min(start + BLOCK * 16, n))
        z = store.epoch_data("logits", epoch, rows).astype(np.float64)
        true = store.truth("eval/labels", rows).astype(bool)
        pred = z > 0
        _put_sets(sets, rows, true, pred)
        cols["missed"][rows] = (true & ~pred).sum(1)
        cols["false"][rows] = (pred & ~true).sum(1)
        # binary cross-entropy with logits, averaged over the labels (stable form)
        bce = np.maximum(z, 0) - z * true + np.log1p(np.exp(-np.abs(z)))
        cols["loss"][rows] = bce.mean(1)
    cols["wrong"] = cols["missed"] + cols["false"]
    return TaskColumns(cols["wrong"] == 0, cols, sets, k)


def _segmentation(store: Any, epoch: int, check: Any = lambda: None) -> TaskColumns:
    from explainkit.task_metrics import IGNORE, confusion, iou_per_class

    n, k = store.num_images, len(store.classes)
    sets = _packed(n, k)
    iou = np.zeros(n, np.float32)
    acc = np.zeros(n, np.float32)
    for start in range(0, n, BLOCK):
        check()
        rows = slice(start, min(start + BLOCK, n))
        pred = store.epoch_data("masks", epoch, rows)
        truth = store.truth("eval/segmentation", rows)
        true_bits = np.zeros((len(pred), k), bool)
        pred_bits = np.zeros((len(pred), k), bool)
        for j, (p, t) in enumerate(zip(pred, truth, strict=True)):
            conf = confusion(p, t, k)
            ious = iou_per_class(conf)
            iou[start + j] = np.nanmean(ious) if np.isfinite(ious).any() else 0.0
            acc[start + j] = np.trace(conf) / max(1, conf.sum())
            true_bits[j] = conf.sum(1) > 0
            pred_bits[j, np.unique(p[t != IGNORE])] = True
        _put_sets(sets, rows, true_bits, pred_bits)
    cols = {"mean_iou": iou, "pixel_accuracy": acc}
    return TaskColumns(iou >= RIGHT_IOU, cols, sets, k)


def _offsets(counts: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])


def _detection(store: Any, epoch: int, check: Any = lambda: None) -> TaskColumns:
    from explainkit.task_metrics import box_iou, match_detections

    n, k = store.num_images, len(store.classes)
    sets = _packed(n, k)
    go = _offsets(store.truth("eval/box_counts"))
    do = _offsets(store.epoch_data("box_counts", epoch))
    cols = {name: np.zeros(n, np.float32) for name in COLUMNS["detection"]}
    for start in range(0, n, BLOCK):
        check()
        stop = min(start + BLOCK, n)
        tb = store.truth("eval/boxes", slice(int(go[start]), int(go[stop])))
        tl = store.truth("eval/box_labels", slice(int(go[start]), int(go[stop])))
        part = slice(int(do[start]), int(do[stop]))
        db, ds, dl = (
            store.epoch_data(x, epoch, part) for x in ("boxes", "box_scores", "box_labels")
        )
        true_bits = np.zeros((stop - start, k), bool)
        pred_bits = np.zeros((stop - start, k), bool)
        missed_bits = np.zeros((stop - start, k), bool)
        false_bits = np.zeros((stop - start, k), bool)
        for j, i in enumerate(range(start, stop)):
            t = slice(int(go[i] - go[start]), int(go[i + 1] - go[start]))
            d = slice(int(do[i] - do[start]), int(do[i + 1] - do[start]))
            b, s, lab, gb, gl = db[d], ds[d], dl[d], tb[t], tl[t]
            false, missed = match_detections(b, s, lab, gb, gl, iou=IOU, min_score=MIN_SCORE)
            kept = s >= MIN_SCORE
            true_bits[j, gl] = True
            pred_bits[j, lab[kept]] = True
            missed_bits[j, gl[missed]] = True
            false_bits[j, lab[false]] = True
            cols["missed"][i], cols["false"][i] = len(missed), len(false)
            cols["objects"][i] = len(gl)
            cols["top_score"][i] = float(s.max()) if len(s) else 0.0
            if len(gl):  # each object's best IoU with a kept detection of its class
                overlap = box_iou(gb, b[kept]) * (gl[:, None] == lab[kept][None, :])
                best = overlap.max(1) if overlap.shape[1] else np.zeros(len(gl))
                cols["worst_iou"][i] = float(best.min())
            else:
                cols["worst_iou"][i] = np.nan
        rows = slice(start, stop)
        for name, bits in zip(SETS, (true_bits, pred_bits, missed_bits, false_bits), strict=True):
            sets[name][rows] = np.packbits(bits, axis=1)
    right = (cols["missed"] == 0) & (cols["false"] == 0)
    return TaskColumns(right, cols, sets, k, truth_offsets=go, det_offsets=do)


COMPUTE = {"multilabel": _multilabel, "segmentation": _segmentation, "detection": _detection}


def caption(task: str, values: dict[str, float]) -> str:
    """The grid's line under a thumbnail."""
    if task == "multilabel":
        wrong = int(values["wrong"])
        return (
            "all labels right"
            if not wrong
            else (f"{int(values['missed'])} missed · {int(values['false'])} false")
        )
    if task == "segmentation":
        return f"mean IoU {values['mean_iou']:.2f} · pixels {100 * values['pixel_accuracy']:.0f}%"
    return (
        f"{int(values['objects'])} objects · {int(values['missed'])} missed · "
        f"{int(values['false'])} false"
    )


def detail(store: Any, epoch: int, cols: TaskColumns, i: int) -> dict[str, Any]:
    """One image's task results: its labels, boxes or per-class IoU, read on demand."""
    classes = store.classes
    names = {s: [classes[c] for c in cols.classes_of(s, i)] for s in SETS}
    out: dict[str, Any] = {"sets": names}
    if store.task == "multilabel":
        z = store.epoch_data("logits", epoch, slice(i, i + 1))[0].astype(np.float64)
        true = store.truth("eval/labels", slice(i, i + 1))[0].astype(bool)
        prob = 1 / (1 + np.exp(-z))
        order = np.argsort(-z, kind="stable")
        out["labels"] = [
            {
                "class": classes[c],
                "probability": float(prob[c]),
                "true": bool(true[c]),
                "predicted": bool(z[c] > 0),
                "status": _status(bool(true[c]), bool(z[c] > 0)),
            }
            for c in order
        ]
    elif store.task == "segmentation":
        from explainkit.task_metrics import confusion, iou_per_class

        pred = store.epoch_data("masks", epoch, slice(i, i + 1))[0]
        truth = store.truth("eval/segmentation", slice(i, i + 1))[0]
        conf = confusion(pred, truth, len(classes))
        ious = iou_per_class(conf)
        out["classes"] = [
            {
                "class": classes[c],
                "iou": None if np.isnan(ious[c]) else float(ious[c]),
                "true_pixels": int(conf[c].sum()),
                "predicted_pixels": int(conf[:, c].sum()),
            }
            for c in range(len(classes))
            if conf[c].sum() or conf[:, c].sum()
        ]
    else:
        out.update(_boxes(store, epoch, cols, i))
    return out


def _status(true: bool, predicted: bool) -> str:
    if true and predicted:
        return "right"
    if true:
        return "missed"
    return "false" if predicted else ""


def _boxes(store: Any, epoch: int, cols: TaskColumns, i: int) -> dict[str, Any]:
    """Image ``i``'s true boxes and every detection (the page hides those under the score
    chosen), each marked as matched or not at :data:`MIN_SCORE`."""
    from explainkit.task_metrics import match_detections

    assert cols.truth_offsets is not None and cols.det_offsets is not None
    classes = store.classes
    t = slice(int(cols.truth_offsets[i]), int(cols.truth_offsets[i + 1]))
    d = slice(int(cols.det_offsets[i]), int(cols.det_offsets[i + 1]))
    gb, gl = store.truth("eval/boxes", t), store.truth("eval/box_labels", t)
    b, s, lab = (store.epoch_data(x, epoch, d) for x in ("boxes", "box_scores", "box_labels"))
    false, missed = (set(x.tolist()) for x in match_detections(b, s, lab, gb, gl, IOU, MIN_SCORE))
    order = np.argsort(-s, kind="stable")
    return {
        "min_score": MIN_SCORE,
        "truth": [
            {"box": [float(v) for v in gb[j]], "class": classes[int(gl[j])], "missed": j in missed}
            for j in range(len(gl))
        ],
        "detections": [
            {
                "box": [float(v) for v in b[j]],
                "class": classes[int(lab[j])],
                "score": float(s[j]),
                "false": bool(j in false),
            }
            for j in order
        ],
    }


def palette(k: int) -> np.ndarray:
    """uint8 (256, 4) RGBA per class id: the background (0) transparent, classes 1..k-1 from
    matplotlib's tab20 (repeating), 255 (not scored) opaque white."""
    import matplotlib

    colours = np.zeros((256, 4), np.uint8)
    tab = matplotlib.colormaps["tab20"]
    for c in range(1, min(k, 255)):
        colours[c, :3] = np.round(np.asarray(tab((c - 1) % 20)[:3]) * 255).astype(np.uint8)
        colours[c, 3] = 255
    colours[255] = 255
    return colours


def mask_png(store: Any, epoch: int, i: int, which: str) -> bytes:
    """Image ``i``'s predicted or true class mask as an RGBA PNG through :func:`palette`."""
    import io

    from PIL import Image

    rows = slice(i, i + 1)
    if which == "true":
        mask = store.truth("eval/segmentation", rows)[0]
    else:
        mask = store.epoch_data("masks", epoch, rows)[0]
    out = io.BytesIO()
    Image.fromarray(palette(len(store.classes))[mask]).save(out, format="PNG", compress_level=1)
    return out.getvalue()
