"""Round-robin timing shared by the benchmarks: each method timed in turn, best pass counts.

Timing methods one after the other favours whichever runs later (allocator caches, weight
packing, clock boosts) and, on a shared machine, whichever runs while the others' load is
low. Warming every method up and then passing over them round-robin, ``repeats`` times, puts
every method through the same conditions; the best pass of each is its time, and ratios of
best passes are what the benchmarks report.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def round_robin(
    fns: dict[str, Callable[[], Any]],
    repeats: int = 3,
    sync: Callable[[], None] = lambda: None,
    warmup: int = 1,
) -> tuple[dict[str, float], dict[str, Any]]:
    """Best seconds of each ``fn()`` over ``repeats`` round-robin passes, and its last output."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync()
    best = dict.fromkeys(fns, float("inf"))
    outputs: dict[str, Any] = {}
    for _ in range(max(repeats, 1)):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            outputs[name] = fn()
            sync()
            best[name] = min(best[name], time.perf_counter() - start)
    return best, outputs
