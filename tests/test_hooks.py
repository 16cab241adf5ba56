"""Each hook of the plugin contract, tested and documented."""

from __future__ import annotations

import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from explainkit import hookimpl, manager
from explainkit.cli import cli
from explainkit.data import Dataset
from explainkit.errors import PluginError
from explainkit.manager import build_registries
from tests.helpers import BUILTIN_DATASETS, REPO, AnalyzersPlugin, make_analyzer

HOOKS_MD = REPO / "docs" / "plugin-hooks.md"


pytestmark = pytest.mark.usefixtures("fresh_plugins")


# -- hooks ---------------------------------------------------------------------------------


def test_hook_register_analyzers(pm):
    pm.register(AnalyzersPlugin(make_analyzer("ek_b"), make_analyzer("ek_a")), name="undo-ab")
    try:
        analyzers = manager.get_analyzers(pm)
        assert analyzers["ek_a"].plugin_name == "undo-ab"
        assert analyzers["ek_b"].source == "registered"
        assert list(analyzers) == sorted(analyzers)
    finally:
        pm.unregister(name="undo-ab")


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (object, "not a subclass of explainkit.Analyzer"),
        (make_analyzer("Bad-Name"), "invalid name 'Bad-Name'"),
        (make_analyzer(""), "invalid name ''"),
    ],
)
def test_hook_register_analyzers_rejects_invalid(pm, bad, message):
    pm.register(AnalyzersPlugin(bad), name="undo-bad")
    pm.register(AnalyzersPlugin(make_analyzer("ek_fine")), name="undo-fine")
    analyzers = manager.get_analyzers(pm)
    assert "ek_fine" in analyzers
    (err,) = [e for e in pm.load_errors if e.plugin == "undo-bad"]
    assert message in err.error


def test_hook_register_analyzers_duplicate_names_both_plugins(pm, monkeypatch):
    pm.register(AnalyzersPlugin(make_analyzer("ek_dup")), name="undo-first")
    pm.register(AnalyzersPlugin(make_analyzer("ek_dup")), name="undo-second")
    assert manager.get_analyzers(pm)["ek_dup"].plugin_name == "undo-first"
    (err,) = pm.load_errors
    assert "'undo-first'" in err.error and "'undo-second'" in err.error
    monkeypatch.setenv("EXPLAINKIT_RAISE_ERRORS", "1")
    with pytest.raises(PluginError, match="registered by both plugin"):
        manager.get_analyzers(pm)


def test_hook_register_analyzers_exception_is_isolated(pm):
    class Raises:
        @hookimpl
        def register_analyzers(self, register):
            register(make_analyzer("ek_partial"))
            raise RuntimeError("hook blew up")

    pm.register(Raises(), name="undo-raises")
    pm.register(AnalyzersPlugin(make_analyzer("ek_other")), name="undo-other")
    analyzers = manager.get_analyzers(pm)
    assert "ek_other" in analyzers and "ek_partial" not in analyzers  # all or nothing
    assert [e.error for e in pm.load_errors] == ["RuntimeError: hook blew up"]
    manager.get_analyzers(pm)
    assert len(pm.load_errors) == 1  # recorded once


class ItemsPlugin:
    """An in-test plugin registering the given models (or datasets) as they are."""

    def __init__(self, *items, hook="register_models"):
        self.items = items
        self.hook = hook

    @hookimpl
    def register_models(self, register):
        for item in self.items if self.hook == "register_models" else ():
            register(item)

    @hookimpl
    def register_datasets(self, register):
        for item in self.items if self.hook == "register_datasets" else ():
            register(item)


def tiny_net(num_classes, width=4):
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(width, num_classes),
    )  # fmt: skip


def test_hook_register_models(pm):
    from explainkit import ModelEntry, ModelFamily

    nets = {"small": 4, "large": 16}

    def resolve(name):
        return ModelEntry(f"nets:{name}", lambda num_classes: tiny_net(num_classes, nets[name]))

    pm.register(
        ItemsPlugin(
            ModelEntry("ek_tiny", tiny_net, default_layer="1", reshape="nchw", summary="Tiny."),
            ModelFamily("nets", lambda name: resolve(name) if name in nets else None, nets.copy),
        ),
        name="undo-models",
    )
    models = manager.get_models(pm)
    assert list(models)[:2] == ["resnet18-s8", "resnet18"]  # built-ins first
    assert models["ek_tiny"].plugin_name == "undo-models" and models["nets:"].source == "registered"
    registries = build_registries(pm)
    model = registries.build_model("ek_tiny", 3, width=2)
    assert model[0].out_channels == 2 and model[-1].out_features == 3
    assert registries.build_model("nets:large", 5)[0].out_channels == 16
    assert registries.model_entry("nets:small").name == "nets:small"
    with pytest.raises(Exception, match="did you mean 'nets:small'"):
        registries.model_entry("nets:smal")
    assert not pm.load_errors


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("resnet", "registered str 'resnet', not a ModelEntry or ModelFamily"),
        (("name with space", tiny_net), "model name 'name with space' of plugin 'undo-bad'"),
        (("ek_x", "not callable"), "model 'ek_x': build of plugin 'undo-bad' is 'not callable'"),
        (("ek_x", tiny_net, "layer4", "nhwc"), "reshape 'nhwc' is not one of nchw, vit, swin"),
        (("ek_x", tiny_net, None, None, 224, (0.5, 0.5)), "mean of plugin 'undo-bad'"),
        (("ek_x", tiny_net, None, None, 224, None, (1, 0, 1)), "not 3 finite numbers above 0"),
    ],
)
def test_hook_register_models_rejects_invalid(pm, bad, message):
    from explainkit import ModelEntry

    item = ModelEntry(*bad) if isinstance(bad, tuple) else bad
    pm.register(ItemsPlugin(item), name="undo-bad")
    pm.register(ItemsPlugin(ModelEntry("ek_fine", tiny_net)), name="undo-fine")
    models = manager.get_models(pm)
    assert "ek_fine" in models and "ek_x" not in models
    (err,) = [e for e in pm.load_errors if e.plugin == "undo-bad"]
    assert message in err.error, err.error


def test_hook_register_models_duplicate_names_both_plugins(pm):
    from explainkit import ModelEntry, ModelFamily

    pm.register(ItemsPlugin(ModelEntry("resnet18", tiny_net)), name="undo-shadow")
    pm.register(ItemsPlugin(ModelFamily("torchvision", dict, list)), name="undo-family")
    models = manager.get_models(pm)
    assert models["resnet18"].plugin_name == "explainkit.plugins.default_models"  # built-ins win
    assert models["torchvision:"].plugin_name == "explainkit.plugins.default_models"
    errors = {e.plugin: e.error for e in pm.load_errors}
    expected = (
        "model name 'resnet18' is registered by both plugin 'explainkit.plugins.default_models' "
        "and plugin 'undo-shadow'"
    )
    assert expected in errors["undo-shadow"]
    assert "'torchvision:' is registered by both" in errors["undo-family"]


def test_hook_register_models_exception_is_isolated(pm):
    from explainkit import ModelEntry

    class Raises:
        @hookimpl
        def register_models(self, register):
            register(ModelEntry("ek_partial", tiny_net))
            raise RuntimeError("models blew up")

    pm.register(Raises(), name="undo-raises")
    models = manager.get_models(pm)
    assert "ek_partial" not in models and "resnet18" in models  # all or nothing
    assert [e.error for e in pm.load_errors] == ["RuntimeError: models blew up"]


def stripes(split, image_size, limit, seed):
    import numpy as np

    n = min(limit or 40, 40)
    images = np.full((n, 20, 30, 3), 10 * seed, np.uint8)  # not square, not image_size
    targets = np.arange(n) % 2
    images[targets == 1, ::4] = 255
    return Dataset(
        images=images, targets=targets, classes=["plain", "striped"], index=np.arange(n),
        name=f"stripes-{split}",
    )  # fmt: skip


def test_hook_register_datasets(pm):
    from explainkit.data import DatasetEntry, load_dataset

    pm.register(
        ItemsPlugin(DatasetEntry("ek_stripes", stripes, "Stripes."), hook="register_datasets"),
        name="undo-data",
    )
    registries = build_registries(pm)
    assert list(registries.datasets) == [*BUILTIN_DATASETS, "ek_stripes"]
    ds = load_dataset("ek_stripes", "train", image_size=16, seed=2, limit=6, registries=registries)
    # Kept the first 6, made 16-pixel squares (centre crop of the 20x30 images).
    assert ds.images.shape == (6, 16, 16, 3) and ds.sizes.tolist() == [[20, 30]] * 6
    assert ds.targets.dtype.name == "int64" and ds.name == "stripes-train"
    assert ds.images[0].max() == 20 and ds.images[1].max() > 150  # plain, striped (blurred)


@pytest.mark.parametrize(
    ("load", "message"),
    [
        (lambda: [1, 2], "returned list, not an explainkit.data.Dataset"),
        (lambda: _dataset(targets=[0, 5]), "targets outside 0..1 (its 2 classes)"),
        (lambda: _dataset(images_dtype="float32"), "images that are not a uint8"),
        (lambda: _dataset(classes=[]), "no class names"),
    ],
)
def test_hook_register_datasets_refuses_what_a_load_returns_wrong(pm, load, message):
    from explainkit.data import DatasetEntry, load_dataset
    from explainkit.errors import DataError

    pm.register(ItemsPlugin(DatasetEntry("ek_bad", load), hook="register_datasets"), name="bad")
    with pytest.raises(DataError) as e:
        load_dataset("ek_bad", "train", registries=build_registries(pm))
    assert str(e.value).startswith("dataset 'ek_bad' of plugin 'bad' returned ")
    assert message in str(e.value)


def _dataset(targets=(0, 1), images_dtype="uint8", classes=("a", "b")):
    import numpy as np

    n = len(targets)
    return Dataset(
        images=np.zeros((n, 8, 8, 3), images_dtype), targets=np.asarray(targets),
        classes=list(classes), index=np.arange(n),
    )  # fmt: skip


def test_hook_register_datasets_rejects_invalid_and_duplicates(pm):
    from explainkit.data import DatasetEntry

    pm.register(ItemsPlugin(DatasetEntry("shapes", stripes), hook="register_datasets"), name="dup")
    pm.register(ItemsPlugin("shapes", hook="register_datasets"), name="wrong")
    datasets = manager.get_datasets(pm)
    assert datasets["shapes"].plugin_name == "explainkit.plugins.default_datasets"
    errors = {e.plugin: e.error for e in pm.load_errors}
    assert "dataset name 'shapes' is registered by both plugin" in errors["dup"]
    assert "registered str 'shapes', not a DatasetEntry" in errors["wrong"]


def test_model_and_dataset_registries_import_no_torch():
    code = (
        "import sys, explainkit.manager as m\n"
        "pm = m.load_plugins()\n"
        "print(list(m.get_models(pm)), list(m.get_datasets(pm)))\n"
        "print(sorted({'torch', 'torchvision', 'numpy', 'h5py'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    models, imported = out.stdout.strip().splitlines()
    assert "'torchvision:'" in models and "'folder'" in models and imported == "[]", out.stderr


def test_hook_register_commands(pm):
    class Commands:
        @hookimpl
        def register_commands(self, cli):
            @cli.command(name="ek-hello")
            @click.argument("who")
            def hello(who):
                """Say hello."""
                click.echo(f"hello {who}")

    group = click.Group("explainkit")
    pm.register(Commands(), name="undo-commands")
    try:
        manager.register_plugin_commands(group, pm)
        result = CliRunner().invoke(group, ["ek-hello", "world"])
        assert result.exit_code == 0, result.output
        assert result.output == "hello world\n"
    finally:
        pm.unregister(name="undo-commands")


def test_hook_register_commands_via_cli(tmp_path, monkeypatch):
    """A plugin command is found by name on the real CLI (loaded only for unknown names)."""
    from explainkit import cli as cli_module

    if "get_command" not in vars(type(cli_module.cli)):
        pytest.skip("ExplainkitGroup.get_command does not call _plugin_command yet")
    (tmp_path / "cmd.py").write_text(
        "import click\nfrom explainkit import hookimpl\n\n@hookimpl\ndef register_commands(cli):\n"
        "    @cli.command(name='ek-ping')\n    def ping():\n        '''Ping.'''\n"
        "        click.echo('pong')\n"
    )
    monkeypatch.setenv("EXPLAINKIT_PLUGINS_DIR", str(tmp_path))
    monkeypatch.setattr(cli_module, "_plugin_commands_loaded", False)
    try:
        result = CliRunner().invoke(cli, ["ek-ping"])
        assert result.exit_code == 0, result.output
        assert result.output == "pong\n"
    finally:
        cli.commands.pop("ek-ping", None)


def test_hook_resolve_target_layer_first_result_wins(pm):
    class Defers:
        @hookimpl
        def resolve_target_layer(self, model, analyzer_name):
            return None

    class Answers:
        @hookimpl
        def resolve_target_layer(self, analyzer_name):  # opt-in: a subset of the arguments
            return "layer3" if analyzer_name == "gradcam" else None

    pm.register(Answers(), name="undo-answers")
    pm.register(Defers(), name="undo-defers")
    assert pm.hook.resolve_target_layer(model=object(), analyzer_name="gradcam") == "layer3"
    assert pm.hook.resolve_target_layer(model=object(), analyzer_name="captum") is None


HOOKS = manager.hook_names(manager.get_plugin_manager(entrypoints=False, quiet=True))


@pytest.mark.parametrize("hook", HOOKS)
def test_plugin_hooks_have_tests(hook):
    tests = [n for n in globals() if n.startswith(f"test_hook_{hook}")]
    assert tests, f"hook {hook} has no test_hook_{hook}... test in tests/test_hooks.py"


@pytest.mark.parametrize("hook", HOOKS)
def test_plugin_hook_is_documented(hook):
    pm = manager.get_plugin_manager(entrypoints=False, quiet=True)
    argnames = getattr(pm.hook, hook).spec.argnames
    assert f"## {hook}({', '.join(argnames)})" in HOOKS_MD.read_text()
