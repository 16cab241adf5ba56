"""HDF5 files written through Python I/O, so that a failed write is a sentence, not a crash.

libhdf5 does not survive a failed write (a full disk, a file-size limit): the file cannot be
closed and the process crashes when the handle is freed. :func:`open_h5_for_writing` streams
an HDF5 file to disk through a Python file object that keeps the first write error from
libhdf5 and raises it as one sentence. Analyzer outputs (gradcam's ``attributions.h5``, the
shards of a torchrun analysis) and the prediction store's head are written with it.
"""

from __future__ import annotations

import errno
import io
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py

from explainkit.atomic import fsync_dir
from explainkit.errors import ExplainkitError, write_failed

# HDF5 >= 1.10 object headers carry checksums: damaged metadata is refused, not a crash.
_FILE_OPTIONS = {"libver": ("v110", "latest")}


class _GuardedFile:
    """A file object for h5py's ``fileobj`` driver that never lets a write error into libhdf5.

    libhdf5 does not survive a failed write: the file cannot be closed, and the process
    crashes when the handle is freed (at the latest at exit). So the first OSError is kept
    here, later writes are dropped (and reads past what reached the disk see zeros), libhdf5
    closes its file normally, and :class:`H5Writer` raises the kept error as one sentence.
    The file is unbuffered: every write reaches the disk (memory stays bounded by HDF5's
    chunk cache) and fails where it happens.
    """

    def __init__(self, raw: io.FileIO) -> None:
        self._raw = raw
        self._pos = 0
        self.error: OSError | None = None

    def _fail(self, e: OSError) -> None:
        if self.error is None:
            self.error = e

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        try:
            self._pos = self._raw.seek(offset, whence)
        except OSError as e:
            self._fail(e)
            if whence == io.SEEK_SET:
                self._pos = offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        done = 0
        try:
            self._raw.seek(self._pos)
            while done < len(view):
                got = self._raw.readinto(view[done:])
                if not got:
                    break
                done += got
        except OSError as e:
            self._fail(e)
        if done < len(view) and self.error is not None:
            view[done:] = bytes(len(view) - done)  # what was dropped reads as zeros
            done = len(view)
        self._pos += done
        return done

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            size = max(0, os.fstat(self._raw.fileno()).st_size - self._pos)
        buffer = bytearray(size)
        return bytes(buffer[: self.readinto(buffer)])

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        if self.error is None:
            done = 0
            try:
                self._raw.seek(self._pos)
                while done < len(view):
                    wrote = self._raw.write(view[done:])
                    if not wrote:
                        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                    done += wrote
            except OSError as e:
                self._fail(e)
        self._pos += len(view)
        return len(view)

    def truncate(self, size: int | None = None) -> int:
        size = self._pos if size is None else size
        if self.error is None:
            try:
                self._raw.truncate(size)
            except OSError as e:
                self._fail(e)
        return size

    def flush(self) -> None:
        pass  # unbuffered: nothing is held here

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True


class H5Writer:
    """Context manager of :func:`open_h5_for_writing`; ``with`` gives the ``h5py.File``."""

    def __init__(
        self,
        path: str | Path,
        error: type[ExplainkitError] = ExplainkitError,
        *,
        tmp: Path | None = None,
        before_replace: Callable[[], None] | None = None,
        **options: Any,
    ) -> None:
        self.path = Path(path)
        self._error = error
        self._options = {**_FILE_OPTIONS, **options}
        self._tmp = tmp or self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self._before_replace = before_replace  # runs once the file is complete and fsynced
        self._raw: io.FileIO | None = None
        self._guard: _GuardedFile | None = None
        self._file: h5py.File | None = None

    def _sentence(self, e: BaseException) -> ExplainkitError:
        return self._error(write_failed(self.path, e))

    def check(self) -> None:
        """Raise now if a write has failed (call it once per batch to stop early)."""
        if self._guard is not None and self._guard.error is not None:
            raise self._sentence(self._guard.error) from self._guard.error

    def __enter__(self) -> h5py.File:
        try:
            self._raw = open(self._tmp, "w+b", buffering=0)  # closed by _finish
        except OSError as e:
            raise self._sentence(e) from e
        self._guard = _GuardedFile(self._raw)
        try:
            self._file = h5py.File(self._guard, "w", **self._options)
        except BaseException as e:
            self._finish(e)
            raise
        return self._file

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        self._finish(exc)
        return False

    def _finish(self, exc: BaseException | None) -> None:
        """Close everything; publish the file only when all of it reached the disk."""
        assert self._raw is not None and self._guard is not None
        guard, raw = self._guard, self._raw
        closing: Exception | None = None
        try:
            if self._file is not None:
                try:
                    self._file.close()
                except Exception as e:  # not a write error (those are kept by the guard)
                    closing = e
            if guard.error is None and closing is None and exc is None:
                try:
                    os.fsync(raw.fileno())
                except OSError as e:
                    guard._fail(e)
            raw.close()
            if guard.error is not None:
                raise self._sentence(guard.error) from guard.error
            if closing is not None:
                raise self._sentence(closing) from closing
            if exc is None:
                if self._before_replace is not None:
                    self._before_replace()
                os.replace(self._tmp, self.path)
                fsync_dir(self.path.parent)
        finally:
            self._tmp.unlink(missing_ok=True)


def open_h5_for_writing(
    path: str | Path, error: type[ExplainkitError] = ExplainkitError, **options: Any
) -> H5Writer:
    """Open a new HDF5 file for streamed writing through Python I/O.

    Use as ``with open_h5_for_writing(path, AnalyzerError) as f:`` and write datasets batch by
    batch as with ``h5py.File(path, "w")``. Data goes to disk as HDF5 evicts chunks from its
    cache, so memory stays bounded however large the file grows. The file is written beside
    ``path`` and renamed over it only when complete: a failure leaves an older ``path`` as it
    was. A failed write (a full disk, a file-size limit) raises ``error`` with one sentence
    when the ``with`` block ends, or at once from ``writer.check()``; libhdf5 never sees it,
    so it cannot crash the process. ``options`` go to ``h5py.File`` (default
    ``libver=("v110", "latest")``: checksummed metadata, as in the prediction store).
    """
    return H5Writer(path, error, **options)


# How analyzers' map files are compressed and checksummed.
COMPRESSED = {"compression": "gzip", "compression_opts": 4, "shuffle": True, "fletcher32": True}


def batched_dataset(
    f: Any, name: str, shape: tuple[int, ...], dtype: str, batch: int, **options: Any
) -> Any:
    """A compressed, checksummed dataset of ``shape`` chunked by about one ``batch`` of rows,
    for writing batch by batch (plain when it has no rows; ``options`` such as ``fillvalue``
    go to h5py)."""
    if not shape[0]:
        return f.create_dataset(name, shape=shape, dtype=dtype, **options)
    chunks = (max(1, min(batch, shape[0])), *(max(1, s) for s in shape[1:]))
    return f.create_dataset(name, shape=shape, dtype=dtype, chunks=chunks, **COMPRESSED, **options)
