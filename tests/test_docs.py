"""The code on docs/writing-a-plugin.md runs as written, against a real trained run."""

from __future__ import annotations

import json
import re
import shutil
import textwrap
from pathlib import Path

import pytest

from tests.helpers import REPO, run_cli

GUIDE = REPO / "docs" / "writing-a-plugin.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", GUIDE.read_text(), flags=re.S)


@pytest.fixture
def workspace(tiny_run, tmp_path, monkeypatch):
    """A folder laid out as the guide assumes: runs/tiny and myplugins/unsure.py."""
    plugin = next(b for b in python_blocks() if b.startswith("# myplugins/unsure.py"))
    (tmp_path / "myplugins").mkdir()
    (tmp_path / "myplugins" / "unsure.py").write_text(plugin)
    (tmp_path / "runs").mkdir()
    shutil.move(tiny_run, tmp_path / "runs" / "tiny")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_docs_plugin_guide_has_the_blocks_this_test_runs():
    blocks = python_blocks()
    assert len(blocks) == 3
    assert blocks[0].startswith("# myplugins/unsure.py")
    assert "context.target_layer" in blocks[1] and "explainkit.analyze(" in blocks[2]


def test_docs_plugin_guide_analyzer_runs_through_the_cli(workspace):
    result = run_cli(
        "analyze", "runs/tiny", "--plugins-dir", "myplugins", "--plugin", "unsure",
        "--unsure-count", "8", "--device", "cpu", cwd=workspace,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "ok      unsure: 2 file(s) in runs/tiny/analyses/unsure" in result.stderr
    manifest = json.loads((workspace / "runs/tiny/analyses/unsure/manifest.json").read_text())
    assert [a["path"] for a in manifest["artifacts"]] == ["unsure.png", "unsure.csv"]
    header, *rows = (workspace / "runs/tiny/analyses/unsure/unsure.csv").read_text().splitlines()
    assert header == "index,true,predicted,confidence" and len(rows) == 8
    confidences = [float(r.rsplit(",", 1)[1]) for r in rows]
    assert confidences == sorted(confidences)  # least confident first


def test_docs_plugin_guide_python_test_snippet_runs(workspace):
    namespace: dict = {}
    exec(compile(python_blocks()[2], str(GUIDE), "exec"), namespace)
    assert namespace["manifest"]["analyzer"] == "unsure"


def test_docs_plugin_guide_gradcam_snippet_runs_inside_an_analyzer(workspace):
    body = textwrap.indent(python_blocks()[1], " " * 8)
    (workspace / "myplugins" / "cams.py").write_text(
        "from explainkit import Analyzer, hookimpl\n\n\n"
        "class Cams(Analyzer):\n"
        "    name = 'cams'\n"
        "    needs = frozenset({'store', 'checkpoint'})\n\n"
        "    def run(self, context):\n"
        f"{body}"
        "        return [context.artifact('cams.png', 'CAMs', 'image')]\n\n\n"
        "@hookimpl\n"
        "def register_analyzers(register):\n"
        "    register(Cams)\n"
    )
    import explainkit

    (manifest,) = explainkit.analyze(
        "runs/tiny", plugins=["cams"], plugins_dir="myplugins", device="cpu"
    )
    assert manifest["status"] == "ok", manifest.get("traceback")
    assert (Path("runs/tiny/analyses/cams/cams.png")).stat().st_size > 1000
