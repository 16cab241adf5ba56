"""explainkit plugin: per-class histograms of the model's confidence on the evaluation images.

Calibration in one picture: a trustworthy classifier is confident when it is right and unsure
when it is wrong (Guo et al., "On Calibration of Modern Neural Networks",
https://arxiv.org/abs/1706.04599). Only numpy and matplotlib are used, imported inside
``run`` so that ``explainkit plugins`` stays fast.
"""

from __future__ import annotations

import csv
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

    def run(
        self,
        context: AnalysisContext,
        *,
        bins: int,
        by: str,
    ) -> list[dict]:
        import numpy as np

        store = context.store
        logits = np.asarray(store.logits(context.epoch), dtype=np.float64)
        targets = np.asarray(store.targets)
        classes = list(store.classes)
        z = logits - logits.max(axis=1, keepdims=True)  # stable softmax
        probs = np.exp(z)
        probs /= probs.sum(axis=1, keepdims=True)
        predicted = probs.argmax(axis=1)
        confidence = probs.max(axis=1)
        correct = predicted == targets
        group = targets if by == "target" else predicted
        edges = np.linspace(0.0, 1.0, bins + 1)

        rows = []
        counts = np.zeros((len(classes), 2, bins), dtype=np.int64)
        for c in range(len(classes)):
            for j, ok in enumerate((True, False)):
                sel = (group == c) & (correct == ok)
                counts[c, j] = np.histogram(confidence[sel], bins=edges)[0]
            for b in range(bins):
                rows.append(
                    [classes[c], f"{edges[b]:.4f}", f"{edges[b + 1]:.4f}", *counts[c, :, b]]
                )

        csv_path = context.output_dir / "confidence.csv"
        with open(csv_path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["class", "bin_low", "bin_high", "correct", "wrong"])
            writer.writerows(rows)

        png_path = context.output_dir / "confidence.png"
        _plot(counts, edges, classes, by, context.epoch, png_path)
        accuracy = float(correct.mean()) if len(correct) else 0.0
        return [
            context.artifact(
                png_path.name,
                "Confidence histograms",
                "image",
                f"Top softmax probability per {by} class at epoch {context.epoch}; "
                f"green = right, red = wrong (accuracy {accuracy:.1%}).",
            ),
            context.artifact(csv_path.name, "Confidence histogram counts", "table"),
        ]


def _plot(counts: Any, edges: Any, classes: list[str], by: str, epoch: int, path: Any) -> None:
    """Small multiples, one panel per class, so many classes stay legible."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    n = len(classes)
    cols = min(n, 5) if n <= 20 else math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(2.4 * cols, 1.9 * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, sharex=True, squeeze=False)
    width = edges[1] - edges[0]
    small = 8 if n <= 20 else 6
    for i, ax in enumerate(axes.flat):
        if i >= n:
            ax.set_visible(False)
            continue
        ax.bar(edges[:-1], counts[i, 0], width=width, align="edge", color="tab:green")
        ax.bar(
            edges[:-1],
            counts[i, 1],
            width=width,
            align="edge",
            bottom=counts[i, 0],
            color="tab:red",
        )
        ax.set_title(classes[i][:18], fontsize=small + 1)
        ax.tick_params(labelsize=small)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlim(0, 1)
    fig.suptitle(f"Confidence by {by} class, epoch {epoch} (green right, red wrong)")
    fig.supxlabel("top softmax probability", fontsize=small + 1)
    fig.savefig(path, dpi=100)


@hookimpl
def register_analyzers(register: Any) -> None:
    register(ConfidenceAnalyzer)
