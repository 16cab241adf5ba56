"""Training the tasks beyond classification: multi-label, segmentation and detection.

:class:`TaskTrainer` is the :class:`~explainkit.train.trainer.Trainer` with another objective,
evaluation and store: the data, optimizer, schedule, moving average, checkpoints, resume and
commits are the classifier's. Per task:

- ``multilabel``: binary cross-entropy per class on the model's logits; ``train_acc`` and
  ``eval_acc`` are the fraction of labels right (a label is predicted where its logit > 0);
  the store records the logits.
- ``segmentation``: per-pixel cross-entropy (pixels labelled 255 not scored); ``train_acc``
  is the pixel accuracy, ``eval_acc`` the mean IoU; the store records the predicted class of
  each pixel and each class's share of the image.
- ``detection``: the detector's own losses (torchvision's); ``eval_loss`` is their sum on the
  eval split (BatchNorm frozen), ``eval_acc`` the mAP at IoU 0.5; ``train_acc`` is not
  recorded; the store records each image's boxes, scores and classes.

Augmentation is a horizontal flip (``--flip``) that moves boxes and masks with the pixels; the
classifier's crops, cutout, label smoothing and flip TTA do not apply. One process only (no
torchrun) for now.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from explainkit.config import FIELDS, TrainConfig
from explainkit.data.tasks import IGNORE, require_task, task_classes
from explainkit.errors import ConfigError, DataError, TrainingDiverged
from explainkit.explain.outputs import scores_of
from explainkit.registries import Registries
from explainkit.store.schema import MAX_SEGMENTATION_CLASSES
from explainkit.task_eval import (
    METRICS,
    TaskScores,
    detection_targets,
    detections_of,
    device_truth,
    frozen_norm_losses,
    segmentation_logits,
)
from explainkit.train import distributed as dist_utils
from explainkit.train import trainer as classifier
from explainkit.train.run_files import RunFacts

# The model a task trains when --model is left at the classifier's default.
DEFAULT_MODELS = {"segmentation": "fcn-s8", "detection": "fcos-s8"}


def train(
    config: TrainConfig,
    registries: Registries,
    out: str | Path | None = None,
    overwrite: bool = False,
    quiet: bool = False,
    resume: bool = False,
) -> Path:
    """Train a run of ``config.task`` (the classifier's trainer for classification).

    A segmentation or detection run whose ``--model`` is the classifier's default trains the
    task's default model instead (``fcn-s8``, ``fcos-s8``: the same ResNet trunk).
    """
    if config.task in DEFAULT_MODELS and config.model == FIELDS["model"].default:
        config.model = DEFAULT_MODELS[config.task]
    cls = classifier.Trainer if config.task == "classification" else TaskTrainer
    return classifier.train(config, registries, out, overwrite, quiet, resume, trainer_class=cls)


class TaskTrainer(classifier.Trainer):
    """A run of a multilabel, segmentation or detection model (see the module docstring)."""

    def __init__(self, config: TrainConfig, run_dir: Path, registries: Registries, **kw: Any):
        dist = kw.get("dist") or dist_utils.init_from_env(config.device)
        if dist.enabled:
            raise ConfigError(
                f"--task {config.task} trains in one process; run it without torchrun"
            )
        kw["dist"] = dist
        super().__init__(config, run_dir, registries, **kw)

    # -- setup -----------------------------------------------------------------------------
    def _build_model(self, weights: Any, load_weights: bool) -> None:
        """The task's ground truth on the device, its classes, then the model for them."""
        task, data, device = self.config.task, self.data, self.device
        train = require_task(data.train_annotations, task, self.config.dataset)
        evals = require_task(data.eval_data.annotations, task, self.config.dataset)
        self.truth = [device_truth(task, a, device) for a in (train, evals)]
        data.classes = task_classes(task, data.classes)
        if len(data.classes) > MAX_SEGMENTATION_CLASSES and task == "segmentation":
            raise DataError(
                f"a segmenter of {len(data.classes)} classes (the background included) is more "
                f"than its store holds ({MAX_SEGMENTATION_CLASSES} class ids fit in uint8)"
            )
        super()._build_model(weights, load_weights)

    @property
    def run_facts(self) -> RunFacts:
        return dataclasses.replace(super().run_facts, task=self.config.task, eval_tta=False)

    # -- training --------------------------------------------------------------------------
    def _flips(self, n: int) -> torch.Tensor:
        if not self.config.flip:
            return torch.zeros(n, dtype=torch.bool, device=self.device)
        return torch.rand(n, generator=self.data.aug_gen, device=self.device) < 0.5

    def _objective(
        self, net: Any, x: torch.Tensor, idx: torch.Tensor, flip: torch.Tensor, split: int
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | int]:
        """The task's loss on a batch; the labels (or pixels) right and how many counted."""
        task, truth = self.config.task, self.truth[split]
        if task == "multilabel":
            out = scores_of(net(x)).float()
            y = truth[idx]
            right = ((out > 0) == (y > 0.5)).sum()
            return F.binary_cross_entropy_with_logits(out, y), right, y.numel()
        if task == "segmentation":
            out = segmentation_logits(net(x), tuple(x.shape[-2:]), len(self.classes))
            seg = truth[idx]
            seg = torch.where(flip.view(-1, 1, 1), seg.flip(2), seg).long()
            valid = seg != IGNORE
            right = ((out.argmax(1) == seg) & valid).sum()
            loss = F.cross_entropy(out, seg, ignore_index=IGNORE)
            return loss, right, valid.sum()
        boxes, labels = truth
        width = x.shape[-1]
        targets_boxes = []
        for i, f in zip(idx.tolist(), flip.tolist(), strict=True):
            b = boxes[i]
            targets_boxes.append(
                torch.stack([width - b[:, 2], b[:, 1], width - b[:, 0], b[:, 3]], 1) if f else b
            )
        targets = detection_targets(targets_boxes, [labels[i] for i in idx.tolist()])
        losses = net(list(x), targets)
        return sum(losses.values()), None, 0

    def train_epoch_stats(self, stop: Any) -> dict[str, float]:
        """One pass over the training split: ``train_loss``, ``train_acc`` (not for detection)
        and ``images_per_s``."""
        self.net.train()
        order = self.data.epoch_order()
        perm = order.to(self.device)
        bs = self.config.batch_size
        batches = self.data.train.batches(order, bs, self.steps_per_epoch)
        loss_sum = torch.zeros((), device=self.device)
        right_sum = torch.zeros((), device=self.device)
        counted = torch.zeros((), device=self.device)
        seen = 0
        bar = self._progress(self.steps_per_epoch, f"epoch {self.epoch + 1}")
        start = time.perf_counter()
        for step in range(self.steps_per_epoch):
            self._stop_if_asked(stop, step)
            idx = perm[step * bs : (step + 1) * bs]
            x = self.data.normalize(next(batches))
            flip = self._flips(len(x))
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
            with self._autocast():
                loss, right, count = self._objective(self.forward_net, x, idx, flip, 0)
            self._update(loss)
            seen += len(x)
            loss_sum += loss.detach().float() * len(x)
            if right is not None:
                right_sum += right
                counted += count
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        seconds = time.perf_counter() - start
        stats = {"train_loss": float(loss_sum) / seen, "images_per_s": seen / seconds}
        if self.config.task != "detection":
            stats["train_acc"] = float(right_sum) / max(1.0, float(counted))
        return stats

    # -- evaluation ------------------------------------------------------------------------
    @torch.inference_mode()
    def evaluate(self) -> tuple[Any, float, float]:
        """The eval split's results as the store records them, the eval loss and the task's
        headline score (``eval_acc``): :class:`explainkit.task_eval.TaskScores`."""
        self.net.eval()
        model = self.eval_model.eval()
        task, n = self.config.task, self.data.num_eval
        bs = max(self.config.batch_size, 64)
        scores = TaskScores(task, self.truth[1], len(self.classes))
        for start, xb in zip(
            range(0, n, bs), self.data.eval.batches(torch.arange(n), bs), strict=True
        ):
            x = self.data.normalize(xb)
            idx = torch.arange(start, start + len(x), device=self.device)
            with self._autocast():
                if task == "detection":
                    outs = detections_of(model(list(x)), tuple(x.shape[-2:]))
                    boxes, labels = self.truth[1]
                    targets = detection_targets(
                        [boxes[i] for i in idx.tolist()], [labels[i] for i in idx.tolist()]
                    )
                    scores.add(outs, idx, frozen_norm_losses(model, list(x), targets))
                elif task == "multilabel":
                    scores.add(scores_of(model(x)).float(), idx)
                else:
                    scores.add(segmentation_logits(model(x), tuple(x.shape[-2:]), scores.k), idx)
        return scores.finish()

    def _refuse_non_finite(self, train: dict[str, float], eval_loss: float, results: Any) -> None:
        arrays = results.values() if isinstance(results, dict) else [results]
        finite = all(np.isfinite(a).all() for a in arrays if a.dtype.kind == "f")
        if finite and np.isfinite(train["train_loss"]) and np.isfinite(eval_loss):
            return
        raise TrainingDiverged(
            f"epoch {self.epoch + 1} produced a non-finite loss or result (NaN or infinity) and "
            f"was not saved; {self._saved_epochs()}; train again with a lower --lr"
        )

    def _log_epoch(self, row: dict[str, float]) -> None:
        acc = f" acc {100 * row['train_acc']:5.2f}%" if "train_acc" in row else ""
        self.log(
            f"epoch {self.epoch:>3}/{self.config.epochs}  train loss {row['train_loss']:.4f}{acc}"
            f"  eval loss {row['eval_loss']:.4f} {METRICS[self.config.task]} "
            f"{row['eval_acc']:.4f}  lr {row['lr']:.4f}  {row['seconds']:6.1f}s  "
            f"{row['images_per_s']:7.0f} img/s"
        )
