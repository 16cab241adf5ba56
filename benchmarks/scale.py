"""Store commit cost: the time of one epoch's commit at 10,000 and 50,000 eval images, at epoch 1
and epoch 20, with 10 and 1000 classes.

A commit writes one epoch file (that epoch's logits and history row), so it should not
grow with the images stored or with the epochs before it; only with the logits themselves
(N x classes floats). Printed side by side: milliseconds per commit, milliseconds per MB of
logits, each case's ratio to the same classes' 10,000-image epoch-1 commit (per MB), and the
ratio to epoch 1 at the same size (goal: within 10%). Epoch 2 is measured too: it is the
first commit that checks an earlier epoch file (a constant cost), so epoch 2 against epoch 20
shows whether the earlier epochs cost anything.

    python benchmarks/scale.py                       # everything (a few minutes)
    python benchmarks/scale.py --images 10000 --classes 10 --repeats 3

Images are 32 x 32 x 3 random pixels (stored once, streamed by StoreBuilder); logits random
normal float32 (incompressible, like real logits). The 19 epochs before epoch 20 hold zeros
(cheap to write: a commit never reads them, only their names and the latest file's
attributes). Each epoch case has its own copy of the store; the cases take turns
(interleaved) and the disk is synced before each timed commit, so noise from other work hits
them alike.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from explainkit.store import HISTORY_COLUMNS, StoreBuilder, append_epoch, truncate_store

SHAPE = (32, 32, 3)
# Epoch 1 has no earlier epoch file to check; epoch 2 is the first commit that checks one.
EPOCHS = (1, 2, 20)


def row(epoch: int) -> dict[str, float]:
    return {**{name: 0.5 for name, _ in HISTORY_COLUMNS}, "epoch": epoch}


def split(n: int, classes: int) -> dict:
    return dict(
        targets=np.arange(n) % classes,
        index=np.arange(n),
        classes=[f"c{i}" for i in range(classes)],
        dataset="synthetic",
        model={"arch": "resnet18", "num_classes": classes},
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
    )


def build(path: Path, n: int, classes: int) -> float:
    """Stream n random images into a new store; seconds taken."""
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    with StoreBuilder(path, **split(n, classes), image_shape=SHAPE) as builder:
        for first in range(0, n, 1000):
            count = min(1000, n - first)
            builder.add_images(rng.integers(0, 256, (count, *SHAPE), dtype=np.uint8))
    return time.perf_counter() - start


def interleaved_commits(
    paths: dict[int, Path], logits: np.ndarray, repeats: int
) -> dict[int, list[float]]:
    """Seconds of committing epoch E to the store ``paths[E]`` (which holds E - 1 epochs),
    ``repeats`` times, truncating back between tries. The cases take turns, so a burst of
    other work on the machine hits them alike; the disk is synced before each timed commit,
    so none pays for the writeback of the one before."""
    times: dict[int, list[float]] = {epoch: [] for epoch in paths}
    for _ in range(repeats):
        for epoch, path in paths.items():
            os.sync()
            start = time.perf_counter()
            append_epoch(path, logits, row(epoch))
            times[epoch].append(time.perf_counter() - start)
            truncate_store(path, epoch - 1)
    return times


def measure(folder: Path, n: int, classes: int, repeats: int) -> dict:
    """Commit times at each of EPOCHS; the earlier epochs hold zeros (never read by a
    commit)."""
    first = folder / f"{n}-{classes}-1.h5"
    took = build(first, n, classes)
    print(f"  head: {n} images streamed in {took:.1f} s", flush=True)
    logits = np.random.default_rng(1).standard_normal((n, classes)).astype(np.float32)
    earlier = np.zeros_like(logits)
    paths = {1: first}
    for epoch in EPOCHS[1:]:  # copies of the same head, each with epoch - 1 epochs
        paths[epoch] = first.with_name(f"{n}-{classes}-{epoch}.h5")
        shutil.copyfile(first, paths[epoch])
        for done in range(1, epoch):
            append_epoch(paths[epoch], earlier, row(done))
    return interleaved_commits(paths, logits, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, nargs="+", default=[10_000, 50_000])
    parser.add_argument("--classes", type=int, nargs="+", default=[10, 1000])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: temp)")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = Path(tmp)
        for classes in args.classes:
            for n in args.images:
                print(f"{n} images, {classes} classes", flush=True)
                mb = n * classes * 4 / 2**20
                times = measure(folder, n, classes, args.repeats)
                for epoch in EPOCHS:
                    rows.append((classes, n, epoch, mb, times[epoch]))
                for path in folder.iterdir():  # free the disk for the next case
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
    print_table(rows)


def print_table(rows: list[tuple]) -> None:
    """Markdown, for docs/performance.md. Times: the minimum of the repeats (the least
    disturbed try, used for the ratios) and the median in brackets."""
    per_mb = {}  # classes -> ms per MB of the first (fewest images) epoch-1 commit
    for classes, _, epoch, mb, times in rows:
        if epoch == 1 and classes not in per_mb:
            per_mb[classes] = min(times) / mb
    print()
    print(
        "| classes | images | epoch | logits MB | commit ms | ms per MB | per MB vs "
        "fewest images | vs epoch 1 |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for classes, n, epoch, mb, times in rows:
        first = min(next(r for r in rows if r[:3] == (classes, n, 1))[4])
        best = min(times)
        print(
            f"| {classes} | {n:,} | {epoch} | {mb:.1f} | {best * 1000:.0f} "
            f"({statistics.median(times) * 1000:.0f}) | {best * 1000 / mb:.1f} "
            f"| {best / mb / per_mb[classes]:.2f} | {best / first:.2f} |"
        )


if __name__ == "__main__":
    main()
