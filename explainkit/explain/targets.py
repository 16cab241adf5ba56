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

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from explainkit.errors import AnalyzerError
from explainkit.explain.outputs import describe_output, scores_of

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
]

EMBEDDING_KEYS = ("image_embeds", "embeds", "embeddings", "pooler_output")


class Target:
    """Base class: ``scores(output)`` is the (N,) scalar per image whose gradient is explained.

    Attributes:
        per_image: names of attributes holding one entry per image (cut by :meth:`take`).
    """

    per_image: tuple[str, ...] = ()

    def scores(self, output: Any) -> Tensor:
        """(N,) differentiable scores of the model's ``output``."""
        raise NotImplementedError

    def objective(self, output: Any) -> tuple[Tensor, Tensor]:
        """``(tensor, grad_outputs)`` whose vector-Jacobian product is d(sum of scores)."""
        s = self.scores(output)
        return s, torch.ones_like(s)

    def classes(self, output: Any, n: int) -> Tensor:
        """(N,) int64: the class each image's map explains, -1 where none is (embeddings)."""
        return torch.full((n,), -1, dtype=torch.int64)

    def take(self, index: Tensor) -> Target:
        """This target for the images ``index`` (a batch, or the same images repeated, as
        Captum's Integrated Gradients repeats them per step)."""
        if not self.per_image:
            return self
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        for name in self.per_image:
            value = getattr(self, name)
            if isinstance(value, Tensor) and value.dim() > 0:
                setattr(new, name, value[index.to(value.device)])
            elif isinstance(value, list):
                setattr(new, name, [value[int(i)] for i in index])
        return new

    def _count(self, n: int) -> None:
        for name in self.per_image:
            value = getattr(self, name)
            size = len(value) if isinstance(value, (list, Tensor)) and _has_len(value) else None
            if size is not None and size != n:
                raise AnalyzerError(
                    f"{type(self).__name__} holds {size} {name} for {n} images; give one per "
                    "image, or one for all"
                )


def _has_len(value: Any) -> bool:
    return not isinstance(value, Tensor) or value.dim() > 0


def _classes(value: Any, what: str) -> Any:
    """``"predicted"``, an int, or an int64 tensor of one class per image."""
    if isinstance(value, str):
        if value != "predicted":
            raise AnalyzerError(f"{what} must be 'predicted', a class index or one per image")
        return value
    if isinstance(value, bool):
        raise AnalyzerError(f"{what} must be a class index, not {value!r}")
    if isinstance(value, int):
        return value
    t = torch.as_tensor(value)
    if t.dim() != 1 or t.is_floating_point() or t.dtype == torch.bool:
        raise AnalyzerError(f"{what} must be integer class indices, one per image")
    return t.to(torch.int64)


class _ClassBase(Target):
    """A class (or label) of an (N, C) output: predicted, one for all, or one per image."""

    per_image = ("index",)

    def __init__(self, index: str | int | Tensor | Sequence[int] = "predicted") -> None:
        self.index = _classes(index, type(self).__name__)

    def _logits(self, output: Any) -> Tensor:
        logits = scores_of(output)
        if logits.dim() != 2:
            raise AnalyzerError(
                f"{type(self).__name__} needs (N, C) scores; the model returned "
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
            raise AnalyzerError(f"{what} output {k} is not in [0, {y.shape[1]})")
        return y[:, k]
    if y.dim() == 1 and index in (None, 0):
        return y
    raise AnalyzerError(
        f"{what} needs (N,) or (N, 1) outputs (or an index into (N, K)); the model returned "
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


class SegmentationRegion(Target):
    """A class's per-pixel scores summed over a region of (N, K, H, W) segmentation output.

    Args:
        cls: the class, one for all images or one per image.
        region: ``"predicted"`` (the pixels whose argmax is ``cls``), a mask ((H, W) for all
            images or (N, H, W), bool or float weights) at the output's resolution, or a box
            ``(x1, y1, x2, y2)`` in output pixels (end-exclusive).
    """

    per_image = ("cls", "mask")

    def __init__(
        self,
        cls: int | Sequence[int] | Tensor,
        region: str | Tensor | Sequence[float] = "predicted",
    ) -> None:
        self.cls = _classes(cls, "SegmentationRegion's class")
        if isinstance(self.cls, str):
            raise AnalyzerError("SegmentationRegion needs a class index (or one per image)")
        self.box: tuple[int, int, int, int] | None = None
        self.mask: Tensor | None = None
        if isinstance(region, str):
            if region != "predicted":
                raise AnalyzerError("region must be 'predicted', a mask or a box (x1, y1, x2, y2)")
        elif isinstance(region, Tensor) and region.dim() >= 2:
            self.mask = region if region.dim() == 3 else region
        else:
            box = [int(round(float(v))) for v in region]  # type: ignore[union-attr]
            if len(box) != 4 or box[2] <= box[0] or box[3] <= box[1]:
                raise AnalyzerError(f"a box is (x1, y1, x2, y2) with x1 < x2, y1 < y2; got {box}")
            self.box = (box[0], box[1], box[2], box[3])
        if self.mask is None or self.mask.dim() == 2:
            self.per_image = ("cls",)

    def _cls(self, n: int, device: torch.device) -> Tensor:
        if isinstance(self.cls, int):
            return torch.full((n,), self.cls, dtype=torch.int64, device=device)
        if self.cls.shape[0] != n:
            raise AnalyzerError(
                f"SegmentationRegion holds {self.cls.shape[0]} classes for {n} images"
            )
        return self.cls.to(device)

    def scores(self, output: Any) -> Tensor:
        out = scores_of(output)
        if out.dim() != 4:
            raise AnalyzerError(
                "SegmentationRegion needs (N, K, H, W) per-pixel scores; the model returned "
                f"{describe_output(out)}"
            )
        n, k, h, w = out.shape
        cls = self._cls(n, out.device)
        if bool((cls >= k).any()) or bool((cls < 0).any()):
            raise AnalyzerError(f"segmentation class must lie in [0, {k})")
        picked = out.gather(1, cls.view(n, 1, 1, 1).expand(n, 1, h, w))[:, 0]
        if self.box is not None:
            x1, y1, x2, y2 = self.box
            weight = torch.zeros((h, w), dtype=out.dtype, device=out.device)
            weight[max(y1, 0) : y2, max(x1, 0) : x2] = 1.0
        elif self.mask is not None:
            weight = self.mask.to(out.device, out.dtype)
            if tuple(weight.shape[-2:]) != (h, w):
                raise AnalyzerError(
                    f"the region mask is {tuple(weight.shape[-2:])} but the output is {h}x{w}; "
                    "give the mask at the output's resolution"
                )
        else:
            weight = (out.detach().argmax(1) == cls.view(n, 1, 1)).to(out.dtype)
        return (picked * weight).sum((-2, -1))

    def classes(self, output: Any, n: int) -> Tensor:
        return self._cls(n, torch.device("cpu"))


def _detections(output: Any) -> list[Mapping[str, Tensor]]:
    if isinstance(output, (list, tuple)) and all(
        isinstance(o, Mapping) and {"boxes", "scores", "labels"} <= set(o) for o in output
    ):
        return list(output)
    raise AnalyzerError(
        f"Detection needs a list of {{boxes, labels, scores}} per image (torchvision's "
        f"detectors in eval mode); the model returned {describe_output(output)}"
    )


class Detection(Target):
    """Reference boxes, each matched to the detection it overlaps most.

    A match (IoU above ``iou_threshold`` and the same label) scores its IoU plus its class
    score, and an image scores the sum over its references: what makes the detector find
    these objects, where it found them (pytorch-grad-cam's ``FasterRCNNBoxScoreTarget``).
    ``with_iou=False`` keeps the class scores only. An image with no match scores a constant
    zero, so its map is zero.

    Args:
        boxes: per image, (K, 4) ``x1, y1, x2, y2`` in input pixels (a list, one per image),
            or one (K, 4) for every image; or ``"top"``: each image's highest-scoring
            detection.
        labels: per image, (K,) labels of the boxes (or one (K,) for all images); unused
            with ``"top"``.
    """

    per_image = ("boxes", "labels")

    def __init__(
        self,
        boxes: str | Tensor | Sequence[Any] = "top",
        labels: Tensor | Sequence[Any] | None = None,
        iou_threshold: float = 0.5,
        with_iou: bool = True,
    ) -> None:
        self.iou_threshold, self.with_iou = float(iou_threshold), with_iou
        if isinstance(boxes, str):
            if boxes != "top":
                raise AnalyzerError("boxes must be 'top' or reference boxes (x1, y1, x2, y2)")
            self.boxes, self.labels, self.per_image = None, None, ()
            return
        if labels is None:
            raise AnalyzerError("Detection with reference boxes needs their labels")
        if isinstance(boxes, Tensor) and boxes.dim() == 2:
            self.boxes = self.labels = None
            self._shared = (boxes.float(), torch.as_tensor(labels).long())
            self.per_image = ()
            return
        self.boxes = [torch.as_tensor(b, dtype=torch.float32).reshape(-1, 4) for b in boxes]
        self.labels = [torch.as_tensor(t).long().reshape(-1) for t in labels]  # type: ignore[union-attr]

    def _references(self, dets: list[Mapping[str, Tensor]]) -> list[tuple[Tensor, Tensor]]:
        if self.boxes is not None:
            self._count(len(dets))
            return list(zip(self.boxes, self.labels, strict=True))  # type: ignore[arg-type]
        if hasattr(self, "_shared"):
            return [self._shared] * len(dets)
        refs = []
        for d in dets:  # "top": each image's best detection explains itself
            if len(d["scores"]) == 0:
                refs.append((torch.zeros((0, 4)), torch.zeros((0,), dtype=torch.int64)))
                continue
            best = int(d["scores"].detach().argmax())
            refs.append((d["boxes"][best : best + 1].detach(), d["labels"][best : best + 1]))
        return refs

    def scores(self, output: Any) -> Tensor:
        from torchvision.ops import box_iou

        dets = _detections(output)
        out = []
        for d, (ref_boxes, ref_labels) in zip(dets, self._references(dets), strict=True):
            boxes = d["boxes"]
            total = boxes.new_zeros(())
            if len(boxes) == 0:
                out.append(total)
                continue
            ious = box_iou(ref_boxes.to(boxes.device, boxes.dtype), boxes)
            for k in range(ious.shape[0]):
                best = ious[k].argmax()
                if ious[k, best] > self.iou_threshold and int(d["labels"][best]) == int(
                    ref_labels[k]
                ):
                    total = total + d["scores"][best] + (ious[k, best] if self.with_iou else 0)
            out.append(total)
        return torch.stack(out)

    def classes(self, output: Any, n: int) -> Tensor:
        refs = self._references(_detections(output))
        return torch.tensor([int(labels[0]) if len(labels) else -1 for _, labels in refs])


def _embedding(output: Any) -> Tensor:
    if isinstance(output, Tensor):
        emb = output
    elif isinstance(output, Mapping):
        emb = next((output[k] for k in EMBEDDING_KEYS if isinstance(output.get(k), Tensor)), None)
    else:
        emb = next(
            (
                getattr(output, k)
                for k in EMBEDDING_KEYS
                if isinstance(getattr(output, k, None), Tensor)
            ),
            None,
        )
    if emb is None or emb.dim() != 2:
        raise AnalyzerError(
            f"EmbeddingSimilarity needs (N, D) embeddings (a tensor or image_embeds); the "
            f"model returned {describe_output(output)}"
        )
    return emb


class EmbeddingSimilarity(Target):
    """Cosine similarity of each image's embedding to a reference embedding.

    ``reference``: (D,) for every image (a text embedding of a CLIP-like model) or (N, D)
    one per image (e.g. another image's embedding). The explained model returns (N, D)
    embeddings: explain the image tower itself (``clip.visual``) or a module calling
    ``get_image_features``.
    """

    per_image = ("reference",)

    def __init__(self, reference: Tensor) -> None:
        ref = torch.as_tensor(reference).detach().float()
        if ref.dim() not in (1, 2):
            raise AnalyzerError("the reference embedding must be (D,) or (N, D)")
        self.reference = ref
        if ref.dim() == 1:
            self.per_image = ()

    def scores(self, output: Any) -> Tensor:
        emb = _embedding(output)
        ref = self.reference.to(emb.device, emb.dtype)
        if ref.shape[-1] != emb.shape[1]:
            raise AnalyzerError(
                f"the reference has {ref.shape[-1]} dimensions, the embeddings {emb.shape[1]}"
            )
        return F.cosine_similarity(emb, ref.expand_as(emb), dim=1)


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
