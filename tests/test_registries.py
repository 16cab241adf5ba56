"""The model registry: explainkit's ResNets, the torchvision and timm families, lookups with a
did-you-mean, initial weights (``--weights``), and model specs old and new.

Architectures are built with random weights (nothing is downloaded); shapes are checked on the
meta device, which runs a forward pass without memory or arithmetic.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch

from explainkit import ModelEntry, manager
from explainkit.config import TrainConfig
from explainkit.errors import CheckpointError, ConfigError, ExplainkitError
from explainkit.registries import accepted_kwargs, spec_kwargs
from explainkit.train.weights import InitialWeights, apply_weights
from tests.helpers import build_model, registries

HAS_TIMM = importlib.util.find_spec("timm") is not None


pytestmark = pytest.mark.usefixtures("fresh_plugins")


def model_entry(name: str) -> ModelEntry:
    return registries().model_entry(name)


def read_weights(value: str, entry: ModelEntry):
    from explainkit.train.weights import read_weights

    return read_weights(value, entry, registries())


def params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def layer_output_shape(entry: ModelEntry, size: int = 64, **offered) -> tuple[int, ...]:
    """The shape of ``entry.default_layer``'s output for two size x size images (meta device)."""
    seen = []
    with torch.device("meta"):
        model = entry.build(3, **accepted_kwargs(entry.build, {"image_size": size, **offered}))
        layer = dict(model.named_modules())[entry.default_layer]
        layer.register_forward_hook(lambda m, i, out: seen.append(tuple(out.shape)))
        assert tuple(model.eval()(torch.zeros(2, 3, size, size)).shape) == (2, 3)
    return seen[0]


# -- the built-ins ---------------------------------------------------------------------------


def test_builtin_names_come_from_the_builtin_plugin():
    pm = manager.get_plugin_manager(entrypoints=False, quiet=True)
    models = manager.get_models(pm)
    tasks = ["torchvision_detection:", "torchvision_segmentation:", "torchvision_video:"]
    assert list(models) == [
        "resnet18-s8",
        "resnet18",
        "torchvision:",
        "timm:",
        "hf:",
        "import:",
        "fcn-s8",
        "fcos-s8",
        *tasks,
    ]
    assert {r.plugin_name for r in models.values()} == {
        "explainkit.plugins.default_models",
        "explainkit.plugins.small_task_models",
        "explainkit.plugins.task_models",
    }
    assert {r.source for r in models.values()} == {"builtin"}
    assert manager.build_registries(pm).model_names() == [
        "resnet18-s8", "resnet18", "torchvision:NAME", "timm:NAME", "hf:NAME", "import:NAME",
        "fcn-s8", "fcos-s8", *(f"{t}NAME" for t in tasks),
    ]  # fmt: skip


def test_a_model_by_import_path_builds_with_its_class_count_and_arguments():
    """``import:package.module:factory`` builds ``factory(num_classes=N, **kwargs)`` from any
    importable module (a dotted bare ``package.module:factory`` means the same)."""
    from evaluate_models import TinyNet

    for name in ("import:evaluate_models:tiny_net", "import:evaluate_models:TinyNet"):
        model = build_model(name, num_classes=5)
        assert isinstance(model, TinyNet) and model.head.out_features == 5
    entry = model_entry("import:evaluate_models:TinyNet")
    assert entry.name == "import:evaluate_models:TinyNet" and entry.default_layer is None
    with pytest.raises(ConfigError, match="is not a class or function taking num_classes"):
        model_entry("json.decoder:JSONDecoder")  # the bare dotted form reaches the family


@pytest.mark.parametrize("arch, expected", [("resnet18-s8", 11_189_322), ("resnet18", 11_173_962)])
def test_explainkit_resnets_build_through_the_registry(arch, expected):
    from explainkit.models import resnet

    entry = model_entry(arch)
    assert (entry.default_layer, entry.reshape) == ("layer4", "nchw")
    assert accepted_kwargs(entry.build, {"width": 8, "image_size": 32}) == {"width": 8}
    assert params(build_model(arch, 10)) == expected
    assert registries().count_parameters(arch, 64, 32) == expected
    factory = resnet.resnet18_s8 if arch == "resnet18-s8" else resnet.resnet18
    small = build_model(arch, 37, width=8)
    assert params(small) == params(factory(num_classes=37, width=8))


# -- torchvision -------------------------------------------------------------------------------


def test_every_torchvision_classifier_resolves():
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    assert {"resnet50", "vit_b_16", "swin_t", "convnext_tiny", "efficientnet_b0"} <= set(names)
    for name in names:
        entry = model_entry(f"torchvision:{name}")
        assert entry.name == f"torchvision:{name}" and entry.mean and entry.std
        assert entry.weights is not None


@pytest.mark.parametrize(
    "name, layer, reshape, shape",
    [
        ("resnet18", "layer4", "nchw", (2, 512, 2, 2)),
        ("resnext50_32x4d", "layer4", "nchw", (2, 2048, 2, 2)),
        ("wide_resnet50_2", "layer4", "nchw", (2, 2048, 2, 2)),
        # (N, 1 + 4x4 patches, C): the class token and the patch grid of a 64-pixel image.
        ("vit_b_16", "encoder.layers.encoder_layer_11.ln_1", "vit", (2, 17, 768)),
        ("vit_l_32", "encoder.layers.encoder_layer_23.ln_1", "vit", (2, 5, 1024)),
        ("swin_t", "features.7", "swin", (2, 2, 2, 768)),  # channels-last
        ("convnext_tiny", "features.7", "nchw", (2, 768, 2, 2)),
        ("efficientnet_b0", "features", "nchw", (2, 1280, 2, 2)),
        ("mobilenet_v3_small", "features", "nchw", (2, 576, 2, 2)),
        ("densenet121", "features", "nchw", (2, 1024, 2, 2)),
        ("vgg11", "features", "nchw", (2, 512, 2, 2)),
    ],
)
def test_torchvision_default_layers_are_real_modules_of_the_right_layout(
    name, layer, reshape, shape
):
    entry = model_entry(f"torchvision:{name}")
    assert (entry.default_layer, entry.reshape) == (layer, reshape)
    assert layer_output_shape(entry) == shape


def test_torchvision_models_without_a_known_stage_are_located_at_training_time():
    entry = model_entry("torchvision:alexnet")
    assert entry.default_layer is None and entry.reshape is None
    assert model_entry("torchvision:inception_v3").input_size == 299


def test_a_torchvision_vit_takes_the_image_size():
    entry = model_entry("torchvision:vit_b_16")
    assert accepted_kwargs(entry.build, {"width": 8, "image_size": 32}) == {"image_size": 32}
    assert layer_output_shape(entry, size=32) == (2, 5, 768)  # 2x2 patches


# -- timm ----------------------------------------------------------------------------------------


def test_timm_models_without_timm_say_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # an import of timm now fails, as uninstalled
    with pytest.raises(ConfigError) as e:
        model_entry("timm:resnet18")
    assert str(e.value) == "timm models need timm: pip install explainkit[timm]"
    TrainConfig(model="timm:resnet18").validate(registries=registries())  # the prefix is known


@pytest.mark.skipif(not HAS_TIMM, reason="timm is not installed (pip install explainkit[timm])")
@pytest.mark.parametrize(
    "name, layer, reshape, shape",
    [
        ("resnet18", "layer4", "nchw", (2, 512, 2, 2)),
        ("vit_tiny_patch16_224", "blocks.11.norm1", "vit", (2, 17, 192)),
        ("swin_tiny_patch4_window7_224", "layers.3", "swin", (2, 2, 2, 768)),
    ],
)
def test_timm_models_resolve_with_their_last_stage(name, layer, reshape, shape):
    entry = model_entry(f"timm:{name}")
    assert (entry.default_layer, entry.reshape, entry.input_size) == (layer, reshape, 224)
    assert layer_output_shape(entry) == shape


@pytest.mark.skipif(not HAS_TIMM, reason="timm is not installed (pip install explainkit[timm])")
def test_a_mistyped_timm_name_gets_a_suggestion():
    with pytest.raises(ConfigError, match="did you mean 'timm:resnet18'"):
        model_entry("timm:resnet18x")


# -- unknown names -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, suggestion",
    [
        ("resnet19", "resnet18"),
        ("resnet50", "torchvision:resnet50"),  # a family's name without its prefix
        ("torchvision:resnt50", "torchvision:resnet50"),
        ("torchvison:resnet50", "torchvision:resnet50"),
    ],
)
def test_unknown_models_get_one_sentence_with_a_did_you_mean(name, suggestion):
    with pytest.raises(ConfigError) as e:
        model_entry(name)
    text = str(e.value)
    assert text.startswith(f"unknown model {name!r}; did you mean {suggestion!r}? available: ")
    assert "resnet18-s8, resnet18, torchvision:NAME, timm:NAME" in text and "\n" not in text


def test_config_checks_names_without_importing_torch():
    code = (
        "import sys\n"
        "from explainkit.config import TrainConfig\nfrom explainkit.errors import ConfigError\n"
        "from explainkit.manager import load_registries\nregistries = load_registries()\n"
        "TrainConfig(model='torchvision:resnet50', dataset='shapes').validate(\n"
        "    check_memory=False, registries=registries)\n"
        "print(sorted({'torch', 'torchvision', 'numpy'} & set(sys.modules)))\n"
        "try:\n"  # a mistyped name asks the families for a suggestion (imports torchvision)
        "    TrainConfig(model='resnet19').validate(registries=registries)\n"
        "except ConfigError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"EXPLAINKIT_LOAD_PLUGINS": "", "PATH": "/usr/bin:/bin"},
    )
    imported, error = out.stdout.strip().splitlines()
    assert error.startswith("--model: unknown model 'resnet19'; did you mean 'resnet18'?")
    assert imported == "[]"


# -- model specs -----------------------------------------------------------------------------


def test_spec_kwargs_of_old_and_new_runs():
    assert spec_kwargs({"arch": "resnet18-s8", "width": 8, "num_classes": 10}) == {"width": 8}
    assert spec_kwargs({"arch": "torchvision:resnet18", "kwargs": {}}) == {}
    assert spec_kwargs({"arch": "x", "width": 8, "kwargs": {"width": 16}}) == {"width": 16}


# -- initial weights -----------------------------------------------------------------------------


def test_a_torchvision_state_dict_loads_strictly_and_a_module_prefix_is_stripped(tmp_path):
    entry = model_entry("torchvision:resnet18")
    source = entry.build(5)
    path = tmp_path / "w.pt"
    torch.save({f"module.{k}": v for k, v in source.state_dict().items()}, path)
    weights = read_weights(str(path), entry)
    assert weights.mean == (0.485, 0.456, 0.406)  # what torchvision's weights expect
    model = entry.build(5)
    notes = apply_weights(model, weights, 5, entry.name)
    assert notes == [f"weights: file {path} ({len(source.state_dict())} tensors)"]
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_a_head_of_another_class_count_is_skipped_and_trained_afresh(tmp_path):
    entry = model_entry("torchvision:resnet18")
    pretrained = entry.build(1000).state_dict()
    path = tmp_path / "imagenet.pt"
    torch.save({"state_dict": pretrained}, path)  # a wrapped state_dict opens too
    model = entry.build(3)
    fresh_head = model.fc.weight.detach().clone()
    notes = apply_weights(model, read_weights(str(path), entry), 3, entry.name)
    assert "the classifier head (fc.weight, fc.bias) was trained for 1000 classes" in notes[1]
    assert "this run has 3; it is skipped and trained from a fresh initialization" in notes[1]
    assert torch.equal(model.fc.weight, fresh_head)
    assert torch.equal(model.layer4[1].conv2.weight, pretrained["layer4.1.conv2.weight"])


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda sd: sd.pop("layer1.0.conv1.weight"), "lacks 'layer1.0.conv1.weight'"),
        (lambda sd: sd.update(extra=torch.zeros(1)), "has the unknown key 'extra'"),
        (
            lambda sd: sd.update({"conv1.weight": torch.zeros(64, 3, 3, 3)}),
            "'conv1.weight' has shape [64, 3, 3, 3] there but [64, 3, 7, 7] here",
        ),
    ],
)
def test_weights_of_another_architecture_are_refused_with_one_sentence(change, message):
    entry = model_entry("torchvision:resnet18")
    state = entry.build(3).state_dict()
    change(state)
    with pytest.raises(ConfigError, match="do not fit model torchvision:resnet18") as e:
        apply_weights(entry.build(3), InitialWeights(state, "file w.pt"), 3, entry.name)
    assert message in str(e.value)


def test_weights_files_that_are_not_state_dicts_are_refused(tmp_path):
    entry = model_entry("resnet18")
    pickled = tmp_path / "code.pt"
    torch.save({"model": entry.build(3, width=8)}, pickled)  # a whole module: a pickle
    with pytest.raises(CheckpointError, match="never unpickles"):
        read_weights(str(pickled), entry)
    plain = tmp_path / "plain.pt"
    torch.save([1, 2, 3], plain)
    with pytest.raises(CheckpointError, match="is not a state_dict"):
        read_weights(str(plain), entry)
    with pytest.raises(ConfigError, match="neither a file nor a weights name"):
        read_weights(str(tmp_path / "missing.pt"), entry)
    with pytest.raises(ConfigError, match="model resnet18 has no named weights"):
        read_weights("IMAGENET1K_V1", entry)


def test_named_torchvision_weights_are_checked_and_a_failed_download_is_one_sentence(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no cached copy
    entry = model_entry("torchvision:resnet18")
    with pytest.raises(ConfigError, match="its weights: IMAGENET1K_V1, DEFAULT"):
        read_weights("ResNet50_Weights.IMAGENET1K_V1", entry)
    try:
        weights = read_weights("ResNet18_Weights.IMAGENET1K_V1", entry)
    except ExplainkitError as e:  # offline, as the tests run
        text = str(e)
        assert text.startswith("cannot download the ResNet18_Weights.IMAGENET1K_V1 weights")
        assert text.endswith("pass the saved file: --weights PATH") and "\n" not in text
        assert not list((tmp_path / "torch").rglob("*.pth"))  # nothing half-written is left
    else:  # a machine with a network (or torch hub's cache): the real weights
        assert weights.state_dict["fc.weight"].shape == (1000, 512)
