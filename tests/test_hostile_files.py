"""Hostile files and full disks: generated wrong values in real stores and checkpoints, and
HDF5 writes that fail.

The generated tests take a real store (written with ``create_store``/``append_epoch``; its
head or one of its epoch files) or a real checkpoint (from a trained run), change one value
with h5py or in the checkpoint dict, and read everything back. Only StoreError/CheckpointError
may come out, as one sentence; and what a reader accepts must make sense (logits of the right
shape and finite, the history's epochs 1..k, std positive, ...), so a wrong value can never
pass as confident nonsense. Kept small (derandomized, 50-120 examples each) so that each test
runs in seconds.

The full-disk tests use a file-size limit (``RLIMIT_FSIZE`` with ``SIGXFSZ`` ignored): writes
fail with EFBIG, as on a full disk (the HDF5 writer alone: tests/test_h5files.py).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st

from explainkit.errors import AnalyzerError, CheckpointError, StoreError
from explainkit.store import (
    EPOCH_ATTRIBUTES,
    HISTORY_COLUMNS,
    ROOT_ATTRIBUTES,
    append_epoch,
    create_store,
    epochs_folder,
    open_store,
)
from explainkit.train.checkpoint import load_checkpoint, model_from_checkpoint
from tests.helpers import (
    assert_clean_failure,
    assert_unchanged,
    checksums,
    limited,
    registries,
    run_cli,
)


def hostile(max_examples: int):
    return settings(
        max_examples=max_examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        derandomize=True,  # the same examples every run: a failure here is reproducible
    )


def assert_one_sentence(e: BaseException) -> str:
    text = str(e)
    assert text.strip() and "\n" not in text and "Traceback" not in text, text
    assert not text.endswith("."), text
    return text


# -- stores ------------------------------------------------------------------------------------

N, CLASSES, SIZE = 12, 3, 8
_STORE: dict[str, bytes] = {}
HEAD = "predictions.h5"
EPOCH = "predictions.epochs/epoch_0002.h5"


def real_store() -> dict[str, bytes]:
    """A small complete store (masks, 2 committed epochs, a plausible history), built once:
    its files' bytes by path."""
    if not _STORE:
        import tempfile

        rng = np.random.default_rng(0)
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / HEAD
            create_store(
                path,
                images=rng.integers(0, 255, (N, SIZE, SIZE, 3), dtype=np.uint8),
                targets=np.arange(N) % CLASSES,
                index=np.arange(N) + 100,
                classes=["circle", "square", "triangle"],
                dataset="shapes",
                model={"arch": "resnet18-s8", "width": 8, "num_classes": CLASSES},
                mean=(0.5, 0.4, 0.3),
                std=(0.25, 0.2, 0.2),
                masks=(rng.random((N, SIZE, SIZE)) > 0.5).astype(np.uint8),
            )
            for epoch in (1, 2):
                row = {name: 0.5 for name, _ in HISTORY_COLUMNS}
                row["epoch"] = epoch
                logits = rng.standard_normal((N, CLASSES)).astype(np.float32)
                append_epoch(path, logits, row)
            files = [path, *sorted(epochs_folder(path).glob("*.h5"))]
            _STORE.update({str(p.relative_to(folder)): p.read_bytes() for p in files})
    return _STORE


def read_store_checked(path: Path) -> str | None:
    """Open and read everything. A StoreError is fine (its message is returned); what is
    accepted must be sane."""
    try:
        with open_store(path) as store:
            n, k = store.num_images, len(store.classes)
            images = store.images()
            assert images.dtype == np.uint8 and images.ndim == 4 and len(images) == n >= 1
            _, h, w, c = images.shape
            assert k >= 1 and len(set(store.classes)) == k
            assert all(isinstance(name, str) for name in store.classes)
            assert len(store.mean) == len(store.std) == c
            assert all(0 <= m <= 1 for m in store.mean)
            assert all(math.isfinite(s) and s > 0 for s in store.std)
            assert list(store.attrs["input_shape"]) == [c, h, w]
            assert store.attrs["model"].get("num_classes", k) == k
            targets = store.targets
            assert targets.shape == (n,) and targets.min() >= 0 and targets.max() < k
            assert store.index.shape == (n,) and store.index.min() >= 0
            assert store.images([0, n - 1, 0]).shape == (3, h, w, c)
            history = store.history
            assert list(history["epoch"]) == store.epochs == list(range(1, store.committed + 1))
            for name, _ in HISTORY_COLUMNS:
                assert np.isfinite(history[name]).all() and (history[name] >= 0).all()
            assert store.best_epoch in (store.epochs or [None])
            if store.has_masks:
                masks = store.masks
                assert masks.shape == (n, h, w) and masks.max() <= 1
            for epoch in store.epochs:
                logits = store.logits(epoch)
                assert logits.shape == (n, k) and np.isfinite(logits).all()
                assert np.isfinite(store.probabilities(epoch)).all()
                assert store.predictions(epoch).max() < k
            store.verify()
    except StoreError as e:
        return assert_one_sentence(e)
    return None


def mutated_store(tmp: Path, mutate, target: str = HEAD) -> Path:
    """A real store in ``tmp`` whose file ``target`` was changed by ``mutate(h5py_file)``."""
    for name, data in real_store().items():
        (tmp / name).parent.mkdir(exist_ok=True)
        (tmp / name).write_bytes(data)
    path = tmp / HEAD
    try:
        with h5py.File(tmp / target, "r+") as f:
            mutate(f)
    except (TypeError, ValueError, OSError, OverflowError, RuntimeError, IndexError):
        reject()  # h5py cannot store that value: nothing to read
    return path


numbers = st.one_of(
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, 1, 2, 3, -1, 0.5, 1.5, 255.0, np.nan, np.inf]),
)
texts = st.text(max_size=12) | st.sampled_from(["[]", '["a"]', '["a", "a", "b"]', "{}", "null"])
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 20) | st.floats(-2, 2) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=8,
)


def _array(values: list, dtype: str) -> np.ndarray:
    """``values`` as ``dtype`` where they fit, else as float64."""
    with np.errstate(all="ignore"):
        try:
            return np.array(values, dtype)
        except (ValueError, OverflowError):
            return np.array(values, "f8")


arrays = st.builds(
    _array, st.lists(numbers, max_size=5), st.sampled_from(["f8", "f4", "i8", "u1"])
) | st.builds(_array, st.lists(numbers.map(float), min_size=3, max_size=3), st.just("f8"))
attribute_values = st.one_of(
    numbers,
    st.booleans(),
    texts.map(lambda t: np.bytes_(t.encode("utf-8"))),
    json_values.map(lambda v: np.bytes_(json.dumps(v).encode("utf-8"))),
    st.fixed_dictionaries(
        {"arch": st.sampled_from(["resnet18-s8", 18]), "num_classes": st.integers(0, 5)}
    ).map(lambda v: np.bytes_(json.dumps(v).encode("utf-8"))),
    arrays,
)
DELETE = object()


@st.composite
def attribute_mutations(draw, names=ROOT_ATTRIBUTES):
    name = draw(st.sampled_from(names))
    value = draw(attribute_values | st.just(DELETE))

    def mutate(f):
        if value is DELETE:
            del f.attrs[name]
        else:
            f.attrs[name] = value

    return name, mutate


@hostile(300)
@given(attribute_mutations())
def test_any_root_attribute_value_is_read_or_refused(tmp_path_factory, mutation):
    name, mutate = mutation
    message = read_store_checked(mutated_store(tmp_path_factory.mktemp("s"), mutate))
    if message is not None and name != "format":
        assert "not an explainkit prediction store" not in message, message


@hostile(100)
@given(attribute_mutations(EPOCH_ATTRIBUTES))
def test_any_epoch_attribute_value_is_read_or_refused(tmp_path_factory, mutation):
    _, mutate = mutation
    path = mutated_store(tmp_path_factory.mktemp("s"), mutate, target=EPOCH)
    message = read_store_checked(path)
    if message is not None:  # a damaged epoch file is never a foreign store
        assert "not an explainkit prediction store" not in message, message
        assert "epoch_0002.h5" in message, message


def _replace(name, value):
    def mutate(f):
        del f[name]
        f[name] = value

    return mutate


def _set_cell(name, where, value):
    def mutate(f):
        data = f[name][...]
        with np.errstate(all="ignore"):
            data[where + (0,) * (data.ndim - len(where))] = value
        f[name][...] = data

    return mutate


def _history_cell(column, row, value):
    def mutate(f):
        rows = f["history"][...]
        with np.errstate(all="ignore"):
            rows[column][row] = value
        f["history"][...] = rows

    return mutate


shapes = st.lists(st.integers(0, 14), min_size=0, max_size=4).map(tuple)
dtypes = st.sampled_from(["u1", "i2", "i8", "u8", "f2", "f4", "f8", "?"])
head_mutations = st.one_of(
    st.tuples(
        st.sampled_from(["eval/images", "eval/targets", "eval/index", "eval/masks"]),
        shapes,
        dtypes,
    ).map(lambda t: _replace(t[0], np.zeros(t[1], t[2]))),
    st.tuples(
        st.sampled_from(["eval/targets", "eval/index", "eval/masks", "eval/images"]),
        st.integers(0, 1),
        numbers,
    ).map(lambda t: _set_cell(t[0], (t[1],), t[2])),
    st.sampled_from(["eval/targets", "eval/images", "eval/masks"]).map(
        lambda name: lambda f: f.__delitem__(name)
    ),
)
epoch_file_mutations = st.one_of(  # epoch 2 of a v2 store: logits (N, classes), one history row
    st.tuples(st.sampled_from([name for name, _ in HISTORY_COLUMNS]), st.just(0), numbers).map(
        lambda t: _history_cell(*t)
    ),
    st.tuples(st.just("logits"), shapes, dtypes).map(
        lambda t: _replace(t[0], np.zeros(t[1], t[2]))
    ),
    st.tuples(st.just("history"), shapes, dtypes).map(
        lambda t: _replace(t[0], np.zeros(t[1], t[2]))
    ),
    st.tuples(st.integers(0, N - 1), st.integers(0, CLASSES - 1), numbers).map(
        lambda t: _set_cell("logits", (t[0], t[1]), t[2])
    ),
    st.sampled_from(["logits", "history"]).map(lambda name: lambda f: f.__delitem__(name)),
)


@hostile(100)
@given(head_mutations)
def test_any_head_dataset_change_is_read_or_refused(tmp_path_factory, mutate):
    path = mutated_store(tmp_path_factory.mktemp("s"), mutate)
    message = read_store_checked(path)
    if message is not None:
        assert "not an explainkit prediction store" not in message, message


@hostile(100)
@given(epoch_file_mutations)
def test_any_epoch_file_change_is_read_or_refused(tmp_path_factory, mutate):
    message = read_store_checked(mutated_store(tmp_path_factory.mktemp("s"), mutate, target=EPOCH))
    if message is not None:
        assert "not an explainkit prediction store" not in message, message


def test_the_real_store_is_accepted(tmp_path):
    assert read_store_checked(mutated_store(tmp_path, lambda f: None)) is None


def test_a_damaged_store_says_damaged_through_the_cli(tiny_run):
    with h5py.File(tiny_run / "predictions.h5", "r+") as f:
        f.attrs["std"] = np.zeros(3)
    before = checksums(tiny_run)
    result = run_cli("inspect", str(tiny_run))
    assert_clean_failure(result, (1,), "is damaged: the std attribute", "train the run again")
    assert "not an explainkit prediction store" not in result.stderr
    assert_unchanged(before, tiny_run)


# -- checkpoints -------------------------------------------------------------------------------

plain = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.just(10**400)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=6,
)
tensors = st.builds(
    lambda shape, dtype, fill: torch.full(shape, fill).to(dtype),
    st.lists(st.integers(0, 4), max_size=3).map(tuple),
    st.sampled_from([torch.float32, torch.float16, torch.float64, torch.int64, torch.bool]),
    st.sampled_from([0.0, 1.0, -1.0, float("nan"), float("inf")]),
)
FIELDS = [
    "format_version", "epoch", "model", "state_dict", "state_dict_ema", "ema_updates",
    "best_epoch", "best_acc", "eval_acc", "classes", "mean", "std", "optimizer", "scheduler",
    "scaler", "rng", "config",
]  # fmt: skip
MODEL_FIELDS = ["arch", "width", "num_classes", "input_shape", "default_layer"]


@pytest.fixture(scope="module")
def real_checkpoint(tiny_run_master) -> dict:
    return torch.load(tiny_run_master / "checkpoints" / "last.pt", weights_only=True)


def read_checkpoint_checked(path: Path, input_shape: list[int]) -> str | None:
    try:
        data = load_checkpoint(path, registries())
        model = model_from_checkpoint(data, registries())
    except CheckpointError as e:
        return assert_one_sentence(e)
    assert isinstance(data["epoch"], int) and data["epoch"] >= 1
    with torch.no_grad():
        out = model(torch.zeros(2, *input_shape))
    assert out.shape == (2, data["model"]["num_classes"]) and torch.isfinite(out).all()
    return None


def _save(tmp: Path, data: dict) -> Path:
    path = tmp / "last.pt"
    torch.save(data, path)
    return path


@hostile(80)
@given(
    st.sampled_from(FIELDS + [f"model.{k}" for k in MODEL_FIELDS]),
    plain | tensors | st.just(DELETE),
)
def test_any_checkpoint_field_value_is_loaded_or_refused(
    tmp_path_factory, real_checkpoint, field, value
):
    data = dict(real_checkpoint)
    target, key = (data, field)
    if field.startswith("model."):
        data["model"] = target = dict(data["model"])
        key = field.removeprefix("model.")
    if value is DELETE:
        target.pop(key, None)
    else:
        target[key] = value
    path = _save(tmp_path_factory.mktemp("c"), data)
    message = read_checkpoint_checked(path, real_checkpoint["model"]["input_shape"])
    if message is not None and field != "format_version":
        assert "newer" not in message, message


@hostile(60)
@given(
    st.sampled_from(["state_dict", "state_dict_ema"]),
    st.integers(0, 10_000),
    tensors | plain | st.just(DELETE),
)
def test_any_weight_is_loaded_or_refused(tmp_path_factory, real_checkpoint, which, pick, value):
    weights = dict(real_checkpoint[which])
    keys = sorted(weights)
    key = keys[pick % len(keys)] if pick < 9_000 else "not.a.layer"
    if value is DELETE:
        weights.pop(key, None)
    else:
        weights[key] = value
    path = _save(tmp_path_factory.mktemp("c"), {**real_checkpoint, which: weights})
    read_checkpoint_checked(path, real_checkpoint["model"]["input_shape"])


def test_a_crafted_checkpoint_is_one_sentence_through_the_cli(tiny_run):
    for path in (tiny_run / "checkpoints").glob("*.pt"):
        data = torch.load(path, weights_only=True)
        data["epoch"] = -1
        torch.save(data, path)
    before = checksums(tiny_run)
    result = run_cli("analyze", str(tiny_run), "--device", "cpu", "--plugin", "gradcam")
    assert_clean_failure(result, (1,), "is damaged: its epoch is -1", "1 of 1 analyzers failed")
    assert_unchanged(before, tiny_run)


# -- a full disk under an analyzer ------------------------------------------------------------


@pytest.mark.parametrize("limit", [2_000, 60_000], ids=["at-once", "mid-stream"])
def test_gradcam_on_a_full_disk_keeps_the_earlier_result(tiny_run, limit):
    from explainkit.runner import analyze

    (manifest,) = analyze(tiny_run, plugins=["gradcam"], device="cpu", batch_size=24)
    assert manifest["status"] == "ok", manifest["error"]
    assert (tiny_run / "analyses" / "gradcam" / "attributions.h5").stat().st_size > 60_000
    before = checksums(tiny_run)
    result = subprocess.run(
        [sys.executable, "-m", "explainkit", "analyze", str(tiny_run), "--device", "cpu",
         "--plugin", "gradcam", "--batch-size", "24"],
        capture_output=True, text=True, preexec_fn=limited(limit), timeout=300,
        env={**os.environ, "EXPLAINKIT_LOAD_PLUGINS": ""},
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert result.returncode == 1, (result.returncode, result.stderr)  # never a segfault
    assert_clean_failure(result, (1,), "attributions.h5: File too large", "gradcam")
    assert_unchanged(before, tiny_run)
    assert sorted(p.name for p in (tiny_run / "analyses").iterdir()) == ["gradcam"]
    failed = json.loads((tiny_run / "analyses" / "gradcam" / "failed.json").read_text())
    assert failed["status"] == "failed" and "File too large" in failed["error"]
    assert AnalyzerError.__name__ not in failed["error"]  # our sentence, not a typed bug
