"""Targets of models that are not classifiers: a segmentation region, a detection matched
by IoU, an embedding's similarity. Public through :mod:`explainkit.explain.targets`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from explainkit.errors import AnalyzerError
from explainkit.explain.outputs import describe_output, scores_of
from explainkit.explain.target_base import Target, parse_classes

__all__ = ["Detection", "EmbeddingSimilarity", "SegmentationRegion"]

EMBEDDING_KEYS = ("image_embeds", "embeds", "embeddings", "pooler_output")


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
        self.cls = parse_classes(cls, "SegmentationRegion")
        if isinstance(self.cls, str):
            raise AnalyzerError(
                "a SegmentationRegion target needs a class index (or one per image)"
            )
        self.box: tuple[int, int, int, int] | None = None
        self.mask: Tensor | None = None
        if isinstance(region, str):
            if region != "predicted":
                raise AnalyzerError("region must be 'predicted', a mask or a box (x1, y1, x2, y2)")
        elif isinstance(region, Tensor) and region.dim() >= 2:
            self.mask = region
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
                f"the SegmentationRegion target holds {self.cls.shape[0]} classes for {n} images"
            )
        return self.cls.to(device)

    def scores(self, output: Any) -> Tensor:
        out = scores_of(output)
        if out.dim() != 4:
            raise AnalyzerError(
                "a SegmentationRegion target needs (N, K, H, W) per-pixel scores; the model "
                "returned "
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
        f"a Detection target needs a list of {{boxes, labels, scores}} per image (torchvision's "
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
            raise AnalyzerError("a Detection target with reference boxes needs their labels")
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
            f"an EmbeddingSimilarity target needs (N, D) embeddings (a tensor or "
            "image_embeds); the "
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
