"""Built-in analyzer ``gallery``: misclassified images, confusion matrix, per-class accuracy."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import click

from explainkit import hookimpl
from explainkit.analyzer import AnalysisContext, Analyzer, Option
from explainkit.errors import AnalyzerError
from explainkit.selection import MISTAKE_CHOICES

__all__ = ["GalleryAnalyzer"]

MAX_COLS = 5
ANNOTATE_MAX_CLASSES = 15  # above this, confusion cells are too small for numbers


class GalleryAnalyzer(Analyzer):
    """Misclassified evaluation images at the chosen epoch, and where the errors go.

    Takes the stored logits of the epoch, applies a softmax, and shows the mistakes captioned
    ``true → predicted (confidence)``, un-normalized and upscaled with nearest-neighbour so
    pixels stay crisp. It also writes the confusion matrix (counts and row-normalized) and the
    per-class accuracy.

    Example:
        explainkit analyze runs/cifar --plugin gallery --gallery-count 20 --gallery-select per_class
    """

    name = "gallery"
    title = "Misclassified images"
    summary = "Misclassified eval images, confusion matrix and per-class accuracy at an epoch."
    order = 20
    options = (
        Option("count", click.IntRange(1, 400), 10, "How many misclassified images to show."),
        Option(
            "select",
            str,
            "confident",
            "Which mistakes: most confident first, a seeded random sample, or round-robin "
            "over true classes.",
            choices=MISTAKE_CHOICES,
        ),
        Option("class_name", str, None, "Show only mistakes whose true class is this one."),
    )

    def run(
        self,
        context: AnalysisContext,
        *,
        count: int,
        select: str,
        class_name: str | None,
    ) -> list[dict]:
        class_id = _class_id(class_name, context.classes)
        mistakes = _find_mistakes(context, class_id, count, select)
        counts = _confusion_counts(context, mistakes)
        return [
            *_write_gallery(context, mistakes, count, select, class_name),
            *_write_confusion(context, counts),
            *_write_per_class_accuracy(context, counts),
        ]


# -- step 1: which mistakes to show -------------------------------------------------------


def _class_id(class_name: str | None, classes: list[str]) -> int | None:
    """The index of ``--gallery-class-name`` (None when not given); unknown names list all."""
    if class_name is None:
        return None
    if class_name not in classes:
        raise AnalyzerError(
            f"--gallery-class-name {class_name!r} is not a class of this run; "
            f"classes: {', '.join(classes)}"
        )
    return classes.index(class_name)


@dataclass
class _Mistakes:
    """The recorded predictions of one epoch and the mistakes chosen for display.

    ``candidates`` marks the mistakes in scope (of the chosen class, if any); ``chosen`` are
    the store positions shown, in display order.
    """

    epoch: int
    targets: Any
    preds: Any
    confidence: Any
    wrong: Any
    candidates: Any
    chosen: Any

    @property
    def num_wrong(self) -> int:
        return int(self.wrong.sum())

    @property
    def num_candidates(self) -> int:
        return int(self.candidates.sum())


def _find_mistakes(
    context: AnalysisContext, class_id: int | None, count: int, select: str
) -> _Mistakes:
    import numpy as np

    from explainkit.selection import select_mistakes

    store, epoch = context.store, context.epoch
    targets = store.targets
    preds = store.predictions(epoch)
    confidence = store.probabilities(epoch)[np.arange(len(preds)), preds]
    wrong = preds != targets
    candidates = wrong if class_id is None else wrong & (targets == class_id)
    chosen = select_mistakes(
        np.flatnonzero(candidates), targets, confidence, count, select, context.rng
    )
    return _Mistakes(epoch, targets, preds, confidence, wrong, candidates, chosen)


# -- step 2: the gallery figure and its JSON ----------------------------------------------


def _write_gallery(
    context: AnalysisContext, m: _Mistakes, count: int, select: str, class_name: str | None
) -> list[dict]:
    from explainkit import figures, tables

    out = context.output_dir
    items = _gallery_items(context, m)
    tables.write_json(
        out / "gallery.json",
        {
            "epoch": m.epoch,
            "select": select,
            "count": count,
            "class_name": class_name,
            "num_images": int(len(m.targets)),
            "num_mistakes": m.num_wrong,
            "num_candidates": m.num_candidates,
            "items": items,
        },
    )
    scope = f" of class {class_name!r}" if class_name is not None else ""
    title = f"Misclassified eval images{scope}, epoch {m.epoch}"
    total = f"{m.num_wrong} of {len(m.targets)} eval images"
    if items:
        fig = _gallery_figure(context.store.images(m.chosen), items, title)
        caption = (
            f"{len(items)} of {m.num_candidates} mistakes{scope} ({total} wrong), "
            f"selected: {select}; caption: true → predicted (softmax confidence)"
        )
    else:
        fig = figures.message_figure(
            f"No misclassified images{scope} at epoch {m.epoch}\n({total} are wrong).", title
        )
        caption = f"no mistakes{scope} to show at epoch {m.epoch}"
    figures.save_figure(fig, out / "gallery.png")
    header = ["index", "source", "true", "predicted", "confidence"]
    tables.write_csv(out / "gallery.csv", header, [[item[h] for h in header] for item in items])
    return [
        context.artifact("gallery.png", "Misclassified images", "image", caption),
        context.artifact(
            "gallery.csv", "Shown images", "table", "In display order; source: the image's file."
        ),
        context.artifact(
            "gallery.json", "Gallery selection", "json", "Shown images, in display order."
        ),
    ]


def _gallery_items(context: AnalysisContext, m: _Mistakes) -> list[dict]:
    """One JSON record per shown image, in display order; ``source`` names its file (folder
    datasets) or its dataset and position, as :meth:`StoreReader.sources` does."""
    classes, chosen = context.classes, m.chosen
    return [
        {
            "index": int(i),
            "source_index": int(s),
            "source": source,
            "true": classes[t],
            "true_id": int(t),
            "predicted": classes[p],
            "predicted_id": int(p),
            "confidence": float(c),
        }
        for i, s, source, t, p, c in zip(
            chosen,
            context.store.index[chosen] if len(chosen) else [],
            context.store.sources(chosen),
            m.targets[chosen],
            m.preds[chosen],
            m.confidence[chosen],
            strict=True,
        )
    ]


def _caption(item: dict) -> str:
    from explainkit.figures import short

    true, pred = short(item["true"]), short(item["predicted"])
    conf = f"({100 * item['confidence']:.1f}%)"
    if len(true) + len(pred) + len(conf) + 4 <= 24:
        return f"{true} → {pred}\n{conf}"
    return f"{true} →\n{pred} {conf}"


def _gallery_figure(images: Any, items: list[dict], title: str) -> Any:
    from explainkit.figures import grid_figure

    return grid_figure(
        images,
        cols=min(MAX_COLS, len(items)),
        captions=[_caption(item) for item in items],
        title=title,
    )


# -- step 3: confusion matrix over the whole eval set -------------------------------------


@dataclass
class _ConfusionCounts:
    """Confusion matrix (rows: true class) of one epoch, and what follows from it."""

    epoch: int
    classes: list[str]
    matrix: Any  # (K, K) counts
    normalized: Any  # each row divided by its support; 0 for an empty class
    support: Any
    correct: Any
    accuracy: Any  # per class; NaN for an empty class

    @property
    def num_images(self) -> int:
        return int(self.matrix.sum())

    @property
    def overall(self) -> float:
        return float(self.correct.sum() / max(self.num_images, 1))


def _confusion_counts(context: AnalysisContext, m: _Mistakes) -> _ConfusionCounts:
    """Counts of ``(true, predicted)`` pairs over the whole eval set, vectorized."""
    import numpy as np

    k = len(context.classes)
    matrix = np.bincount(m.targets * k + m.preds, minlength=k * k).reshape(k, k)
    support = matrix.sum(axis=1)
    correct = np.diag(matrix)
    with np.errstate(invalid="ignore", divide="ignore"):
        normalized = matrix / support[:, None]
        accuracy = correct / support
    return _ConfusionCounts(
        m.epoch, context.classes, matrix, np.nan_to_num(normalized), support, correct, accuracy
    )


def _write_confusion(context: AnalysisContext, c: _ConfusionCounts) -> list[dict]:
    from explainkit import figures, tables

    out = context.output_dir
    tables.write_csv(
        out / "confusion_matrix.csv",
        ["true \\ predicted", *c.classes],
        [[name, *row] for name, row in zip(c.classes, c.matrix.tolist(), strict=True)],
    )
    figures.save_figure(_confusion_figure(c), out / "confusion_matrix.png")
    return [
        context.artifact(
            "confusion_matrix.png",
            "Confusion matrix",
            "image",
            f"Rows: true class, columns: predicted; {c.num_images} eval images, "
            f"accuracy {100 * c.overall:.2f}% at epoch {c.epoch}.",
        ),
        context.artifact(
            "confusion_matrix.csv", "Confusion matrix (counts)", "table", "Rows: true class."
        ),
    ]


def _confusion_figure(c: _ConfusionCounts) -> Any:
    from explainkit import figures

    k = len(c.classes)
    side = max(4.5, 0.26 * k + 2.5)
    fig = figures.new_figure(2 * side + 1.2, 0.9 * side + 0.6)
    panels = (
        (c.matrix, "Counts", None),
        (c.normalized, "Row-normalized (recall per true class)", (0.0, 1.0)),
    )
    for i, (data, name, limits) in enumerate(panels):
        _confusion_panel(fig, fig.add_subplot(1, 2, i + 1), data, name, limits, c.classes)
    fig.suptitle(f"Confusion matrix, epoch {c.epoch} ({c.num_images} eval images)")
    return fig


def _confusion_panel(
    fig: Any, ax: Any, data: Any, name: str, limits: tuple[float, float] | None, classes: list
) -> None:
    """One heatmap of the matrix: counts (``limits`` None) or fractions in ``limits``."""
    import numpy as np

    from explainkit.figures import class_font_size, short

    k = len(classes)
    font = class_font_size(k)
    labels = [short(name, 22) for name in classes]
    vmin, vmax = limits if limits else (0, max(int(data.max()), 1))
    im = ax.imshow(data, cmap="Blues", vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_title(name, fontsize=11)
    ax.set_xticks(np.arange(k), labels, rotation=90, fontsize=font)
    ax.tick_params(length=2)
    ax.set_yticks(np.arange(k), labels, fontsize=font)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.colorbar(im, ax=ax, shrink=0.8)
    if k > ANNOTATE_MAX_CLASSES:
        return
    threshold = vmin + 0.6 * (vmax - vmin)
    for (r, col), value in np.ndenumerate(data):
        text = f"{value:d}" if limits is None else f"{value:.2f}"
        color = "white" if value > threshold else "black"
        if value == 0:
            text, color = "0", "0.7"  # zeros recede, so the errors stand out
        ax.text(col, r, text, ha="center", va="center", fontsize=8 if k <= 10 else 6, color=color)


# -- step 4: per-class accuracy -----------------------------------------------------------


def _write_per_class_accuracy(context: AnalysisContext, c: _ConfusionCounts) -> list[dict]:
    from explainkit import tables

    out = context.output_dir
    per_class = [
        {
            "class": name,
            "class_id": k,
            "support": int(c.support[k]),
            "correct": int(c.correct[k]),
            "accuracy": None if c.support[k] == 0 else float(c.accuracy[k]),
        }
        for k, name in enumerate(c.classes)
    ]
    header = ["class", "class_id", "support", "correct", "accuracy"]
    tables.write_csv(
        out / "per_class_accuracy.csv", header, [[r[h] for h in header] for r in per_class]
    )
    tables.write_json(
        out / "per_class_accuracy.json",
        {
            "epoch": c.epoch,
            "accuracy": c.overall,
            "num_images": c.num_images,
            "classes": per_class,
        },
    )
    return [
        context.artifact(
            "per_class_accuracy.csv", "Per-class accuracy", "table", "Empty support → blank."
        ),
        context.artifact("per_class_accuracy.json", "Per-class accuracy (JSON)", "json"),
    ]


@hookimpl
def register_analyzers(register):
    register(GalleryAnalyzer)
