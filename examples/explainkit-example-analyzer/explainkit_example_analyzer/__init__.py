"""explainkit plugin: per-class histograms of the model's confidence on the evaluation images.

Calibration in one picture: a trustworthy classifier is confident when it is right and unsure
when it is wrong (Guo et al., "On Calibration of Modern Neural Networks",
https://arxiv.org/abs/1706.04599). It uses numpy and explainkit's public helpers for plugins:
``explainkit.figures`` for the figure and ``explainkit.tables`` for the CSV. They import numpy
and matplotlib, so they are imported inside ``run``, and ``explainkit plugins`` stays fast.
"""

from __future__ import annotations

import math
from typing import Any

import click

from explainkit import hookimpl
from explainkit.analyzer import AnalysisContext, Analyzer, Option

__version__ = "0.1.0"


class ConfidenceAnalyzer(Analyzer):
    """Histogram of the top softmax probability per class, right and wrong stacked.

    Example:
        explainkit analyze runs/demo --plugin confidence --confidence-bins 10
    """

    name = "confidence"
    summary = "Per-class histograms of prediction confidence, right vs wrong (PNG + CSV)."
    title = "Confidence per class"
    options = (
        Option("bins", click.IntRange(2, 200), 20, "Number of histogram bins between 0 and 1."),
        Option(
            "by",
            str,
            "target",
            "Group images by their true class (target) or predicted class (predicted).",
            choices=("target", "predicted"),
        ),
    )
    needs = frozenset({"store"})
    order = 80

    def run(self, context: AnalysisContext, *, bins: int, by: str) -> list[dict]:
        from explainkit import figures, tables

        epoch, classes, targets = context.epoch, context.classes, context.store.targets
        probs = context.store.probabilities(epoch)  # softmax of the logits recorded then
        predicted = probs.argmax(axis=1)
        correct = predicted == targets
        group = targets if by == "target" else predicted
        counts, edges = _histograms(probs.max(axis=1), correct, group, len(classes), bins)

        out = context.output_dir
        tables.write_csv(
            out / "confidence.csv",
            ["class", "bin_low", "bin_high", "correct", "wrong"],
            _table_rows(counts, edges, classes),
        )
        fig = _figure(counts, edges, classes, f"Confidence by {by} class, epoch {epoch}")
        figures.save_figure(fig, out / "confidence.png")
        accuracy = float(correct.mean()) if len(correct) else 0.0
        return [
            context.artifact(
                "confidence.png",
                "Confidence histograms",
                "image",
                f"Top softmax probability per {by} class at epoch {epoch}; "
                f"green = right, red = wrong (accuracy {accuracy:.1%}).",
            ),
            context.artifact("confidence.csv", "Confidence histogram counts", "table"),
        ]


def _histograms(confidence: Any, correct: Any, group: Any, num_classes: int, bins: int) -> Any:
    """(classes, right/wrong, bins) counts of ``confidence``, and the bin edges in [0, 1]."""
    import numpy as np

    edges = np.linspace(0.0, 1.0, bins + 1)
    counts = np.zeros((num_classes, 2, bins), dtype=np.int64)
    for c in range(num_classes):
        for j, ok in enumerate((True, False)):
            sel = (group == c) & (correct == ok)
            counts[c, j] = np.histogram(confidence[sel], bins=edges)[0]
    return counts, edges


def _table_rows(counts: Any, edges: Any, classes: list[str]) -> list[list]:
    """One CSV row per class and bin: class, bin edges, right and wrong counts."""
    return [
        [name, f"{edges[b]:.4f}", f"{edges[b + 1]:.4f}", *counts[c, :, b]]
        for c, name in enumerate(classes)
        for b in range(counts.shape[2])
    ]


def _figure(counts: Any, edges: Any, classes: list[str], title: str) -> Any:
    """Small multiples, one panel per class, so many classes stay legible."""
    from matplotlib.ticker import MaxNLocator

    from explainkit.figures import new_figure, short

    n = len(classes)
    cols = min(n, 5) if n <= 20 else math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    fig = new_figure(2.4 * cols, 1.9 * rows + 0.6)
    axes = fig.subplots(rows, cols, sharex=True, squeeze=False)
    width = edges[1] - edges[0]
    small = 8 if n <= 20 else 6
    for i, ax in enumerate(axes.flat):
        if i >= n:
            ax.set_visible(False)
            continue
        right, wrong = counts[i]
        ax.bar(edges[:-1], right, width=width, align="edge", color="tab:green")
        ax.bar(edges[:-1], wrong, width=width, align="edge", bottom=right, color="tab:red")
        ax.set_title(short(classes[i]), fontsize=small + 1)
        ax.tick_params(labelsize=small)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlim(0, 1)
    fig.suptitle(f"{title} (green right, red wrong)")
    fig.supxlabel("top softmax probability", fontsize=small + 1)
    return fig


@hookimpl
def register_analyzers(register: Any) -> None:
    register(ConfidenceAnalyzer)
