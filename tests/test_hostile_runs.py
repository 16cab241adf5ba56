"""Round 3 of the hostile user, generated: a user's folder given as --out, refused resumes
with every option combination, state_dicts of every tensor layout and dtype, the Python API
called with wrong types for every argument, duplicate config keys, stale temporary folders.

Each test makes its own inputs (hypothesis, derandomized, few examples: seconds each) and
checks the promise of docs/reliability.md: one sentence (an ExplainkitError subclass, or
the CLI's exit code), nothing changed and nothing deleted. Runs are real, small and shared
(the session's tiny run, copied).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import explainkit
from explainkit.config import TrainConfig
from explainkit.config_files import read_config_file
from explainkit.errors import ConfigError, ExplainkitError
from explainkit.rundir import RunDir
from explainkit.train.resume import resume_config
from explainkit.train.trainer import train
from explainkit.train.weights import apply_weights, read_weights
from tests.helpers import checksums, registries, run_cli


def hostile(max_examples: int):
    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        suppress_health_check=[
            HealthCheck.function_scoped_fixture,
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
        ],
    )


def one_sentence(e: BaseException) -> str:
    text = str(e)
    assert text and "\n" not in text and "Traceback" not in text, text
    return text


def tree(folder: Path) -> dict[str, str]:
    """Every file and folder under ``folder`` (folders as "dir"), with file hashes."""
    found = {str(p.relative_to(folder)): "dir" for p in folder.rglob("*") if p.is_dir()}
    return {**found, **checksums(folder)}


# -- 1. a user's folder is never taken for a half-made run -------------------------------------

RUN_NAMES = [n for n in RunDir.OWNED if n != RunDir.SETUP]  # every name a run writes
USER_FILES = st.sampled_from(["mine.pt", "thesis.tex", "notes.txt", "epoch_001.pt", "x.h5"])


@st.composite
def user_folders(draw):
    """A folder of user files under run-owned names (as files or folders), maybe others."""
    names = draw(st.lists(st.sampled_from(RUN_NAMES), min_size=1, max_size=4, unique=True))
    layout = {}
    for name in names:
        if draw(st.booleans()):
            layout[name] = draw(st.lists(USER_FILES, min_size=1, max_size=2, unique=True))
        else:
            layout[name] = None  # a plain file of that name
    if draw(st.booleans()):
        layout["my_data"] = ["raw.csv"]
    return layout


def make_folder(root: Path, layout: dict) -> Path:
    root.mkdir(parents=True)
    for name, inside in layout.items():
        if inside is None:
            (root / name).write_bytes(b"the user's own " + name.encode())
        else:
            (root / name).mkdir()
            for file in inside:
                (root / name / file).write_bytes(b"user data " + file.encode())
    return root


@hostile(40)
@given(layout=user_folders())
def test_a_folder_of_user_files_is_refused_and_kept(tmp_path_factory, layout):
    folder = make_folder(tmp_path_factory.mktemp("out") / "d", layout)
    before = tree(folder)
    assert not RunDir(folder).is_half_made()
    with pytest.raises(ConfigError) as refused:
        RunDir(folder).create(overwrite=False)
    text = one_sentence(refused.value)
    assert "nothing was deleted" in text
    assert tree(folder) == before


@pytest.mark.parametrize("command", ["train", "evaluate"])
def test_train_and_evaluate_refuse_a_user_folder_through_the_cli(tmp_path, command):
    folder = make_folder(
        tmp_path / "d",
        {"checkpoints": ["mine.pt"], "analyses": ["thesis.tex"], "train.log": None,
         "report.html": None},
    )  # fmt: skip
    before = tree(folder)
    weights = tmp_path / "w.pt"
    torch.save(registries().build_model("resnet18-s8", 10, width=8).state_dict(), weights)
    extra = ["--weights", str(weights), "--limit-eval", "8"] if command == "evaluate" else [
        "--epochs", "1", "--limit-train", "32", "--limit-eval", "8", "--quiet"]  # fmt: skip
    result = run_cli(command, "--dataset", "shapes", "--width", "8", "--device", "cpu",
                     *extra, "--out", str(folder))  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "nothing was deleted" in result.stderr and "Traceback" not in result.stderr
    assert tree(folder) == before


def test_only_the_marker_makes_a_folder_half_made(tmp_path):
    folder = make_folder(tmp_path / "d", {"checkpoints": ["epoch_001.pt"], "train.log": None})
    run = RunDir(folder)
    (folder / RunDir.SETUP).write_text("{}")
    assert run.is_half_made()
    lock = run.create(overwrite=False)  # explainkit's own half-made run: taken over
    lock.release()
    assert sorted(p.name for p in folder.iterdir()) == [RunDir.SETUP]


# -- 2. a refused resume changes nothing ---------------------------------------------------------


def _flip_logits(run: Path, epoch: int) -> None:
    """Flip bytes inside the logits' chunk of one epoch file: its checksum fails."""
    import h5py

    path = run / "predictions.epochs" / f"epoch_{epoch:04d}.h5"
    with h5py.File(path, "r") as f:
        offset = f["logits"].id.get_chunk_info(0).byte_offset
    data = bytearray(path.read_bytes())
    for i in range(offset + 4, offset + 20):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _epoch_file(run: Path, epoch: int) -> Path:
    return run / "predictions.epochs" / f"epoch_{epoch:04d}.h5"


DAMAGES = {
    "last epoch file deleted": lambda run: _epoch_file(run, 2).unlink(),
    "first epoch file deleted": lambda run: _epoch_file(run, 1).unlink(),
    "last epoch file emptied": lambda run: _epoch_file(run, 2).write_bytes(b""),
    "last epoch fails its checksum": lambda run: _flip_logits(run, 2),
    "first epoch fails its checksum": lambda run: _flip_logits(run, 1),
    "last.pt truncated": lambda run: (run / "checkpoints" / "last.pt").write_bytes(
        (run / "checkpoints" / "last.pt").read_bytes()[:5000]
    ),
    "last.pt emptied": lambda run: (run / "checkpoints" / "last.pt").write_bytes(b""),
    "store head deleted": lambda run: (run / "predictions.h5").unlink(),
}

OPTIONS = st.fixed_dictionaries(
    {},
    optional={
        "epochs": st.integers(2, 6),
        "keep_checkpoints": st.integers(1, 3),
        "device": st.just("cpu"),
        "batch_size": st.sampled_from([16, 64]),
    },
)


@hostile(30)
@given(damage=st.sampled_from(sorted(DAMAGES)), options=OPTIONS)
def test_a_refused_resume_changes_nothing(tiny_run_master, tmp_path_factory, damage, options):
    run = tmp_path_factory.mktemp("resume") / "run"
    shutil.copytree(tiny_run_master, run)
    DAMAGES[damage](run)
    before = tree(run)
    with pytest.raises(ExplainkitError) as refused:
        config = resume_config(run, options, registries())
        train(config, registries(), out=run, quiet=True, resume=True)
    one_sentence(refused.value)
    assert tree(run) == before, damage


@pytest.mark.parametrize("options", [["--epochs", "4"], ["--keep-checkpoints", "1"]])
def test_a_refused_resume_through_the_cli_changes_nothing(tiny_run, options):
    _flip_logits(tiny_run, 2)
    before = tree(tiny_run)
    result = run_cli("train", "--resume", str(tiny_run), *options, "--quiet")
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert tree(tiny_run) == before


# -- 4. state_dicts of every layout and dtype ----------------------------------------------------

DTYPES = [
    torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64,
    torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool,
    torch.float8_e4m3fn, torch.float8_e5m2,
]  # fmt: skip
LAYOUTS = ["strided", "sparse_coo", "sparse_csr", "sparse_csc", "meta", "quantized", "nested"]


def _convert(t: torch.Tensor, layout: str, dtype: torch.dtype) -> torch.Tensor:
    t = t.to(dtype) if layout != "quantized" else t
    if layout == "sparse_coo":
        return t.to_sparse()
    if layout == "sparse_csr" and t.dim() == 2:
        return t.to_sparse_csr()
    if layout == "sparse_csc" and t.dim() == 2:
        return t.to_sparse_csc()
    if layout == "meta":
        return t.to("meta")
    if layout == "quantized" and t.is_floating_point():
        return torch.quantize_per_tensor(t.float(), 0.1, 0, torch.qint8)
    if layout == "nested" and t.dim() >= 1:
        return torch.nested.nested_tensor([t.float()])
    return t


@pytest.fixture(scope="module")
def tiny_model_state():
    return registries().build_model("resnet18-s8", 3, width=8).state_dict()


@hostile(60)
@given(
    layout=st.sampled_from(LAYOUTS),
    dtype=st.sampled_from(DTYPES),
    which=st.sampled_from(["all", "one", "head"]),
)
def test_any_weights_layout_and_dtype_is_loaded_or_refused(
    tiny_model_state, tmp_path_factory, layout, dtype, which
):
    keys = list(tiny_model_state)
    chosen = {"all": keys, "one": keys[:1], "head": keys[-2:]}[which]
    path = tmp_path_factory.mktemp("w") / "w.pt"
    try:
        state = {k: (_convert(v, layout, dtype) if k in chosen else v) for k, v in
                 tiny_model_state.items()}  # fmt: skip
        torch.save(state, path)
    except Exception:  # torch cannot make or save it at all: no file for a user to pass
        return
    entry = registries().model_entry("resnet18-s8")
    model = registries().build_model("resnet18-s8", 3, width=8)
    try:
        weights = read_weights(str(path), entry, registries())
        apply_weights(model, weights, 3, entry.name)
    except ExplainkitError as e:
        one_sentence(e)
        return
    for value in model.state_dict().values():  # accepted: plain tensors of the model's kind
        assert value.layout == torch.strided and not value.is_meta


@pytest.mark.parametrize("command", ["evaluate", "train"])
def test_sparse_weights_are_one_sentence_in_evaluate_and_train(tiny_model_state, tmp_path, command):
    path = tmp_path / "sparse.pt"
    torch.save({k: v.to_sparse() if v.dim() else v for k, v in tiny_model_state.items()}, path)
    extra = ["--limit-eval", "8"] if command == "evaluate" else [
        "--epochs", "1", "--limit-train", "32", "--limit-eval", "8", "--quiet"]  # fmt: skip
    out = tmp_path / "run"
    result = run_cli(command, "--dataset", "shapes", "--width", "8", "--device", "cpu",
                     "--weights", str(path), *extra, "--out", str(out))  # fmt: skip
    assert result.returncode in (1, 2), result.stderr
    assert "sparse_coo" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()


# -- 6. the Python API: wrong types for every argument -------------------------------------------


class Tiny(nn.Module):
    """A small CNN classifier of 2 classes (importable: this module)."""

    def __init__(self, num_classes: int = 2) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


IMAGES = np.random.default_rng(0).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
TARGETS = np.array([0, 1, 0, 1, 0, 1])

HOSTILE_VALUES = st.sampled_from(
    [
        None, "abc", "", -1, 0, 1.5, float("nan"), float("inf"), True, [], {}, (0.5, 0.5),
        (0.5, 0.5, float("nan")), (0.5, 0.5, 0.0), {"a": object()}, {"a": [1, 2]}, 10**100,
        b"bytes", object(), print, torch.zeros(2), np.zeros(3), ("x",), ["a", 1],
    ]
)  # fmt: skip

EVALUATE_ARGS = [
    "model", "data", "out", "classes", "mean", "std", "arch", "kwargs", "default_layer",
    "data_dir", "image_size", "limit_eval", "device", "batch_size", "overwrite", "registries",
]  # fmt: skip


def _evaluate_call(out: Path, name: str, value) -> None:
    args = {"model": Tiny(), "data": (IMAGES, TARGETS), "out": out, "classes": ["a", "b"],
            "device": "cpu", "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}  # fmt: skip
    args[name] = value
    explainkit.evaluate(**args)


@hostile(80)
@given(name=st.sampled_from(EVALUATE_ARGS), value=HOSTILE_VALUES)
def test_evaluate_with_any_wrong_argument(tmp_path_factory, name, value):
    here = tmp_path_factory.mktemp("api")
    try:
        with contextlib.chdir(here):  # a relative or default out lands here
            _evaluate_call(here / "run", name, value)
    except ExplainkitError as e:
        one_sentence(e)
    # Anything else (TypeError, ValueError, RuntimeError, AttributeError...) fails the test.


LOG_ARGS = ["model", "train_loss", "train_acc", "lr", "images_per_s", "seconds"]


@pytest.fixture(scope="module")
def writer(tmp_path_factory):
    with explainkit.RunWriter(
        tmp_path_factory.mktemp("writer") / "run", Tiny(), (IMAGES, TARGETS),
        classes=["a", "b"], device="cpu",
    ) as w:  # fmt: skip
        yield w


@hostile(60)
@given(name=st.sampled_from(LOG_ARGS), value=HOSTILE_VALUES)
def test_log_epoch_with_any_wrong_argument(writer, name, value):
    epochs = writer.epoch
    try:
        writer.log_epoch(**{name: value})
    except ExplainkitError as e:
        one_sentence(e)
        assert writer.epoch == epochs  # nothing of the epoch was committed


def test_the_issue_cases_are_config_errors(writer, tmp_path):
    with pytest.raises(ConfigError, match="train_loss must be a number"):
        writer.log_epoch(train_loss="abc")
    with pytest.raises(ConfigError, match="mean must be 3 finite numbers"):
        explainkit.evaluate(Tiny(), (IMAGES, TARGETS), out=tmp_path / "m", classes=["a", "b"],
                            mean=(0.5, 0.5), std=(0.2, 0.2), device="cpu")  # fmt: skip
    with pytest.raises(ConfigError, match="kwargs must be a dict of names to plain JSON"):
        explainkit.evaluate(Tiny(), (IMAGES, TARGETS), out=tmp_path / "k", classes=["a", "b"],
                            kwargs={"layers": object()}, device="cpu")  # fmt: skip
    assert not (tmp_path / "m").exists() and not (tmp_path / "k").exists()


ANALYZE_ARGS = ["run", "plugins", "epoch", "device", "batch_size", "seed", "registries",
                "plugins_dir", "echo", "collect_failures", "trust_imports"]  # fmt: skip


@pytest.fixture(scope="module")
def analyzed_run(tiny_run_master, tmp_path_factory):
    run = tmp_path_factory.mktemp("analyze") / "run"
    shutil.copytree(tiny_run_master, run)
    return run


LOAD_ARGS = ["load_model:" + n for n in ("run", "epoch", "device", "registries", "trust_imports")]


@hostile(60)
@given(name=st.sampled_from(ANALYZE_ARGS + LOAD_ARGS), value=HOSTILE_VALUES)
def test_analyze_and_load_model_with_any_wrong_argument(analyzed_run, name, value):
    try:
        if name.startswith("load_model:"):
            explainkit.load_model(**{"run": analyzed_run, name.split(":")[1]: value})
        else:  # no analyzer selected: the arguments are what is tried, in milliseconds
            explainkit.analyze(**{"run": analyzed_run, "plugins": [], "device": "cpu", name: value})
    except ExplainkitError as e:
        one_sentence(e)


# -- smaller: config keys given twice, stale temporary folders, odd output paths -----------------

OPTION_NAMES = sorted(TrainConfig.fields_by_name())


@hostile(40)
@given(
    keys=st.lists(st.sampled_from(OPTION_NAMES), min_size=1, max_size=4, unique=True),
    twice=st.data(),
    suffix=st.sampled_from([".yaml", ".yml", ".json"]),
    dash=st.booleans(),
)
def test_a_key_given_twice_in_a_config_file_is_refused(tmp_path_factory, keys, twice, suffix, dash):
    repeated = twice.draw(st.sampled_from(keys))
    lines = [*keys, repeated]
    spelled = [k.replace("_", "-") if dash and k == repeated else k for k in lines[:-1]]
    spelled.append(repeated)
    path = tmp_path_factory.mktemp("cfg") / f"c{suffix}"
    if suffix == ".json":
        path.write_text("{" + ", ".join(f'"{k}": 1' for k in spelled) + "}")
    else:
        path.write_text("".join(f"{k}: 1\n" for k in spelled))
    with pytest.raises(ConfigError) as refused:
        read_config_file(path)
    assert "twice" in one_sentence(refused.value)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temporary_folders_of_any_analyzer_go_at_the_next_analyze(tiny_run):
    analyses = tiny_run / "analyses"
    analyses.mkdir(exist_ok=True)
    pid = _dead_pid()
    stale = [analyses / f".gallery.tmp-{pid}", analyses / f".gradcam.parts-{pid}",
             analyses / f".evolution.old-{pid}"]  # fmt: skip
    for folder in stale:
        folder.mkdir()
        (folder / "part.png").write_bytes(b"x")
    live = analyses / f".gallery.tmp-{os.getpid()}"  # a live process's: kept
    live.mkdir()
    result = run_cli("analyze", str(tiny_run), "--plugin", "losses")  # not gallery
    assert result.returncode == 0, result.stderr
    assert not any(folder.exists() for folder in stale)
    assert live.exists()


@pytest.mark.parametrize("target", ["/proc/self/x", "/proc/self/fd/x.html"])
def test_report_to_an_impossible_path_does_not_blame_the_disk(tiny_run, target):
    result = run_cli("report", str(tiny_run), "--out", target)
    assert result.returncode == 1
    assert "disk space" not in result.stderr and "Traceback" not in result.stderr
    assert "cannot write" in result.stderr


def _mount_tmpfs(where: Path, size: str) -> bool:
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True)  # fmt: skip
    return done.returncode == 0


@pytest.mark.parametrize("size", ["4k", "40k", "400k"])
def test_a_full_disk_during_train_names_the_file(tmp_path, size):
    disk = tmp_path / "disk"
    if os.geteuid() != 0 or not _mount_tmpfs(disk, size):
        pytest.skip("needs a tmpfs mount (root)")
    try:
        out = disk / "run"
        result = run_cli("train", "--dataset", "shapes", "--width", "8", "--epochs", "2",
                         "--batch-size", "32", "--limit-train", "64", "--limit-eval", "32",
                         "--device", "cpu", "--quiet", "--out", str(out))  # fmt: skip
        assert result.returncode == 1, result.stderr
        error = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
        assert len(error) == 1 and f"cannot write {out}/" in error[0], result.stderr
        assert "free some disk space" in error[0]
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def test_resume_with_an_untouched_run_still_works(tiny_run):
    """The checks before a resume accept a sound run (no false refusals)."""
    config = resume_config(tiny_run, {"epochs": 3}, registries())
    train(config, registries(), out=tiny_run, quiet=True, resume=True)
    assert json.loads((tiny_run / "config.json").read_text())["config"]["epochs"] == 3
