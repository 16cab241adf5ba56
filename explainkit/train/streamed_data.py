"""A split too large for memory, streamed to the device a batch at a time.

Its images stay lazy (explainkit.data.lazy); DataLoader workers decode each batch of the
order the trainer asks for, in that order, into pinned memory on CUDA. Only the targets sit
on the device. Batches come out as :class:`~explainkit.train.device_data.Split` gives them
(uint8 NCHW, contiguous), so augmentation and resume behave the same bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from explainkit.data.batches import iter_chunks
from explainkit.data.lazy import LazyImages


class StreamedSplit:
    """Lazy images and their targets (on the device); :meth:`batches` streams the images."""

    def __init__(
        self,
        images: LazyImages,
        targets: np.ndarray,
        device: torch.device,
        workers: int | None = None,
    ) -> None:
        self.images = images
        self.targets = torch.from_numpy(np.asarray(targets)).long().to(device)
        self.device = device
        self.workers = workers

    def batches(
        self, order: torch.Tensor, batch_size: int, steps: int | None = None
    ) -> Iterator[torch.Tensor]:
        """The images at ``order`` (CPU indices), ``batch_size`` at a time, for ``steps``
        batches (default: all of them), as uint8 NCHW on the device."""
        if steps is None:
            steps = -(-len(order) // batch_size)
        rows = order.cpu().numpy()
        chunks = [rows[s * batch_size : (s + 1) * batch_size] for s in range(steps)]
        pin = self.device.type == "cuda"
        for batch in iter_chunks(self.images, chunks, self.workers, pin_memory=pin):
            x = batch.to(self.device, non_blocking=pin)
            yield x.permute(0, 3, 1, 2).contiguous()
