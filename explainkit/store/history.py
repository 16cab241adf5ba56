"""The training history's checks: one row per committed epoch, numbered, finite, >= 0.

Kept apart from validate.py so each stays readable; :class:`Damage` is the phrase both
raise for what is wrong with a store that is ours.
"""

from __future__ import annotations

import h5py
import numpy as np

from explainkit.store.schema import HISTORY_COLUMNS, OPTIONAL_HISTORY_COLUMNS


class Damage(Exception):
    """What is wrong with a store that is ours, as a phrase; becomes one StoreError sentence."""


# -- the history -------------------------------------------------------------------------------


def recorded(
    rows: np.ndarray, name: str, optional: tuple[str, ...] = OPTIONAL_HISTORY_COLUMNS
) -> bool:
    """Whether the history ``rows`` hold column ``name`` (an ``optional`` one may be absent
    or all NaN, which means not recorded)."""
    if name not in (rows.dtype.names or ()):
        return False
    if name in optional and len(rows):
        return not np.isnan(rows[name].astype(np.float64)).all()
    return True


def check_history(
    rows: np.ndarray,
    first: int,
    where: str = "the history",
    optional: tuple[str, ...] = OPTIONAL_HISTORY_COLUMNS,
) -> None:
    """The ``rows`` of epochs ``first``, ``first + 1``, ...: numbered so, finite, >= 0.

    An optional column (``OPTIONAL_HISTORY_COLUMNS``) may be absent, or NaN in every row (not
    recorded); NaN in some rows only is damage.
    """
    names = rows.dtype.names or ()
    expected = np.arange(first, first + len(rows))
    if not np.array_equal(rows["epoch"], expected):
        shown = ", ".join(f"{v:g}" for v in rows["epoch"][:5].astype(np.float64))
        span = f"{first}..{first + len(rows) - 1}" if len(rows) != 1 else str(first)
        raise Damage(f"{where}'s epoch column is [{shown}], not {span}")
    for name, _ in HISTORY_COLUMNS[1:]:
        if name not in names:
            continue  # an optional column this table does not have
        column = rows[name].astype(np.float64)
        if name in optional and column.size and np.isnan(column).all():
            continue  # not recorded by the writer
        if not np.isfinite(column).all():
            raise Damage(f"{where}'s {name} column holds NaN or infinity")
        if (column < 0).any():
            raise Damage(f"{where}'s {name} column holds a negative value")


def check_history_table(
    history: h5py.Dataset, length: int, what: str, optional: tuple[str, ...]
) -> None:
    """``history`` must be a 1-D table of ``length`` rows with the numeric columns."""
    names = history.dtype.names or ()
    if (
        history.ndim != 1
        or history.shape != (length,)
        or any(
            (name not in names and name not in optional)
            or (name in names and history.dtype[name].kind not in "iuf")
            for name, _ in HISTORY_COLUMNS
        )
    ):
        raise Damage(f"{what} lacks its numeric columns")
