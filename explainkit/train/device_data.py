"""The training and eval splits as uint8 batches on the device, and the batch transforms.

A split that fits in memory sits whole on the device as uint8 (150 MB for CIFAR-10), so no
data loader or per-image Python work stands between two steps. A split too large for memory
(lazy images: explainkit.data.lazy) is streamed instead (streamed_data.py): DataLoader workers
decode each batch in the epoch's order. Either way batches are augmented on the device with
the same generators, so the two give the same bits.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from explainkit.config import TrainConfig
from explainkit.data import channel_stats, load_dataset
from explainkit.data.augment import cutout, random_crop, random_flip
from explainkit.data.lazy import LazyImages, is_lazy
from explainkit.errors import ExplainkitError
from explainkit.registries import Registries
from explainkit.train.streamed_data import StreamedSplit


@dataclass
class Split:
    images: torch.Tensor  # uint8 NCHW on the device
    targets: torch.Tensor  # int64 on the device

    @classmethod
    def to_device(cls, images: np.ndarray, targets: np.ndarray, device: torch.device) -> Split:
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()
        return cls(x.to(device), torch.from_numpy(targets).long().to(device))

    def batches(
        self, order: torch.Tensor, batch_size: int, steps: int | None = None
    ) -> Iterator[torch.Tensor]:
        """The images at ``order`` (CPU indices), ``batch_size`` at a time, for ``steps``
        batches (default: all of them), as uint8 NCHW on the device."""
        order = order.to(self.images.device)
        if steps is None:
            steps = -(-len(order) // batch_size)
        for step in range(steps):
            yield self.images[order[step * batch_size : (step + 1) * batch_size]]


def place_split(
    images: np.ndarray | LazyImages, targets: np.ndarray, device: torch.device
) -> Split | StreamedSplit:
    """The split on the device when it is in memory; streamed when its images are lazy."""
    if is_lazy(images):
        return StreamedSplit(images, targets, device)
    return Split.to_device(images, targets, device)


class DeviceData:
    """Both splits of ``config.dataset`` on ``device``, with the run's two seeded generators.

    ``order_gen`` draws each epoch's order and ``aug_gen`` the crops, flips and cutouts; they are
    separate from the global generators so that a checkpoint can save and restore them exactly.
    Each split is a :class:`Split` on the device, or a :class:`StreamedSplit` when its images
    are lazy; both hand out the same uint8 batches for the same order.
    """

    def __init__(
        self,
        config: TrainConfig,
        registries: Registries,
        device: torch.device,
        channels_last: bool,
    ) -> None:
        c, r = config, registries
        train = load_dataset(
            c.dataset, "train", c.data_dir, c.image_size, c.seed, c.limit_train, registries=r
        )
        evals = load_dataset(
            c.dataset, "eval", c.data_dir, c.image_size, c.seed, c.limit_eval, registries=r
        )
        if len(train) < 2:
            raise ExplainkitError("the training split has fewer than 2 images")
        self.config = config
        self.device = device
        self.channels_last = channels_last
        self.classes = list(train.classes)
        self.mean, self.std = channel_stats(train.images, c.seed)
        self.eval_data = evals  # the split as loaded (in memory or lazy), for the store
        self.train_annotations = train.annotations  # boxes, class masks (data/tasks.py)
        self.train = place_split(train.images, train.targets, device)
        self.eval = place_split(evals.images, evals.targets, device)
        self.num_train = len(train)
        self.train_subset = train.subset  # which images --limit-train kept, in words
        self.num_eval = len(evals)
        self.use_normalization(self.mean, self.std)
        self.order_gen = torch.Generator().manual_seed(config.seed)
        self.aug_gen = torch.Generator(device=device).manual_seed(config.seed + 1)

    def use_normalization(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        """Normalize batches with ``mean`` and ``std`` (in [0, 1] units): the training split's
        statistics by default, the ones pretrained weights expect when a run starts from them."""
        self.mean, self.std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        self.mean_t = torch.tensor(self.mean, device=self.device).view(1, 3, 1, 1)
        self.std_t = torch.tensor(self.std, device=self.device).view(1, 3, 1, 1)

    def epoch_order(self) -> torch.Tensor:
        """A fresh permutation of the training images (on the CPU, from ``order_gen``)."""
        return torch.randperm(self.num_train, generator=self.order_gen)

    def augment(self, xb: torch.Tensor) -> torch.Tensor:
        """uint8 batch -> normalized float batch, cropped, flipped and cut out."""
        c = self.config
        x = xb.float().div_(255)
        if c.crop_padding:
            x = random_crop(x, c.crop_padding, self.aug_gen)
        if c.flip:
            x = random_flip(x, self.aug_gen)
        x = (x - self.mean_t) / self.std_t
        if c.cutout:
            x = cutout(x, c.cutout, self.aug_gen)
        return self._layout(x)

    def normalize(self, xb: torch.Tensor) -> torch.Tensor:
        """uint8 batch -> normalized float batch, as evaluated (in place: one float copy)."""
        return self._layout(xb.float().div_(255).sub_(self.mean_t).div_(self.std_t))

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x
