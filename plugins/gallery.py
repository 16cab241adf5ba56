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
DENSE_CSV_MAX_CLASSES = 200  # above this, confusion_pairs.csv alone (a K x K CSV is K² cells)
MAX_LISTED = 20  # class names an error message lists


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
    tasks = ("classification", "video")  # a video run: its clips' middle frames and logits
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
            *_write_confusion(context, counts, mistakes.epoch),
            *_write_per_class_accuracy(context, counts, mistakes.epoch),
        ]


# -- step 1: which mistakes to show -------------------------------------------------------


def _class_id(class_name: str | None, classes: list[str]) -> int | None:
    """The index of ``--gallery-class-name`` (None when not given); unknown names list all."""
    if class_name is None:
        return None
    if class_name not in classes:
        from explainkit.errors import did_you_mean

        close = did_you_mean(class_name, classes)
        hint = f"did you mean {close[0]!r}? " if close else ""
        listed = ", ".join(classes[:MAX_LISTED]) + (", …" if len(classes) > MAX_LISTED else "")
        raise AnalyzerError(
            f"--gallery-class-name {class_name!r} is not a class of this run; {hint}"
            f"the {len(classes)} classes: {listed} (all in per_class_accuracy.csv)"
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

    from explainkit.confusions import predictions_and_confidence
    from explainkit.selection import select_mistakes

    store, epoch = context.store, context.epoch
    targets = store.targets
    preds, confidence = predictions_and_confidence(store.logits(epoch))
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

    cols = MAX_COLS if len(items) <= 8 * MAX_COLS else 2 * MAX_COLS  # many: wider, not taller
    return grid_figure(
        images,
        cols=min(cols, len(items)),
        captions=[_caption(item) for item in items],
        title=title,
    )


# -- step 3: confusions over the whole eval set -------------------------------------------


def _confusion_counts(context: AnalysisContext, m: _Mistakes) -> Any:
    """Counts of ``(true, predicted)`` pairs over the whole eval set, kept sparse."""
    from explainkit.confusions import Confusions

    return Confusions.of(m.targets, m.preds, len(context.classes))


def _write_confusion(context: AnalysisContext, c: Any, epoch: int) -> list[dict]:
    """Every error pair as CSV; a matrix figure for up to MAX_LABELED classes, else the
    largest confusions (and the dense CSV up to DENSE_CSV_MAX_CLASSES)."""
    from explainkit import confusions, figures, tables

    out, classes, k = context.output_dir, context.classes, c.num_classes
    found = len(c.off_diagonal())
    artifacts = []
    if k <= figures.MAX_LABELED:
        figures.save_figure(_confusion_figure(c, classes, epoch), out / "confusion_matrix.png")
        artifacts.append(
            context.artifact(
                "confusion_matrix.png",
                "Confusion matrix",
                "image",
                f"Rows: true class, columns: predicted; {c.num_images} eval images, "
                f"accuracy {100 * c.overall:.2f}% at epoch {epoch}.",
            )  # fmt: skip
        )
    else:
        fig = confusions.top_confusions_figure(c, classes, epoch)
        figures.save_figure(fig, out / "top_confusions.png")
        artifacts.append(
            context.artifact(
                "top_confusions.png",
                "Largest confusions",
                "image",
                f"The {min(confusions.TOP, found)} largest of {found} nonzero off-diagonal cells "
                f"of the {k} x {k} confusion matrix ({c.num_images} eval images, accuracy "
                f"{100 * c.overall:.2f}% at epoch {epoch}); all of them in confusion_pairs.csv.",
            )  # fmt: skip
        )
    tables.write_csv(out / "confusion_pairs.csv", confusions.PAIR_HEADER, c.pair_rows(classes))
    artifacts.append(
        context.artifact(
            "confusion_pairs.csv",
            "Confusions (true → predicted)",
            "table",
            f"All {found} nonzero off-diagonal cells, the largest first; fraction_of_true: "
            "their share of the true class's eval images.",
        )  # fmt: skip
    )
    if k <= DENSE_CSV_MAX_CLASSES:
        tables.write_csv(
            out / "confusion_matrix.csv",
            ["true \\ predicted", *classes],
            [[name, *row] for name, row in zip(classes, c.dense().tolist(), strict=True)],
        )
        artifacts.append(
            context.artifact(
                "confusion_matrix.csv", "Confusion matrix (counts)", "table", "Rows: true class."
            )
        )
    return artifacts


def _confusion_figure(c: Any, classes: list[str], epoch: int) -> Any:
    """Counts and row-normalized matrices side by side, every class named (few classes)."""
    import numpy as np

    from explainkit import figures

    k = len(classes)
    matrix = c.dense()
    with np.errstate(invalid="ignore", divide="ignore"):
        normalized = np.nan_to_num(matrix / c.support[:, None])
    side = max(4.5, 0.26 * k + 2.5)
    fig = figures.new_figure(2 * side + 1.2, 0.9 * side + 0.6)
    panels = (
        (matrix, "Counts", None),
        (normalized, "Row-normalized (recall per true class)", (0.0, 1.0)),
    )
    for i, (data, name, limits) in enumerate(panels):
        _confusion_panel(fig, fig.add_subplot(1, 2, i + 1), data, name, limits, classes)
    fig.suptitle(f"Confusion matrix, epoch {epoch} ({c.num_images} eval images)")
    return fig


def _confusion_panel(
    fig: Any, ax: Any, data: Any, name: str, limits: tuple[float, float] | None, classes: list
) -> None:
    """One heatmap of the matrix: counts (``limits`` None) or fractions in ``limits``."""
    import numpy as np

    from explainkit.figures import MIN_FONT_PT, class_font_size, short

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
        size = 8 if k <= 10 else MIN_FONT_PT
        ax.text(col, r, text, ha="center", va="center", fontsize=size, color=color)


# -- step 4: per-class accuracy -----------------------------------------------------------


def _write_per_class_accuracy(context: AnalysisContext, c: Any, epoch: int) -> list[dict]:
    from explainkit import confusions, figures, tables

    out, classes = context.output_dir, context.classes
    accuracy = c.accuracy
    per_class = [
        {
            "class": name,
            "class_id": k,
            "support": int(c.support[k]),
            "correct": int(c.correct[k]),
            "accuracy": None if c.support[k] == 0 else float(accuracy[k]),
        }
        for k, name in enumerate(classes)
    ]
    header = ["class", "class_id", "support", "correct", "accuracy"]
    worst = [per_class[k] for k in c.worst(len(classes))]  # the worst first, empty ones last
    worst += [r for r in per_class if r["support"] == 0]
    rows = [[r[h] for h in header] for r in worst]
    tables.write_csv(out / "per_class_accuracy.csv", header, rows)
    tables.write_json(
        out / "per_class_accuracy.json",
        {"epoch": epoch, "accuracy": c.overall, "num_images": c.num_images, "classes": per_class},
    )
    artifacts = []
    if len(classes) > figures.MAX_LABELED:
        figures.save_figure(confusions.worst_figure(c, classes, epoch), out / "worst_classes.png")
        artifacts.append(
            context.artifact(
                "worst_classes.png",
                "Worst classes",
                "image",
                f"The {min(confusions.TOP, int((c.support > 0).sum()))} classes of lowest "
                f"accuracy among {len(classes)}, and the spread of all; every class in "
                "per_class_accuracy.csv.",
            )  # fmt: skip
        )
    return [
        *artifacts,
        context.artifact(
            "per_class_accuracy.csv",
            "Per-class accuracy",
            "table",
            "The lowest accuracy first (ties: more eval images first); classes without eval "
            "images last, with a blank accuracy.",
        ),  # fmt: skip
        context.artifact(
            "per_class_accuracy.json",
            "Per-class accuracy (JSON)",
            "json",
            "The table above in class order, for programs.",
        ),  # fmt: skip
    ]


@hookimpl
def register_analyzers(register):
    register(GalleryAnalyzer)
