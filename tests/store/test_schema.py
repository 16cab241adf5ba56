"""The layout in explainkit/store/schema.py: what is written, and what docs/store-format.md says."""

from __future__ import annotations

import re
from pathlib import Path

import h5py
import numpy as np

from explainkit.rundir import RunDir
from explainkit.store import (
    DATASETS,
    DEFAULT_TASK,
    EPOCH_ATTRIBUTES,
    EPOCH_DATASETS,
    HISTORY_COLUMNS,
    ROOT_ATTRIBUTES,
    TASKS,
    epoch_file,
    epochs_folder,
    open_store,
)
from explainkit.store.schema import epoch_fields, head_fields, shape_text
from tests.helpers import make_store

DOC = (Path(__file__).resolve().parents[2] / "docs" / "store-format.md").read_text()
# "| `name` | type | meaning |" rows of the doc's tables: name -> type.
DOCUMENTED = dict(re.findall(r"^\| `([^`]+)` \| ([^|]+?) \|", DOC, flags=re.M))


def names_in(path: Path) -> set[str]:
    with h5py.File(path) as f:
        written = set(f.attrs)
        f.visit(lambda name: written.add(name))
    return written - {"eval"}


def test_documented_names_are_the_ones_written(tmp_path):
    path = tmp_path / "p.h5"
    make_store(path)
    head, epoch = names_in(path), names_in(epoch_file(path, 1))
    assert head == set(ROOT_ATTRIBUTES) | set(DATASETS)
    assert epoch == set(EPOCH_ATTRIBUTES) | set(EPOCH_DATASETS)
    tasks = {f.name for task in TASKS for f in (*head_fields(task), *epoch_fields(task))}
    assert head | epoch | tasks == set(DOCUMENTED)
    for name, _ in HISTORY_COLUMNS:
        assert f"`{name}`" in DOC


def documented_type(dtype: str, shape: tuple) -> str:
    if dtype == "S":
        return f"fixed-length UTF-8 strings {shape_text(shape)}"
    return f"{np.dtype(dtype).name} {shape_text(shape)}"


def test_documented_types_and_shapes_are_the_schema_ones(tmp_path):
    """Every dataset of every task, as the doc's tables give its dtype and shape; and the
    writer stores exactly those dtypes."""
    fields = [f for task in TASKS for f in (*head_fields(task), *epoch_fields(task))]
    for field in fields:
        assert DOCUMENTED[field.name] == documented_type(field.dtype, field.shape), field.name
    path = tmp_path / "p.h5"
    make_store(path, epochs=1)
    with h5py.File(path) as head, h5py.File(epoch_file(path, 1)) as epoch:
        for field in (*head_fields(), *epoch_fields()):
            stored = (epoch if field in epoch_fields() else head)[field.name].dtype
            assert stored.kind == np.dtype(field.dtype).kind, field.name
            if field.dtype != "S":
                assert stored == np.dtype(field.dtype), field.name


def test_a_store_records_its_task(tmp_path):
    path = tmp_path / "p.h5"
    make_store(path, epochs=1)
    assert DEFAULT_TASK == "classification" and DEFAULT_TASK in TASKS
    with h5py.File(path) as f:
        assert f.attrs["task"] == b"classification"
    with open_store(path) as store:
        assert store.task == "classification"


def test_the_run_directory_knows_the_epochs_folder(tmp_path):
    run = RunDir(tmp_path / "run")
    assert run.store_epochs == epochs_folder(run.store_path)
    assert RunDir.STORE_EPOCHS in RunDir.OWNED
    assert epochs_folder(tmp_path / "p.h5") == tmp_path / "p.epochs"
    assert epoch_file(tmp_path / "p.h5", 7) == tmp_path / "p.epochs" / "epoch_0007.h5"
