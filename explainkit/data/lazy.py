"""Images decoded when they are indexed, for splits too large to hold in memory.

A :class:`LazyImages` looks like a uint8 (N, H, W, 3) array to the code that reads a split:
``shape``, ``dtype``, ``len`` and indexing by an int, a slice or an integer array (the first
axis), each returning decoded numpy images. Nothing is kept between two reads, so memory is
what the caller asks for at once: :func:`explainkit.data.iter_batches` asks a batch at a time.

Whether a split stays lazy is decided by its decoded size against :func:`memory_budget`
(``EXPLAINKIT_DATA_MEMORY``): CIFAR-sized data is decoded once and kept, as before.
"""

from __future__ import annotations

import os
import re
from typing import Any

import numpy as np

from explainkit.errors import DataError

MEMORY_ENV = "EXPLAINKIT_DATA_MEMORY"
DEFAULT_BUDGET = 1 << 30  # 1 GiB of decoded pixels per split: CIFAR-10 is 150 MB
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def memory_budget() -> int:
    """Bytes of decoded images a split may hold in memory before it is read lazily.

    ``EXPLAINKIT_DATA_MEMORY`` overrides the 1 GiB default: a byte count with an optional
    unit (``500M``, ``2G``, ``2GiB``); ``0`` makes every folder split lazy.
    """
    text = os.environ.get(MEMORY_ENV, "").strip()
    if not text:
        return DEFAULT_BUDGET
    found = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(?:i?[bB])?", text)
    if found is None:
        raise DataError(
            f"{MEMORY_ENV}={text[:40]!r} is not a size; give bytes with an optional unit, "
            "such as 500M or 2G"
        )
    return int(float(found.group(1)) * _UNITS[found.group(2).lower()])


def fits_in_memory(count: int, size: int) -> bool:
    """Whether ``count`` decoded ``size`` x ``size`` RGB images fit :func:`memory_budget`."""
    return count * size * size * 3 <= memory_budget()


class LazyImages:
    """uint8 (N, H, W, 3) images read on demand; subclasses implement :meth:`read`.

    Indexing follows numpy on the first axis: an int gives one (H, W, 3) image; a slice, an
    integer or boolean array gives (n, H, W, 3); a tuple indexes the decoded rows further.
    ``np.asarray`` decodes every image (what an in-memory split would hold): streaming code
    uses :func:`explainkit.data.iter_batches` instead.
    """

    dtype = np.dtype(np.uint8)
    ndim = 4
    workers_allowed = True  # False: read in the calling process (an open file cannot be forked)

    def __init__(self, count: int, height: int, width: int) -> None:
        self.shape = (int(count), int(height), int(width), 3)

    def read(self, rows: np.ndarray) -> np.ndarray:
        """Decode the images at positions ``rows`` (int64, in range) as (len(rows), H, W, 3)."""
        raise NotImplementedError

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def nbytes(self) -> int:
        """Bytes the decoded images would take (nothing is held)."""
        return self.size

    def _rows(self, key: Any) -> np.ndarray | int:
        try:
            return np.arange(len(self))[key]
        except IndexError as e:
            raise IndexError(f"{e} (lazy images of length {len(self)})") from None

    def __getitem__(self, key: Any) -> np.ndarray:
        rest: tuple[Any, ...] = ()
        if isinstance(key, tuple):
            key, rest = (key[0] if key else slice(None)), key[1:]
        rows = self._rows(key)
        if np.ndim(rows) == 0:
            out = self.read(np.asarray([rows], dtype=np.int64))[0]
            return out[rest] if rest else out
        out = self.read(np.asarray(rows, dtype=np.int64))
        return out[(slice(None), *rest)] if rest else out

    def __iter__(self) -> Any:
        for i in range(len(self)):
            yield self[i]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self.read(np.arange(len(self), dtype=np.int64))
        return out if dtype is None else out.astype(dtype, copy=False)

    def select(self, rows: Any) -> LazyImages:
        """A lazy view of some of these images (``rows``: any first-axis index), in order."""
        return _Selected(self, np.atleast_1d(np.asarray(self._rows(rows), dtype=np.int64)))

    def resized(self, size: int, fit: str = "crop", resize: int | None = None) -> LazyImages:
        """A lazy view of these images as ``size`` squares (by default the shorter side, then
        a centre crop; see :mod:`explainkit.data.fit`)."""
        if self.shape[1:3] == (size, size):
            return self
        return _Resized(self, size, fit, resize)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={self.shape})"


class RowReader(LazyImages):
    """Lazy images read by a function of row positions, e.g. an open prediction store's
    ``store.images``: ``channel_stats(RowReader(store.images, store.images([0]).shape[1:3],
    store.num_images))`` streams them. Read in the calling process, never by workers."""

    workers_allowed = False

    def __init__(self, read: Any, size: tuple[int, int], count: int) -> None:
        super().__init__(count, *size)
        self._read = read

    def read(self, rows: np.ndarray) -> np.ndarray:
        return np.asarray(self._read(rows), dtype=np.uint8)


class _Selected(LazyImages):
    def __init__(self, base: LazyImages, rows: np.ndarray) -> None:
        super().__init__(len(rows), *base.shape[1:3])
        self.base, self.rows = base, rows
        self.workers_allowed = base.workers_allowed

    def read(self, rows: np.ndarray) -> np.ndarray:
        return self.base.read(self.rows[rows])


class _Resized(LazyImages):
    def __init__(self, base: LazyImages, size: int, fit: str, resize: int | None) -> None:
        super().__init__(len(base), size, size)
        self.base, self.side, self.fit, self.resize = base, size, fit, resize
        self.workers_allowed = base.workers_allowed

    def read(self, rows: np.ndarray) -> np.ndarray:
        from explainkit.data import fit_images

        return fit_images(self.base.read(rows), self.side, False, self.fit, self.resize)


def is_lazy(images: Any) -> bool:
    """Whether ``images`` are read on demand (a :class:`LazyImages`), not an array in memory."""
    return isinstance(images, LazyImages)
