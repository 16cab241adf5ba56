import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from explainkit import __version__
from explainkit.cli import cli
from tests.helpers import run_cli

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "h5py", "matplotlib", "numpy", "captum", "torchvision")


def walk(command: click.Command, path=()):
    yield path, command
    if isinstance(command, click.Group):
        ctx = click.Context(command)
        for name in command.list_commands(ctx):
            yield from walk(command.get_command(ctx, name), path + (name,))


COMMANDS = [" ".join(p) for p, _ in walk(cli)]


@pytest.mark.parametrize("args", [["--help"], ["--version"]])
def test_cli_help_and_version_do_not_import_torch(args):
    code = (
        "import sys; from explainkit.cli import main; sys.argv = ['explainkit', *sys.argv[1:]]\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_version_is_printed():
    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output


@pytest.mark.parametrize("command", COMMANDS)
def test_cli_help_of_every_command(command):
    result = CliRunner(env={"EXPLAINKIT_LOAD_PLUGINS": ""}).invoke(
        cli, [*command.split(), "--help"], catch_exceptions=False
    )
    assert result.exit_code == 0
    assert "Usage:" in result.output


def test_every_option_has_help_and_is_documented():
    doc = (REPO / "docs" / "cli.md").read_text()
    for path, command in walk(cli):
        ctx = click.Context(command, info_name=" ".join(path) or "explainkit")
        assert command.help, f"{path} has no docstring"
        assert f"explainkit {' '.join(path)}".strip() in doc
        for param in command.get_params(ctx):
            if isinstance(param, click.Option):
                assert param.help, f"{path} {param.opts} has no help"
                assert param.opts[0] in doc, f"{param.opts[0]} of {path} is not in docs/cli.md"


def test_cli_reference_is_up_to_date():
    result = subprocess.run(
        [sys.executable, "-m", "cogapp", "--check", "docs/cli.md"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={"EXPLAINKIT_LOAD_PLUGINS": "", "PATH": "/usr/bin:/bin", "COLUMNS": "80"},
    )
    assert result.returncode == 0, "docs/cli.md is stale: run `make docs`\n" + result.stderr


def test_usage_errors_exit_2_and_failures_exit_1(tmp_path):
    result = run_cli("train", "--dataset", "imagenet")
    assert result.returncode == 2 and "imagenet" in result.stderr
    result = run_cli("inspect", str(tmp_path / "missing"))
    assert result.returncode == 1
    assert result.stderr.strip() == f"Error: run directory {tmp_path / 'missing'} does not exist"


def test_verbose_shows_the_traceback(tmp_path):
    result = run_cli("--verbose", "inspect", str(tmp_path / "missing"))
    assert result.returncode == 1 and "Traceback" in result.stderr


def test_python_dash_m_runs_the_cli():
    result = run_cli("--help")
    assert result.returncode == 0 and "train" in result.stdout
