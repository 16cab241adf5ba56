"""Built-in analyzer ``gallery``: misclassified images, confusion matrix, per-class accuracy."""

from __future__ import annotations

from typing import Any

import click

from explainkit import hookimpl
from explainkit.analyzer import AnalysisContext, Analyzer, Option
from explainkit.errors import AnalyzerError

__all__ = ["GalleryAnalyzer", "select_mistakes", "softmax"]

SELECT_CHOICES = ("confident", "random", "per_class")
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
            choices=SELECT_CHOICES,
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
        import numpy as np
        from explainkit.plugins import _plot

        store = context.store
        classes = list(store.classes)
        num_classes = len(classes)
        class_id = None
        if class_name is not None:
            if class_name not in classes:
                raise AnalyzerError(
                    f"--gallery-class-name {class_name!r} is not a class of this run; "
                    f"classes: {', '.join(classes)}"
                )
            class_id = classes.index(class_name)

        epoch = context.epoch
        targets = store.targets
        probs = softmax(store.logits(epoch))
        preds = probs.argmax(axis=1)
        confidence = probs[np.arange(len(preds)), preds]
        wrong = preds != targets
        candidates = wrong if class_id is None else wrong & (targets == class_id)
        chosen = select_mistakes(
            np.flatnonzero(candidates), targets, confidence, count, select, context.rng
        )

        out = context.output_dir
        artifacts = []
        items = [
            {
                "index": int(i),
                "source_index": int(s),
                "true": classes[t],
                "true_id": int(t),
                "predicted": classes[p],
                "predicted_id": int(p),
                "confidence": float(c),
            }
            for i, s, t, p, c in zip(
                chosen,
                store.index[chosen] if len(chosen) else [],
                targets[chosen],
                preds[chosen],
                confidence[chosen],
                strict=True,
            )
        ]
        num_wrong = int(wrong.sum())
        scope = f" of class {class_name!r}" if class_name is not None else ""
        _plot.write_json(
            out / "gallery.json",
            {
                "epoch": epoch,
                "select": select,
                "count": count,
                "class_name": class_name,
                "num_images": int(len(targets)),
                "num_mistakes": num_wrong,
                "num_candidates": int(candidates.sum()),
                "items": items,
            },
        )

        title = f"Misclassified eval images{scope}, epoch {epoch}"
        if items:
            fig = _gallery_figure(store.images(chosen), items, title)
            caption = (
                f"{len(items)} of {int(candidates.sum())} mistakes{scope} "
                f"({num_wrong} of {len(targets)} eval images wrong), selected: {select}; "
                "caption: true → predicted (softmax confidence)"
            )
        else:
            fig = _plot.message_figure(
                f"No misclassified images{scope} at epoch {epoch}\n"
                f"({num_wrong} of {len(targets)} eval images are wrong).",
                title,
            )
            caption = f"no mistakes{scope} to show at epoch {epoch}"
        _plot.save_figure(fig, out / "gallery.png")
        artifacts.append(context.artifact("gallery.png", "Misclassified images", "image", caption))
        artifacts.append(
            context.artifact(
                "gallery.json", "Gallery selection", "json", "Shown images, in display order."
            )
        )

        # Confusion matrix and per-class accuracy over the whole eval set (vectorized).
        matrix = np.bincount(
            targets * num_classes + preds, minlength=num_classes * num_classes
        ).reshape(num_classes, num_classes)
        support = matrix.sum(axis=1)
        correct = np.diag(matrix)
        with np.errstate(invalid="ignore", divide="ignore"):
            normalized = matrix / support[:, None]
            accuracy = correct / support
        normalized = np.nan_to_num(normalized)
        _plot.write_csv(
            out / "confusion_matrix.csv",
            ["true \\ predicted", *classes],
            [[name, *row] for name, row in zip(classes, matrix.tolist(), strict=True)],
        )
        fig = _confusion_figure(matrix, normalized, classes, epoch)
        _plot.save_figure(fig, out / "confusion_matrix.png")
        overall = float(correct.sum() / max(len(targets), 1))
        artifacts.append(
            context.artifact(
                "confusion_matrix.png",
                "Confusion matrix",
                "image",
                f"Rows: true class, columns: predicted; {len(targets)} eval images, "
                f"accuracy {100 * overall:.2f}% at epoch {epoch}.",
            )
        )
        artifacts.append(
            context.artifact(
                "confusion_matrix.csv", "Confusion matrix (counts)", "table", "Rows: true class."
            )
        )

        per_class = [
            {
                "class": name,
                "class_id": k,
                "support": int(support[k]),
                "correct": int(correct[k]),
                "accuracy": None if support[k] == 0 else float(accuracy[k]),
            }
            for k, name in enumerate(classes)
        ]
        _plot.write_csv(
            out / "per_class_accuracy.csv",
            ["class", "class_id", "support", "correct", "accuracy"],
            [
                [r["class"], r["class_id"], r["support"], r["correct"], r["accuracy"]]
                for r in per_class
            ],
        )
        _plot.write_json(
            out / "per_class_accuracy.json",
            {
                "epoch": epoch,
                "accuracy": overall,
                "num_images": int(len(targets)),
                "classes": per_class,
            },
        )
        artifacts.append(
            context.artifact(
                "per_class_accuracy.csv", "Per-class accuracy", "table", "Empty support → blank."
            )
        )
        artifacts.append(
            context.artifact("per_class_accuracy.json", "Per-class accuracy (JSON)", "json")
        )
        return artifacts


def softmax(logits: Any) -> Any:
    """Row-wise softmax in float64 (stable: the row maximum is subtracted first)."""
    import numpy as np

    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


def select_mistakes(
    candidates: Any, targets: Any, confidence: Any, count: int, select: str, rng: Any
) -> Any:
    """Pick up to ``count`` eval positions from ``candidates``, in display order.

    ``confident``: highest confidence first. ``random``: a seeded sample, then shown highest
    confidence first. ``per_class``: round-robin over true classes in class order, each class's
    mistakes taken most confident first. Ties break by eval position, so the result is stable.
    """
    import numpy as np

    candidates = np.asarray(candidates, dtype=np.int64)
    if candidates.size == 0:
        return candidates
    conf = confidence[candidates]
    if select == "random":
        take = min(count, candidates.size)
        picked = np.sort(rng.choice(candidates.size, size=take, replace=False))
        candidates, conf = candidates[picked], conf[picked]
        return candidates[np.lexsort((candidates, -conf))]
    if select == "confident":
        return candidates[np.lexsort((candidates, -conf))][:count]
    if select == "per_class":
        cls = targets[candidates]
        order = np.lexsort((candidates, -conf, cls))  # by class, then most confident
        cls_sorted = cls[order]
        starts = np.searchsorted(cls_sorted, cls_sorted, side="left")
        rank = np.arange(order.size) - starts  # position within its class
        round_robin = order[np.lexsort((cls_sorted, rank))]
        return candidates[round_robin][:count]
    raise AnalyzerError(f"unknown gallery selection {select!r}; use {', '.join(SELECT_CHOICES)}")


def _caption(item: dict) -> str:
    from explainkit.plugins._plot import short

    true, pred = short(item["true"]), short(item["predicted"])
    conf = f"({100 * item['confidence']:.1f}%)"
    if len(true) + len(pred) + len(conf) + 4 <= 24:
        return f"{true} → {pred}\n{conf}"
    return f"{true} →\n{pred} {conf}"


def _gallery_figure(images: Any, items: list[dict], title: str) -> Any:
    from explainkit.plugins import _plot

    return _plot.grid_figure(
        images,
        cols=min(MAX_COLS, len(items)),
        captions=[_caption(item) for item in items],
        title=title,
    )


def _confusion_figure(matrix: Any, normalized: Any, classes: list[str], epoch: int) -> Any:
    import numpy as np
    from explainkit.plugins import _plot

    k = len(classes)
    side = max(4.5, 0.26 * k + 2.5)
    fig = _plot.new_figure(2 * side + 1.2, 0.9 * side + 0.6)
    font = _plot.class_font_size(k)
    labels = [_plot.short(c, 22) for c in classes]
    panels = (
        (matrix, "Counts", "Blues", None),
        (normalized, "Row-normalized (recall per true class)", "Blues", (0.0, 1.0)),
    )
    for i, (data, name, cmap, limits) in enumerate(panels):
        ax = fig.add_subplot(1, 2, i + 1)
        vmin, vmax = limits if limits else (0, max(int(data.max()), 1))
        im = ax.imshow(data, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
        ax.set_title(name, fontsize=11)
        ax.set_xticks(np.arange(k), labels, rotation=90, fontsize=font)
        ax.tick_params(length=2)
        ax.set_yticks(np.arange(k), labels, fontsize=font)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        fig.colorbar(im, ax=ax, shrink=0.8)
        if k <= ANNOTATE_MAX_CLASSES:
            threshold = vmin + 0.6 * (vmax - vmin)
            for (r, c), value in np.ndenumerate(data):
                text = f"{value:d}" if limits is None else f"{value:.2f}"
                color = "white" if value > threshold else "black"
                if value == 0:
                    text, color = "0", "0.7"  # zeros recede, so the errors stand out
                ax.text(
                    c, r, text, ha="center", va="center", fontsize=8 if k <= 10 else 6,
                    color=color,
                )  # fmt: skip
    fig.suptitle(f"Confusion matrix, epoch {epoch} ({int(matrix.sum())} eval images)")
    return fig


@hookimpl
def register_analyzers(register):
    register(GalleryAnalyzer)
