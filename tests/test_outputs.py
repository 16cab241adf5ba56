"""The one output adapter: tuples, dicts and result objects are explained like tensors."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn

from explainkit.errors import AnalyzerError
from explainkit.explain.attribution import attribution_fn
from explainkit.explain.gradcam import compute_cam
from explainkit.explain.outputs import ScoresModel, describe_output, scores_of
from tests.helpers import build_model


@dataclass
class ImageClassifierOutput:  # the shape of transformers' ModelOutput: attributes
    logits: torch.Tensor
    hidden_states: tuple | None = None


class Wrapped(nn.Module):
    """A classifier whose forward returns its scores inside ``shape``."""

    def __init__(self, inner: nn.Module, shape: str) -> None:
        super().__init__()
        self.inner, self.shape = inner, shape

    def forward(self, x):
        logits = self.inner(x)
        if self.shape == "tuple":
            return logits, logits.detach() * 0  # an auxiliary head after the scores
        if self.shape == "logits":
            return {"logits": logits, "aux": x.mean()}
        if self.shape == "out":
            return {"aux": x.mean(), "out": logits}  # torchvision segmentation's key
        return ImageClassifierOutput(logits=logits)


@pytest.fixture(scope="module")
def inner():
    torch.manual_seed(0)
    return build_model("resnet18-s8", 10, width=8).eval()


@pytest.mark.parametrize("shape", ["tuple", "logits", "out", "object"])
def test_grad_cam_of_a_wrapped_output_equals_the_plain_model(inner, shape):
    x = torch.randn(3, 3, 32, 32)
    plain = compute_cam(inner, x, "layer4", target="predicted")
    wrapped = compute_cam(Wrapped(inner, shape), x, "inner.layer4", target="predicted")
    assert torch.equal(plain.targets, wrapped.targets)
    assert torch.allclose(plain.maps, wrapped.maps, atol=1e-6)


def test_captum_methods_see_the_scores_of_a_dict_model(inner):
    x = torch.randn(2, 3, 32, 32)
    targets = torch.tensor([1, 2])
    for method in ("saliency", "guided_gradcam"):
        layer = "layer4"
        plain = attribution_fn(method, layer=layer)(inner, x, targets)
        wrapped = attribution_fn(method, layer="inner." + layer)(
            Wrapped(inner, "logits"), x, targets
        )
        assert torch.allclose(plain, wrapped, atol=1e-6), method


def test_evaluate_accepts_a_model_returning_a_dict(inner, tmp_path):
    import explainkit

    images = np.random.default_rng(0).integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(12) % 10
    classes = [f"c{i}" for i in range(10)]
    run_plain = explainkit.evaluate(inner, (images, labels), tmp_path / "a", classes=classes,
                                    device="cpu")  # fmt: skip
    run_dict = explainkit.evaluate(Wrapped(inner, "out"), (images, labels), tmp_path / "b",
                                   classes=classes, device="cpu")  # fmt: skip
    from explainkit.store import open_store

    with open_store(run_plain) as a, open_store(run_dict) as b:
        assert np.allclose(a.logits(a.epochs[-1]), b.logits(b.epochs[-1]), atol=1e-6)


@pytest.mark.parametrize(
    ("output", "fragment"),
    [
        (
            [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0)}],
            "a list of 1 starting with a dict",
        ),
        ({"boxes": torch.zeros(1, 4)}, "a dict with keys boxes"),
        (torch.zeros(2, 10, dtype=torch.int64), "torch.int64 scores"),
        ("text", "a str, which holds no class scores"),
        ((), "a tuple of 0 starting with nothing"),
    ],
)
def test_outputs_without_scores_are_refused_in_one_sentence(output, fragment):
    with pytest.raises(AnalyzerError, match=None) as info:
        scores_of(output)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_the_wrapper_keeps_the_models_own_layers(inner):
    wrapped = ScoresModel(Wrapped(inner, "tuple"))
    assert wrapped.model.inner.layer4 is inner.layer4
    assert describe_output(torch.zeros(2, 3)) == "a torch.float32 tensor of shape (2, 3)"
