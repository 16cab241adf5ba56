"""Fuzz the store reader and the config loaders: only explainkit's own errors may escape.

Inputs are random bytes, mutated copies of a real store (bytes overwritten at random offsets,
truncations), random JSON/YAML documents, any JSON value for any TrainConfig field and damaged
``RUN/config.json`` documents. A reader that meets them must either work or raise its own error
(ConfigError for options, RunError for a run's config) as one bounded sentence; any other
exception is a bug (it would reach the user as a traceback). Kept small (max_examples 60, no
deadline) so the file runs in seconds.
"""

from __future__ import annotations

import copy
import json
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from explainkit.config import FIELDS, TrainConfig, field_kind, resolve_config
from explainkit.errors import ConfigError, ExplainkitError, RunError
from explainkit.rundir import RunDir, check_run_config
from explainkit.store import (
    HISTORY_COLUMNS,
    append_epoch,
    create_store,
    epochs_folder,
    open_store,
)
from tests.helpers import run_cli, valid_run_document

FUZZ = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,  # the same examples every run: a failure here is reproducible
)
OPTION_NAMES = [f.name for f in TrainConfig.__dataclass_fields__.values()]
_STORE: dict[str, bytes] = {}
HEAD = "predictions.h5"
EPOCH = "predictions.epochs/epoch_0002.h5"
# Which file of the store the byte-level fuzzing damages: the head or an epoch file.
TARGETS = pytest.mark.parametrize("target", [HEAD, EPOCH], ids=["head", "epoch"])


def real_store_files() -> dict[str, bytes]:
    """A small but complete store (masks, 2 committed epochs), built once: its files' bytes."""
    if not _STORE:
        rng = np.random.default_rng(0)
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / HEAD
            n, classes = 12, 3
            create_store(
                path,
                images=rng.integers(0, 255, (n, 8, 8, 3), dtype=np.uint8),
                targets=np.arange(n) % classes,
                index=np.arange(n),
                classes=["a", "b", "c"],
                dataset="fuzz",
                model={"arch": "resnet18-s8", "width": 8, "num_classes": classes},
                mean=(0.5, 0.5, 0.5),
                std=(0.25, 0.25, 0.25),
                masks=(rng.random((n, 8, 8)) > 0.5).astype(np.uint8),
            )
            for epoch in (1, 2):
                logits = rng.standard_normal((n, classes)).astype(np.float32)
                append_epoch(path, logits, {name: float(epoch) for name, _ in HISTORY_COLUMNS})
            files = [path, *sorted(epochs_folder(path).glob("*.h5"))]
            _STORE.update({str(p.relative_to(folder)): p.read_bytes() for p in files})
    return _STORE


def real_store_bytes(target: str = HEAD) -> bytes:
    return real_store_files()[target]


def read_everything(data: bytes, target: str = HEAD) -> None:
    """Put ``data`` in place of file ``target`` of a real store; open it and touch every
    reader entry point."""
    files = {**real_store_files(), target: data}
    with tempfile.TemporaryDirectory() as folder:
        for name, content in files.items():
            (Path(folder) / name).parent.mkdir(exist_ok=True)
            (Path(folder) / name).write_bytes(content)
        path = Path(folder) / HEAD
        try:
            with open_store(path) as store:
                store.verify()
                store.history  # noqa: B018
                for epoch in [None, *store.epochs]:
                    store.logits(epoch)
                    store.predictions(epoch)
                store.best_epoch  # noqa: B018
                store.targets, store.index, store.masks  # noqa: B018
                if store.num_images:
                    store.images([0, store.num_images - 1, 0])
                    store.read_masks([store.num_images - 1, 0])
        except ExplainkitError as e:
            assert str(e).strip(), "an error without a message"


@TARGETS
def test_the_real_store_reads_back(target):
    read_everything(real_store_bytes(target), target)


@FUZZ
@given(st.binary(min_size=0, max_size=4096))
@TARGETS
def test_random_bytes_are_refused_as_a_store(target, data):
    read_everything(data, target)


@FUZZ
@given(st.binary(min_size=0, max_size=1024))
@TARGETS
def test_random_bytes_behind_an_hdf5_signature(target, tail):
    read_everything(b"\x89HDF\r\n\x1a\n" + tail, target)


@FUZZ
@given(st.data())
@TARGETS
def test_mutated_stores_raise_only_store_errors(target, draw):
    data = bytearray(real_store_bytes(target))
    offsets = st.integers(0, len(data) - 1)
    edits = draw.draw(st.lists(st.tuples(offsets, st.integers(0, 255)), min_size=1, max_size=8))
    for where, value in edits:
        data[where] = value
    read_everything(bytes(data), target)


@pytest.mark.parametrize("seed", range(3))
@TARGETS
def test_many_random_byte_edits(target, seed):
    """Plain random edits too: hypothesis favours small offsets, damage can be anywhere."""
    rng = np.random.default_rng(seed)
    original = real_store_bytes(target)
    for _ in range(100):
        data = bytearray(original)
        for _ in range(int(rng.integers(1, 8))):
            data[int(rng.integers(0, len(data)))] = int(rng.integers(0, 256))
        read_everything(bytes(data), target)


@FUZZ
@given(st.floats(0, 1, exclude_max=True))
@TARGETS
def test_truncated_stores_raise_only_store_errors(target, fraction):
    data = real_store_bytes(target)
    read_everything(data[: int(fraction * len(data))], target)


# -- config files ------------------------------------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)
keys = st.sampled_from(OPTION_NAMES + [n.replace("_", "-") for n in OPTION_NAMES]) | st.text(
    max_size=10
)
documents = st.dictionaries(keys, values, max_size=6)


def assert_one_sentence(error: Exception, limit: int = 400) -> None:
    message = str(error)
    assert message.strip(), "an error without a message"
    assert "\n" not in message and len(message) < limit, message[:2000]
    assert not message.endswith("."), message


def load_config_text(text: str | bytes, suffix: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"config{suffix}"
        path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
        try:
            config = resolve_config({}, set(), path)
        except ConfigError as e:
            assert_one_sentence(e, 400 + len(str(path)))
        else:
            config.validate()  # whatever was accepted is a valid config


@FUZZ
@given(documents, st.sampled_from([".json", ".yaml"]))
def test_random_config_documents_raise_only_config_errors(document, suffix):
    if suffix == ".json":
        text = json.dumps(document, allow_nan=True)
    else:
        text = yaml.safe_dump(document, allow_unicode=True)
    load_config_text(text, suffix)


@FUZZ
@given(st.text(max_size=200) | st.binary(max_size=200), st.sampled_from([".json", ".yml"]))
def test_random_config_text_raises_only_config_errors(text, suffix):
    load_config_text(text, suffix)


@pytest.mark.parametrize(
    "text",
    [
        "epochs: 2001-13-01\n",  # YAML timestamp that is not a date
        "preset: [seed]\n",  # unhashable preset
        "? [a, b]\n: 1\n",  # a key that is a list
        "&a [*a]\n",  # a recursive alias
        "epochs: !!python/object/apply:os.system ['true']\n",  # code, refused by safe_load
    ],
)
def test_known_awkward_yaml(text):
    load_config_text(text, ".yaml")


# -- any value for any TrainConfig field ------------------------------------------------------


def nested(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


# Any JSON value, and the awkward ones: unbounded integers (4,000 digits from JSON, 5,000 from
# Python, whose repr raises), nan and infinities, lists nested deeper than repr can go.
json_values = (
    values
    | st.integers()
    | st.sampled_from([10**5000, -(10**4000), 2**63, 2**64, -1, 0, math.nan, math.inf, "", "\x00"])
    | st.integers(0, 3000).map(nested)
)
field_names = st.sampled_from(sorted(FIELDS))


def check_from_dict(document: dict) -> TrainConfig | None:
    """from_dict + validate: a valid config, or one ConfigError sentence naming a field."""
    try:
        config = TrainConfig.from_dict(document, source="fuzz")
        config.validate()
    except ConfigError as e:
        assert_one_sentence(e)
        return None
    for name in FIELDS:  # what was accepted holds what its field says
        value = getattr(config, name)
        kind = {"int": int, "float": float, "bool": bool, "str": str}[field_kind(name)]
        assert value is None or (
            isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
        )
    return config


@FUZZ
@given(st.dictionaries(field_names, json_values, max_size=6))
def test_any_value_for_any_field_is_a_config_or_a_config_error(document):
    check_from_dict(document)


def bad_values(name: str) -> st.SearchStrategy:
    """Values that field ``name`` must refuse: the wrong type, out of range, not finite."""
    meta = FIELDS[name].metadata
    kind = field_kind(name)
    optional = "None" in str(FIELDS[name].type)
    wrong: list[st.SearchStrategy] = [
        st.lists(json_values, max_size=3),
        st.dictionaries(st.text(max_size=4), json_values, max_size=2),
    ]
    if not optional:
        wrong.append(st.none())
    if kind in ("int", "float"):
        wrong += [st.text(max_size=8), st.booleans()]
        low, high = meta["min"], meta["max"]
        if kind == "int":
            wrong += [st.floats(), st.integers(max_value=low - 1), st.integers(min_value=high + 1)]
        else:
            wrong += [st.sampled_from([math.nan, math.inf, -math.inf, 10**400])]
            below = st.floats(max_value=low, exclude_max=not meta.get("min_open"))
            above = st.floats(min_value=high, exclude_min=not meta.get("max_open"))
            wrong += [below.filter(math.isfinite), above.filter(math.isfinite)]
    elif kind == "bool":
        wrong += [st.integers(), st.text(max_size=8), st.floats()]
    else:
        wrong += [st.integers(), st.booleans(), st.floats()]
        if meta.get("choices"):
            wrong.append(st.text(max_size=12).filter(lambda v: v not in meta["choices"]))
        elif meta.get("pattern"):
            wrong.append(st.sampled_from(["gpu", "cuda:", "CPU", "cuda:0 ", "x" * 5000]))
        else:
            wrong.append(st.text(max_size=8).map(lambda v: v + "\x00"))
    return st.one_of(wrong)


bad_fields = field_names.flatmap(lambda name: st.tuples(st.just(name), bad_values(name)))


@FUZZ
@given(st.data(), st.dictionaries(field_names, json_values, max_size=4))
def test_a_bad_value_is_always_refused(data, others):
    """Every field, each example: one bad value among any others is always refused."""
    for name in sorted(FIELDS):
        value = data.draw(bad_values(name), label=name)
        assert check_from_dict({**others, name: value}) is None, (name, value)


@settings(FUZZ, max_examples=8)
@given(bad_fields, st.dictionaries(keys, values, max_size=3), st.sampled_from([".json", ".yaml"]))
def test_bad_config_files_through_the_real_cli(bad, others, suffix):
    """The real CLI on a config file holding a bad value: exit 2, one sentence, nothing made."""
    name, value = bad
    document = {**others, name: value}
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"c{suffix}"
        try:
            if suffix == ".json":
                text = json.dumps(document, allow_nan=True)
            else:
                text = yaml.safe_dump(document, allow_unicode=True)
        except (RecursionError, ValueError):  # too deep or too long for the writers
            return
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        out = Path(folder) / "never"
        result = run_cli("train", "--config", str(path), "--out", str(out), timeout=120)
        assert "Traceback" not in result.stderr, result.stderr[-3000:]
        assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
        errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1 and len(result.stderr) < 1000, result.stderr[-2000:]
        assert not out.exists()


# -- RUN/config.json through check_run_config --------------------------------------------------


def leaf_paths(document: dict, prefix: tuple = ()) -> list[tuple]:
    paths = []
    for key, value in document.items():
        paths.append((*prefix, key))
        if isinstance(value, dict):
            paths += leaf_paths(value, (*prefix, key))
    return paths


VALID_RUN = valid_run_document()
RUN_PATHS = leaf_paths(VALID_RUN)


def check_run_document(document) -> None:
    try:
        checked = check_run_config(document, "run/config.json")
    except RunError as e:
        assert_one_sentence(e)
        assert str(e).startswith("run/config.json: ")
    else:
        TrainConfig.from_dict(checked["config"]).validate(check_memory=False)
        assert len(checked["data"]["classes"]) == checked["model"]["num_classes"]


@FUZZ
@given(
    st.lists(st.tuples(st.sampled_from(RUN_PATHS), st.none() | json_values), min_size=1, max_size=3)
)
def test_damaged_run_documents_raise_only_run_errors(edits):
    """A real document with up to three values replaced (None: deleted) by any JSON value."""
    document = copy.deepcopy(VALID_RUN)
    for path, value in edits:
        target = document
        for key in path[:-1]:
            target = target.get(key) if isinstance(target, dict) else None
        if isinstance(target, dict):
            if value is None:
                target.pop(path[-1], None)
            else:
                target[path[-1]] = value
    check_run_document(document)


@FUZZ
@given(
    st.dictionaries(
        st.sampled_from(["format_version", "config", "model", "data", "world_size"])
        | st.text(max_size=8),
        json_values,
        max_size=5,
    )
    | json_values
)
def test_random_run_documents_raise_only_run_errors(document):
    check_run_document(document)


@FUZZ
@given(
    st.dictionaries(
        st.sampled_from(["format", "format_version", "config", "model"]) | st.text(max_size=8),
        values,
        max_size=5,
    )
    | values
)
def test_random_run_configs_raise_only_run_errors(document):
    with tempfile.TemporaryDirectory() as folder:
        run = Path(folder)
        if isinstance(document, dict) and document.get("format") is not None:
            document["format"] = "explainkit-run"
        (run / "config.json").write_text(json.dumps(document, allow_nan=True))
        try:
            RunDir(run).read_config()
        except ExplainkitError as e:
            assert str(e).strip()
