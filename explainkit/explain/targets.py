"""What is explained: a target turns a model's output into one score per image.

Every gradient method (the CAM engine, Captum through :class:`TargetModel`) differentiates one
scalar per image. A classifier's class logit is the common case, but a detector, a segmenter,
a multi-label or binary classifier, a regression head or an embedding model each have their
own scalar worth explaining. A :class:`Target` is that choice, made once:

- :class:`ClassLogit` / :class:`ClassProbability`: a class of an (N, C) classifier;
- :class:`MultiLabel`: one label of a multi-label model (its logit or sigmoid);
- :class:`Binary`: a one-output (sigmoid) classifier, either side;
- :class:`Regression`: one output of a regression head;
- :class:`SegmentationRegion`: a class's scores summed over a region (the predicted mask, a
  given mask or a box), as pytorch-grad-cam's ``SemanticSegmentationTarget``;
- :class:`Detection`: each reference box's matched detection (IoU above a threshold, same
  label): its IoU plus its class score, as pytorch-grad-cam's ``FasterRCNNBoxScoreTarget``;
- :class:`EmbeddingSimilarity`: cosine similarity of an embedding to a reference (another
  image's embedding, or a text embedding of a CLIP-like model);
- :class:`FinerContrast`: Finer-CAM's contrast of a class with its closest rivals.

Outputs of any shape are adapted by :func:`explainkit.explain.outputs.scores_of` (tensors,
tuples, dicts with ``logits``/``out``, transformers ``ModelOutput``); detection outputs are
torchvision's list of ``{boxes, labels, scores}`` dicts, one per image.

Per-image data (classes, masks, boxes, references) is cut with its images
(:meth:`Target.take`), so a target for 1,000 images is explained in batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from explainkit.errors import AnalyzerError
from explainkit.explain.outputs import describe_output, scores_of
from explainkit.explain.target_base import Target
from explainkit.explain.target_base import parse_classes as _classes
from explainkit.explain.task_targets import Detection, EmbeddingSimilarity, SegmentationRegion

__all__ = [
    "Binary",
    "ClassLogit",
    "ClassProbability",
    "Detection",
    "EmbeddingSimilarity",
    "FinerContrast",
    "MultiLabel",
    "Regression",
    "SegmentationRegion",
    "Target",
    "TargetModel",
    "as_target",
    "class_target",
    "split_score_kind",
]

# --gradcam-target prefixes: which score of a class is explained.
SCORE_KINDS = ("logit", "probability", "sigmoid")


class _ClassBase(Target):
    """A class (or label) of an (N, C) output: predicted, one for all, or one per image."""

    per_image = ("index",)

    def __init__(self, index: str | int | Tensor | Sequence[int] = "predicted") -> None:
        self.index = _classes(index, type(self).__name__)

    def _logits(self, output: Any) -> Tensor:
        logits = scores_of(output)
        if logits.dim() != 2:
            raise AnalyzerError(
                f"the {type(self).__name__} target needs (N, C) scores; the model returned "
                f"{describe_output(logits)}: use SegmentationRegion, Regression or Binary"
            )
        return logits

    def _index(self, logits: Tensor) -> Tensor:
        n, c = logits.shape
        if isinstance(self.index, str):
            return logits.detach().argmax(1)
        if isinstance(self.index, int):
            if not 0 <= self.index < c:
                raise AnalyzerError(f"target class {self.index} is not in [0, {c})")
            return torch.full((n,), self.index, dtype=torch.int64, device=logits.device)
        t = self.index
        if t.shape[0] != n:
            raise AnalyzerError(
                f"targets must be {n} integer class indices, one per image; got {t.shape[0]}"
            )
        # Checked only on the CPU: a check on the device would cost a sync per batch.
        if t.device.type == "cpu" and ((t < 0) | (t >= c)).any():
            raise AnalyzerError(f"targets must lie in [0, {c})")
        return t.to(logits.device, non_blocking=True)

    def classes(self, output: Any, n: int) -> Tensor:
        return self._index(self._logits(output))

    def take(self, index: Tensor) -> Target:
        if not isinstance(self.index, Tensor):
            return self
        return super().take(index)


class ClassLogit(_ClassBase):
    """The logit of a class: ``"predicted"`` (argmax), one index, or one per image."""

    def scores(self, output: Any) -> Tensor:
        logits = self._logits(output)
        return logits.gather(1, self._index(logits)[:, None])[:, 0]

    def objective(self, output: Any) -> tuple[Tensor, Tensor]:
        # The one-hot matrix is the gradient of the logits: no gather/sum nodes to record.
        logits = self._logits(output)
        onehot = torch.zeros_like(logits).scatter_(1, self._index(logits)[:, None], 1.0)
        return logits, onehot


class ClassProbability(_ClassBase):
    """The softmax probability of a class (it also falls when rival classes rise)."""

    def scores(self, output: Any) -> Tensor:
        logits = self._logits(output)
        return logits.softmax(1).gather(1, self._index(logits)[:, None])[:, 0]


class MultiLabel(_ClassBase):
    """One label of a multi-label model: its logit, or its sigmoid when ``probability``.

    Each label is explained by its own target (``MultiLabel(3)``); ``"predicted"`` is the
    highest-scoring label of each image.
    """

    def __init__(
        self, label: str | int | Tensor | Sequence[int] = "predicted", probability: bool = False
    ) -> None:
        super().__init__(label)
        self.probability = probability

    def scores(self, output: Any) -> Tensor:
        logits = self._logits(output)
        picked = logits.gather(1, self._index(logits)[:, None])[:, 0]
        return picked.sigmoid() if self.probability else picked


def _single(output: Any, what: str, index: int | None = None) -> Tensor:
    """(N,) from an (N,), (N, 1) or (N, K) output (``index`` picks one of K)."""
    y = scores_of(output)
    if y.dim() == 2 and (index is not None or y.shape[1] == 1):
        k = 0 if index is None else index
        if not 0 <= k < y.shape[1]:
            raise AnalyzerError(f"the {what} target's output {k} is not in [0, {y.shape[1]})")
        return y[:, k]
    if y.dim() == 1 and index in (None, 0):
        return y
    raise AnalyzerError(
        f"the {what} target needs (N,) or (N, 1) outputs (or an index into (N, K)); "
        "the model returned "
        f"{describe_output(y)}"
    )


class Binary(Target):
    """A one-output classifier: the logit for ``positive``, its negation for the other side.

    ``side``: ``"positive"``, ``"negative"`` or ``"predicted"`` (the side the logit is on).
    ``probability`` explains the sigmoid (or 1 - sigmoid) instead of the logit.
    """

    def __init__(self, side: str = "positive", probability: bool = False) -> None:
        if side not in ("positive", "negative", "predicted"):
            raise AnalyzerError(f"side must be positive, negative or predicted, not {side!r}")
        self.side, self.probability = side, probability

    def _signs(self, logit: Tensor) -> Tensor:
        if self.side == "predicted":
            return torch.where(logit.detach() >= 0, 1.0, -1.0).to(logit.dtype)
        return torch.full_like(logit, 1.0 if self.side == "positive" else -1.0)

    def scores(self, output: Any) -> Tensor:
        logit = _single(output, "Binary")
        signed = self._signs(logit) * logit
        return signed.sigmoid() if self.probability else signed

    def classes(self, output: Any, n: int) -> Tensor:
        return (self._signs(_single(output, "Binary")) > 0).long()


class Regression(Target):
    """A regression output: ``index`` into (N, K) outputs, or the only one of (N,) / (N, 1).

    ``sign=-1`` explains what lowers the prediction instead of what raises it.
    """

    def __init__(self, index: int | None = None, sign: float = 1.0) -> None:
        self.index, self.sign = index, float(sign)

    def scores(self, output: Any) -> Tensor:
        return self.sign * _single(output, "Regression", self.index)


class FinerContrast(_ClassBase):
    """Finer-CAM (Zhang et al. 2025, arXiv:2501.11309): a class against its closest rivals.

    The rivals are the ``comparisons``-th closest logits to the class's own (1, 2, 3: the
    three most similar classes); the score is ``sum_c p_c (y - alpha y_c) / sum_c p_c`` with
    ``p`` the softmax, so what the class shares with similar classes cancels out.
    """

    def __init__(
        self,
        index: str | int | Tensor | Sequence[int] = "predicted",
        alpha: float = 1.0,
        comparisons: Sequence[int] = (1, 2, 3),
    ) -> None:
        super().__init__(index)
        self.alpha, self.comparisons = float(alpha), tuple(comparisons)

    def scores(self, output: Any) -> Tensor:
        logits = self._logits(output)
        main = self._index(logits)
        y = logits.gather(1, main[:, None])
        ranks = [r for r in self.comparisons if r < logits.shape[1]]
        if not ranks:
            return y[:, 0]
        order = torch.argsort((logits.detach() - y.detach()).abs(), dim=1, stable=True)
        rivals = order[:, list(ranks)]
        p = logits.softmax(1).gather(1, rivals)
        diff = y - self.alpha * logits.gather(1, rivals)
        return (p * diff).sum(1) / (p.sum(1) + 1e-9)


def as_target(
    target: str | int | Tensor | Sequence[int] | Target,
    true_targets: Tensor | Sequence[int] | None = None,
) -> Target:
    """A :class:`Target` from what ``compute_cam`` accepts: a Target as it is; ``"predicted"``,
    ``"true"`` (with ``true_targets``), a class index or one per image as :class:`ClassLogit`.
    """
    if isinstance(target, Target):
        return target
    if isinstance(target, str):
        if target == "true":
            if true_targets is None:
                raise AnalyzerError("target='true' needs true_targets (one label per image)")
            return ClassLogit(true_targets)
        if target != "predicted":
            raise AnalyzerError(
                f"unknown target {target!r}; use 'predicted', 'true', a class index, one "
                "index per image, or a Target (explainkit.explain.targets)"
            )
    if isinstance(target, (Tensor, list, tuple)):
        t = torch.as_tensor(target)
        if t.dim() != 1 or t.is_floating_point() or t.dtype == torch.bool:
            raise AnalyzerError(
                f"targets must be integer class indices, one per image; got {t.dtype} "
                f"{tuple(t.shape)}"
            )
    return ClassLogit(target)


class TargetModel(nn.Module):
    """``model`` whose forward returns its target's score as (N, 1): for Captum
    (``attribute(x, target=0)``). A per-image target follows batches that repeat the images
    (Integrated Gradients' steps); the wrapped model stays a submodule, so its layers are the
    same objects."""

    def __init__(self, model: nn.Module, target: Target) -> None:
        super().__init__()
        self.model, self.target = model, target

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        target = self.target
        n = _per_image_count(target)
        if n and x.shape[0] != n:
            if x.shape[0] % n:
                raise AnalyzerError(f"the target holds {n} images, the batch {x.shape[0]}")
            target = target.take(torch.arange(x.shape[0]) % n)
        return target.scores(self.model(x, *args, **kwargs))[:, None]


def _per_image_count(target: Target) -> int:
    for name in target.per_image:
        value = getattr(target, name)
        if isinstance(value, list) or (isinstance(value, Tensor) and value.dim() > 0):
            return len(value)
    return 0


def split_score_kind(text: str) -> tuple[str, str]:
    """``"probability:cat"`` -> ``("probability", "cat")``; else ``("logit", text)``."""
    kind, colon, rest = str(text).strip().partition(":")
    if colon and kind in SCORE_KINDS:
        return kind, rest.strip()
    return "logit", str(text).strip()


def class_target(kind: str, classes: Any) -> Target:
    """The :class:`Target` of a class score of ``kind`` (one of :data:`SCORE_KINDS`)."""
    if kind == "probability":
        return ClassProbability(classes)
    if kind == "sigmoid":
        return MultiLabel(classes, probability=True)
    if kind == "logit":
        return ClassLogit(classes)
    raise AnalyzerError(f"unknown score {kind!r}; use one of {', '.join(SCORE_KINDS)}")
