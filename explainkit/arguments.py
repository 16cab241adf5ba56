"""The Python API's argument checks: a wrong type or value is one ConfigError sentence, the one
the CLI would print, before anything runs or is written.

``explainkit.api`` checks every argument of its public calls here (``evaluate``,
``RunWriter`` and its ``log_epoch``, ``analyze``, ``load_model``), so a library caller gets
an :class:`~explainkit.errors.ExplainkitError` subclass, never a TypeError from deep inside.
Nothing heavier than the standard library is imported at module level.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Callable, Mapping
from typing import Any

from explainkit.errors import ConfigError, describe

__all__ = ["check", "checked_number", "is_path", "plain_kwargs"]

Check = tuple[Callable[[Any], bool], str]


def is_path(value: Any) -> bool:
    return isinstance(value, (str, os.PathLike)) and bool(os.fspath(value))


def _optional(test: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: value is None or test(value)


def _int_from(low: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= low


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool)


def _is_text(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip()) and len(value) <= 200


def _names(value: Any) -> bool:
    return (
        isinstance(value, (list, tuple))
        and bool(value)
        and all(isinstance(v, str) and v for v in value)
    )


def _three_finite(positive: bool) -> Callable[[Any], bool]:
    def test(value: Any) -> bool:
        if not isinstance(value, (list, tuple)) or len(value) not in (1, 3):
            return False
        for v in value:
            if not isinstance(v, numbers.Real) or isinstance(v, bool):
                return False
            if not math.isfinite(float(v)) or (positive and float(v) <= 0):
                return False
        return True

    return test


def plain_kwargs(value: Any) -> bool:
    """A model's build arguments as a run records them: names to JSON-plain values, or lists
    of them (a detector's ``label_names``)."""
    return isinstance(value, Mapping) and all(
        isinstance(k, str)
        and k
        and (_plain(v) or (isinstance(v, list) and len(v) <= 100_000 and all(_plain(x) for x in v)))
        for k, v in value.items()
    )


def _plain(v: Any) -> bool:
    return v is None or isinstance(v, (str, bool, int)) or _finite_float(v)


def _finite_float(value: Any) -> bool:
    return isinstance(value, float) and math.isfinite(value)


def _device(value: Any) -> bool:
    return isinstance(value, str) or type(value).__name__ == "device"


def _trust(value: Any) -> bool:
    return (
        value is None
        or isinstance(value, (bool, str))
        or (isinstance(value, (list, tuple, set, frozenset)) and all(_is_text(v) for v in value))
    )


# name -> (test, what it must be), for every public argument that has one meaning everywhere.
CHECKS: dict[str, Check] = {
    "out": (_optional(is_path), "a path (str or os.PathLike) or None"),
    "run": (is_path, "a run directory or checkpoint path (str or os.PathLike)"),
    "classes": (_optional(_names), "a non-empty list of class names (str)"),
    "mean": (
        _optional(_three_finite(False)),
        "3 finite numbers, one per RGB channel (or 1 for a grayscale model)",
    ),
    "std": (
        _optional(_three_finite(True)),
        "3 positive finite numbers, one per RGB channel (or 1 for a grayscale model)",
    ),
    "fit": (lambda v: v in ("crop", "pad", "stretch"), "'crop', 'pad' or 'stretch'"),
    "arch": (_optional(_is_text), "a model name or import:package.module:factory (str)"),
    "kwargs": (
        _optional(plain_kwargs),
        "a dict of names to plain JSON values (str, int, finite float, bool, None)",
    ),
    "default_layer": (_optional(_is_text), "a layer name (str) or None"),
    "data_dir": (_optional(is_path), "a folder path (str or os.PathLike) or None"),
    "image_size": (_optional(_int_from(1)), "an int of 1 or more, or None"),
    "limit_eval": (_optional(_int_from(1)), "an int of 1 or more, or None"),
    "device": (_device, "a device name such as 'auto', 'cpu' or 'cuda:0'"),
    "batch_size": (_int_from(1), "an int of 1 or more"),
    "overwrite": (_is_bool, "True or False"),
    "epoch": (_optional(_int_from(1)), "an epoch number (int of 1 or more) or None"),
    "seed": (_int_from(0), "an int of 0 or more"),
    "task": (
        lambda v: v in ("classification", "multilabel", "segmentation", "detection", "video"),
        "'classification', 'multilabel', 'segmentation', 'detection' or 'video'",
    ),
    "plugins": (
        _optional(lambda v: isinstance(v, (list, tuple, set)) and all(_is_text(n) for n in v)),
        "a list of analyzer names (str) or None",
    ),
    "plugins_dir": (_optional(is_path), "a folder path (str or os.PathLike) or None"),
    "echo": (_optional(callable), "a function taking one line (str), or None"),
    "collect_failures": (_is_bool, "True or False"),
    "trust_imports": (_trust, "True, False, or the module names (str) to trust"),
}


def check(function: str, values: Mapping[str, Any], extra: Mapping[str, Check] = {}) -> None:  # noqa: B006 - read only
    """Raise ConfigError naming the first argument of ``function`` whose value is wrong."""
    for name, value in values.items():
        rule = extra.get(name) or CHECKS.get(name)
        if rule is not None and not rule[0](value):
            raise ConfigError(f"{function}: {name} must be {rule[1]}, got {describe(value)}")


def checked_number(function: str, name: str, value: Any) -> float | None:
    """A training number (loss, accuracy, learning rate...) as a finite float, or None;
    a 1-element tensor or a NumPy scalar is read as its value."""
    if value is None:
        return None
    if not isinstance(value, numbers.Real) and hasattr(value, "item"):
        try:
            value = value.item()  # loss tensors, NumPy scalars
        except (ValueError, RuntimeError, TypeError):
            pass
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{function}: {name} must be a number, got {describe(value)}")
    number = float(value)
    if not math.isfinite(number):
        raise ConfigError(f"{function}: {name} must be finite, got {number!r}")
    return number
