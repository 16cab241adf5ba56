"""A real distribution (examples/explainkit-example-analyzer) pip-installed into a temporary
target and driven through the CLI."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import pytest

from tests.helpers import install_example, pip_install, run_installed_cli

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "explainkit-example-analyzer"
HOOKS_MD = REPO / "docs" / "plugin-hooks.md"


pytestmark = pytest.mark.usefixtures("fresh_plugins")


# -- a real distribution, pip-installed into a temporary target ----------------------------


@pytest.fixture(scope="module")
def example_target(tmp_path_factory) -> Path:
    return install_example(EXAMPLE, tmp_path_factory)


def test_example_plugin_installed_lists_and_analyzes(example_target, tiny_run):
    listed = run_installed_cli(["plugins", "--json"], example_target)
    assert listed.returncode == 0, listed.stderr
    (row,) = [r for r in json.loads(listed.stdout) if r["name"] == "confidence"]
    assert row["package"] == "explainkit-example-analyzer"
    assert row["version"] == "0.1.0"
    assert row["source"] == "entry point"
    assert [a["name"] for a in row["analyzers"]] == ["confidence"]

    result = run_installed_cli(
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

    limited = run_installed_cli(["plugins", "--json"], example_target, plugins="")
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

    helped = run_installed_cli(["--help"], target, example_target)
    assert helped.returncode == 0, helped.stderr

    listed = run_installed_cli(["plugins", "--json"], target, example_target)
    assert listed.returncode == 0, listed.stderr
    rows = {r["name"]: r for r in json.loads(listed.stdout)}
    assert rows["broken"]["errors"] == ["ImportError: this plugin is broken on purpose"]
    assert rows["broken"]["package"] is None  # never registered, so no distribution info
    assert "confidence" in rows
    assert listed.stderr.count("plugin 'broken'") == 1

    result = run_installed_cli(
        ["analyze", str(tiny_run), "--plugin", "confidence"], target, example_target
    )
    assert result.returncode == 0, result.stderr
    assert re.search(r"ok +confidence", result.stderr)
