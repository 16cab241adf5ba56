import pytest
import torch

from explainkit.errors import ConfigError
from explainkit.explain.layers import target_layer
from tests.helpers import build_model


def count(model):
    return sum(p.numel() for p in model.parameters())


def test_seed_resnet18_has_the_seed_parameter_count():
    assert count(build_model("resnet18-s8")) == 11_189_322


def test_standard_resnet18_parameter_count():
    assert count(build_model("resnet18")) == 11_173_962


@pytest.mark.parametrize("arch", ["resnet18-s8", "resnet18"])
@pytest.mark.parametrize("size", [32, 64])
def test_models_run_on_small_and_larger_inputs(arch, size):
    model = build_model(arch, num_classes=37, width=8).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, size, size)).shape == (2, 37)


def test_seed_variant_keeps_an_8x8_last_stage():
    model = build_model("resnet18-s8", width=8).eval()
    seen = {}

    def hook(module, inputs, output):
        seen["shape"] = output.shape

    model.layer4.register_forward_hook(hook)
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert seen["shape"] == (1, 64, 8, 8)
    assert target_layer(model).name == "layer4"


def test_relus_are_modules_and_not_inplace():
    relus = [m for m in build_model("resnet18", width=8).modules() if isinstance(m, torch.nn.ReLU)]
    assert relus and not any(r.inplace for r in relus)


def test_width_scales_every_stage():
    model = build_model("resnet18-s8", width=16)
    assert model.layer4[0].conv1.out_channels == 128
    assert model.linear.in_features == 128 * 4


def test_unknown_model_is_refused():
    with pytest.raises(ConfigError, match="unknown model 'vgg'; did you mean 'torchvision:vgg19'"):
        build_model("vgg")
