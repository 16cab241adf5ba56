"""Batches of a split as uint8 tensors, in order: sliced from memory, or decoded by workers.

In-memory images are sliced (no copy, no workers). Lazy images (:mod:`explainkit.data.lazy`)
go through a torch DataLoader whose every item is one whole batch: a worker decodes a batch,
the loader hands batches back in the order asked, and at most ``2 x workers`` batches wait
decoded at once, so memory is bounded by a few batches whatever the number of images.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from explainkit.data.lazy import LazyImages, is_lazy
from explainkit.errors import DataError

MAX_WORKERS = 8
WORKERS_ENV = "EXPLAINKIT_DATA_WORKERS"


def default_workers() -> int:
    """Decoding processes: ``EXPLAINKIT_DATA_WORKERS`` when set (0 decodes in the calling
    process), else one core is left to the training or evaluating process, at most
    :data:`MAX_WORKERS` (more rarely helps a GPU that is fed 224-px JPEGs)."""
    text = os.environ.get(WORKERS_ENV, "").strip()
    if text:
        if not text.isdigit():
            raise DataError(f"{WORKERS_ENV}={text[:40]!r} is not a number of processes")
        return int(text)
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    return max(1, min(MAX_WORKERS, cores - 1))


class _Chunks(torch.utils.data.Dataset):
    """Item k: the images at ``chunks[k]`` decoded, or the decoding error's message (raised
    again in the main process, where it reads as the one sentence it is)."""

    def __init__(self, images: LazyImages, chunks: Sequence[np.ndarray]) -> None:
        self.images, self.chunks = images, chunks

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, k: int) -> torch.Tensor | str:
        try:
            return torch.from_numpy(self.images.read(np.asarray(self.chunks[k], np.int64)))
        except DataError as e:
            return str(e)


def _pinnable(pin_memory: bool) -> bool:
    return pin_memory and torch.cuda.is_available()


def iter_chunks(
    images: Any,
    chunks: Sequence[np.ndarray],
    workers: int | None = None,
    pin_memory: bool = False,
) -> Iterator[torch.Tensor]:
    """The images at each index array of ``chunks``, one uint8 (b, H, W, 3) tensor each, in
    order. Lazy images are decoded by ``workers`` processes (default
    :func:`default_workers`; 0 decodes here); ``pin_memory`` pins each batch for a fast,
    asynchronous copy to a CUDA device (ignored without CUDA)."""
    pin = _pinnable(pin_memory)
    if not is_lazy(images):
        for rows in chunks:
            batch = torch.from_numpy(np.ascontiguousarray(images[np.asarray(rows)]))
            yield batch.pin_memory() if pin else batch
        return
    workers = default_workers() if workers is None else max(0, int(workers))
    workers = min(workers, len(chunks)) if images.workers_allowed else 0
    loader = torch.utils.data.DataLoader(
        _Chunks(images, chunks),
        batch_size=None,
        shuffle=False,
        num_workers=workers,
        pin_memory=pin,
        prefetch_factor=2 if workers else None,
        # Its own generator: starting workers must not draw from torch's global one, or a
        # lazy split would change the random draws (model init, ...) that follow it.
        generator=torch.Generator(),
    )
    for batch in loader:
        if isinstance(batch, str):
            raise DataError(batch)
        yield batch


def iter_batches(
    data: Any,
    batch_size: int,
    workers: int | None = None,
    pin_memory: bool = False,
) -> Iterator[tuple[int, torch.Tensor]]:
    """``(start, images)`` for consecutive batches of a split in dataset order: ``images`` is a
    uint8 tensor (b, H, W, 3) of the images at positions ``start .. start + b - 1``.

    ``data`` is a :class:`~explainkit.data.Dataset` or its ``images``. In-memory images are
    sliced without a copy (the tensor shares the array's memory); lazy ones are decoded by
    DataLoader workers (see :func:`iter_chunks`).
    """
    if batch_size < 1:
        raise DataError(f"batch_size must be a positive number of images, got {batch_size}")
    images = getattr(data, "images", data)
    n = len(images)
    if not is_lazy(images):
        pin = _pinnable(pin_memory)
        for start in range(0, n, batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size]))
            yield start, batch.pin_memory() if pin else batch
        return
    starts = range(0, n, batch_size)
    chunks = [np.arange(s, min(s + batch_size, n)) for s in starts]
    yield from zip(starts, iter_chunks(images, chunks, workers, pin_memory), strict=True)
