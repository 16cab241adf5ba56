"""Built-in analyzer ``task_mistakes``: the analyzed epoch's worst images for each task.

- detection: images ranked by their mistakes at IoU 0.5: missed objects (ground truth no
  detection of its class matched) and false detections (scored at least ``min_score`` and
  matching no ground truth of their class), each drawn on the image;
- segmentation: the images of lowest mean IoU, beside their true and predicted class masks;
- multi-label: the images with the most wrong labels, naming the missed and the false ones.

Images are read from the store a batch at a time; only the shown ones are kept.
"""

from __future__ import annotations

from typing import Any

import click

from explainkit import hookimpl
from explainkit.analyzer import AnalysisContext, Analyzer, Option

__all__ = ["TaskMistakesAnalyzer"]

TILE = 160  # pixels of a tile's side in the figure
TRUTH, FOUND, MISSED, FALSE = (40, 200, 40), (60, 120, 255), (255, 40, 40), (255, 160, 0)


class TaskMistakesAnalyzer(Analyzer):
    """The images a detector, segmenter or multi-label model gets most wrong (PNG + CSV).

    Example:
        explainkit analyze runs/scenes-det --plugin task_mistakes --task-mistakes-count 16
    """

    name = "task_mistakes"
    title = "Mistakes per task"
    summary = "Missed and false detections, worst segmentations, wrong labels (PNG + CSV)."
    tasks = ("multilabel", "segmentation", "detection")
    options = (
        Option("count", click.IntRange(1, 64), 12, "Images shown."),
        Option(
            "min_score",
            click.FloatRange(0.0, 1.0),
            0.3,
            "Detections scored below this are not shown nor counted as false.",
        ),
    )
    order = 31

    def run(self, context: AnalysisContext, *, count: int, min_score: float) -> list[dict]:
        from explainkit import figures, tables

        store, out = context.store, context.output_dir
        ranked, header, rows, draw = _rank(store, context.epoch, min_score)
        worst = ranked[:count]
        sources = store.sources(worst) if len(worst) else []
        tiles = [draw(int(i)) for i in worst]
        tables.write_csv(
            out / "mistakes.csv",
            ["image", "source", *header],
            [[int(i), s, *rows[int(i)]] for i, s in zip(worst, sources, strict=True)],
        )
        fig = _tiles_figure(
            tiles, f"{store.task}: worst {len(worst)} images, epoch {context.epoch}"
        )
        figures.save_figure(fig, out / "mistakes.png")
        return [
            context.artifact("mistakes.png", "Worst images", "image", _caption(store.task)),
            context.artifact("mistakes.csv", "Worst images", "table", "Worst first."),
        ]


def _caption(task: str) -> str:
    if task == "detection":
        return (
            "Green: matched ground truth; red: missed objects; blue: right detections; "
            "orange: false detections (IoU 0.5, same class)."
        )
    if task == "segmentation":
        return "Each image, its true classes and the predicted ones; lowest mean IoU first."
    return "Most wrong labels first; missed labels (-) and false ones (+)."


def _rank(store: Any, epoch: int, min_score: float) -> tuple[Any, list, dict, Any]:
    """Image indices worst first, the CSV columns, each image's row, and a tile drawer."""
    import numpy as np

    from explainkit.task_metrics import image_ious, match_detections

    classes = store.classes
    if store.task == "detection":
        dets, truth = store.detections(epoch), store.boxes()
        errors = []
        for (b, s, lab), (tb, tl) in zip(dets, truth, strict=True):
            errors.append(match_detections(b, s, lab, tb, tl, min_score=min_score))
        bad = np.array([len(f) + len(m) for f, m in errors])
        rows = {
            i: [len(m), len(f), " ".join(classes[c] for c in truth[i][1][m])]
            for i, (f, m) in enumerate(errors)
        }

        def draw(i: int) -> tuple[Any, str]:
            return _boxes_tile(store, i, dets[i], truth[i], errors[i], min_score)

        return np.argsort(-bad, kind="stable"), ["missed", "false", "missed_classes"], rows, draw
    if store.task == "segmentation":
        ious = np.zeros(store.num_images)
        for batch in store.batches(256):
            part = slice(int(batch[0]), int(batch[-1]) + 1)
            pred = store.epoch_data("masks", epoch, part)
            ious[part] = image_ious(pred, store.truth("eval/segmentation", part), len(classes))
        rows = {i: [round(float(v), 4)] for i, v in enumerate(ious)}
        return (
            np.argsort(ious, kind="stable"),
            ["mean_iou"],
            rows,
            lambda i: _mask_tile(store, epoch, i, ious[i]),
        )
    logits, labels = store.logits(epoch), store.truth("eval/labels").astype(bool)
    pred = logits > 0  # the threshold of task_metrics' F1
    wrong = (pred != labels).sum(1)
    rows = {}
    for i in range(len(labels)):
        missed = [classes[c] for c in np.flatnonzero(labels[i] & ~pred[i])]
        false = [classes[c] for c in np.flatnonzero(pred[i] & ~labels[i])]
        rows[i] = [int(wrong[i]), " ".join(missed), " ".join(false)]

    def draw_labels(i: int) -> tuple[Any, str]:
        _, missed, false = rows[i]
        text = " ".join([*(f"-{c}" for c in missed.split()), *(f"+{c}" for c in false.split())])
        return _upscaled(store, i), f"#{i} {text or 'all right'}"

    return np.argsort(-wrong, kind="stable"), ["wrong", "missed", "false"], rows, draw_labels


def _upscaled(store: Any, i: int) -> Any:
    from PIL import Image

    return Image.fromarray(store.images([i])[0]).resize((TILE, TILE), Image.NEAREST)


def _boxes_tile(store: Any, i: int, det: tuple, truth: tuple, errors: tuple, min_score: float):
    """Image ``i`` with its ground truth and its detections above ``min_score`` drawn."""
    from PIL import ImageDraw

    image = _upscaled(store, i)
    scale = TILE / store.images([i]).shape[2]
    pen = ImageDraw.Draw(image)
    false, missed = (set(e.tolist()) for e in errors)
    for j, box in enumerate(truth[0]):
        pen.rectangle(list(box * scale), outline=MISSED if j in missed else TRUTH, width=2)
    for j, (box, score) in enumerate(zip(det[0], det[1], strict=True)):
        if score >= min_score:
            pen.rectangle(list(box * scale), outline=FALSE if j in false else FOUND, width=1)
    return image, f"#{i}: {len(missed)} missed, {len(false)} false"


def _mask_tile(store: Any, epoch: int, i: int, iou: float):
    """Image ``i``, its true and its predicted class masks side by side."""
    import numpy as np
    from PIL import Image

    truth = store.truth("eval/segmentation", slice(i, i + 1))[0]
    pred = store.epoch_data("masks", epoch, slice(i, i + 1))[0]
    palette = _palette(len(store.classes))
    parts = [np.asarray(_upscaled(store, i))]
    for mask in (truth, pred):
        parts.append(np.asarray(Image.fromarray(palette[mask]).resize((TILE, TILE), Image.NEAREST)))
    return Image.fromarray(np.concatenate(parts, axis=1)), f"#{i}: mean IoU {iou:.2f}"


def _palette(k: int) -> Any:
    """256 RGB colours: background black, classes from tab20, 255 (not scored) white."""
    import numpy as np
    from matplotlib import colormaps

    colours = np.zeros((256, 3), np.uint8)
    tab = colormaps["tab20"]
    for c in range(1, min(k, 255)):
        colours[c] = (np.asarray(tab((c - 1) % 20)[:3]) * 255).astype(np.uint8)
    colours[255] = 255
    return colours


def _tiles_figure(tiles: list, title: str) -> Any:
    from explainkit.figures import message_figure, new_figure

    if not tiles:
        return message_figure("no images", title)
    cols = 4 if tiles[0][0].width <= TILE else 2
    rows = -(-len(tiles) // cols)
    width = tiles[0][0].width / TILE
    fig = new_figure(3.2 * cols * width, 3.4 * rows)
    for n, (image, caption) in enumerate(tiles):
        ax = fig.add_subplot(rows, cols, n + 1)
        ax.imshow(image)
        ax.set_title(caption, fontsize=8)
        ax.axis("off")
    fig.suptitle(title)
    return fig


@hookimpl
def register_analyzers(register):
    register(TaskMistakesAnalyzer)
