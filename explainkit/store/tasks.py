"""The values of each task's datasets (schema.TASKS): what the writer refuses and the reader
calls damage, in one place.

Shapes and types are checked by validate.check_field; here are the value checks a field names
(``Field.check``) that cost a read: class ids, boxes, scores in [0, 1]. The writer turns a
problem into ValueError or StoreError before anything is written; the reader into "damaged".
"""

from __future__ import annotations

from typing import Any

import numpy as np

from explainkit.store.schema import IGNORE, TASKS, Field

# The truth datasets written a batch at a time with the images (per pixel); the rest at once.
PER_PIXEL = ("N", "H", "W")


def value_problem(spec: Field, values: np.ndarray, k: int) -> str | None:
    """What is wrong with ``values`` of ``spec`` for a store of ``k`` classes, or None."""
    if values.size == 0:
        return None
    check = spec.check
    if check == "binary" and (values.min() < 0 or values.max() > 1):
        return f"{spec.name} holds values other than 0 and 1"
    if check == "finite" and not np.isfinite(values).all():
        return f"{spec.name} holds NaN or infinity"
    if check == "class" and (values.min() < 0 or values.max() >= k):
        return f"{spec.name} holds a class outside 0..{k - 1}"
    if check == "count" and values.min() < 0:
        return f"{spec.name} holds a negative count"
    if check == "pixel" and values.max() >= k:
        return f"{spec.name} holds a class id outside 0..{k - 1}"
    if check == "truthpixel" and ((values >= k) & (values != IGNORE)).any():
        return f"{spec.name} holds a class id outside 0..{k - 1} that is not {IGNORE} (ignored)"
    if check == "unit" and not (
        np.isfinite(values).all() and values.min() >= 0 and values.max() <= 1
    ):
        return f"{spec.name} holds a score outside [0, 1]"
    if check == "box":
        if not np.isfinite(values).all():
            return f"{spec.name} holds a box with NaN or infinite corners"
        if (values[:, 2] < values[:, 0]).any() or (values[:, 3] < values[:, 1]).any():
            return f"{spec.name} holds a box whose x1 < x0 or y1 < y0"
    return None


def _field(task: str, name: str, epoch: bool) -> Field:
    specs = TASKS[task].epoch if epoch else TASKS[task].truth
    return next(spec for spec in specs if spec.name == name)


def truth_names(task: str) -> tuple[str, ...]:
    """The ground truth a ``task`` store holds besides ``eval/targets``."""
    return tuple(spec.name for spec in TASKS[task].truth[1:])


def per_pixel(task: str) -> tuple[str, ...]:
    """The truth written a batch at a time, with the images."""
    return tuple(spec.name for spec in TASKS[task].truth[1:] if spec.shape == PER_PIXEL)


def expected_shape(spec: Field, dims: dict[str, int]) -> tuple[int, ...]:
    return tuple(dims[d] if isinstance(d, str) else d for d in spec.shape)


def check_arrays(
    task: str,
    given: dict[str, Any],
    dims: dict[str, int],
    epoch: bool,
    names: list[str] | None = None,
) -> dict[str, np.ndarray]:
    """``given`` as the arrays ``task``'s truth (or epoch) stores, in their stored dtypes;
    ValueError naming the first that does not fit. ``dims`` gains the ragged dimensions;
    ``names`` limits the check to those datasets (default: every one)."""
    specs = TASKS[task].epoch if epoch else TASKS[task].truth[1:]
    if names is not None:
        specs = tuple(spec for spec in specs if spec.name in names)
    names = [spec.name for spec in specs]
    unknown = sorted(set(given) - set(names))
    missing = [name for name in names if name not in given]
    if unknown or missing:
        raise ValueError(
            f"a {task} store {'epoch' if epoch else 'truth'} takes {', '.join(names)}"
            + (f"; missing {', '.join(missing)}" if missing else "")
            + (f"; unknown {', '.join(unknown)}" if unknown else "")
        )
    counted = {name: dim for dim, name in TASKS[task].counts}
    out = {}
    for spec in specs:
        values = np.asarray(given[spec.name])
        if spec.check == "count" and values.dtype.kind in "iu" and values.ndim == 1:
            dims = {**dims, counted[spec.name]: int(values.sum())}
        shape = expected_shape(spec, dims)
        if values.shape != shape or values.dtype.kind not in "iufb":
            raise ValueError(
                f"{spec.name} must be {spec.what} of shape {shape}, got {values.shape}"
            )
        problem = value_problem(spec, values, dims["K"])
        if problem:
            raise ValueError(problem)
        out[spec.name] = values.astype(spec.dtype)
    if epoch:
        for dim, name in TASKS[task].counts:
            if name in out:
                dims[dim] = int(out[name].sum())
    return out


def check_batch(task: str, name: str, values: Any, shape: tuple[int, ...], k: int) -> np.ndarray:
    """One batch of per-pixel truth ``name``, as stored; ValueError if it does not fit."""
    spec = _field(task, name, epoch=False)
    values = np.asarray(values)
    if values.shape != shape or values.dtype.kind not in "iu":
        raise ValueError(f"{name} must be integer class ids of shape {shape}, got {values.shape}")
    problem = value_problem(spec, values, k)
    if problem:
        raise ValueError(problem)
    return values.astype(spec.dtype)


def split_ragged(counts: np.ndarray, *tables: np.ndarray) -> list[tuple[np.ndarray, ...]]:
    """Per image, its rows of each ragged table (the counts say how many are whose)."""
    ends = np.cumsum(counts)
    starts = ends - counts
    return [tuple(t[s:e] for t in tables) for s, e in zip(starts, ends, strict=True)]
