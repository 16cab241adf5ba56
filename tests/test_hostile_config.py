"""Hostile values and config files for ``explainkit train``, and damaged ``RUN/config.json``.

The promise: one ``Error:`` sentence (bounded in length, whatever the input), exit 2 for a
bad value wherever it comes from (the command line or a ``--config`` file), no traceback, no
hang, and nothing already on disk changes. Each case stands for a class of inputs; the
generated versions of these classes are in tests/test_fuzz.py.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from pathlib import Path

import pytest

from explainkit.config import (
    FIELDS,
    check_value,
    field_kind,
    resolve_config,
)
from explainkit.config_files import read_config_file
from explainkit.errors import ConfigError, RunError, brief
from explainkit.files import MAX_CONFIG_BYTES
from explainkit.rundir import check_run_config
from tests.helpers import run_cli, valid_run_document

# A shapes run that would train in seconds if a bad value slipped through (it must not).
SMALL = ("--dataset", "shapes", "--width", "8", "--epochs", "1", "--limit-train", "64")
SMALL += ("--limit-eval", "16", "--device", "cpu", "--quiet")


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("Error:")]


def assert_usage_error(result, *fragments: str) -> str:
    """Exit 2, no traceback, one bounded ``Error:`` line holding ``fragments``."""
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr[-3000:]
    assert len(result.stderr) < 1000, f"{len(result.stderr)} characters of stderr"
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert not lines[0].endswith("."), lines[0]
    return lines[0]


def checksums(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# -- values on the command line ----------------------------------------------------------------


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--momentum", "-0.5"], ["--momentum must be at least 0"]),
        (["--momentum", "1"], ["--momentum must be less than 1"]),
        (["--weight-decay", "-1e-4"], ["--weight-decay must be at least 0"]),
        (["--seed", "-1"], ["--seed must be at least 0"]),
        (["--seed", str(2**70)], ["--seed must be at most 4294967295"]),
        (["--lr", "nan"], ["--lr must be a finite number", "nan"]),
        (["--lr", "-inf"], ["--lr must be a finite number"]),
        (["--lr", "1e400"], ["--lr must be a finite number", "inf"]),
        (["--lr", "0"], ["--lr must be greater than 0"]),
        (["--label-smoothing", "inf"], ["--label-smoothing must be a finite number"]),
        (["--ema", "1"], ["--ema must be less than 1"]),
        (["--width", "100000"], ["--width must be at most 4096"]),
        (["--image-size", "2000000"], ["--image-size must be at most 8192"]),
        (["--image-size", "4"], ["--image-size must be at least 8"]),
        (["--crop-padding", "-1"], ["--crop-padding must be at least 0"]),
        (["--limit-train", "0"], ["--limit-train must be at least 1"]),
        (["--keep-checkpoints", "-3"], ["--keep-checkpoints must be at least 1"]),
        # In range one by one, but far more memory than any machine has, together.
        (["--width", "4096", "--image-size", "8192"], ["need at least", "lower --width"]),
        (["--device", "foo"], ["'foo' is not a device"]),
        (["--device", "cuda" * 5000], ["is not a device"]),
        (["--dataset", "s" * 5000], ["is not a dataset name"]),
        (["--epochs", "9" * 5000], ["is too long to be an integer"]),
        (["--lr", "x" * 5000], ["is too long to be a number"]),
        (["--lr", "0.1x"], ["'0.1x' is not a number"]),
        (["--dataset", "folder"], ["--dataset folder needs --data-dir"]),
    ],
)
def test_bad_values_on_the_command_line_are_usage_errors(tmp_path, args, fragments):
    out = tmp_path / "never"
    result = run_cli("train", *SMALL, "--out", str(out), *args, timeout=120)
    assert_usage_error(result, *fragments)
    assert not out.exists()


def test_bad_values_never_touch_an_existing_run(tiny_run):
    before = checksums(tiny_run)
    attempts = [
        ["--overwrite", "--out", str(tiny_run), "--lr", "nan"],
        ["--overwrite", "--out", str(tiny_run), "--width", "4096", "--image-size", "8192"],
        ["--resume", str(tiny_run), "--seed", "-1"],
        ["--resume", str(tiny_run), "--epochs", "0"],
    ]
    for args in attempts:
        result = run_cli("train", *args, timeout=120)
        assert_usage_error(result)
        assert checksums(tiny_run) == before, args


# -- config files ------------------------------------------------------------------------------


def _alias_bomb() -> str:
    lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"{name}: &{name} [{', '.join([f'*{prev}'] * 9)}]")
    return "\n".join(lines) + "\nepochs: *i\n"


HOSTILE_FILES = {
    "string-epoch.json": (json.dumps({"epochs": "20"}), ["epochs must be int", "'20'"]),
    "list-lr.yaml": ("lr: [0.1, 0.2]\n", ["lr must be float", "list"]),
    "dict-width.json": (json.dumps({"width": {"a": 1}}), ["width must be int", "dict"]),
    "bool-width.json": (json.dumps({"width": True}), ["width must be int", "bool True"]),
    "float-epochs.yaml": ("epochs: 2.5\n", ["epochs must be int"]),
    "null-lr.json": (json.dumps({"lr": None}), ["lr must be float, got None"]),
    "nan-lr.json": ('{"lr": NaN}', ["lr must be a finite number"]),
    "inf-lr.yaml": ("lr: .inf\n", ["lr must be a finite number"]),
    "huge-float.json": ('{"momentum": 1e999}', ["momentum must be a finite number"]),
    "int-flip.json": (json.dumps({"flip": 1}), ["flip must be true or false"]),
    "seed-2-70.json": (json.dumps({"seed": 2**70}), ["seed must be at most 4294967295"]),
    "digits-4000.json": (
        '{"epochs": ' + "9" * 4000 + "}",
        ["epochs must be at most 100000", "digits>"],
    ),
    "digits-5000.json": ('{"epochs": ' + "9" * 5000 + "}", ["number too long"]),
    "digits-5000.yaml": ("epochs: " + "9" * 5000 + "\n", ["cannot be read"]),
    "deep.json": ('{"epochs": ' + "[" * 100_000 + "]" * 100_000 + "}", ["nests too deeply"]),
    "deep.yaml": ("epochs: " + "[" * 100_000 + "]" * 100_000 + "\n", ["nests too deeply"]),
    "deep-900.json": ('{"cutout": ' + "[" * 900 + "]" * 900 + "}", ["cutout must be int"]),
    "alias-bomb.yaml": (_alias_bomb(), ["YAML anchor or alias"]),
    "merge-key.yaml": ("base: &b {epochs: 2}\n<<: *b\n", ["YAML anchor or alias"]),
    "long-key.json": (json.dumps({"e" * 200_000: 1}), ["unknown option"]),
    "long-device.json": (json.dumps({"device": "c" * 200_000}), ["device must be"]),
    "nul-data-dir.json": (json.dumps({"data_dir": "a\x00b"}), ["without NUL"]),
    "bad-device.yaml": ("device: gpu\n", ["device must be auto, cpu, cuda", "'gpu'"]),
    "bad-preset.json": (json.dumps({"preset": ["seed"] * 1000}), ["preset must be one of"]),
    "dataset-choice.json": (json.dumps({"dataset": "x" * 10_000}), ["is not a dataset name"]),
    "zero-epochs.yaml": ("epochs: 0\n", ["epochs must be at least 1, got 0"]),
    "typo.json": (json.dumps({"epocs": 3}), ["unknown option 'epocs'", "did you mean 'epochs'"]),
    "twice.json": ('{"batch-size": 8, "batch_size": 16}', ["gives 'batch_size' twice"]),
    "top-list.json": ("[1, 2, 3]", ["must hold a mapping"]),
    "binary.json": (b"\xff\xfe\x00garbage", ["not UTF-8"]),
    "too-big.json": ("{}" + " " * MAX_CONFIG_BYTES, ["larger than 1.0 MiB"]),
    "date.yaml": ("epochs: 2001-13-01\n", ["cannot be read"]),
    "python-tag.yaml": ("epochs: !!python/object/apply:os.system ['true']\n", ["not valid YAML"]),
}


@pytest.mark.parametrize("name", sorted(HOSTILE_FILES))
def test_hostile_config_files_in_process(tmp_path, name):
    """Every class of bad file is one ConfigError sentence, bounded, naming the file."""
    text, fragments = HOSTILE_FILES[name]
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    with pytest.raises(ConfigError) as e:
        resolve_config({}, set(), path)
    message = str(e.value)
    assert "\n" not in message and len(message) < 300 + len(str(path)), message
    assert str(path) in message, message
    for fragment in fragments:
        assert fragment in message, message


@pytest.mark.parametrize(
    "name",
    ["string-epoch.json", "alias-bomb.yaml", "deep.json", "digits-5000.json", "too-big.json"],
)
def test_hostile_config_files_through_the_cli(tmp_path, name):
    text, fragments = HOSTILE_FILES[name]
    path = tmp_path / name
    path.write_text(text)
    out = tmp_path / "never"
    result = run_cli("train", "--config", str(path), "--out", str(out), timeout=120)
    assert_usage_error(result, *fragments)
    assert not out.exists()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "config.json"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="is a named pipe"):
        read_config_file(fifo)  # would block forever if it were opened for reading
    result = run_cli("train", "--config", str(fifo), "--out", str(tmp_path / "x"), timeout=60)
    assert_usage_error(result, "is a named pipe")


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/urandom"])
def test_devices_are_refused_without_reading(tmp_path, device):
    if not Path(device).exists():
        pytest.skip(f"no {device}")
    with pytest.raises(ConfigError, match="is a device"):
        read_config_file(device)
    result = run_cli("train", "--config", device, "--out", str(tmp_path / "x"), timeout=60)
    assert_usage_error(result, "is a device")


def test_a_symlink_to_a_device_and_a_missing_file(tmp_path):
    link = tmp_path / "c.yaml"
    link.symlink_to("/dev/zero")
    with pytest.raises(ConfigError, match="is a device"):
        read_config_file(link)
    with pytest.raises(ConfigError, match="does not exist"):
        read_config_file(tmp_path / "missing.json")


def test_command_line_values_are_named_as_flags_and_file_values_by_file(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"epochs": 0}))
    with pytest.raises(ConfigError, match=r"c\.json: epochs must be at least 1"):
        resolve_config({}, set(), path)
    with pytest.raises(ConfigError, match="^--epochs must be at least 1"):
        resolve_config({"epochs": 0}, {"epochs"}, path)
    path.write_text(json.dumps({"epochs": 3}))
    assert resolve_config({"epochs": 5}, {"epochs"}, path).epochs == 5


def test_every_number_option_states_its_range():
    for name, f in FIELDS.items():
        if field_kind(name) in ("int", "float"):
            assert f.metadata.get("min") is not None and f.metadata.get("max") is not None, name
            if field_kind(name) == "int":
                assert f.metadata["max"] < 2**63, name  # every int fits torch and numpy


def test_brief_is_bounded_on_anything():
    huge = [10**5000, "x" * 10**6, list(range(10**5)), {"k" * 1000: "v" * 1000}]
    deep: list = []
    for _ in range(5000):
        deep = [deep]
    for value in [*huge, deep, math.nan, -math.inf, "\ud800\x00\x1b[31m", object()]:
        text = brief(value)
        assert len(text) <= 60 and "\n" not in text and "\x1b" not in text, text
        text.encode("utf-8")  # printable: no lone surrogates


def test_check_value_names_the_label():
    with pytest.raises(ConfigError, match=r"^x\.yaml: seed must be int, got str '1'$"):
        check_value("seed", "1", "x.yaml: seed")
    assert check_value("lr", 1) == 1.0 and isinstance(check_value("lr", 1), float)
    assert check_value("limit_train", None) is None


# -- RUN/config.json ---------------------------------------------------------------------------


def test_a_valid_run_document_passes_and_comes_back_complete():
    doc = valid_run_document()
    del doc["config"]["sync_bn"]  # an older run without a later option: its default
    doc["config"]["lr"] = 1  # JSON writes 1.0 as 1 in some writers
    checked = check_run_config(copy.deepcopy(doc), "run/config.json")
    assert checked["config"]["sync_bn"] is False and checked["config"]["lr"] == 1.0
    assert checked["model"] == doc["model"] and checked["data"] == doc["data"]


def test_a_real_run_document_passes(tiny_run_master):
    path = tiny_run_master / "config.json"
    doc = json.loads(path.read_text())
    assert check_run_config(doc, path)["config"] == doc["config"]


def _set(doc: dict, where: str, value) -> dict:
    *parents, last = where.split(".")
    target = doc
    for key in parents:
        target = target[key]
    if value is DELETE:
        del target[last]
    else:
        target[last] = value
    return doc


DELETE = object()


def _deep(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


DEEP = _deep(5000)  # deeper than repr or json.dumps can go


@pytest.mark.parametrize(
    "where, value, fragment",
    [
        ("config.epochs", "20", "config.epochs must be int, got str '20'"),
        ("config.epochs", 10**4000, "config.epochs must be at most 100000"),
        ("config.epochs", True, "config.epochs must be int, got bool"),
        ("config.lr", math.nan, "config.lr must be a finite number"),
        ("config.width", DEEP, "config.width must be int, got list"),
        ("config.seed", -5, "config.seed must be at least 0"),
        ("config.device", "tpu", "config.device must be auto"),
        ("config.dataset", "folder", "config.dataset folder needs config.data_dir"),
        ("config.epocs", 3, "unknown option 'epocs'"),
        ("config", {}, "the config section must be a non-empty object"),
        ("config", DELETE, "the config section must be a non-empty object, got nothing"),
        ("config", [1, 2], "the config section must be a non-empty object, got list"),
        ("model", DELETE, "the model section"),
        ("model", "resnet", "the model section"),
        ("data", {}, "the data section"),
        ("model.arch", 5, "model.arch must be a name"),
        ("model.width", 0, "model.width must be an int from 1"),
        ("model.width", 10**4000, "model.width must be an int from 1"),
        ("model.num_classes", "3", "model.num_classes must be an int"),
        ("model.num_classes", DELETE, "model.num_classes must be an int"),
        ("model.input_shape", [3, 32], "model.input_shape must be a list of 3 ints"),
        ("model.input_shape", [3, 32, -32], "model.input_shape must be a list of 3 ints"),
        ("model.input_shape", [3, 32, True], "model.input_shape must be a list of 3 ints"),
        ("model.input_shape", {"a": 1}, "model.input_shape must be a list of 3 ints"),
        ("model.default_layer", None, "model.default_layer must be a name"),
        ("data.classes", [], "data.classes must be a non-empty list"),
        ("data.classes", "abc", "data.classes must be a non-empty list"),
        ("data.classes", ["a", 2, "c"], "data.classes must hold names"),
        ("data.classes", ["a", "b"], "data.classes names 2 classes but model.num_classes is 3"),
        ("data.mean", [0.5, 0.5], "data.mean must be a list of 3 finite numbers"),
        ("data.mean", [0.5, math.inf, 0.5], "data.mean must be a list of 3 finite numbers"),
        ("data.std", [0.2, 0.0, 0.2], "data.std must be positive"),
        ("data.std", [0.2, "0.2", 0.2], "data.std must be a list of 3 finite numbers"),
        ("data.std", DEEP, "data.std must be a list of 3 finite numbers"),
        ("data.num_train", -1, "data.num_train must be an int"),
        ("environment", [1], "environment must be an object"),
        ("world_size", 0, "world_size must be an int from 1"),
        ("format_version", "1", "format_version must be int"),
    ],
)
def test_damaged_run_documents_get_one_run_error(where, value, fragment):
    doc = _set(valid_run_document(), where, value)
    path = Path("runs/x/config.json")
    with pytest.raises(RunError) as e:
        check_run_config(doc, path)
    message = str(e.value)
    assert fragment in message, message
    assert message.startswith(f"{path}: ") and "\n" not in message and len(message) < 300


def test_a_run_document_that_is_not_an_object():
    for doc in ([], None, "config", 10**5000):
        with pytest.raises(RunError, match="the document must be a JSON object"):
            check_run_config(doc, "c.json")
