"""Round-robin timing shared by the benchmarks: methods take turns, batch by batch.

Timing methods one after the other favours whichever runs later (allocator caches, weight
packing, clock boosts) and, on a shared machine, whichever runs while the others' load is
low. Here every method is warmed up, then the methods take turns on each unit of work (a
batch), ``repeats`` times over all units; a method's time is the sum over units of its best
time on that unit. A burst of load from another process then spoils one unit of one pass,
not a whole pass of one method, and ratios of these times hold up on a loaded machine.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def round_robin(
    fns: dict[str, Callable[[int], Any]],
    units: int,
    repeats: int = 3,
    sync: Callable[[], None] = lambda: None,
    warmup: int = 1,
) -> tuple[dict[str, float], dict[str, list[Any]]]:
    """Seconds of each ``fn(unit)`` summed over ``units`` (best of ``repeats`` per unit),
    and each method's outputs of the last pass, in unit order."""
    for fn in fns.values():
        for _ in range(warmup):
            fn(0)
    sync()
    best = {name: [float("inf")] * units for name in fns}
    outputs: dict[str, list[Any]] = {name: [None] * units for name in fns}
    names = list(fns)
    for r in range(max(repeats, 1)):
        for unit in range(units):
            shift = (r + unit) % len(names)  # who goes first rotates too
            for name in names[shift:] + names[:shift]:
                sync()
                start = time.perf_counter()
                outputs[name][unit] = fns[name](unit)
                sync()
                best[name][unit] = min(best[name][unit], time.perf_counter() - start)
    return {name: sum(times) for name, times in best.items()}, outputs
