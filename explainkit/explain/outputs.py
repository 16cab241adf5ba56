"""One adapter from whatever a model returns to the class scores explainkit explains.

Classifiers in the wild return a tensor (torchvision, timm), a transformers ``ModelOutput``
(``.logits``), a dict (``{"logits": ...}``, torchvision segmentation's ``{"out": ...}``) or a
tuple whose first element is the scores (models with auxiliary heads). Every place that runs a
model for its scores (evaluation, the CAM engine, Captum methods, the quality metrics) calls
:func:`scores_of`, so a model is adapted the same way everywhere and refused with the same
sentence when it cannot be.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from explainkit.errors import AnalyzerError

__all__ = ["ScoresModel", "as_scores_model", "describe_output", "scores_of"]

# Keys of a dict or attributes of an output object that hold the scores, in order of trust.
SCORE_KEYS = ("logits", "out", "scores", "pred")


def scores_of(output: Any) -> Tensor:
    """The floating (N, ...) scores inside a model's ``output``.

    Raises:
        AnalyzerError: the output holds no tensor of scores, or holds integers (a model that
            returns class ids cannot be explained by gradients).
    """
    found = _find_scores(output)
    if found is None:
        raise AnalyzerError(
            f"the model returned {describe_output(output)}, which holds no class scores; "
            "return a tensor, a tuple starting with one, or a dict or object with 'logits' "
            "or 'out'"
        )
    if not found.is_floating_point():
        raise AnalyzerError(
            f"the model returned {found.dtype} scores; explanations need floating-point "
            "logits or probabilities, not class ids"
        )
    return found


def _find_scores(output: Any) -> Tensor | None:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping):
        for key in SCORE_KEYS:
            if isinstance(output.get(key), Tensor):
                return output[key]
        return None
    for key in SCORE_KEYS:  # transformers' ModelOutput and other result objects
        value = getattr(output, key, None)
        if isinstance(value, Tensor):
            return value
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    return None


def describe_output(output: Any) -> str:
    """``a tensor of shape (2, 10)``, ``a dict with keys boxes, labels``: for messages."""
    if isinstance(output, Tensor):
        return f"a {output.dtype} tensor of shape {tuple(output.shape)}"
    if isinstance(output, Mapping):
        keys = ", ".join(str(k) for k in list(output)[:6]) or "none"
        return f"a dict with keys {keys}"
    if isinstance(output, (tuple, list)):
        inner = describe_output(output[0]) if output else "nothing"
        return f"a {type(output).__name__} of {len(output)} starting with {inner}"
    return f"a {type(output).__name__}"


class ScoresModel(nn.Module):
    """``model`` whose forward returns :func:`scores_of` its output.

    For libraries that call the model themselves (Captum): the wrapped model stays a
    submodule, so its layers (and hooks on them) are the same objects.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        return scores_of(self.model(*args, **kwargs))


def as_scores_model(model: nn.Module) -> nn.Module:
    """``model`` itself when already wrapped, else a :class:`ScoresModel` around it."""
    return model if isinstance(model, ScoresModel) else ScoresModel(model)
