"""The plugin manager: loading entry points and plugin folders, `explainkit plugins`, and
malformed analyzers skipped alone."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from explainkit import hookimpl, manager
from explainkit.analyzer import Option
from explainkit.cli import cli
from explainkit.errors import PluginError
from tests.helpers import BUILTIN_DATASETS, AnalyzersPlugin, make_analyzer, run_installed_cli

pytestmark = pytest.mark.usefixtures("fresh_plugins")


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
    assert [d["name"] for d in datasets] == list(BUILTIN_DATASETS)
    listed = runner.invoke(cli, ["plugins", "--all"]).stdout
    assert "  model torchvision:NAME: Every torchvision classification model" in listed
    assert "  dataset shapes: Synthetic shapes" in listed


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
    listed = run_installed_cli(["plugins", "--all", "--plugins-dir", str(tmp_path)])
    assert listed.returncode == 0, listed.stderr
    assert "options must be a tuple of explainkit.Option" in listed.stdout + listed.stderr
    helped = run_installed_cli(["analyze", "--help", "--plugins-dir", str(tmp_path)])
    assert helped.returncode == 0 and "gradcam" in helped.stdout


def test_a_broken_plugin_is_mentioned_once_and_choices_are_listed(tmp_path):
    (tmp_path / "broken.py").write_text("raise ImportError('broken on purpose')\n")
    for args in (["analyze", "--help"], ["plugins", "--all"]):
        result = run_installed_cli([*args, "--plugins-dir", str(tmp_path)])
        assert result.returncode == 0, result.stderr
        assert result.stderr.count("broken on purpose") == 1, result.stderr
    listed = run_installed_cli(["plugins", "--all"])
    assert "--gradcam-method gradcam|gradcampp|xgradcam|layercam" in listed.stdout
    assert "CHOICE" not in listed.stdout
