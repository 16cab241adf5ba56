"""Plugin manager, analyzer registry, hooks, `explainkit plugins`, and a real installed plugin."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from explainkit import hookimpl, manager
from explainkit.analyzer import Analyzer, Option
from explainkit.cli import cli
from explainkit.data import Dataset
from explainkit.errors import PluginError
from explainkit.manager import build_registries

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "explainkit-example-analyzer"
HOOKS_MD = REPO / "docs" / "plugin-hooks.md"


pytestmark = pytest.mark.usefixtures("fresh_plugins")


@pytest.fixture
def pm():
    return manager.get_plugin_manager(entrypoints=False, quiet=True)


def make_analyzer(name: str, **attrs) -> type[Analyzer]:
    return type(f"A_{name}", (Analyzer,), {"name": name, "summary": f"{name} test.", **attrs})


class AnalyzersPlugin:
    """An in-test plugin registering the given classes."""

    def __init__(self, *classes):
        self.classes = classes

    @hookimpl
    def register_analyzers(self, register):
        for cls in self.classes:
            register(cls)


# -- fake entry points, as pluggy's own tests do ------------------------------------------


class FakeEntryPoint:
    def __init__(self, name, plugin, group="explainkit"):
        self.name, self.group, self.plugin, self.value = name, group, plugin, f"fake:{name}"

    def load(self):
        if isinstance(self.plugin, BaseException):
            raise self.plugin
        return self.plugin


class FakeDistribution:
    def __init__(self, name, version, entry_points):
        self.metadata = {"name": name}
        self.version = version
        self.entry_points = entry_points


@pytest.fixture
def fake_dists(monkeypatch):
    """Install fake distributions: ``fake_dists(FakeDistribution(...), ...)``."""

    def install(*dists):
        monkeypatch.setattr(importlib.metadata, "distributions", lambda: list(dists))

    return install


# -- loading -------------------------------------------------------------------------------


def test_get_plugin_manager_is_a_pure_factory():
    a = manager.get_plugin_manager(entrypoints=False, quiet=True)
    b = manager.get_plugin_manager(entrypoints=False, quiet=True)
    assert a is not b
    assert manager.load_plugins() is manager.load_plugins()  # cached for the CLI


def test_builtins_registered_like_third_party(pm):
    for modname in manager.DEFAULT_PLUGINS:
        if pm.has_plugin(modname):
            assert pm.source_of(modname) == "builtin"
    assert not [e for e in pm.load_errors if e.source == "builtin"], pm.load_errors


def test_missing_or_broken_default_plugins_are_recorded_not_fatal(monkeypatch, tmp_path, capsys):
    (tmp_path / "ek_broken_default.py").write_text("import ek_no_such_module_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(
        manager, "DEFAULT_PLUGINS", ("explainkit.plugins.ek_not_written_yet", "ek_broken_default")
    )
    pm = manager.get_plugin_manager(entrypoints=False)
    assert [e.plugin for e in pm.load_errors] == [
        "explainkit.plugins.ek_not_written_yet",
        "ek_broken_default",
    ]
    assert "ek_no_such_module_xyz" in pm.load_errors[1].error
    assert capsys.readouterr().err.count("ek_broken_default") == 1


def test_loading_plugins_does_not_import_torch():
    code = (
        "import sys, explainkit.manager as m\n"
        "m.get_analyzers(m.load_plugins())\n"
        "print(sorted({'torch', 'h5py', 'matplotlib', 'numpy'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stderr


def test_cli_help_loads_no_plugins_and_no_torch():
    code = (
        "import sys\n"
        "from explainkit.cli import cli\n"
        "try:\n"
        "    cli(['--help'], prog_name='explainkit')\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = {'torch', 'h5py', 'matplotlib', 'explainkit.manager'} & set(sys.modules)\n"
        "heavy |= {m for m in sys.modules if m.startswith('explainkit.plugins.')}\n"
        "print(sorted(heavy), file=sys.stderr)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "analyze" in out.stdout and "plugins" in out.stdout
    assert out.stderr.strip().splitlines()[-1] == "[]"


def test_entry_points_loaded_with_distribution_info(fake_dists, monkeypatch):
    plugin = AnalyzersPlugin(make_analyzer("ek_fake"))
    fake_dists(FakeDistribution("ek-fake-dist", "1.2.3", [FakeEntryPoint("ekfake", plugin)]))
    monkeypatch.delenv("EXPLAINKIT_LOAD_PLUGINS")
    pm = manager.get_plugin_manager(quiet=True)
    assert pm.get_plugin("ekfake") is plugin
    entry = manager.get_analyzers(pm)["ek_fake"]
    assert (entry.plugin_name, entry.source) == ("ekfake", "entry point")
    (row,) = [r for r in manager.plugin_info(pm) if r["name"] == "ekfake"]
    assert (row["package"], row["version"], row["source"]) == (
        "ek-fake-dist",
        "1.2.3",
        "entry point",
    )
    assert row["analyzers"][0]["name"] == "ek_fake"
    assert row["hooks"] == ["register_analyzers"]


@pytest.mark.parametrize(
    ("env", "loaded", "errors"),
    [
        (None, ["eka", "ekb"], []),
        ("", [], []),
        ("ekb", ["ekb"], []),
        ("ekb,nope", ["ekb"], ["nope"]),
    ],
)
def test_load_plugins_env_limits_entry_points(fake_dists, monkeypatch, env, loaded, errors):
    eps = [FakeEntryPoint("eka", AnalyzersPlugin()), FakeEntryPoint("ekb", AnalyzersPlugin())]
    fake_dists(FakeDistribution("ek-dist", "1.0", eps))
    if env is None:
        monkeypatch.delenv("EXPLAINKIT_LOAD_PLUGINS")
    else:
        monkeypatch.setenv("EXPLAINKIT_LOAD_PLUGINS", env)
    pm = manager.get_plugin_manager(defaults=False, quiet=True)
    assert sorted(n for n, _ in pm.list_name_plugin()) == loaded
    assert [e.plugin for e in pm.load_errors] == errors


def test_broken_entry_point_is_recorded_and_others_load(fake_dists, monkeypatch, capsys):
    good = AnalyzersPlugin(make_analyzer("ek_good"))
    fake_dists(
        FakeDistribution("ek-bad", "0.1", [FakeEntryPoint("ekbad", ImportError("no module x"))]),
        FakeDistribution("ek-good", "0.1", [FakeEntryPoint("ekgood", good)]),
    )
    monkeypatch.delenv("EXPLAINKIT_LOAD_PLUGINS")
    pm = manager.get_plugin_manager()
    assert "ek_good" in manager.get_analyzers(pm)
    (err,) = pm.load_errors
    assert (err.plugin, err.source, err.error) == (
        "ekbad",
        "entry point",
        "ImportError: no module x",
    )
    assert capsys.readouterr().err.count("ekbad") == 1
    monkeypatch.setenv("EXPLAINKIT_RAISE_ERRORS", "1")
    with pytest.raises(ImportError, match="no module x"):
        manager.get_plugin_manager()


def test_check_pending_reports_misspelled_hook(pm):
    class Typo:
        @hookimpl
        def register_analyzer(self, register):  # missing "s"
            pass

    pm.register(Typo(), name="undo-typo")
    manager._check_pending(pm)
    (err,) = [e for e in pm.load_errors if e.plugin == "undo-typo"]
    assert "unknown hook 'register_analyzer'" in err.error
    assert "did you mean 'register_analyzers'" in err.error


def test_check_pending_raises_with_raise_errors(monkeypatch, tmp_path):
    (tmp_path / "typo.py").write_text(
        "from explainkit import hookimpl\n\n@hookimpl\ndef register_comands(cli):\n    pass\n"
    )
    pm = manager.get_plugin_manager(entrypoints=False, plugins_dir=tmp_path, quiet=True)
    assert "register_comands" in pm.load_errors[-1].error
    monkeypatch.setenv("EXPLAINKIT_RAISE_ERRORS", "1")
    with pytest.raises(Exception, match="unknown hook 'register_comands'"):
        manager.get_plugin_manager(entrypoints=False, plugins_dir=tmp_path)


def test_plugins_dir_loads_modules_and_records_broken_ones(tmp_path):
    (tmp_path / "mine.py").write_text(
        textwrap.dedent(
            """
            from explainkit import hookimpl
            from explainkit.analyzer import Analyzer

            class Mine(Analyzer):
                name = "ek_mine"
                summary = "Mine."

            @hookimpl
            def register_analyzers(register):
                register(Mine)
            """
        )
    )
    (tmp_path / "bad.py").write_text("raise RuntimeError('bad on purpose')\n")
    (tmp_path / "_helper.py").write_text("raise RuntimeError('never imported')\n")
    pm = manager.get_plugin_manager(entrypoints=False, plugins_dir=tmp_path, quiet=True)
    assert manager.get_analyzers(pm)["ek_mine"].source == "plugins-dir"
    assert [(e.plugin, e.error) for e in pm.load_errors] == [
        ("bad", "RuntimeError: bad on purpose")
    ]
    with pytest.raises(PluginError, match="does not exist"):
        manager.get_plugin_manager(entrypoints=False, plugins_dir=tmp_path / "missing")


def test_trace_plugins_writes_hook_calls_to_stderr(monkeypatch, capsys):
    monkeypatch.setenv("EXPLAINKIT_TRACE_PLUGINS", "1")
    pm = manager.get_plugin_manager(entrypoints=False, quiet=True)
    pm.register(AnalyzersPlugin(make_analyzer("ek_traced")), name="undo-traced")
    manager.get_analyzers(pm)
    assert "explainkit trace: register_analyzers" in capsys.readouterr().err


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
    assert list(registries.datasets) == ["cifar10", "shapes", "folder", "ek_stripes"]
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
    assert tests, f"hook {hook} has no test_hook_{hook}... test in tests/test_plugins.py"


@pytest.mark.parametrize("hook", HOOKS)
def test_plugin_hook_is_documented(hook):
    pm = manager.get_plugin_manager(entrypoints=False, quiet=True)
    argnames = getattr(pm.hook, hook).spec.argnames
    assert f"## {hook}({', '.join(argnames)})" in HOOKS_MD.read_text()


# -- `explainkit plugins` ------------------------------------------------------------------


def plugins_dir_with_two(tmp_path: Path) -> Path:
    folder = tmp_path / "plugdir"
    folder.mkdir()
    for name in ("zeta", "alpha"):
        (folder / f"{name}.py").write_text(
            textwrap.dedent(
                f"""
                import click
                from explainkit import hookimpl
                from explainkit.analyzer import Analyzer, Option

                class A(Analyzer):
                    name = "ek_{name}"
                    summary = "The {name} analyzer."
                    options = (Option("count", click.IntRange(1), 3, "How many."),)

                @hookimpl
                def register_analyzers(register):
                    register(A)
                """
            )
        )
    (folder / "broken.py").write_text("raise ImportError('broken on purpose')\n")
    return folder


def test_plugins_command(tmp_path):
    folder = plugins_dir_with_two(tmp_path)
    runner = CliRunner()
    result = runner.invoke(cli, ["plugins", "--json", "--plugins-dir", str(folder)])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["name"] for r in rows] == ["alpha", "broken", "zeta"]
    assert all(r["source"] == "plugins-dir" for r in rows)
    assert rows[1]["errors"] == ["ImportError: broken on purpose"]
    (opt,) = rows[0]["analyzers"][0]["options"]
    assert (opt["flag"], opt["default"], opt["help"]) == ("--ek-alpha-count", 3, "How many.")

    everything = json.loads(
        runner.invoke(cli, ["plugins", "--all", "--json", "--plugins-dir", str(folder)]).stdout
    )
    names = [r["name"] for r in everything]
    assert names == sorted(names) and set(names) >= {"alpha", "zeta"}
    assert len(names) == 3 + len([n for n in names if n.startswith("explainkit.plugins.")])

    hooked = runner.invoke(
        cli, ["plugins", "--json", "--hook", "register_analyzers", "--plugins-dir", str(folder)]
    )
    assert [r["name"] for r in json.loads(hooked.stdout)] == ["alpha", "zeta"]

    bad = runner.invoke(cli, ["plugins", "--hook", "register_analyzer"])
    assert bad.exit_code == 2
    assert "did you mean 'register_analyzers'" in bad.stderr

    text = runner.invoke(cli, ["plugins", "--plugins-dir", str(folder)])
    assert text.exit_code == 0
    assert "analyzer ek_alpha: The alpha analyzer." in text.stdout
    assert "error: ImportError: broken on purpose" in text.stdout


def test_plugins_command_lists_each_plugins_models_and_datasets(tmp_path):
    (tmp_path / "mine.py").write_text(
        textwrap.dedent(
            """
            from explainkit import hookimpl
            from explainkit.data import DatasetEntry
            from explainkit import ModelEntry

            @hookimpl
            def register_models(register):
                register(ModelEntry("ek_net", print, "features", "nchw", summary="A net."))

            @hookimpl
            def register_datasets(register):
                register(DatasetEntry("ek_pics", print, summary="Some pictures."))
            """
        )
    )
    runner = CliRunner()
    text = runner.invoke(cli, ["plugins", "--plugins-dir", str(tmp_path)])
    assert text.exit_code == 0, text.output
    assert text.stdout.splitlines() == [
        "mine  [plugins-dir]",
        "  hooks: register_datasets, register_models",
        "  model ek_net: A net. [layer features]",
        "  dataset ek_pics: Some pictures.",
    ]
    rows = json.loads(runner.invoke(cli, ["plugins", "--all", "--json"]).stdout)
    by_name = {r["name"]: r for r in rows}
    models = by_name["explainkit.plugins.default_models"]["models"]
    assert [m["name"] for m in models] == [
        "resnet18-s8", "resnet18", "torchvision:NAME", "timm:NAME", "hf:NAME", "import:NAME",
    ]  # fmt: skip
    assert models[0]["default_layer"] == "layer4" and models[2]["family"] is True
    datasets = by_name["explainkit.plugins.default_datasets"]["datasets"]
    assert [d["name"] for d in datasets] == ["cifar10", "shapes", "folder"]
    listed = runner.invoke(cli, ["plugins", "--all"]).stdout
    assert "  model torchvision:NAME: Every torchvision classification model" in listed
    assert "  dataset shapes: Synthetic shapes" in listed


# -- a real distribution, pip-installed into a temporary target ----------------------------


def pip_install(source: Path, target: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--no-index", "--target", str(target), str(source)],
        check=True,
        capture_output=True,
        text=True,
        cwd=source.parent,
    )  # fmt: skip


@pytest.fixture(scope="module")
def example_target(tmp_path_factory) -> Path:
    # Build from a copy: setuptools leaves build/ and *.egg-info next to the sources.
    src = tmp_path_factory.mktemp("example-src") / EXAMPLE.name
    shutil.copytree(EXAMPLE, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "tests"))
    target = tmp_path_factory.mktemp("example-site")
    pip_install(src, target)
    return target


def run_cli(args, *pythonpath, plugins=None):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, pythonpath))}
    env.pop("EXPLAINKIT_LOAD_PLUGINS", None)
    env.pop("EXPLAINKIT_PLUGINS_DIR", None)
    if plugins is not None:
        env["EXPLAINKIT_LOAD_PLUGINS"] = plugins
    return subprocess.run(
        [sys.executable, "-m", "explainkit", *args], capture_output=True, text=True, env=env
    )


def test_example_plugin_installed_lists_and_analyzes(example_target, tiny_run):
    listed = run_cli(["plugins", "--json"], example_target)
    assert listed.returncode == 0, listed.stderr
    (row,) = [r for r in json.loads(listed.stdout) if r["name"] == "confidence"]
    assert row["package"] == "explainkit-example-analyzer"
    assert row["version"] == "0.1.0"
    assert row["source"] == "entry point"
    assert [a["name"] for a in row["analyzers"]] == ["confidence"]

    result = run_cli(
        ["analyze", str(tiny_run), "--plugin", "confidence", "--confidence-bins", "5"],
        example_target,
    )
    assert result.returncode == 0, result.stderr
    out = tiny_run / "analyses" / "confidence"
    assert result.stdout.strip() == str(out / "manifest.json")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "ok"
    assert {a["path"] for a in manifest["artifacts"]} == {"confidence.png", "confidence.csv"}
    lines = (out / "confidence.csv").read_text().splitlines()
    assert lines[0] == "class,bin_low,bin_high,correct,wrong"
    assert len(lines) == 1 + 5 * len(json.loads((tiny_run / "config.json").read_text())
                                     ["data"]["classes"])  # fmt: skip

    limited = run_cli(["plugins", "--json"], example_target, plugins="")
    assert [r for r in json.loads(limited.stdout) if r["name"] == "confidence"] == []


def test_broken_installed_plugin_does_not_break_cli(example_target, tiny_run, tmp_path):
    src = tmp_path / "broken-src"
    (src / "ek_broken_plugin").mkdir(parents=True)
    (src / "pyproject.toml").write_text(
        textwrap.dedent(
            """
            [build-system]
            requires = ["setuptools>=68"]
            build-backend = "setuptools.build_meta"

            [project]
            name = "ek-broken-plugin"
            version = "9.9"

            [project.entry-points.explainkit]
            broken = "ek_broken_plugin"

            [tool.setuptools]
            packages = ["ek_broken_plugin"]
            """
        )
    )
    (src / "ek_broken_plugin" / "__init__.py").write_text(
        "raise ImportError('this plugin is broken on purpose')\n"
    )
    target = tmp_path / "site"
    pip_install(src, target)

    helped = run_cli(["--help"], target, example_target)
    assert helped.returncode == 0, helped.stderr

    listed = run_cli(["plugins", "--json"], target, example_target)
    assert listed.returncode == 0, listed.stderr
    rows = {r["name"]: r for r in json.loads(listed.stdout)}
    assert rows["broken"]["errors"] == ["ImportError: this plugin is broken on purpose"]
    assert rows["broken"]["package"] is None  # never registered, so no distribution info
    assert "confidence" in rows
    assert listed.stderr.count("plugin 'broken'") == 1

    result = run_cli(["analyze", str(tiny_run), "--plugin", "confidence"], target, example_target)
    assert result.returncode == 0, result.stderr
    assert re.search(r"ok +confidence", result.stderr)


# -- malformed analyzer classes are skipped alone, naming their plugin ----------------------

ATTRIBUTE_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=5),
    st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=2), st.integers()),
)  # fmt: skip


def _is_valid(attr: str, value) -> bool:
    if attr in ("summary", "title"):
        return isinstance(value, str)
    if attr == "order":
        return isinstance(value, int) and not isinstance(value, bool)
    return False  # options, needs, requires: none of the generated values is a valid one


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    attr=st.sampled_from(["options", "needs", "requires", "order", "summary", "title"]),
    value=ATTRIBUTE_VALUES,
)
def test_malformed_analyzer_attributes_are_refused_naming_the_plugin(attr, value):
    broken = make_analyzer("broken", **{attr: value})
    pm = manager.get_plugin_manager(entrypoints=False, quiet=True)
    pm.register(AnalyzersPlugin(broken), name="undo-malformed")
    entries = manager.get_analyzers(pm)
    assert {"gradcam", "gallery", "losses"} <= set(entries)  # the rest still load
    if _is_valid(attr, value):
        assert "broken" in entries
    else:
        assert "broken" not in entries
        (error,) = [e for e in pm.load_errors if e.plugin == "undo-malformed"]
        assert attr in error.error and "\n" not in error.error


@pytest.mark.parametrize(
    "run_source, problem",
    [
        ("def run(self, context, *, count=3): ...", "repeats the default"),
        ("def run(self, context, **options): ...", "**kwargs"),
        ("def run(self, context, *, count, extra): ...", "make them the same"),
        ("def run(self, context): ...", "make them the same"),
    ],
)
def test_run_must_take_exactly_the_declared_options(run_source, problem):
    namespace: dict = {}
    exec(run_source, namespace)
    cls = make_analyzer(
        "strict", options=(Option("count", int, 3, "How many."),), run=namespace["run"]
    )
    pm = manager.get_plugin_manager(entrypoints=False, quiet=True)
    pm.register(AnalyzersPlugin(cls), name="undo-strict")
    assert "strict" not in manager.get_analyzers(pm)
    (error,) = [e for e in pm.load_errors if e.plugin == "undo-strict"]
    assert problem in error.error and "undo-strict" in error.error


def test_a_malformed_analyzer_breaks_no_other_command(tmp_path):
    (tmp_path / "bad.py").write_text(
        "from explainkit import Analyzer, hookimpl\n"
        "class Bad(Analyzer):\n"
        "    name = 'bad'\n"
        "    options = None\n"
        "    needs = None\n"
        "    order = 'first'\n"
        "@hookimpl\n"
        "def register_analyzers(register):\n"
        "    register(Bad)\n"
    )
    listed = run_cli(["plugins", "--all", "--plugins-dir", str(tmp_path)])
    assert listed.returncode == 0, listed.stderr
    assert "options must be a tuple of explainkit.Option" in listed.stdout + listed.stderr
    helped = run_cli(["analyze", "--help", "--plugins-dir", str(tmp_path)])
    assert helped.returncode == 0 and "gradcam" in helped.stdout


def test_a_broken_plugin_is_mentioned_once_and_choices_are_listed(tmp_path):
    (tmp_path / "broken.py").write_text("raise ImportError('broken on purpose')\n")
    for args in (["analyze", "--help"], ["plugins", "--all"]):
        result = run_cli([*args, "--plugins-dir", str(tmp_path)])
        assert result.returncode == 0, result.stderr
        assert result.stderr.count("broken on purpose") == 1, result.stderr
    listed = run_cli(["plugins", "--all"])
    assert "--gradcam-method gradcam|gradcampp|xgradcam|layercam" in listed.stdout
    assert "CHOICE" not in listed.stdout
