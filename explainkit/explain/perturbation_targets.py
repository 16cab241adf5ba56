"""Targets for the perturbation CAMs: chosen once on the intact image, scored on each copy.

A gradient CAM reads its target from one output, so a target's own choices (the
``"predicted"`` class, the ``"top"`` detection, the predicted region of a class) come from
that output. A perturbation CAM scores hundreds of perturbed copies of each image; were the
choices made again on every copy, each masked input would be scored on whatever it now
looks like most (its own best box, its own argmax class), and the weights would say nothing
about the object explained. :func:`fix_target` therefore makes every such choice on the
intact image's output, as pytorch-grad-cam's targets hold fixed boxes, classes and masks.
Each perturbed copy is then scored by the target cut to its image (:meth:`Target.take` with
the copy's owner), so detections are matched by IoU on each copy's own output.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from explainkit.errors import AnalyzerError
from explainkit.explain.cams.base import logits_and_predicted
from explainkit.explain.outputs import scores_of
from explainkit.explain.target_base import Target as ScoreTarget
from explainkit.explain.targets import (
    Binary,
    ClassLogit,
    ClassProbability,
    Detection,
    FinerContrast,
    MultiLabel,
    SegmentationRegion,
)

__all__ = [
    "Target",
    "cut_targets",
    "explained_targets",
    "fix_target",
    "output_rows",
    "pick_scores",
    "resolve_targets",
    "score_copies",
    "varies",
]

# What the perturbation CAMs accept: "predicted", "true", class indices, or a Target object.
Target = str | int | Tensor | Sequence[int] | ScoreTarget


class _FixedSides(Binary):
    """A :class:`Binary` ``"predicted"`` target whose side per image is already chosen."""

    per_image = ("signs",)

    def __init__(self, signs: Tensor, probability: bool) -> None:
        self.side, self.signs, self.probability = "predicted", signs, probability

    def _signs(self, logit: Tensor) -> Tensor:
        return self.signs.to(logit.device, logit.dtype)


def fix_target(target: ScoreTarget, output: Any, n: int) -> ScoreTarget:
    """``target`` with the choices it makes from a model's output made on ``output`` (the
    intact images'): the ``"predicted"`` class or label, the ``"top"`` detection, a class's
    predicted region, the predicted side of a binary output. Targets without such a choice
    (given classes, boxes, masks, references) and unknown subclasses are returned as they
    are."""
    classes = (ClassLogit, ClassProbability, MultiLabel, FinerContrast)
    if isinstance(target, classes) and isinstance(target.index, str):
        fixed = copy.copy(target)
        fixed.index = target.classes(output, n)
        return fixed
    if isinstance(target, Detection) and _is_top(target):
        target.scores(output)  # not detections: the target's own one-sentence error
        tops = [int(d["scores"].argmax()) if len(d["scores"]) else None for d in output]
        boxes = [_row(d["boxes"], i, (0, 4)) for d, i in zip(output, tops, strict=True)]
        labels = [_row(d["labels"], i, (0,)) for d, i in zip(output, tops, strict=True)]
        return Detection(boxes, labels, target.iou_threshold, target.with_iou)
    if isinstance(target, SegmentationRegion) and target.box is None and target.mask is None:
        out = scores_of(output)
        if out.dim() == 4:  # else scoring raises the target's own one-sentence error
            cls = target.classes(output, n).to(out.device)
            mask = (out.argmax(1) == cls.view(n, 1, 1)).float()
            return SegmentationRegion(target.cls, mask)
    if type(target) is Binary and target.side == "predicted":
        logit = Binary("positive").scores(output)
        return _FixedSides(torch.where(logit >= 0, 1.0, -1.0), target.probability)
    return target


def _is_top(target: Detection) -> bool:
    """``Detection("top")``: no reference boxes, per image or shared."""
    return target.boxes is None and getattr(target, "_shared", None) is None


def _row(values: Tensor, i: int | None, empty: tuple[int, ...]) -> Tensor:
    """Row ``i`` of ``values`` kept 2-D (1-D for labels), or an empty one when ``i`` is None."""
    if i is None:
        return values.new_zeros(empty)
    return values[i : i + 1].detach()


def output_rows(output: Any) -> int:
    """How many images a model's output holds (-1 when it cannot tell)."""
    if isinstance(output, Tensor):
        return int(output.shape[0])
    if isinstance(output, (list, tuple)) and output and isinstance(output[0], Mapping):
        return len(output)
    try:
        return int(scores_of(output).shape[0])
    except AnalyzerError:
        return -1


def varies(scores: Tensor, base: Tensor) -> Tensor:
    """(N,) 0.0 where a target scores the same on every perturbed copy (N, K) of an image as on
    the intact image (N,), else 1.0. Such a score (no detection matches the boxes, an empty
    region) does not depend on the model, so its map is zero, as a gradient CAM makes it,
    with the same warning, instead of softmax's uniform weights."""
    same = (scores.amax(1) == scores.amin(1)) & (scores[:, 0] == base) & (scores.shape[1] > 1)
    if bool(same.any()):
        warnings.warn(
            "the target's score does not depend on the model here (no detection matched, or an "
            "empty region), so its maps are zero",
            stacklevel=4,
        )
    return (~same).float()


def score_copies(target: ScoreTarget, output: Any, owners: Tensor) -> Tensor:
    """(B,) float scores of a batch of perturbed copies; ``owners`` (B,) says which of the
    target's images each copy is (its per-image data is cut and repeated to match)."""
    return target.take(owners).scores(output).detach().float()


def resolve_targets(
    target: Target, true_targets: Any, predicted: Tensor, num_classes: int
) -> Tensor:
    """(N,) int64 classes to explain: "predicted", "true", one index, or one per image.

    Raises:
        AnalyzerError: an unknown keyword, a missing label, or an index out of range.
    """
    n, device = predicted.shape[0], predicted.device
    if isinstance(target, str):
        if target == "predicted":
            return predicted
        if target != "true":
            raise AnalyzerError(
                f"unknown target {target!r}; use 'predicted', 'true', a class index or one "
                "index per image"
            )
        if true_targets is None:
            raise AnalyzerError("target='true' needs true_targets (one label per image)")
        target = true_targets
    if isinstance(target, bool):
        raise AnalyzerError(f"target must be a class index, not {target!r}")
    t = torch.full((n,), target) if isinstance(target, int) else torch.as_tensor(target)
    if t.dim() != 1 or t.shape[0] != n or t.is_floating_point() or t.dtype == torch.bool:
        raise AnalyzerError(
            f"targets must be {n} integer class indices, one per image; "
            f"got {t.dtype} {tuple(t.shape)}"
        )
    if t.device.type == "cpu" and ((t < 0) | (t >= num_classes)).any():
        raise AnalyzerError(f"targets must lie in [0, {num_classes})")
    return t.to(device=device, dtype=torch.int64)


def pick_scores(output: Any, targets: Tensor | ScoreTarget, owners: Tensor) -> Tensor:
    """(B,) scores of a batch of perturbed copies, copy ``b`` belonging to image
    ``owners[b]``: the class logit (the fast path) or the fixed target's score."""
    if isinstance(targets, Tensor):
        return scores_of(output).float().gather(1, targets[owners, None])[:, 0]
    return score_copies(targets, output, owners)


def cut_targets(targets: Tensor | ScoreTarget, sl: slice, n: int) -> Tensor | ScoreTarget:
    """The targets of images ``sl`` of ``n``."""
    if isinstance(targets, Tensor):
        return targets[sl]
    return targets.take(torch.arange(n)[sl])


def explained_targets(target: Target, true_targets: Any, output: Any, n: int) -> tuple:
    """What is explained: class indices (the fast path) or a :class:`ScoreTarget` fixed on the
    intact images (:func:`fix_target`); their (N,) scores on the intact images; and the
    CAMResult's targets, predicted, logits (and scores)."""
    if isinstance(target, ScoreTarget):
        fixed = fix_target(target, output, n)
        scores = fixed.scores(output).detach().float()
        logits, predicted = logits_and_predicted(output, scores, n)
        classes = fixed.classes(output, n).to(scores.device)
        return fixed, scores, (classes, predicted, logits, scores)
    logits = scores_of(output).detach().float()
    if logits.dim() != 2:
        raise AnalyzerError(
            "a class index is explained on (N, C) logits; for other outputs pass a Target "
            "(explainkit.explain.targets: Detection, SegmentationRegion, ...)"
        )
    targets = resolve_targets(target, true_targets, logits.argmax(1), logits.shape[1])
    return targets, logits.gather(1, targets[:, None])[:, 0], (targets, logits.argmax(1), logits)
