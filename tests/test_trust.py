"""A run directory never imports a module without the user's consent (explainkit.trust).

Each test writes a real module that leaves a sentinel file when imported (as a hostile
module's import side effects would run), points a real run's config.json and checkpoints at
it under every spelling explainkit reads, and checks that every command that rebuilds a
run's model refuses in one sentence saying how to consent, with the sentinel absent; and
that with consent (flag, allow-list, API keyword) the model is built.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import explainkit
from explainkit.errors import ExplainkitError, UntrustedImport
from explainkit.trust import ENV, check_trusted, imported_module, trusted_imports
from tests.helpers import checksums, run_cli

MODULE = """
import pathlib
pathlib.Path({sentinel!r}).write_text("imported")

from explainkit.models.resnet import resnet18_s8


def Net(num_classes, width=64):
    return resnet18_s8(num_classes=num_classes, width=width)
"""


def plant(folder: Path, name: str) -> Path:
    """Write module ``name`` (a dotted name makes packages) under ``folder``; its sentinel."""
    sentinel = folder / f"{name}.imported"
    parts = name.split(".")
    where = folder
    for package in parts[:-1]:
        where = where / package
        where.mkdir(exist_ok=True)
        (where / "__init__.py").write_text(
            f"import pathlib\npathlib.Path({str(sentinel)!r}).write_text('imported')\n"
        )
    (where / f"{parts[-1]}.py").write_text(MODULE.format(sentinel=str(sentinel)))
    return sentinel


def point_run_at(run: Path, arch: str) -> None:
    """Record ``arch`` as the run's model everywhere it is recorded."""
    config = json.loads((run / "config.json").read_text())
    config["model"]["arch"] = arch
    config["config"]["model"] = arch
    (run / "config.json").write_text(json.dumps(config))
    for path in (run / "checkpoints").glob("*.pt"):
        data = torch.load(path, weights_only=True)
        data["model"]["arch"] = arch
        torch.save(data, path)


@pytest.fixture
def hostile_run(tiny_run, tmp_path, monkeypatch):
    """A real run whose model is ``import:ek_hostile_mod:Net``, importable from sys.path."""
    folder = tmp_path / "site"
    folder.mkdir()
    sentinel = plant(folder, "ek_hostile_mod")
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delenv(ENV, raising=False)
    point_run_at(tiny_run, "import:ek_hostile_mod:Net")
    yield tiny_run, folder, sentinel
    sys.modules.pop("ek_hostile_mod", None)


def test_imported_module_reads_every_spelling():
    assert imported_module("import:a.b:Net") == "a.b"
    assert imported_module("a.b:Net") == "a.b"  # as runs of 0.2 recorded it
    assert imported_module("resnet18-s8") is None
    assert imported_module("torchvision:resnet18") is None
    assert imported_module(None) is None


def test_the_api_refuses_then_builds_with_consent(hostile_run):
    run, _, sentinel = hostile_run
    with pytest.raises(UntrustedImport) as refused:
        explainkit.load_model(run)
    message = str(refused.value)
    assert "--trust-imports" in message and "trust_imports=True" in message and ENV in message
    assert "\n" not in message
    assert not sentinel.exists() and "ek_hostile_mod" not in sys.modules
    with pytest.raises(ExplainkitError, match="--trust-imports"):  # the model analyzer failed
        explainkit.analyze(run, plugins=["model"], device="cpu")
    assert not sentinel.exists()
    model = explainkit.load_model(run, trust_imports=["ek_hostile_mod"])
    assert sentinel.exists() and isinstance(model, torch.nn.Module)


@pytest.mark.parametrize(
    "command",
    [
        ("analyze", "{run}", "--plugin", "model", "--device", "cpu"),
        ("train", "--resume", "{run}", "--epochs", "3", "--quiet"),
        ("evaluate", "--model", "resnet18-s8", "--width", "8", "--dataset", "shapes",
         "--weights", "{run}/checkpoints/best.pt", "--limit-eval", "8", "--device", "cpu",
         "--out", "{tmp}/ev"),
    ],
    ids=["analyze", "resume", "evaluate-weights"],
)  # fmt: skip
def test_commands_refuse_without_consent_and_change_nothing(hostile_run, tmp_path, command):
    run, folder, sentinel = hostile_run
    before = checksums(run)
    args = [a.format(run=run, tmp=tmp_path) for a in command]
    result = run_cli(*args, env={"PYTHONPATH": str(folder)})
    assert result.returncode == 1, result.stderr
    assert "--trust-imports" in result.stderr and "Traceback" not in result.stderr
    assert not sentinel.exists()
    # analyze records the refusal as the model analyzer's failed manifest; nothing else moves
    after = {k: v for k, v in checksums(run).items() if not k.startswith("analyses/")}
    assert after == before
    assert not (tmp_path / "ev").exists()


def test_the_flag_and_the_allow_list_give_consent(hostile_run):
    run, folder, sentinel = hostile_run
    env = {"PYTHONPATH": str(folder)}
    flagged = run_cli("analyze", str(run), "--plugin", "model", "--device", "cpu",
                      "--trust-imports", env=env)  # fmt: skip
    assert flagged.returncode == 0, flagged.stderr
    assert sentinel.exists()
    sentinel.unlink()
    listed = run_cli("analyze", str(run), "--plugin", "model", "--device", "cpu",
                     env={**env, ENV: "ek_hostile_mod"})  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    assert sentinel.exists()
    sentinel.unlink()
    other = run_cli(
        "analyze", str(run), "--plugin", "model", "--device", "cpu", env={**env, ENV: "ek_hostile"}
    )  # a prefix of the name is not the package
    assert other.returncode == 1 and not sentinel.exists()


def test_reading_a_run_needs_no_consent(hostile_run):
    """inspect, report and the store-only analyzers never build the model."""
    run, folder, sentinel = hostile_run
    env = {"PYTHONPATH": str(folder)}
    for args in (("inspect", str(run)), ("report", str(run)),
                 ("analyze", str(run), "--plugin", "losses")):  # fmt: skip
        result = run_cli(*args, env=env)
        assert result.returncode == 0, (args, result.stderr)
    assert not sentinel.exists()


identifiers = st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True).map(lambda s: f"ekt_{s}")


@settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    package=identifiers,
    submodule=st.none() | identifiers,
    spelling=st.sampled_from(["import:{m}:Net", "{m}:Net"]),
    where=st.sampled_from(["checkpoints", "config"]),
)
def test_any_module_a_run_names_is_not_imported(
    tiny_run_master, tmp_path_factory, package, submodule, spelling, where
):
    """Generated module names, in every spelling a run can record, in the checkpoint or in
    config.json (read by resume): refused before anything is imported."""
    name = f"{package}.{submodule}" if submodule else package
    if spelling == "{m}:Net" and "." not in name:
        name = f"{name}.core"  # the bare spelling needs a dotted module
    tmp = tmp_path_factory.mktemp("trust")
    run = tmp / "run"
    shutil.copytree(tiny_run_master, run)
    sentinel = plant(tmp, name)
    sys.path.insert(0, str(tmp))
    try:
        point_run_at(run, spelling.format(m=name))
        with pytest.raises(UntrustedImport):
            if where == "checkpoints":
                explainkit.load_model(run)
            else:
                from explainkit.train.resume import resume_config

                resume_config(run, {"epochs": 5}, explainkit.load_registries())
        assert not sentinel.exists()
        assert name.split(".")[0] not in sys.modules
    finally:
        sys.path.remove(str(tmp))
        for key in [k for k in sys.modules if k.split(".")[0] == package]:
            del sys.modules[key]


def test_consent_is_scoped(tmp_path, monkeypatch):
    for name in ("pkg_a.sub", "pkg_ab"):
        plant(tmp_path, name)
    monkeypatch.syspath_prepend(str(tmp_path))
    check_trusted("import:no_such_pkg_ek:Net", "here")  # nothing here to import, nothing runs
    with trusted_imports(["pkg_a"]):
        check_trusted("import:pkg_a.sub:Net", "here")
        with pytest.raises(UntrustedImport):
            check_trusted("import:pkg_ab:Net", "here")
    with pytest.raises(UntrustedImport):
        check_trusted("import:pkg_a:Net", "here")
    check_trusted("import:json:JSONDecoder", "here")  # already imported: nothing runs
    assert issubclass(UntrustedImport, ExplainkitError)
