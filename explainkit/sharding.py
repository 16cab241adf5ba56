"""One analyzer over several processes: each torchrun rank explains its own block of images.

An analyzer opts in with the class attribute ``shardable = True`` (read with ``getattr``, so
analyzers written before it stay unsharded). Under ``torchrun`` the host then runs it on
every rank, and the analyzer asks ``context.shard`` which images are its own and where to write
them::

    shard = context.shard
    with open_h5_for_writing(shard.part_path("scores.h5"), AnalyzerError) as f:
        ...  # rows shard.start .. shard.stop of every per-image dataset
    reports = shard.merge("scores.h5", seconds=took)
    if not shard.is_main:
        return []  # the main rank writes the summary, the figure and the manifest
    ...  # analyses/<name>/scores.h5 now holds all images, in order

In one process the same code runs unchanged: the block is every image, ``part_path`` is the
output file itself and ``merge`` only returns ``[facts]``.

The host's side of it is here too: joining torchrun's process group (:func:`join_torchrun`),
checking that every rank runs the same plan (:func:`check_same_plan`), and running one analyzer
over the ranks (:func:`run_on_ranks`).

Blocks are contiguous (rank 0 first), so joining them is a copy in order. Parts are written
to ``analyses/.<name>.parts-<pid>`` (on the run directory, which every node sees) and copied
into the main rank's output chunk by chunk: memory stays bounded by one chunk, however many
images there are. Nothing is published unless every rank finished its part.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from explainkit.errors import AnalyzerError, RunError

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

    from explainkit.train.distributed import DistContext

__all__ = [
    "Shard",
    "block",
    "check_same_plan",
    "is_shardable",
    "join_torchrun",
    "leave_torchrun",
    "merge_h5_parts",
    "run_on_ranks",
]

COPY_BYTES = 64 << 20  # at most this much of one dataset is in memory while merging


def is_shardable(cls: type) -> bool:
    """Whether an analyzer class declares ``shardable = True``."""
    return getattr(cls, "shardable", False) is True


def block(rank: int, world_size: int, n: int) -> tuple[int, int]:
    """Rank ``rank``'s contiguous ``[start, stop)`` of ``n`` images; sizes differ by at most
    one and the larger blocks come first, so rank 0 has images whenever there are any."""
    size, extra = divmod(n, world_size)
    start = rank * size + min(rank, extra)
    return start, start + size + (rank < extra)


@dataclass
class Shard:
    """This process's share of one analyzer's work (see the module docstring).

    Attributes:
        rank: This process's rank (0 in one process).
        world_size: How many processes share the work.
        num_images: Eval images in the whole run.
        output_dir: The analyzer's output folder (only the main rank's is published).
        parts_dir: Where ranks write their parts (None in one process).
    """

    rank: int
    world_size: int
    num_images: int
    output_dir: Path
    parts_dir: Path | None = None
    label: str = ""  # the analyzer's name, for progress bars
    group: Any = field(default=None, repr=False)  # explainkit.train.distributed.DistContext
    facts: dict = field(default_factory=dict, repr=False)
    outcomes: list | None = field(default=None, repr=False)

    @property
    def start(self) -> int:
        return block(self.rank, self.world_size, self.num_images)[0]

    @property
    def stop(self) -> int:
        return block(self.rank, self.world_size, self.num_images)[1]

    @property
    def size(self) -> int:
        return self.stop - self.start

    @property
    def is_main(self) -> bool:
        """Whether this rank writes the summary, figures and manifest (rank 0)."""
        return self.rank == 0

    def part_path(self, name: str) -> Path:
        """Where this rank writes its block of the file ``name`` (a plain file name)."""
        return self.output_dir / name if self.parts_dir is None else self._part(self.rank, name)

    def _part(self, rank: int, name: str) -> Path:
        assert self.parts_dir is not None
        return self.parts_dir / f"rank{rank:05d}-{name}"

    def merge(self, *names: str, **facts: Any) -> list[dict] | None:
        """Join every rank's part of each HDF5 file ``names`` into ``output_dir`` (main rank).

        Call it once, after this rank has written all its parts. ``facts`` (small, picklable,
        e.g. timings) reach the main rank. Returns each rank's facts in rank order on the main
        rank and None on the others. A rank with an empty block may write no part.

        Raises:
            AnalyzerError: Another rank failed or stopped before finishing its part.
        """
        self.facts = facts
        if self.parts_dir is None:
            return [facts]
        if not self.is_main:
            return None
        failure = self.sync(None)
        if failure:
            raise AnalyzerError(failure)
        n, world = self.num_images, self.world_size
        for name in names:
            parts = [(self._part(r, name), *block(r, world, n)) for r in range(world)]
            merge_h5_parts(parts, self.output_dir / name, n, self.label)
        return [outcome[1] for outcome in self.outcomes or []]

    def sync(self, error: str | None) -> str | None:
        """Tell every rank whether this one finished (``error`` None) and learn the same of
        them; returns the first other rank's failure as a sentence, or None. Runs once per
        analyzer: later calls return the first answer."""
        from explainkit.faults import fault_point

        if self.outcomes is None:
            fault_point(f"analyze-sync:{self.rank}")
            try:
                self.outcomes = self.group.gather_objects((error, self.facts))
            except RuntimeError:
                self.outcomes = []
                return (
                    f"another process of this torchrun job of {self.world_size} stopped before "
                    "finishing its share of the images; nothing of this analysis was published"
                )
        for rank, (other_error, _) in enumerate(self.outcomes):
            if other_error is not None and rank != self.rank:
                return f"rank {rank} of {self.world_size} failed: {other_error}"
        return None


def merge_h5_parts(
    parts: Iterable[tuple[Path, int, int]], out: Path, n: int, label: str = ""
) -> None:
    """Concatenate HDF5 parts along the first axis of every dataset into ``out``.

    ``parts`` are ``(path, start, stop)`` blocks that tile ``0..n`` in order; a part with an
    empty block may be missing. Datasets keep their dtype, chunking and filters; the root and
    dataset attributes come from the first part. Copied in slices of about ``COPY_BYTES``;
    ``out`` appears only when complete.

    Raises:
        AnalyzerError: A part is missing or does not fit the others.
    """
    import h5py

    from explainkit.faults import fault_point
    from explainkit.h5files import open_h5_for_writing
    from explainkit.progress import progress

    parts = [(Path(p), a, b) for p, a, b in parts if b > a]
    if not parts:
        raise AnalyzerError(f"no rank wrote a part of {out.name}; there are no images")
    missing = [p.name for p, _, _ in parts if not p.is_file()]
    if missing:
        raise AnalyzerError(f"the part files {', '.join(missing)} of {out.name} are missing")
    with h5py.File(parts[0][0], "r") as first, open_h5_for_writing(out, AnalyzerError) as f:
        f.attrs.update(dict(first.attrs))
        names = _dataset_names(first)
        for name in names:
            _create_like(f, name, first[name], n)
        desc = f"{label}: joining parts of {out.name}" if label else f"joining {out.name}"
        bar = progress(desc=desc, total=n, unit="img")
        with bar:
            for path, start, stop in parts:
                with h5py.File(path, "r") as part:
                    for name in names:
                        _copy_block(part, f[name], name, path, start, stop)
                bar.update(stop - start)
                fault_point("analyze-merge")  # tests: rank 0 dies with the file half joined


def _dataset_names(f: Any) -> list[str]:
    import h5py

    names: list[str] = []
    f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
    return names


def _create_like(f: Any, name: str, ds: Any, n: int) -> None:
    chunks = (min(ds.chunks[0], n), *ds.chunks[1:]) if ds.chunks else None
    target = f.create_dataset(
        name,
        shape=(n, *ds.shape[1:]),
        dtype=ds.dtype,
        chunks=chunks,
        compression=ds.compression,
        compression_opts=ds.compression_opts,
        shuffle=ds.shuffle,
        fletcher32=ds.fletcher32,
    )
    target.attrs.update(dict(ds.attrs))


def _copy_block(part: Any, target: Any, name: str, path: Path, start: int, stop: int) -> None:
    import numpy as np

    source = part.get(name)
    want = (stop - start, *target.shape[1:])
    if source is None or source.shape != want or source.dtype != target.dtype:
        got = "missing" if source is None else f"{source.dtype} {source.shape}"
        raise AnalyzerError(
            f"{name} in part {path.name} is {got}, expected {target.dtype} {want}; the ranks "
            "disagree"
        )
    row_bytes = max(1, int(np.prod(want[1:], dtype=np.int64)) * target.dtype.itemsize)
    step = max(1, COPY_BYTES // row_bytes)
    if target.chunks:
        step = max(target.chunks[0], step // target.chunks[0] * target.chunks[0])
    for i in range(0, stop - start, step):
        j = min(i + step, stop - start)
        target[start + i : start + j] = source[i:j]


# -- the host's side: one analyze call over torchrun's processes ------------------------------

# Ranks wait at a collective while rank 0 runs an analyzer that is not sharded: allow long ones.
WAIT_FOR_RANK_0 = 12 * 3600

GONE = (
    "another process of this torchrun job stopped (torchrun names it below); analyses "
    "published before it stopped are complete, the one running was not published"
)  # gloo's connection error names no rank: torchrun's own report does


def join_torchrun(device_name: str) -> tuple[DistContext, torch.device, bool] | None:
    """Under torchrun, join its process group (gloo: only small Python objects travel) and
    give this rank its own device, ``cuda:LOCAL_RANK`` when CUDA is asked for.

    Returns:
        None outside torchrun; else the group, this rank's device, and whether this call
        joined (a caller that initialized the group itself keeps it).
    """
    from explainkit.train.distributed import launched_by_torchrun

    if not launched_by_torchrun():
        return None
    from datetime import timedelta

    import torch.distributed

    from explainkit.device import resolve_device
    from explainkit.train.distributed import init_from_env

    requested = resolve_device(device_name)  # an unusable device is one sentence
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    gpus = torch.cuda.device_count() if requested.type == "cuda" else 0
    if requested.type == "cuda" and local_rank >= gpus:
        raise RunError(
            f"torchrun started local process {local_rank} but this machine has {gpus} GPU(s), "
            f"one per process; use --nproc-per-node {gpus} or fewer, or --device cpu"
        )
    if int(os.environ.get("RANK", "0")) != 0:  # rank 0 speaks for the job; errors still show
        logging.getLogger("explainkit").setLevel(logging.ERROR)
    initialized = torch.distributed.is_initialized()  # by the caller: leave it to them
    dist = init_from_env(requested.type, "gloo", timedelta(seconds=WAIT_FOR_RANK_0))
    device = dist.device if requested.type == "cuda" else requested
    return dist, device, not initialized


def leave_torchrun(failed: bool) -> None:
    """Leave the process group; after a failure a peer may be gone, so do not wait for it."""
    import torch.distributed as dist

    from explainkit.train.distributed import shutdown

    if failed:
        if dist.is_initialized():
            dist.destroy_process_group()
        return
    try:
        shutdown()
    except RuntimeError as e:
        raise RunError(GONE) from e


def check_same_plan(dist: DistContext, epoch: int, names: list[str]) -> None:
    """Every rank must run the same analyzers on the same epoch, or the collectives of one
    analyzer would meet those of another."""
    try:
        plans = dist.gather_objects((epoch, names))
    except RuntimeError as e:
        raise RunError(GONE) from e
    if any(plan != plans[0] for plan in plans):
        raise RunError(
            f"the ranks of this torchrun job disagree on what to run ({plans[0]} on rank 0); "
            "do all nodes see the same run directory and plugins?"
        )


ShardMaker = Callable[[Path], Shard]


def run_on_ranks(
    dist: DistContext,
    analyses: Path,
    name: str,
    num_images: int,
    sharded: bool,
    run_main: Callable[[ShardMaker | None], dict],
    run_share: Callable[[ShardMaker], None],
) -> dict:
    """One analyzer under torchrun: a shardable one on every rank, any other on rank 0 while
    the others wait. Every rank returns rank 0's manifest.

    Args:
        dist: The process group.
        analyses: The run's ``analyses/`` folder (every node sees it).
        name: The analyzer.
        num_images: The run's eval images.
        sharded: Whether every rank runs it on its own block.
        run_main: Runs it on rank 0 and returns the manifest; given a maker of its
            :class:`Shard` for an output folder when sharded, else None.
        run_share: Runs a rank's share on the other ranks, given the same maker.
    """
    parts = _parts_folder(dist, analyses, name) if sharded else None

    def make_shard(output_dir: Path) -> Shard:
        return Shard(dist.rank, dist.world_size, num_images, output_dir, parts, name, dist)

    try:
        manifest = None
        if dist.rank == 0:
            manifest = run_main(make_shard if sharded else None)
        elif sharded:
            run_share(make_shard)
        try:
            return dist.broadcast_object(manifest)
        except RuntimeError as e:
            raise RunError(GONE) from e
    finally:
        if parts is not None and dist.rank == 0:
            shutil.rmtree(parts, ignore_errors=True)


def _parts_folder(dist: DistContext, analyses: Path, name: str) -> Path:
    """``analyses/.<name>.parts-<pid of rank 0>``, made by rank 0 and named to all ranks."""
    from explainkit.rundir import remove_stale_tmp

    folder = None
    if dist.rank == 0:
        analyses.mkdir(exist_ok=True)
        remove_stale_tmp(analyses, name)
        folder = analyses / f".{name}.parts-{os.getpid()}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
    try:
        return Path(dist.broadcast_object(str(folder)))
    except RuntimeError as e:
        raise RunError(GONE) from e
