"""The training and eval splits as uint8 tensors on the device, and the batch transforms.

The whole uint8 split sits on the device (150 MB for CIFAR-10) and batches are augmented there
in one go, so no data loader or per-image Python work stands between two steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from explainkit.config import TrainConfig
from explainkit.data import channel_stats, load_dataset
from explainkit.data.augment import cutout, random_crop, random_flip
from explainkit.errors import ExplainkitError


@dataclass
class Split:
    images: torch.Tensor  # uint8 NCHW on the device
    targets: torch.Tensor  # int64 on the device

    @classmethod
    def to_device(cls, images: np.ndarray, targets: np.ndarray, device: torch.device) -> Split:
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()
        return cls(x.to(device), torch.from_numpy(targets).long().to(device))


class DeviceData:
    """Both splits of ``config.dataset`` on ``device``, with the run's two seeded generators.

    ``order_gen`` draws each epoch's order and ``aug_gen`` the crops, flips and cutouts; they are
    separate from the global generators so that a checkpoint can save and restore them exactly.
    """

    def __init__(self, config: TrainConfig, device: torch.device, channels_last: bool) -> None:
        c = config
        train = load_dataset(c.dataset, "train", c.data_dir, c.image_size, c.seed, c.limit_train)
        evals = load_dataset(c.dataset, "eval", c.data_dir, c.image_size, c.seed, c.limit_eval)
        if len(train.images) < 2:
            raise ExplainkitError("the training split has fewer than 2 images")
        self.config = config
        self.device = device
        self.channels_last = channels_last
        self.classes = list(train.classes)
        self.mean, self.std = channel_stats(train.images)
        self.eval_data = evals  # the numpy split, for the prediction store
        self.train = Split.to_device(train.images, train.targets, device)
        self.eval = Split.to_device(evals.images, evals.targets, device)
        self.num_train = len(train.images)
        self.num_eval = len(evals.images)
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
        """uint8 batch -> normalized float batch, as evaluated."""
        return self._layout((xb.float().div_(255) - self.mean_t) / self.std_t)

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x
