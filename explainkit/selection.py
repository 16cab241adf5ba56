"""Choosing what an analyzer shows: target classes and samples of eval images (public API).

Every function is seeded through the ``rng`` it is given (``context.rng``), returns store
positions as int64 arrays, and breaks ties by position, so a figure is the same on every run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from explainkit.errors import AnalyzerError, brief, did_you_mean

if TYPE_CHECKING:  # pragma: no cover - numpy is imported where it is used, so that plugins can
    import numpy as np  # take SELECT_CHOICES for their options without loading it

__all__ = [
    "MISTAKE_CHOICES",
    "SELECT_CHOICES",
    "parse_target",
    "per_class_sample",
    "sample_indices",
    "select_mistakes",
    "select_right_and_wrong",
    "spread_over_classes",
]

SELECT_CHOICES = ("mixed", "misclassified", "correct")
MISTAKE_CHOICES = ("confident", "random", "per_class")


def parse_target(target: Any, classes: list[str], flag: str) -> str | int:
    """``predicted``/``true`` as is; a class index or a class name as an int index."""
    if isinstance(target, int) and not isinstance(target, bool):
        text = str(target)
    else:
        text = str(target).strip()
    if text in ("predicted", "true"):
        return text
    if text.lstrip("-").isdigit():
        index = int(text)
        if 0 <= index < len(classes):
            return index
        raise AnalyzerError(
            f"{flag} {index} is not a class index of this run; use 0 to {len(classes) - 1}"
        )
    if text in classes:
        return classes.index(text)
    close = did_you_mean(text, classes) if len(text) <= 200 else []
    hint = f"did you mean {close[0]!r}? " if close else ""
    shown = ", ".join(classes[:20]) + (f", … ({len(classes)} classes)" if len(classes) > 20 else "")
    raise AnalyzerError(
        f"{flag} {brief(text)} is not predicted, true, a class index or a class name; "
        f"{hint}classes: {shown}"
    )


def sample_indices(num_images: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """A seeded sample of ``count`` store positions, sorted (all images when fewer)."""
    import numpy as np

    if num_images == 0:
        raise AnalyzerError("the store has no eval images to explain")
    if count >= num_images:
        return np.arange(num_images, dtype=np.int64)
    return np.sort(rng.choice(num_images, size=count, replace=False)).astype(np.int64)


def select_right_and_wrong(
    labels: np.ndarray, predicted: np.ndarray, count: int, select: str, rng: np.random.Generator
) -> np.ndarray:
    """Up to ``count`` positions, misclassified first, each group in index order.

    ``mixed`` takes half (rounded down) misclassified and fills up with correct ones (or the
    other way round when one kind runs short); the sample within each kind is seeded.
    """
    import numpy as np

    wrong = np.flatnonzero(predicted != labels)
    right = np.flatnonzero(predicted == labels)
    if select == "misclassified":
        want_wrong, want_right = count, 0
    elif select == "correct":
        want_wrong, want_right = 0, count
    elif select == "mixed":
        want_wrong = min(count // 2, wrong.size)
        want_right = min(count - want_wrong, right.size)
        want_wrong = min(count - want_right, wrong.size)
    else:
        raise AnalyzerError(f"unknown selection {select!r}; use {', '.join(SELECT_CHOICES)}")

    def sample(pool: np.ndarray, k: int) -> np.ndarray:
        k = min(k, pool.size)
        return np.sort(rng.choice(pool, size=k, replace=False)) if k else pool[:0]

    return np.concatenate([sample(wrong, want_wrong), sample(right, want_right)]).astype(np.int64)


def select_mistakes(
    candidates: np.ndarray,
    targets: np.ndarray,
    confidence: np.ndarray,
    count: int,
    select: str,
    rng: np.random.Generator,
) -> np.ndarray:
    """Pick up to ``count`` positions from ``candidates``, in display order.

    ``confident``: highest confidence first. ``random``: a seeded sample, then shown highest
    confidence first. ``per_class``: round-robin over true classes in class order, each class's
    mistakes taken most confident first. Ties break by eval position.
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
    raise AnalyzerError(f"unknown selection {select!r}; use {', '.join(MISTAKE_CHOICES)}")


def per_class_sample(
    targets: np.ndarray, num_classes: int, per_class: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``per_class`` random positions per class, and their grid cells (row = class)."""
    import numpy as np

    perm = rng.permutation(len(targets))
    order = perm[np.argsort(targets[perm], kind="stable")]
    sorted_targets = targets[order]
    rank = np.arange(len(order)) - np.searchsorted(sorted_targets, sorted_targets, side="left")
    keep = rank < per_class
    return order[keep], sorted_targets[keep] * per_class + rank[keep]


def spread_over_classes(sample: np.ndarray, labels: np.ndarray, count: int) -> np.ndarray:
    """Up to ``count`` positions from ``sample``, round-robin over classes (more variety)."""
    import numpy as np

    by_class = {c: list(sample[labels == c]) for c in np.unique(labels)}
    chosen: list[int] = []
    while len(chosen) < min(count, len(sample)):
        for c in list(by_class):
            if by_class[c] and len(chosen) < count:
                chosen.append(int(by_class[c].pop(0)))
    return np.sort(np.asarray(chosen, dtype=np.int64))
