"""Where a classifier's errors go, for any number of classes, in bounded memory (public API).

A dense confusion matrix costs K² cells: 8 MB at 1,000 classes, 3.5 GB at 21,000, and a
figure of it cannot name its classes. Here the matrix is kept sparse (one entry per
``(true, predicted)`` pair that occurs, at most one per image), and what a page shows of it is
bounded whatever K is: the largest off-diagonal cells, the worst classes, and CSV files of
everything. Figures are built on :mod:`explainkit.figures`, so they respect its size cap and
smallest font.

Import inside ``Analyzer.run``; it imports numpy and matplotlib.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from matplotlib.ticker import MaxNLocator

from explainkit import figures

__all__ = ["Confusions", "predictions_and_confidence", "top_confusions_figure", "worst_figure"]

TOP = 20  # cells or classes a figure shows one by one
CHUNK = 2_000_000  # logits turned into probabilities at a time (16 MB of float64)


def predictions_and_confidence(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The argmax of each row and its softmax probability, a block of rows at a time (no
    float64 copy of an (N, 21,000) matrix)."""
    preds = logits.argmax(axis=1).astype(np.int64)
    confidence = np.empty(len(logits), np.float64)
    rows = max(1, CHUNK // max(logits.shape[1], 1))
    for start in range(0, len(logits), rows):
        block = logits[start : start + rows].astype(np.float64)
        block -= block.max(axis=1, keepdims=True)
        confidence[start : start + rows] = 1.0 / np.exp(block).sum(axis=1)
    return preds, confidence


@dataclass
class Confusions:
    """The nonzero cells of a confusion matrix (rows: true class), sorted by cell code.

    Attributes:
        num_classes: K.
        true, predicted, count: One entry per nonzero cell (diagonal included).
        support: Images per true class (K,).
        correct: Correctly predicted images per class (K,).
    """

    num_classes: int
    true: np.ndarray
    predicted: np.ndarray
    count: np.ndarray
    support: np.ndarray
    correct: np.ndarray

    @classmethod
    def of(cls, targets: np.ndarray, preds: np.ndarray, num_classes: int) -> Confusions:
        """Count the pairs: memory grows with the images, not with K²."""
        k = int(num_classes)
        codes = np.asarray(targets, np.int64) * k + np.asarray(preds, np.int64)
        cells, count = np.unique(codes, return_counts=True)
        true, predicted = np.divmod(cells, k)
        support = np.bincount(targets, minlength=k)[:k]
        correct = np.bincount(true[true == predicted], count[true == predicted], k)[:k]
        return cls(k, true, predicted, count, support, correct.astype(np.int64))

    @property
    def num_images(self) -> int:
        return int(self.count.sum())

    @property
    def overall(self) -> float:
        return float(self.correct.sum() / max(self.num_images, 1))

    @property
    def accuracy(self) -> np.ndarray:
        """Per class; NaN for a class without eval images."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.correct / self.support

    def dense(self) -> np.ndarray:
        """The (K, K) matrix of counts: only for a K whose K² cells are affordable."""
        if self.num_classes > 2000:
            raise ValueError(f"a dense matrix of {self.num_classes} classes is too large")
        matrix = np.zeros((self.num_classes, self.num_classes), np.int64)
        matrix[self.true, self.predicted] = self.count
        return matrix

    def off_diagonal(self) -> np.ndarray:
        """Positions of the error cells, the largest first (ties: by true, then predicted)."""
        errors = np.flatnonzero(self.true != self.predicted)
        order = np.lexsort((self.predicted[errors], self.true[errors], -self.count[errors]))
        return errors[order]

    def worst(self, n: int = TOP) -> np.ndarray:
        """Up to ``n`` classes with eval images, the lowest accuracy first (ties: the larger
        support first, then the class id)."""
        present = np.flatnonzero(self.support > 0)
        acc = self.accuracy[present]
        order = np.lexsort((present, -self.support[present], acc))
        return present[order[:n]]

    def pair_rows(self, classes: list[str]) -> list[list[Any]]:
        """Every error cell as a CSV row, the largest first."""
        rows = []
        for i in self.off_diagonal():
            t, p, c = int(self.true[i]), int(self.predicted[i]), int(self.count[i])
            rows.append([classes[t], classes[p], t, p, c, c / int(self.support[t])])
        return rows


PAIR_HEADER = ["true", "predicted", "true_id", "predicted_id", "count", "fraction_of_true"]


def top_confusions_figure(c: Confusions, classes: list[str], epoch: int, top: int = TOP) -> Any:
    """The ``top`` largest off-diagonal cells as bars ``true → predicted``, with the share of
    the true class each one takes."""
    cells = c.off_diagonal()[:top]
    if not len(cells):
        return figures.message_figure(f"No misclassified eval images at epoch {epoch}.")
    labels = [
        f"{figures.short(classes[c.true[i]], 28)} → {figures.short(classes[c.predicted[i]], 28)}"
        for i in cells
    ]
    counts = c.count[cells]
    shares = counts / c.support[c.true[cells]]
    fig = figures.new_figure(10, max(2.6, 0.3 * len(cells) + 1.4))
    ax = fig.add_subplot()
    y = np.arange(len(cells))
    ax.barh(y, counts, color="C3", height=0.7)
    ax.set_yticks(y, labels, fontsize=9)
    ax.set_ylim(len(cells) - 0.5, -0.5)
    ax.set_xlim(0, float(counts.max()) * 1.25)
    for yi, n, share in zip(y, counts, shares, strict=True):
        ax.text(n, yi, f" {int(n)} ({100 * share:.0f}% of the true class)", va="center", fontsize=8)
    ax.set_xlabel("eval images")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(axis="x", alpha=0.3)
    total = int(len(c.off_diagonal()))
    ax.set_title(
        f"The {len(cells)} largest of {total} confusions (true → predicted), epoch {epoch}",
        fontsize=11,
    )
    return fig


def worst_figure(c: Confusions, classes: list[str], epoch: int, top: int = TOP) -> Any:
    """Left: the ``top`` classes of lowest accuracy; right: the accuracy of every class."""
    worst = c.worst(top)
    fig = figures.new_figure(13, max(3.2, 0.3 * len(worst) + 1.6))
    ax, hist = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    acc = c.accuracy
    y = np.arange(len(worst))
    labels = [f"{figures.short(classes[k], 30)} ({int(c.support[k])})" for k in worst]
    ax.barh(y, 100 * acc[worst], color="C0", height=0.7)
    for yi, k in zip(y, worst, strict=True):
        text = f" {100 * acc[k]:.0f}% ({int(c.correct[k])} of {int(c.support[k])})"
        ax.text(100 * acc[k], yi, text, va="center", fontsize=8)
    ax.set_yticks(y, labels, fontsize=9)
    ax.set_ylim(len(worst) - 0.5, -0.5)
    ax.set_xlim(0, 118)  # room for the labels right of a 100% bar
    ax.set_xticks([0, 20, 40, 60, 80, 100])
    ax.set_xlabel("accuracy (%)")
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(f"The {len(worst)} worst classes (eval images in brackets)", fontsize=11)
    present = acc[c.support > 0]
    hist.hist(100 * present, bins=np.linspace(0, 100, 21), color="C0", alpha=0.8)
    hist.set_xlabel("accuracy (%)")
    hist.set_ylabel("classes")
    hist.yaxis.set_major_locator(MaxNLocator(integer=True))
    hist.set_title(f"All {len(present)} classes with eval images", fontsize=11)
    hist.grid(alpha=0.3)
    fig.suptitle(f"Per-class accuracy, epoch {epoch}: {100 * c.overall:.2f}% overall", fontsize=12)
    return fig
