"""analyze(): selection, options, manifests, failures, safe output; `explainkit analyze`."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

import explainkit
from explainkit import manager
from explainkit.analyzer import AnalysisContext, Analyzer, Option
from explainkit.cli import cli
from explainkit.errors import AnalyzerError, PluginError, RunError
from explainkit.manager import build_registries
from explainkit.runner import analyze
from tests.helpers import AnalyzersPlugin

pytestmark = pytest.mark.usefixtures("fresh_plugins")


class Writes(Analyzer):
    """Writes one JSON file with what it saw; option ``value``."""

    name = "ek_writes"
    summary = "Writes a JSON file."
    options = (
        Option("value", click.IntRange(0, 10), 1, "A number."),
        Option("mode", str, "a", "A mode.", choices=("a", "b")),
    )
    order = 20

    def run(self, context: AnalysisContext, value: int, mode: str) -> list[dict]:
        data = {"value": value, "mode": mode, "epoch": context.epoch, "n": context.store.num_images}
        (context.output_dir / "out.json").write_text(json.dumps(data))
        return [context.artifact("out.json", "Output", "json", "what it saw")]


class Fails(Analyzer):
    name = "ek_fails"
    summary = "Always fails."
    order = 10

    def run(self, context: AnalysisContext) -> list[dict]:
        (context.output_dir / "partial.txt").write_text("half done")
        raise ValueError("boom on purpose")


class NeedsPackage(Analyzer):
    name = "ek_needs_pkg"
    summary = "Needs a package nobody has."
    requires = ("ek_no_such_package_xyz",)

    def run(self, context: AnalysisContext) -> list[dict]:
        raise AssertionError("must not run")


class UsesModel(Analyzer):
    name = "ek_model"
    summary = "Checks the model the context gives."
    needs = frozenset({"store", "checkpoint"})

    def run(self, context: AnalysisContext) -> list[dict]:
        import torch

        model = context.model()
        assert model is context.model()  # cached
        assert not model.training
        assert not any(p.requires_grad for p in model.parameters())
        images = torch.from_numpy(context.store.images(list(range(4))))
        x = context.normalize(images)
        with torch.no_grad():
            logits = model(x)
        first = torch.randint(0, 1000, (3,), generator=context.generator).tolist()
        data = {
            "shape": list(x.shape),
            "logits": list(logits.shape),
            "device": str(context.device),
            "first": first,
            "rng": int(context.rng.integers(1000)),
            "config": sorted(context.config),
            "classes": len(context.classes),
        }
        (context.output_dir / "model.json").write_text(json.dumps(data))
        return [context.artifact(context.output_dir / "model.json", "Model", "json")]


@pytest.fixture
def pm():
    pm = manager.get_plugin_manager(entrypoints=False, defaults=False, quiet=True)
    pm.register(importlib.import_module("explainkit.plugins.default_models"))  # the run's model
    pm.register(AnalyzersPlugin(Writes, Fails, NeedsPackage, UsesModel), name="undo-test")
    return pm


def read_manifest(run: Path, name: str) -> dict:
    return json.loads((run / "analyses" / name / "manifest.json").read_text())


# -- the Python API ------------------------------------------------------------------------


def test_analyze_writes_manifest_and_files(tiny_run, pm):
    (m,) = analyze(tiny_run, ["ek_writes"], registries=build_registries(pm), ek_writes_value="3")
    assert m == read_manifest(tiny_run, "ek_writes")
    assert m["status"] == "ok" and m["error"] is None
    assert m["options"] == {"value": 3, "mode": "a"}
    assert m["artifacts"] == [
        {"title": "Output", "kind": "json", "path": "out.json", "caption": "what it saw"}
    ]
    out = json.loads((tiny_run / "analyses" / "ek_writes" / "out.json").read_text())
    assert out["value"] == 3 and out["n"] > 0
    assert sorted(p.name for p in (tiny_run / "analyses").iterdir()) == ["ek_writes"]


def test_public_analyze_delegates(tiny_run, pm):
    (m,) = explainkit.analyze(
        tiny_run,
        plugins=["ek_writes"],
        registries=build_registries(pm),
        ek_writes_mode="b",
    )
    assert m["options"]["mode"] == "b"


def test_analyze_default_epoch_is_best_and_epoch_is_checked(tiny_run, pm):
    best = explainkit.open_store(tiny_run)
    try:
        best_epoch, epochs = best.best_epoch, best.epochs
    finally:
        best.close()
    (m,) = analyze(tiny_run, ["ek_writes"], registries=build_registries(pm))
    assert m["epoch"] == best_epoch
    (m,) = analyze(tiny_run, ["ek_writes"], registries=build_registries(pm), epoch=1)
    assert m["epoch"] == 1
    with pytest.raises(RunError, match=r"epoch 7 is not in .*available epochs: 1, 2"):
        analyze(tiny_run, ["ek_writes"], registries=build_registries(pm), epoch=7)
    assert epochs == [1, 2]


def test_analyze_failure_does_not_stop_others(tiny_run, pm):
    manifests = analyze(
        tiny_run, ["ek_writes", "ek_fails"], registries=build_registries(pm), collect_failures=True
    )
    assert [m["analyzer"] for m in manifests] == ["ek_fails", "ek_writes"]  # by order
    failed, ok = manifests
    assert failed["status"] == "failed"
    assert failed["error"] == "ValueError: boom on purpose"
    assert "Traceback" in failed["traceback"]
    assert ok["status"] == "ok"
    assert sorted(p.name for p in (tiny_run / "analyses" / "ek_fails").iterdir()) == [
        "manifest.json"
    ]  # partial files are not kept


def test_failed_rerun_keeps_previous_good_result(tiny_run, pm):
    analyze(tiny_run, ["ek_writes"], registries=build_registries(pm))

    class Broken(Writes):
        def run(self, context, value, mode):
            raise AnalyzerError("cannot do it; try again")

    pm2 = manager.get_plugin_manager(entrypoints=False, defaults=False, quiet=True)
    pm2.register(AnalyzersPlugin(Broken), name="undo-broken")
    (m,) = analyze(tiny_run, ["ek_writes"], registries=build_registries(pm2), collect_failures=True)
    assert m["status"] == "failed" and m["error"] == "cannot do it; try again"
    folder = tiny_run / "analyses" / "ek_writes"
    assert read_manifest(tiny_run, "ek_writes")["status"] == "ok"
    assert (folder / "out.json").is_file()
    assert json.loads((folder / "failed.json").read_text())["error"] == "cannot do it; try again"
    analyze(
        tiny_run, ["ek_writes"], registries=build_registries(pm)
    )  # a good rerun replaces everything
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "out.json"]


def test_analyze_replaces_result_and_removes_stale_temp_folders(tiny_run, pm):
    analyses = tiny_run / "analyses"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = analyses / f".ek_writes.tmp-{dead.pid}"
    stale.mkdir(parents=True)
    (analyses / "ek_writes").mkdir()
    (analyses / "ek_writes" / "old.txt").write_text("old")
    analyze(tiny_run, ["ek_writes"], registries=build_registries(pm), ek_writes_value=5)
    assert sorted(p.name for p in analyses.iterdir()) == ["ek_writes"]
    assert not (analyses / "ek_writes" / "old.txt").exists()


def test_analyze_auto_selection_skips_unmet_needs(tiny_run, pm):
    lines = []
    manifests = analyze(
        tiny_run, registries=build_registries(pm), echo=lines.append, collect_failures=True
    )
    names = [m["analyzer"] for m in manifests]
    assert names == ["ek_fails", "ek_writes", "ek_model"]
    assert any(
        line.startswith("skipped ek_needs_pkg: needs the package 'ek_no_such_package_xyz'")
        for line in lines
    )
    (m,) = analyze(
        tiny_run, ["ek_needs_pkg"], registries=build_registries(pm), collect_failures=True
    )  # asked for by name: a clear failure
    assert m["status"] == "failed" and "ek_no_such_package_xyz" in m["error"]


def test_analyze_context_model_and_generators(tiny_run, pm):
    (m,) = analyze(tiny_run, ["ek_model"], registries=build_registries(pm), device="cpu", seed=3)
    assert m["status"] == "ok", m.get("traceback")
    data = json.loads((tiny_run / "analyses" / "ek_model" / "model.json").read_text())
    assert data["shape"][:2] == [4, 3] and data["logits"][0] == 4
    assert data["device"] == "cpu" and "config" in data["config"]
    (again,) = analyze(
        tiny_run, ["ek_model"], registries=build_registries(pm), device="cpu", seed=3
    )
    data2 = json.loads((tiny_run / "analyses" / "ek_model" / "model.json").read_text())
    assert (data["first"], data["rng"]) == (data2["first"], data2["rng"])


def test_analyze_checkpoint_need_checks_the_epoch(tiny_run, pm):
    (tiny_run / "checkpoints" / "epoch_001.pt").unlink()
    (m,) = analyze(
        tiny_run, ["ek_model"], registries=build_registries(pm), epoch=1, collect_failures=True
    )
    assert m["status"] == "failed"
    assert "checkpoint of epoch 1 (saved epochs: 2)" in m["error"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"ek_writes_value": 11}, r"ek_writes option 'value' \(--ek-writes-value\)"),
        ({"ek_writes_mode": "c"}, "'c' is not one of 'a', 'b'"),
        ({"ek_writes_valeu": 1}, "did you mean 'ek_writes_value'"),
        ({"ek_writes_nope": 1}, "unknown analyzer option 'ek_writes_nope'"),
        ({"ek_writes": {"mode": "b"}}, "unknown analyzer option 'ek_writes'"),  # one spelling
    ],
)
def test_analyze_rejects_bad_options(tiny_run, pm, options, message):
    with pytest.raises(AnalyzerError, match=message):
        analyze(tiny_run, ["ek_writes"], registries=build_registries(pm), **options)


def test_analyze_warns_about_options_of_unselected_analyzers(tiny_run, pm):
    with pytest.warns(UserWarning, match="--ek-writes-value ignored: analyzer ek_writes"):
        analyze(
            tiny_run,
            ["ek_fails"],
            registries=build_registries(pm),
            ek_writes_value=2,
            collect_failures=True,
        )


def test_analyze_unknown_analyzer_and_bad_run(tiny_run, pm, tmp_path):
    with pytest.raises(PluginError, match="unknown analyzer 'ek_write'; did you mean 'ek_writes'"):
        analyze(tiny_run, ["ek_write"], registries=build_registries(pm))
    with pytest.raises(RunError, match="does not exist"):
        analyze(tmp_path / "nope", registries=build_registries(pm))
    with pytest.raises(RunError, match="not an explainkit run"):
        analyze(tmp_path, registries=build_registries(pm))


def test_artifact_rejects_bad_kind_and_paths(tmp_path):
    context = AnalysisContext(tmp_path, 1, 8, 0, tmp_path / "out", "x")
    assert context.artifact("a.png", "A", "image")["path"] == "a.png"
    with pytest.raises(AnalyzerError, match="kind 'picture'"):
        context.artifact("a.png", "A", "picture")
    with pytest.raises(AnalyzerError, match="outside its output folder"):
        context.artifact(tmp_path / "elsewhere.png", "A", "image")
    with pytest.raises(AnalyzerError, match="not allowed"):
        context.artifact("../x.png", "A", "image")


def test_analyze_missing_artifact_file_fails(tiny_run, pm):
    class Lies(Writes):
        name = "ek_lies"

        def run(self, context, value, mode):
            return [context.artifact("never.png", "Never", "image")]

    pm.register(AnalyzersPlugin(Lies), name="undo-lies")
    (m,) = analyze(tiny_run, ["ek_lies"], registries=build_registries(pm), collect_failures=True)
    assert m["status"] == "failed" and "did not write it" in m["error"]


# -- the CLI -------------------------------------------------------------------------------

PLUGIN_FILE = textwrap.dedent(
    """
    import click
    from explainkit import hookimpl
    from explainkit.analyzer import Analyzer, Option

    class Okay(Analyzer):
        name = "ek_okay"
        summary = "Writes a text file."
        options = (Option("count", click.IntRange(1, 5), 2, "How many lines."),)

        def run(self, context, count):
            (context.output_dir / "lines.txt").write_text("x\\n" * count)
            return [context.artifact("lines.txt", "Lines", "table")]

    class Boom(Analyzer):
        name = "ek_boom"
        summary = "Fails."
        options = (Option("loud", bool, False, "Fail loudly."),)

        def run(self, context, loud):
            raise RuntimeError("kaboom")

    @hookimpl
    def register_analyzers(register):
        register(Okay)
        register(Boom)
    """
)


@pytest.fixture
def plugdir(tmp_path) -> Path:
    folder = tmp_path / "plugdir"
    folder.mkdir()
    (folder / "ektest.py").write_text(PLUGIN_FILE)
    return folder


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_cli_analyze_ok(tiny_run, plugdir):
    result = invoke("analyze", tiny_run, "--plugins-dir", plugdir, "--plugin", "ek_okay",
                    "--ek-okay-count", "3")  # fmt: skip
    assert result.exit_code == 0, result.output
    manifest_path = tiny_run / "analyses" / "ek_okay" / "manifest.json"
    assert result.stdout == f"{manifest_path}\n"
    assert "ok      ek_okay: 1 file(s)" in result.stderr
    assert (tiny_run / "analyses" / "ek_okay" / "lines.txt").read_text() == "x\n" * 3

    as_json = invoke("analyze", tiny_run, "--plugins-dir", plugdir, "--plugin", "ek_okay", "--json")
    assert as_json.exit_code == 0
    assert json.loads(as_json.stdout)[0]["options"] == {"count": 2}


def test_cli_analyze_failure_exits_1_naming_it(tiny_run, plugdir):
    result = invoke("analyze", tiny_run, "--plugins-dir", plugdir, "--plugin", "ek_boom",
                    "--plugin", "ek_okay")  # fmt: skip
    assert result.exit_code == 1
    assert "failed  ek_boom: RuntimeError: kaboom" in result.stderr
    assert "1 of 2 analyzers failed: ek_boom" in result.stderr
    assert read_manifest(tiny_run, "ek_okay")["status"] == "ok"
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--plugin", "ek_oky"], "unknown analyzer 'ek_oky'; did you mean 'ek_okay'?"),
        (["--ek-okay-count", "9"], "Invalid value for '--ek-okay-count'"),
        (["--device", "gpu"], "'gpu' is not a device"),
        (["--epoch", "0"], "Invalid value for '--epoch'"),
    ],
)
def test_cli_analyze_usage_errors_exit_2(tiny_run, plugdir, args, message):
    result = invoke("analyze", tiny_run, "--plugins-dir", plugdir, *args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr


def test_cli_analyze_run_errors_exit_1(tmp_path, plugdir, tiny_run):
    result = invoke("analyze", tmp_path / "missing", "--plugins-dir", plugdir)
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: run directory")
    result = invoke("analyze", tiny_run, "--plugins-dir", plugdir, "--plugin", "ek_okay",
                    "--epoch", "5")  # fmt: skip
    assert result.exit_code == 1
    assert "available epochs: 1, 2" in result.stderr


def test_cli_analyze_warns_for_unselected_analyzer_option(tiny_run, plugdir):
    result = invoke("analyze", tiny_run, "--plugins-dir", plugdir, "--plugin", "ek_okay",
                    "--ek-boom-loud")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "warning: --ek-boom-loud ignored: analyzer ek_boom is not run" in result.stderr


def test_cli_analyze_help_groups_options_per_analyzer(plugdir, monkeypatch):
    monkeypatch.setenv("EXPLAINKIT_PLUGINS_DIR", str(plugdir))
    result = invoke("analyze", "--help")
    assert result.exit_code == 0
    text = result.stdout
    assert "Analyzers (--plugin NAME):" in text and "ek_okay" in text
    okay = text.index("Options of ek_okay:")
    assert text.index("--ek-okay-count") > okay
    assert text.index("--ek-boom-loud / --no-ek-boom-loud") > text.index("Options of ek_boom:")
    assert text.index("--batch-size") < text.index("Analyzers (--plugin NAME):")


@pytest.mark.parametrize("command", ["analyze", "plugins"])
def test_cli_help_command(command):
    result = invoke(command, "--help")
    assert result.exit_code == 0, result.output
    assert "--plugins-dir" in result.stdout


def test_cli_analyze_in_subprocess_with_env_plugins_dir(tiny_run, plugdir):
    env = {**os.environ, "EXPLAINKIT_PLUGINS_DIR": str(plugdir), "EXPLAINKIT_LOAD_PLUGINS": ""}
    result = subprocess.run(
        [sys.executable, "-m", "explainkit", "analyze", str(tiny_run), "--plugin", "ek_okay"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert (tiny_run / "analyses" / "ek_okay" / "lines.txt").is_file()


def test_analyze_results_show_their_figures_in_a_notebook(tiny_run):
    results = analyze(tiny_run, plugins=["losses", "gallery"], device="cpu")
    assert [m["analyzer"] for m in results] == ["losses", "gallery"]  # still plain manifests
    html = results._repr_html_()
    assert html.count('<img src="data:image/png;base64,') >= 3  # curves, gallery, confusion
    assert "Misclassified images" in html and "<table>" in html


def test_cam_results_show_a_grid_of_image_heatmap_overlay(tiny_run):
    import numpy as np
    import torch

    from explainkit import load_model
    from explainkit.explain.gradcam import compute_cam
    from explainkit.store import open_store

    model = load_model(tiny_run)
    with open_store(tiny_run) as store:
        images = store.images(np.arange(3))
        mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (store.mean, store.std))
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - mean) / std
    figure = compute_cam(model, x, "layer3").show(images)
    width, height = figure.get_size_inches() * figure.dpi
    assert width > 3 * 32 and height > 3 * 32  # three tiles of image | heatmap | overlay


def test_progress_bars_show_in_a_terminal_or_a_notebook_only(monkeypatch):
    import sys

    from explainkit.progress import showing_progress

    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    monkeypatch.delitem(sys.modules, "ipykernel", raising=False)
    assert not showing_progress()  # a log file or CI
    monkeypatch.setitem(sys.modules, "ipykernel", sys)  # a Jupyter kernel is running us
    assert showing_progress()


def test_analyze_from_python_raises_when_an_analyzer_failed(tiny_run, pm):
    from explainkit.runner import AnalysisFailed

    with pytest.raises(AnalysisFailed, match="ek_fails: ValueError: boom on purpose") as info:
        analyze(tiny_run, ["ek_writes", "ek_fails"], registries=build_registries(pm))
    statuses = {m["analyzer"]: m["status"] for m in info.value.results}
    assert statuses == {"ek_writes": "ok", "ek_fails": "failed"}  # the others still ran


def test_analyze_shows_its_real_parameters_in_help():
    import inspect

    import explainkit

    params = inspect.signature(explainkit.analyze).parameters
    assert {"epoch", "device", "plugins_dir", "collect_failures"} <= set(params)
