"""Evaluating a multi-label, segmentation or detection model: one path for the task trainer
and ``explainkit evaluate``.

A model's outputs are adapted once into what each task records: a multi-label model's
logits (N, K); a segmenter's per-pixel logits (N, K, H, W) at the input's size (a
transformers segmenter predicts at a quarter of it); a detector's boxes, scores and labels per
image, from torchvision's list of ``{boxes, labels, scores}`` (label 0 its background) or
from a transformers detector's ``logits`` (the last class "no object") and ``pred_boxes``
(centre, width and height in [0, 1]). :class:`TaskScores` then accumulates batch by batch and
returns what the store records, the eval loss and the task's headline score (``eval_acc``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from explainkit.errors import DataError, ExplainkitError
from explainkit.store.schema import MAX_SEGMENTATION_CLASSES
from explainkit.task_metrics import IGNORE, confusion, detection_map, mean_iou

__all__ = [
    "MAX_DETECTIONS",
    "METRICS",
    "coco_detector",
    "TaskScores",
    "detections_of",
    "detection_targets",
    "device_truth",
    "frozen_norm_losses",
    "segmentation_logits",
    "takes_image_list",
    "task_results",
    "task_split",
]

MAX_DETECTIONS = 20  # kept per image, the highest scores first (a store's detections)
MIN_SCORE = 0.05  # weaker detections are not recorded (torchvision's own default threshold)
METRICS = {"multilabel": "label acc", "segmentation": "mIoU", "detection": "mAP@0.5"}


def task_split(ds: Any, task: str, dataset: str) -> Any:
    """The eval split as a ``task`` model sees it: the classes it scores (a segmenter's with
    the background first); the split itself for classification.

    Raises:
        DataError: The split has no annotations for ``task`` (one sentence naming the
            datasets that have them).
    """
    from dataclasses import replace

    from explainkit.data.tasks import require_task, task_classes

    if task == "classification":
        return ds
    if task == "video":
        if ds.clips is None:
            raise DataError(
                f"a video model needs clips; {dataset} has images (use --dataset clips, or "
                "give a Dataset with clips)"
            )
        return ds
    require_task(ds.annotations, task, dataset)
    return replace(ds, classes=task_classes(task, list(ds.classes)))


def coco_detector(
    entry: Any, model: nn.Module, weights: Any, classes: list[str], kwargs: dict[str, Any]
) -> tuple[nn.Module, dict[str, Any], str] | None:
    """(the detector with COCO's head, its build arguments, what was matched in words) when
    ``weights`` are a COCO detector's (torchvision's ``COCO_V1``) and the dataset's classes
    are not COCO's 91 ids: a build that takes ``label_names`` relabels its detections by
    name. None when the weights fit the model as it is or the build takes no names."""
    from explainkit.registries import accepted_kwargs

    if "label_names" not in accepted_kwargs(entry.build, {"label_names": None}):
        return None
    if _same_shapes(model.state_dict(), weights.state_dict):
        return None
    own = {**kwargs, "label_names": classes}
    coco = entry.build(len(classes), **own)
    if not _same_shapes(coco.state_dict(), weights.state_dict):
        return None  # apply_weights says what does not fit
    ids = coco.explainkit_coco_ids
    missing = [c for c, i in zip(classes, ids, strict=True) if not i]
    line = (
        f"labels: the weights detect COCO's categories; {len(classes) - len(missing)} of the "
        f"{len(classes)} classes matched by name"
        + (f" ({', '.join(missing[:5])} are not COCO's: never detected)" if missing else "")
        + "; detections of other categories are dropped"
    )
    return coco, own, line


def _same_shapes(own: dict[str, Any], given: dict[str, Any]) -> bool:
    return own.keys() == given.keys() and all(
        tuple(own[k].shape) == tuple(given[k].shape) for k in own
    )


def task_results(
    model: nn.Module,
    ds: Any,
    task: str,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    device: torch.device,
    batch_size: int,
) -> tuple[Any, float, float]:
    """``TaskScores.finish()`` of ``model`` on the split ``ds`` (its annotations the truth),
    normalized with ``mean`` and ``std``, batch by batch; the model's mode is restored. A
    torchvision detector's eval loss is its own losses' sum (BatchNorm frozen); another
    detector's (or one relabelled from COCO's categories) is recorded as 0 (explainkit
    cannot compute its losses on the dataset's classes)."""
    from explainkit.data import iter_batches
    from explainkit.explain.outputs import scores_of

    truth = device_truth(task, ds.annotations, device)
    scores = TaskScores(task, truth, len(ds.classes))
    m = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=device).view(1, 3, 1, 1)
    listed = takes_image_list(model)
    was_training = model.training
    model.to(device).eval()
    try:
        with torch.inference_mode():
            for start, batch in iter_batches(ds.images, batch_size):
                x = batch.to(device).permute(0, 3, 1, 2).float().div_(255)
                x = (x - m) / s
                idx = torch.arange(start, start + len(x), device=device)
                size = tuple(x.shape[-2:])
                if task == "detection":
                    out = model(list(x)) if listed else model(x)
                    loss = None
                    if listed and not hasattr(model, "explainkit_coco_ids"):
                        rows = idx.tolist()
                        boxes, labels = truth
                        targets = detection_targets(
                            [boxes[i] for i in rows], [labels[i] for i in rows]
                        )
                        loss = frozen_norm_losses(model, list(x), targets)
                    scores.add(detections_of(out, size), idx, loss)
                elif task == "multilabel":
                    scores.add(scores_of(model(x)).float(), idx)
                else:
                    scores.add(segmentation_logits(model(x), size, scores.k), idx)
    finally:
        model.train(was_training)
    return scores.finish()


def takes_image_list(model: nn.Module) -> bool:
    """Whether ``model`` is a torchvision detector, called with a list of images (it
    normalizes and resizes them itself) rather than a batch tensor."""
    from torchvision.models.detection.fcos import FCOS
    from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
    from torchvision.models.detection.retinanet import RetinaNet
    from torchvision.models.detection.ssd import SSD

    return isinstance(model, (GeneralizedRCNN, RetinaNet, FCOS, SSD))


def detections_of(
    output: Any,
    image_size: tuple[int, int],
    min_score: float = MIN_SCORE,
    limit: int | None = MAX_DETECTIONS,
) -> list[dict[str, Tensor]]:
    """Per image ``{boxes (n, 4) in pixels (x1, y1, x2, y2), scores (n,), labels (n,)}`` with
    labels 0..K-1, the best first: at most ``limit`` of score at least ``min_score`` (what a
    store records; an explanation keeps every detection, so that gradients reach them all).

    Raises:
        ExplainkitError: ``output`` is neither torchvision's nor a transformers detector's.
    """
    if isinstance(output, (list, tuple)) and all(isinstance(o, dict) for o in output):
        if all({"boxes", "scores", "labels"} <= set(o) for o in output):
            return [
                _kept(o["boxes"], o["scores"], o["labels"], o["labels"] > 0, 1, min_score, limit)
                for o in output
            ]
    logits = _field(output, "logits")
    boxes = _field(output, "pred_boxes")
    if isinstance(logits, Tensor) and isinstance(boxes, Tensor) and logits.dim() == 3:
        probs = logits.float().softmax(-1)[..., :-1]  # the last class: no object
        scores, labels = probs.max(-1)
        height, width = image_size
        scale = torch.tensor([width, height, width, height], device=boxes.device)
        cx, cy, w, h = boxes.float().unbind(-1)
        corners = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1) * scale
        return [
            _kept(b, s, lab, torch.ones_like(s, dtype=torch.bool), 0, min_score, limit)
            for b, s, lab in zip(corners, scores, labels, strict=True)
        ]
    from explainkit.explain.outputs import describe_output

    raise ExplainkitError(
        f"a detector must return torchvision's list of {{boxes, labels, scores}} or a "
        f"transformers detector's logits and pred_boxes; this model returned "
        f"{describe_output(output)}"
    )


def _field(output: Any, name: str) -> Any:
    return output.get(name) if isinstance(output, dict) else getattr(output, name, None)


def _kept(
    boxes: Tensor,
    scores: Tensor,
    labels: Tensor,
    keep: Tensor,
    shift: int,
    min_score: float,
    limit: int | None,
) -> dict[str, Tensor]:
    keep = keep & (scores >= min_score)
    scores = scores[keep].float()
    order = scores.argsort(descending=True)[:limit]
    return {
        "boxes": boxes[keep].float()[order].reshape(-1, 4),
        "scores": scores[order].clamp(0, 1),
        "labels": (labels[keep] - shift)[order].long(),
    }


def segmentation_logits(output: Any, size: tuple[int, int], num_classes: int) -> Tensor:
    """(N, K, H, W) logits at the input's size, from any segmenter's output (a tensor,
    torchvision's ``{"out": ...}``, a transformers ``ModelOutput``'s ``logits``).

    Raises:
        ExplainkitError: Not a (N, K, h, w) tensor for the K classes (background first).
    """
    from explainkit.explain.outputs import describe_output, scores_of

    logits = scores_of(output)
    if logits.dim() != 4 or logits.shape[1] != num_classes:
        raise ExplainkitError(
            f"a segmenter of {num_classes} classes (the background first) must return "
            f"(N, {num_classes}, H, W) logits; this model returned {describe_output(output)}"
        )
    if tuple(logits.shape[-2:]) != tuple(size):
        logits = F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)
    return logits.float()


def detection_targets(boxes: list[Tensor], labels: list[Tensor]) -> list[dict[str, Any]]:
    """What a torchvision detector trains on: labels shifted past its background class 0."""
    return [{"boxes": b, "labels": lab + 1} for b, lab in zip(boxes, labels, strict=True)]


def frozen_norm_losses(model: nn.Module, images: list[Tensor], targets: list[dict]) -> Tensor:
    """A detector's summed losses without changing it: computed in training mode (the only
    mode in which torchvision detectors return losses) with BatchNorm statistics frozen."""
    was = model.training
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    try:
        with torch.no_grad():
            losses = model(images, targets)
    finally:
        model.train(was)
    return sum(losses.values())


def device_truth(task: str, ann: Any, device: torch.device) -> Any:
    """A split's ground truth for ``task`` on the device: multi-hot floats, class-id masks,
    or per image its boxes and labels."""
    if task == "multilabel":
        return torch.from_numpy(np.asarray(ann.multi_hot, np.float32)).to(device)
    if task == "segmentation":
        return torch.from_numpy(np.ascontiguousarray(ann.segmentation)).to(device)
    boxes = [torch.from_numpy(d.boxes).to(device) for d in ann.detections]
    labels = [torch.from_numpy(d.labels).to(device) for d in ann.detections]
    return boxes, labels


class TaskScores:
    """The eval split's results of a task model, added batch by batch.

    ``add`` takes a batch's adapted outputs (multi-label logits, segmentation logits,
    detections) and the rows they belong to; ``finish`` returns (what the store records, the
    mean eval loss, ``eval_acc``: the fraction of labels right, the mean IoU, or the mAP at
    IoU 0.5). A segmentation's per-pixel predictions are kept as uint8 class ids, its
    confusion accumulated (memory: the masks, N x H x W bytes).
    """

    def __init__(self, task: str, truth: Any, num_classes: int) -> None:
        if task == "segmentation" and num_classes > MAX_SEGMENTATION_CLASSES:
            raise ExplainkitError(
                f"a segmenter of {num_classes} classes (the background included) is more "
                f"than its store holds ({MAX_SEGMENTATION_CLASSES} class ids fit in uint8)"
            )
        self.task, self.truth, self.k = task, truth, num_classes
        self.parts: list[Any] = []
        self.loss_sum, self.seen = 0.0, 0
        self.conf = np.zeros((num_classes, num_classes), np.int64)

    def add(self, out: Any, idx: Tensor, loss: Tensor | float | None = None) -> None:
        """One batch: ``out`` adapted, ``idx`` its rows; ``loss`` a detector's own (the
        other tasks' losses are computed here)."""
        if self.task == "multilabel":
            y = self.truth[idx]
            if out.shape != y.shape:
                raise ExplainkitError(
                    f"a multi-label model of {self.k} labels must return (N, {self.k}) logits, "
                    f"got {list(out.shape)}"
                )
            loss = F.binary_cross_entropy_with_logits(out, y)
            self.parts.append(out.detach().float().cpu())
        elif self.task == "segmentation":
            seg = self.truth[idx].long()
            loss = F.cross_entropy(out, seg, ignore_index=IGNORE)
            masks = out.argmax(1).to(torch.uint8).cpu().numpy()
            self.conf += confusion(masks, seg.cpu().numpy(), self.k)
            self.parts.append((masks, out.softmax(1).mean((2, 3)).cpu().numpy()))
        else:
            for o in out:
                self.parts.append({name: v.detach().cpu().numpy() for name, v in o.items()})
        self.loss_sum += float(loss or 0.0) * len(idx)
        self.seen += len(idx)

    def finish(self) -> tuple[Any, float, float]:
        eval_loss = self.loss_sum / max(1, self.seen)
        if self.task == "multilabel":
            logits = torch.cat(self.parts)
            truth = self.truth.cpu() > 0.5
            acc = ((logits > 0) == truth).float().mean().item()
            return logits.numpy(), eval_loss, acc
        if self.task == "segmentation":
            masks = np.concatenate([m for m, _ in self.parts])
            shares = np.concatenate([s for _, s in self.parts])
            scores = np.clip(shares, 0, 1).astype(np.float32)
            return {"masks": masks, "scores": scores}, eval_loss, mean_iou(self.conf)
        parts = self.parts
        results = {
            "box_counts": np.array([len(p["labels"]) for p in parts], np.int64),
            "boxes": np.concatenate([p["boxes"] for p in parts] or [np.zeros((0, 4))])
            .astype(np.float32)
            .reshape(-1, 4),
            "box_scores": np.concatenate([p["scores"] for p in parts] or [np.zeros(0)]).astype(
                np.float32
            ),
            "box_labels": np.concatenate([p["labels"] for p in parts] or [np.zeros(0)]).astype(
                np.int64
            ),
        }
        if len(results["box_labels"]) and results["box_labels"].max() >= self.k:
            raise ExplainkitError(
                f"the detector predicted class {int(results['box_labels'].max())} but the "
                f"dataset has {self.k} classes; its head must be for the dataset's classes"
            )
        boxes, labels = self.truth
        truths = [
            (b.cpu().numpy(), lab.cpu().numpy()) for b, lab in zip(boxes, labels, strict=True)
        ]
        dets = [(p["boxes"], p["scores"], p["labels"]) for p in parts]
        return results, eval_loss, detection_map(dets, truths, self.k)["map_50"]
