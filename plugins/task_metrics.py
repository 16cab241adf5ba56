"""Built-in analyzer ``task_metrics``: each task's scores per epoch, from the store.

For a detection run: mAP at IoU 0.5 and averaged over 0.5:0.95 (COCO's, torchmetrics), mAP
at 0.75 and recall at 100 detections; for a segmentation run: mean IoU and each class's IoU;
for a multi-label run: macro F1 and the fraction of labels right, and each label's
precision, recall and F1. Every committed epoch is scored (the store holds them all), beside
the train and eval losses of the history; the per-class table is the analyzed epoch's.
"""

from __future__ import annotations

from typing import Any

from explainkit import hookimpl
from explainkit.analyzer import AnalysisContext, Analyzer

__all__ = ["TaskMetricsAnalyzer", "epoch_scores"]

READ_BATCH = 256  # images whose masks are read at a time


class TaskMetricsAnalyzer(Analyzer):
    """Loss and task-metric curves per epoch, and per-class scores (PNG + CSV).

    Example:
        explainkit analyze runs/scenes-det --plugin task_metrics
    """

    name = "task_metrics"
    title = "Task metrics"
    summary = "mAP (detection), mean IoU (segmentation), per-label F1 (multi-label) per epoch."
    tasks = ("multilabel", "segmentation", "detection")
    order = 11

    def run(self, context: AnalysisContext) -> list[dict]:
        from explainkit import figures, tables

        store, out = context.store, context.output_dir
        history = store.history
        rows, per_class = [], {}
        for epoch in store.epochs:
            scores, classes = epoch_scores(store, epoch)
            rows.append(scores)
            if epoch == context.epoch:
                per_class = classes
        names = [n for n in rows[0] if n != "epoch"]
        header = ["epoch", "train_loss", "eval_loss", *names]
        table = [
            [int(r["epoch"]), float(history["train_loss"][i]), float(history["eval_loss"][i])]
            + [r[n] for n in names]
            for i, r in enumerate(rows)
        ]
        tables.write_csv(out / "metrics.csv", header, table)
        columns = list(per_class)
        tables.write_csv(
            out / "per_class.csv",
            ["class", *columns],
            [[c, *(per_class[k][i] for k in columns)] for i, c in enumerate(store.classes)],
        )
        fig = _figure(store, history, rows, names, per_class, context.epoch)
        figures.save_figure(fig, out / "metrics.png")
        last = rows[[r["epoch"] for r in rows].index(context.epoch)]
        headline = ", ".join(f"{n} {last[n]:.3f}" for n in names)
        return [
            context.artifact(
                "metrics.png",
                "Task metrics",
                "image",
                f"{store.task} run; epoch {context.epoch}: {headline}.",
            ),
            context.artifact("metrics.csv", "Metrics per epoch", "table", "One row per epoch."),
            context.artifact(
                "per_class.csv",
                "Per-class scores",
                "table",
                f"Epoch {context.epoch}; empty where a class cannot be scored.",
            ),
        ]


def epoch_scores(store: Any, epoch: int) -> tuple[dict[str, float], dict[str, Any]]:
    """One epoch's headline scores and its per-class ones (arrays over the store's classes)."""
    import numpy as np

    from explainkit.task_metrics import (
        confusion,
        detection_map,
        iou_per_class,
        label_scores,
        mean_iou,
    )

    k = len(store.classes)
    if store.task == "detection":
        result = detection_map(store.detections(epoch), store.boxes(), k)
        scores = {n: result[n] for n in ("map_50", "map", "map_75", "mar_100")}
        return {"epoch": epoch, **scores}, {"ap": result["map_per_class"]}
    if store.task == "segmentation":
        conf = np.zeros((k, k), np.int64)
        for batch in store.batches(READ_BATCH):
            part = slice(int(batch[0]), int(batch[-1]) + 1)
            pred = store.epoch_data("masks", epoch, part)
            conf += confusion(pred, store.truth("eval/segmentation", part), k)
        pixel = float(np.trace(conf) / max(1, conf.sum()))
        return (
            {"epoch": epoch, "mean_iou": mean_iou(conf), "pixel_acc": pixel},
            {"iou": iou_per_class(conf)},
        )
    result = label_scores(store.logits(epoch), store.truth("eval/labels"))
    scores = {"macro_f1": result["macro_f1"], "label_acc": result["accuracy"]}
    return {"epoch": epoch, **scores}, {n: result[n] for n in ("precision", "recall", "f1")}


def _figure(store: Any, history: dict, rows: list, names: list, per_class: dict, epoch: int):
    """Three panels: losses, the task's metrics per epoch, per-class scores at ``epoch``."""
    import numpy as np

    from explainkit.figures import class_font_size, new_figure, short

    fig = new_figure(14, 4.8)
    ax_loss, ax_metric, ax_class = (fig.add_subplot(1, 3, i) for i in (1, 2, 3))
    epochs = history["epoch"]
    style = {"marker": "o" if len(epochs) <= 40 else None, "markersize": 4}
    ax_loss.plot(epochs, history["train_loss"], label="train", **style)
    ax_loss.plot(epochs, history["eval_loss"], label="eval", **style)
    ax_loss.set_title(f"{store.task} loss")
    ax_loss.legend(fontsize=8)
    for name in names:
        ax_metric.plot([r["epoch"] for r in rows], [r[name] for r in rows], label=name, **style)
    ax_metric.set_ylim(0, 1)
    ax_metric.set_title("Metrics per epoch")
    ax_metric.legend(fontsize=8)
    for ax in (ax_loss, ax_metric):
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.axvline(epoch, color="0.4", linestyle="--", linewidth=1)
        if len(epochs) == 1:
            ax.set_xlim(epochs[0] - 1, epochs[0] + 1)
    key = next(iter(per_class))
    values = np.nan_to_num(np.asarray(per_class[key], np.float64), nan=0.0)
    shown = np.argsort(values)[:30]  # the worst classes, when there are many
    ax_class.barh(np.arange(len(shown)), values[shown], color="C2")
    ax_class.set_yticks(np.arange(len(shown)))
    ax_class.set_yticklabels([short(store.classes[i]) for i in shown])
    ax_class.tick_params(axis="y", labelsize=class_font_size(len(shown)))
    ax_class.set_xlim(0, 1)
    ax_class.set_title(
        f"{key} per class, epoch {epoch}" + (" (worst 30)" if len(values) > 30 else "")
    )
    fig.suptitle(
        f"{store.attrs.get('dataset', '')} · {store.attrs.get('model', {}).get('arch', '')}"
    )
    return fig


@hookimpl
def register_analyzers(register):
    register(TaskMetricsAnalyzer)
