"""explain/layers.py: the one place a layer to explain is chosen."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from explainkit.errors import AnalyzerError
from explainkit.explain.gradcam import compute_cam
from explainkit.explain.layers import run_default_layer, target_layer
from tests.helpers import build_model


@pytest.fixture
def resnet():
    torch.manual_seed(0)
    return build_model("resnet18-s8", num_classes=4, width=8).eval()


def test_a_module_object_is_named_as_it_is_in_the_model(resnet):
    chosen = target_layer(resnet, resnet.layer4[-1])
    assert chosen.name == "layer4.1" and chosen.module is resnet.layer4[1]


def test_a_module_object_gives_the_same_maps_as_its_name(resnet):
    x = torch.randn(3, 3, 32, 32)
    by_module = compute_cam(resnet, x, resnet.layer3[-1])
    by_name = compute_cam(resnet, x, "layer3.1")
    torch.testing.assert_close(by_module.maps, by_name.maps)


def test_a_module_of_another_model_is_one_sentence_without_its_repr(resnet):
    other = build_model("resnet18-s8", num_classes=4, width=8)
    with pytest.raises(AnalyzerError) as info:
        target_layer(resnet, other.layer4)
    message = str(info.value)
    assert "not one of the model's modules" in message
    assert "\n" not in message and "BasicBlock(" not in message and len(message) < 300


@pytest.mark.parametrize("bad", [4, 2.5, ["layer4"], b"layer4"])
def test_a_layer_of_another_type_is_refused(resnet, bad):
    with pytest.raises(AnalyzerError, match="must be a name .* or one of the model's modules"):
        target_layer(resnet, bad)


def test_a_long_unknown_name_is_cut_in_the_message(resnet):
    with pytest.raises(AnalyzerError) as info:
        target_layer(resnet, "x" * 5000)
    assert len(str(info.value)) < 800


def test_no_layer_takes_the_models_declared_default(resnet):
    assert target_layer(resnet).name == "layer4"


def test_no_layer_and_no_default_locates_the_last_spatial_layer():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2),
    )  # fmt: skip
    chosen = target_layer(model, None, torch.zeros(1, 3, 16, 16))
    assert (chosen.name, chosen.reshape) == ("3", "nchw")
    # Without an example nothing can be located: the last child is all that is left.
    assert target_layer(model).name == "6"


def test_compute_cam_without_a_layer_locates_one_and_says_so():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(8, 3),
    )  # fmt: skip
    x = torch.randn(2, 3, 16, 16)
    with pytest.warns(UserWarning, match="no layer given; explaining '1'"):
        located = compute_cam(model, x)
    torch.testing.assert_close(located.maps, compute_cam(model, x, "1").maps)


def test_a_run_records_its_entrys_layer_else_the_located_one(resnet):
    class Entry:
        default_layer, reshape = "layer3", None

    example = torch.zeros(1, 3, 32, 32)
    assert run_default_layer(resnet, Entry(), example) == ("layer3", "auto")
    assert run_default_layer(resnet, None, example) == ("layer4", "auto")  # declared default
