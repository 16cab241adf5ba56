"""The installed distribution: console script, explainkit.plugins mapping, no stray modules."""

import importlib.metadata
import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_plugins_folder_installs_as_explainkit_plugins():
    spec = importlib.util.find_spec("explainkit.plugins")
    assert spec is not None
    assert Path(spec.origin).parent.name == "plugins"


def test_built_wheel_has_no_top_level_plugins_package(tmp_path):
    """Build the real wheel: plugins/ must ship as explainkit/plugins/, never as plugins/."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("explainkit-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "explainkit/plugins/__init__.py" in names
    # Every subpackage of the source tree ships (pyproject lists them one by one).
    packages = [p.relative_to(REPO) for p in (REPO / "explainkit").rglob("__init__.py")]
    assert {str(p) for p in packages} <= set(names)
    # The report's template ships as package data (explainkit/report.py loads it at runtime).
    assert {"explainkit/templates/report.html", "explainkit/templates/report.css"} <= set(names)
    # So do the explorer's templates, script and stylesheet: every non-Python file under them.
    assets = [
        str(p.relative_to(REPO))
        for folder in ("templates", "static")
        for p in (REPO / "explainkit" / "serve" / folder).rglob("*")
        if p.is_file()
    ]
    assert assets and set(assets) <= set(names)
    assert not [n for n in names if n.startswith("plugins/")]
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"explainkit"}


def test_no_importable_top_level_plugins_module(tmp_path):
    """Outside the source tree, the installed project exposes no bare `plugins` module."""
    code = "import importlib.util, explainkit; print(importlib.util.find_spec('plugins'))"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "None"


def test_console_script_is_declared():
    eps = importlib.metadata.entry_points(group="console_scripts")
    assert any(ep.name == "explainkit" and ep.value == "explainkit.cli:main" for ep in eps)


def test_runtime_dependencies_are_declared():
    requires = " ".join(importlib.metadata.requires("explainkit"))
    for name in (
        "torch",
        "torchvision",
        "captum",
        "numpy",
        "matplotlib",
        "click",
        "pluggy",
        "h5py",
        "tqdm",
    ):
        assert name in requires
