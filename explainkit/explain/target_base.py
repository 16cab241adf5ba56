"""The base of every target: one score per image from a model's output, and per-image data
cut with its images. The targets themselves are in :mod:`explainkit.explain.targets`."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from explainkit.errors import AnalyzerError

__all__ = ["Target", "parse_classes"]


class Target:
    """Base class: ``scores(output)`` is the (N,) scalar per image whose gradient is explained.

    Attributes:
        per_image: names of attributes holding one entry per image (cut by :meth:`take`).
    """

    per_image: tuple[str, ...] = ()

    def scores(self, output: Any) -> Tensor:
        """(N,) differentiable scores of the model's ``output``."""
        raise NotImplementedError

    def objective(self, output: Any) -> tuple[Tensor, Tensor]:
        """``(tensor, grad_outputs)`` whose vector-Jacobian product is d(sum of scores)."""
        s = self.scores(output)
        return s, torch.ones_like(s)

    def classes(self, output: Any, n: int) -> Tensor:
        """(N,) int64: the class each image's map explains, -1 where none is (embeddings)."""
        return torch.full((n,), -1, dtype=torch.int64)

    def take(self, index: Tensor) -> Target:
        """This target for the images ``index`` (a batch, or the same images repeated, as
        Captum's Integrated Gradients repeats them per step)."""
        if not self.per_image:
            return self
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        for name in self.per_image:
            value = getattr(self, name)
            if isinstance(value, Tensor) and value.dim() > 0:
                setattr(new, name, value[index.to(value.device)])
            elif isinstance(value, list):
                setattr(new, name, [value[int(i)] for i in index])
        return new

    def _count(self, n: int) -> None:
        for name in self.per_image:
            value = getattr(self, name)
            size = len(value) if isinstance(value, (list, Tensor)) and _has_len(value) else None
            if size is not None and size != n:
                raise AnalyzerError(
                    f"the {type(self).__name__} target holds {size} {name} for {n} images; "
                    "give one per "
                    "image, or one for all"
                )


def _has_len(value: Any) -> bool:
    return not isinstance(value, Tensor) or value.dim() > 0


def parse_classes(value: Any, what: str) -> Any:
    """``"predicted"``, an int, or an int64 tensor of one class per image."""
    if isinstance(value, str):
        if value != "predicted":
            raise AnalyzerError(
                f"the class of a {what} target must be 'predicted', a class index or one per image"
            )
        return value
    if isinstance(value, bool):
        raise AnalyzerError(f"the class of a {what} target must be a class index, not {value!r}")
    if isinstance(value, int):
        return value
    t = torch.as_tensor(value)
    if t.dim() != 1 or t.is_floating_point() or t.dtype == torch.bool:
        raise AnalyzerError(
            f"the class of a {what} target must be integer class indices, one per image"
        )
    return t.to(torch.int64)
