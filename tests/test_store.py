import re
from pathlib import Path

import h5py
import numpy as np
import pytest

from explainkit.errors import StoreError
from explainkit.store import (
    DATASETS,
    EPOCH_ATTRIBUTES,
    EPOCH_DATASETS,
    HISTORY_COLUMNS,
    ROOT_ATTRIBUTES,
    V1_DATASETS,
    append_epoch,
    create_store,
    create_v1_store,
    epoch_file,
    open_store,
)
from tests.helpers import run_cli

DOC = (Path(__file__).resolve().parents[1] / "docs" / "store-format.md").read_text()


PATHS = [f"val/c{i % 3}/café {i}.png" for i in range(20)]  # relative, UTF-8, one per image


def make_store(path, n=20, classes=3, epochs=2, sources=True, version=2):
    """A store with every dataset (``sources=False``: without paths and sizes, as old ones;
    ``version=1``: the one-file schema of explainkit before store v2)."""
    rng = np.random.default_rng(0)
    extra = {"paths": PATHS[:n], "sizes": np.arange(2 * n).reshape(n, 2) + 1} if sources else {}
    (create_v1_store if version == 1 else create_store)(
        path,
        images=rng.integers(0, 255, (n, 8, 8, 3), dtype=np.uint8),
        targets=np.arange(n) % classes,
        index=np.arange(n) + 100,
        classes=[f"c{i}" for i in range(classes)],
        dataset="test",
        model={"arch": "resnet18-s8", "width": 8, "num_classes": classes},
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        masks=(rng.random((n, 8, 8)) > 0.5).astype(np.uint8),
        **extra,
    )
    logits = []
    for e in range(1, epochs + 1):
        lg = rng.standard_normal((n, classes)).astype(np.float32)
        logits.append(lg)
        append_epoch(path, lg, history_row(e))
    return logits


def history_row(epoch: int) -> dict[str, float]:
    return {name: float(epoch) / (10 if "acc" in name else 1) for name, _ in HISTORY_COLUMNS}


def logits_location(path: Path, epoch: int) -> tuple[Path, str, tuple]:
    """Where an epoch's logits live: (file, dataset, index of the epoch in it)."""
    with h5py.File(path) as f:
        if int(f.attrs["schema_version"]) == 1:
            return path, "logits", (epoch - 1,)
    return epoch_file(path, epoch), "logits", ()


VERSIONS = pytest.mark.parametrize("version", [2, 1], ids=["v2", "v1"])


@VERSIONS
def test_store_round_trips_every_field(tmp_path, version):
    path = tmp_path / "p.h5"
    logits = make_store(path, version=version)
    with open_store(path) as store:
        assert store.epochs == [1, 2]
        np.testing.assert_array_equal(store.logits(1), logits[0])
        np.testing.assert_array_equal(store.predictions(2), logits[1].argmax(1))
        assert store.index[0] == 100 and store.masks.shape == (20, 8, 8)
        assert store.classes == ["c0", "c1", "c2"]
        picked = store.images([5, 2, 5])
        np.testing.assert_array_equal(picked[0], store.images()[5])
        np.testing.assert_array_equal(picked[1], store.images()[2])
        assert store.has_paths and store.sources() == PATHS
        assert store.sources(np.array([5, 2, 5])) == [PATHS[5], PATHS[2], PATHS[5]]
        assert store.sources([]) == []
        np.testing.assert_array_equal(store.sizes, np.arange(40).reshape(20, 2) + 1)
    with h5py.File(path) as f:  # fixed-length UTF-8 text, inside checksummed chunks
        info = h5py.check_string_dtype(f["eval/paths"].dtype)
        assert info.encoding == "utf-8" and info.length == max(len(p.encode()) for p in PATHS)
        assert f["eval/paths"].fletcher32 and f["eval/sizes"].dtype == np.int32


def test_a_store_without_paths_and_sizes_still_opens(tmp_path):
    """Stores written before paths and sizes were recorded: sources name dataset and index."""
    path = tmp_path / "p.h5"
    make_store(path, sources=False)
    with open_store(path) as store:
        assert not store.has_paths and store.sizes is None
        assert store.sources([0, 3]) == ["test #100", "test #103"]
        assert len(store.sources()) == 20
        store.verify()


@pytest.mark.parametrize("indices", [[20], [-1], [[0, 1]]])
def test_sources_refuses_positions_outside_the_store(tmp_path, indices):
    path = tmp_path / "p.h5"
    make_store(path, epochs=0)
    with open_store(path) as store, pytest.raises((IndexError, ValueError)):
        store.sources(indices)


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"paths": PATHS[:19]}, "paths must be 20 non-empty strings"),
        ({"paths": ["", *PATHS[1:]]}, "paths must be 20 non-empty strings"),
        ({"paths": ["bad\udce9.png", *PATHS[1:]]}, "paths must be UTF-8 text"),
        ({"sizes": np.ones((20, 3), np.int64)}, "sizes must be integers of shape (20, 2)"),
        ({"sizes": np.ones((20, 2), np.float32)}, "sizes must be integers of shape (20, 2)"),
        ({"sizes": np.zeros((20, 2), np.int64)}, "sizes must be positive"),
        ({"sizes": np.full((20, 2), 2**31, np.int64)}, "fit int32"),
    ],
)
def test_create_store_refuses_paths_and_sizes_readers_would_refuse(tmp_path, extra, message):
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match=re.escape(message)):
        create_store(
            tmp_path / "p.h5",
            images=rng.integers(0, 255, (20, 8, 8, 3), dtype=np.uint8),
            targets=np.zeros(20, np.int64),
            index=np.arange(20),
            classes=["a"],
            dataset="test",
            model={"num_classes": 1},
            mean=(0.5, 0.5, 0.5),
            std=(0.25, 0.25, 0.25),
            **extra,
        )
    assert not (tmp_path / "p.h5").exists()


def test_paths_that_are_not_utf8_are_damage_when_read(tmp_path):
    path = tmp_path / "p.h5"
    make_store(path)
    with h5py.File(path, "r+") as f:
        del f["eval/paths"]
        f["eval/paths"] = np.array([b"a\xe9.png"] * 20, dtype=h5py.string_dtype("utf-8", 6))
    with open_store(path) as store:
        assert store.sizes is not None  # the rest of the store reads
        with pytest.raises(StoreError, match="eval/paths holds text that is not UTF-8"):
            store.sources([0])
        with pytest.raises(StoreError, match="is damaged: eval/paths"):
            store.verify()


def names_in(path: Path) -> set[str]:
    with h5py.File(path) as f:
        written = set(f.attrs)
        f.visit(lambda name: written.add(name))
    return written - {"eval"}


def test_documented_names_are_the_ones_written(tmp_path):
    path = tmp_path / "p.h5"
    make_store(path)
    make_store(tmp_path / "v1.h5", version=1)
    head, epoch, v1 = names_in(path), names_in(epoch_file(path, 1)), names_in(tmp_path / "v1.h5")
    assert head == set(ROOT_ATTRIBUTES) | set(DATASETS)
    assert epoch == set(EPOCH_ATTRIBUTES) | set(EPOCH_DATASETS)
    assert v1 == (head - {"store_id"}) | set(V1_DATASETS)
    documented = set(re.findall(r"^\| `([^`]+)` \|", DOC, flags=re.M))
    assert head | epoch | v1 == documented
    for name, _ in HISTORY_COLUMNS:
        assert f"`{name}`" in DOC


def test_readers_ignore_data_past_the_commit_marker(tmp_path):
    """A v1 writer killed after growing logits but before the marker leaves epochs unseen."""
    path = tmp_path / "p.h5"
    make_store(path, epochs=2, version=1)
    with h5py.File(path, "r+") as f:
        f["logits"].resize(3, axis=0)
        f["logits"][2] = 7.0
        f["committed_epochs"][()] = 2
    with open_store(path) as store:
        assert store.epochs == [1, 2]
        with pytest.raises(StoreError, match="epochs 1..2"):
            store.logits(3)


def store_bytes(path: Path) -> dict[str, bytes]:
    """The bytes of a store's head and of every file in its epochs folder."""
    files = [path, *sorted(epoch_file(path, 1).parent.glob("*"))]
    return {p.name: p.read_bytes() for p in files if p.is_file()}


@VERSIONS
def test_a_leftover_temporary_copy_does_not_matter(tmp_path, version):
    path = tmp_path / "p.h5"
    make_store(path, epochs=1, version=version)
    (tmp_path / "p.h5.tmp").write_bytes(b"half written")
    leftover = epoch_file(path, 2).with_name(".epoch_0002.h5.tmp-999999")
    if version == 2:
        leftover.write_bytes(b"half written")
    append_epoch(path, np.zeros((20, 3), np.float32), history_row(2))
    with open_store(path) as store:
        assert store.epochs == [1, 2]
    assert not leftover.exists()


@VERSIONS
def test_an_open_reader_keeps_its_snapshot_while_epochs_are_added(tmp_path, version):
    path = tmp_path / "p.h5"
    make_store(path, epochs=1, version=version)
    with open_store(path) as store:
        append_epoch(path, np.zeros((20, 3), np.float32), history_row(2))
        assert store.epochs == [1]
        store.verify()
    with open_store(path) as store:
        assert store.epochs == [1, 2]


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: p.write_bytes(b""), "empty"),
        (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "cannot be opened"),
        (lambda p: p.write_bytes(np.random.default_rng(1).bytes(4096)), "cannot be opened"),
    ],
)
@VERSIONS
def test_damaged_stores_are_refused_with_a_sentence(tmp_path, damage, message, version):
    path = tmp_path / "p.h5"
    make_store(path, version=version)
    damage(path)
    with pytest.raises(StoreError, match=message):
        open_store(path)


def _replace(name, value):
    def mutate(f):
        del f[name]
        f[name] = value

    return mutate


def _attr(name, value):
    def mutate(f):
        f.attrs[name] = value

    return mutate


def _history_epochs(*epochs):
    def mutate(f):
        rows = f["history"][...]
        rows["epoch"] = epochs
        f["history"][...] = rows

    return mutate


def _history_value(column, value):
    def mutate(f):
        rows = f["history"][...]
        rows[column][0] = value
        f["history"][...] = rows

    return mutate


def _delete(name):
    def mutate(f):
        del f[name]

    return mutate


FLOAT_IMAGES = np.zeros((20, 8, 8, 3), np.float32)
# Wrong epochs in a v1 store (v2 epoch files: tests/test_store_v2.py).
HOSTILE_V1_EPOCHS = {
    "negative-committed": (_replace("committed_epochs", np.int64(-1)), "committed_epochs is -1"),
    "fractional-committed": (_replace("committed_epochs", 1.5), "committed_epochs is float64"),
    "too-many-committed": (_replace("committed_epochs", np.int64(3)), "claims 3 committed"),
    "epoch-column-repeats": (_history_epochs(1, 1), "epoch column is [1, 1], not 1..2"),
    "epoch-column-from-0": (_history_epochs(0, 1), "epoch column is [0, 1], not 1..2"),
    "nan-in-history": (_history_value("eval_acc", np.nan), "eval_acc column holds NaN"),
    "negative-loss": (_history_value("train_loss", -1.0), "train_loss column holds a negative"),
    "logits-class-count": (
        _replace("logits", np.zeros((2, 20, 4), np.float32)),
        "expected floats of shape (epochs, 20, 3) for 20 images and 3 classes",
    ),
    "logits-image-count": (_replace("logits", np.zeros((2, 19, 3), np.float32)), "(epochs, 20, 3)"),
    "integer-logits": (_replace("logits", np.zeros((2, 20, 3), np.int32)), "logits are int32"),
    "logits-a-group": (
        lambda f: (f.__delitem__("logits"), f.create_group("logits")),
        "logits is not a dataset",
    ),
}
# Wrong values in the head: the same in both schemas.
HOSTILE_STORES = {
    "float-images": (_replace("eval/images", FLOAT_IMAGES), "eval/images is float32"),
    "zero-std": (_attr("std", np.array([0.25, 0.0, 0.25])), "std attribute has a value that"),
    "one-value-mean": (_attr("mean", np.array([0.5])), "mean attribute has 1 value, not 3"),
    "scalar-mean": (_attr("mean", 0.5), "mean attribute is 0.5, not a list of numbers"),
    "nan-mean": (_attr("mean", np.array([0.5, np.nan, 0.5])), "mean attribute holds NaN"),
    "mean-in-0-255": (_attr("mean", np.array([125.0, 120.0, 110.0])), "outside [0, 1]"),
    "classes-not-json": (_attr("classes", np.bytes_(b"[a, b")), "classes attribute is not valid"),
    "classes-empty": (_attr("classes", np.bytes_(b"[]")), "not a non-empty list of class names"),
    "classes-twice": (_attr("classes", np.bytes_(b'["a", "a", "b"]')), "names a class twice"),
    "classes-fewer": (_attr("classes", np.bytes_(b'["a", "b"]')), "model has 3 classes"),
    "model-not-object": (_attr("model", np.bytes_(b"[1]")), "model attribute is not a JSON"),
    "input-shape": (_attr("input_shape", np.array([3, 32, 32])), "input_shape [3, 32, 32]"),
    "targets-out-of-range": (
        _replace("eval/targets", np.full(20, 3, np.int64)),
        "eval/targets holds a class outside 0..2",
    ),
    "float-targets": (_replace("eval/targets", np.zeros(20)), "eval/targets is float64"),
    "negative-index": (_replace("eval/index", np.full(20, -1)), "eval/index holds a negative"),
    "mask-shape": (_replace("eval/masks", np.zeros((20, 4, 4), np.uint8)), "eval/masks is uint8"),
    "schema-as-text": (_attr("schema_version", np.bytes_(b"1")), "schema_version is '1', not an"),
    "schema-0": (_attr("schema_version", 0), "schema version 0 is unknown"),
    "missing-targets": (_delete("eval/targets"), "it lacks eval/targets"),
    "missing-std": (lambda f: f.attrs.__delitem__("std"), "it lacks the std attribute"),
    "targets-a-group": (
        lambda f: (f.__delitem__("eval/targets"), f.create_group("eval/targets")),
        "eval/targets is not a dataset",
    ),
    "eval-weights": (_attr("eval_weights", np.bytes_(b"best")), "eval_weights is 'best'"),
    "paths-count": (_replace("eval/paths", np.array([b"a.png"] * 19)), "expected (20,) UTF-8"),
    "paths-numbers": (_replace("eval/paths", np.arange(20)), "eval/paths is int64 (20,)"),
    "paths-variable-length": (
        lambda f: (
            f.__delitem__("eval/paths"),
            f.create_dataset("eval/paths", data=PATHS, dtype=h5py.string_dtype()),
        ),
        "eval/paths holds variable-length strings",
    ),
    "sizes-shape": (_replace("eval/sizes", np.ones((20, 3), np.int32)), "eval/sizes is int32"),
    "sizes-float": (_replace("eval/sizes", np.ones((20, 2))), "eval/sizes is float64 (20, 2)"),
    "sizes-zero": (_replace("eval/sizes", np.zeros((20, 2), np.int32)), "size below 1 pixel"),
}


CASES = [(name, 2) for name in HOSTILE_STORES] + [
    (name, 1) for name in [*HOSTILE_STORES, *HOSTILE_V1_EPOCHS]
]


@pytest.mark.parametrize("name, version", CASES, ids=[f"{n}-v{v}" for n, v in CASES])
def test_wrong_values_are_refused_at_open_as_damage(tmp_path, name, version):
    """Each is ours (format attribute intact) but wrong: one sentence saying it is damaged."""
    mutate, message = {**HOSTILE_STORES, **HOSTILE_V1_EPOCHS}[name]
    path = tmp_path / "p.h5"
    make_store(path, version=version)
    with h5py.File(path, "r+") as f:
        mutate(f)
    before = path.read_bytes()
    with pytest.raises(StoreError) as caught:
        open_store(path)
    text = str(caught.value)
    assert message in text and f"{path} is damaged: " in text, text
    assert "\n" not in text and not text.endswith(".") and "train the run again" in text
    assert "not an explainkit prediction store" not in text
    assert path.read_bytes() == before


@VERSIONS
def test_nan_logits_fail_the_epoch_that_holds_them(tmp_path, version):
    """Finiteness is checked when an epoch is read: other epochs still read."""
    path = tmp_path / "p.h5"
    logits = make_store(path, version=version)
    where, name, row = logits_location(path, 2)
    with h5py.File(where, "r+") as f:
        f[name][(*row, 4, 2)] = np.inf
    with open_store(path) as store:
        np.testing.assert_array_equal(store.logits(1), logits[0])
        for read in (store.logits, store.predictions, store.probabilities):
            with pytest.raises(StoreError, match="the logits of epoch 2 hold NaN or infinity"):
                read(2)
        with pytest.raises(StoreError, match="epoch 2 hold NaN"):
            store.verify()


def test_masks_other_than_0_and_1_are_refused_when_read(tmp_path):
    path = tmp_path / "p.h5"
    make_store(path)
    with h5py.File(path, "r+") as f:
        f["eval/masks"][3, 0, 0] = 7
    with open_store(path) as store:
        assert store.epochs == [1, 2]
        with pytest.raises(StoreError, match="eval/masks holds values other than 0 and 1"):
            store.masks  # noqa: B018


@VERSIONS
def test_writers_refuse_a_damaged_store_and_leave_it_as_it_was(tmp_path, version):
    from explainkit.store import truncate_store

    path = tmp_path / "p.h5"
    make_store(path, version=version)
    with h5py.File(path, "r+") as f:
        f.attrs["std"] = np.zeros(3)
    before = store_bytes(path)
    with pytest.raises(StoreError, match="is damaged: the std attribute"):
        append_epoch(path, np.zeros((20, 3), np.float32), history_row(3))
    with pytest.raises(StoreError, match="is damaged: the std attribute"):
        truncate_store(path, 1)
    assert store_bytes(path) == before


@pytest.mark.parametrize(
    "logits, row, message",
    [
        (np.zeros((20, 4), np.float32), history_row(3), "shape (20, 4) but the store holds"),
        (np.full((20, 3), np.nan, np.float32), history_row(3), "logits hold NaN or infinity"),
        (np.zeros((20, 3), np.float32), history_row(5), "the next is 3"),
        (np.zeros((20, 3), np.float32), {**history_row(3), "lr": -0.1}, "its lr is -0.1"),
    ],
    ids=["class-count", "nan", "epoch-gap", "negative-lr"],
)
@VERSIONS
def test_an_epoch_that_does_not_fit_is_not_committed(tmp_path, logits, row, message, version):
    path = tmp_path / "p.h5"
    make_store(path, version=version)
    before = store_bytes(path)
    with pytest.raises(StoreError, match=re.escape(message)):
        append_epoch(path, logits, row)
    assert store_bytes(path) == before


def test_hdf5_files_that_are_not_ours_are_refused(tmp_path):
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as f:
        f["x"] = np.arange(3)
    with pytest.raises(StoreError, match="not an explainkit prediction store"):
        open_store(path)


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "p.h5"
    make_store(path)
    with h5py.File(path, "r+") as f:
        f.attrs["schema_version"] = 99
    with pytest.raises(StoreError, match="newer than this explainkit"):
        open_store(path)


def flip_bytes_in_logits(path: Path) -> None:
    """Invert 16 bytes in the first chunk of epoch 1's logits (wherever the schema keeps it)."""
    path, name, _ = logits_location(path, 1)
    with h5py.File(path, "r") as f:
        offset = f[name].id.get_chunk_info(0).byte_offset
    data = bytearray(path.read_bytes())
    for i in range(offset + 8, offset + 24):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


@VERSIONS
def test_flipped_bytes_are_caught_by_the_checksum(tmp_path, version):
    path = tmp_path / "p.h5"
    make_store(path, version=version)
    flip_bytes_in_logits(path)
    with open_store(path) as store, pytest.raises(StoreError, match="corrupt"):
        store.logits(1)


def test_inspect_reports_damage_without_a_traceback(tiny_run):
    flip_bytes_in_logits(tiny_run / "predictions.h5")
    result = run_cli("inspect", str(tiny_run))
    assert result.returncode == 1
    assert "corrupt" in result.stderr and "Traceback" not in result.stderr
    (tiny_run / "predictions.h5").write_bytes((tiny_run / "predictions.h5").read_bytes()[:5000])
    result = run_cli("inspect", str(tiny_run))
    assert result.returncode == 1 and "truncated" in result.stderr


def test_inspect_summarizes_a_run(tiny_run):
    result = run_cli("inspect", str(tiny_run))
    assert result.returncode == 0, result.stderr
    assert "state        complete" in result.stdout
    assert "epochs       2/2" in result.stdout
    assert "epoch_002.pt" in result.stdout
