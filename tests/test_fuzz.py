"""Fuzz the store reader and the config loaders: only explainkit's own errors may escape.

Inputs are random bytes, mutated copies of a real store (bytes overwritten at random offsets,
truncations) and random JSON/YAML documents. A reader that meets them must either work or
raise an ExplainkitError with a message; any other exception is a bug (it would reach the
user as a traceback). Kept small (max_examples 60, no deadline) so the file runs in seconds.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from explainkit.config import TrainConfig, resolve_config
from explainkit.errors import ExplainkitError
from explainkit.rundir import RunDir
from explainkit.store import HISTORY_COLUMNS, append_epoch, create_store, open_store

FUZZ = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,  # the same examples every run: a failure here is reproducible
)
OPTION_NAMES = [f.name for f in TrainConfig.__dataclass_fields__.values()]
_STORE_BYTES: bytes | None = None


def real_store_bytes() -> bytes:
    """A small but complete store (masks, 2 committed epochs), built once."""
    global _STORE_BYTES
    if _STORE_BYTES is None:
        rng = np.random.default_rng(0)
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "predictions.h5"
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
            _STORE_BYTES = path.read_bytes()
    return _STORE_BYTES


def read_everything(data: bytes) -> None:
    """Open ``data`` as a store and touch every reader entry point."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "predictions.h5"
        path.write_bytes(data)
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
        except ExplainkitError as e:
            assert str(e).strip(), "an error without a message"


def test_the_real_store_reads_back():
    read_everything(real_store_bytes())


@FUZZ
@given(st.binary(min_size=0, max_size=4096))
def test_random_bytes_are_refused_as_a_store(data):
    read_everything(data)


@FUZZ
@given(st.binary(min_size=0, max_size=1024))
def test_random_bytes_behind_an_hdf5_signature(tail):
    read_everything(b"\x89HDF\r\n\x1a\n" + tail)


@FUZZ
@given(st.data())
def test_mutated_stores_raise_only_store_errors(draw):
    data = bytearray(real_store_bytes())
    offsets = st.integers(0, len(data) - 1)
    edits = draw.draw(st.lists(st.tuples(offsets, st.integers(0, 255)), min_size=1, max_size=8))
    for where, value in edits:
        data[where] = value
    read_everything(bytes(data))


@pytest.mark.parametrize("seed", range(3))
def test_many_random_byte_edits(seed):
    """Plain random edits too: hypothesis favours small offsets, damage can be anywhere."""
    rng = np.random.default_rng(seed)
    original = real_store_bytes()
    for _ in range(150):
        data = bytearray(original)
        for _ in range(int(rng.integers(1, 8))):
            data[int(rng.integers(0, len(data)))] = int(rng.integers(0, 256))
        read_everything(bytes(data))


@FUZZ
@given(st.floats(0, 1, exclude_max=True))
def test_truncated_stores_raise_only_store_errors(fraction):
    data = real_store_bytes()
    read_everything(data[: int(fraction * len(data))])


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


def load_config_text(text: str | bytes, suffix: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"config{suffix}"
        path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
        try:
            config = resolve_config({}, set(), path)
        except ExplainkitError as e:
            assert str(e).strip(), "an error without a message"
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
