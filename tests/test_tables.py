"""explainkit.tables: the CSV and JSON files analyzers write read back exactly."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from explainkit.tables import write_csv, write_json


@given(st.lists(st.floats(allow_nan=False, allow_infinity=False, width=64), min_size=1))
def test_floats_round_trip_exactly_through_csv(tmp_path_factory, values):
    path = tmp_path_factory.mktemp("csv") / "t.csv"
    write_csv(path, ["value"], [[v] for v in values])
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["value"]
    assert [float(r[0]) for r in rows[1:]] == values


def test_numpy_scalars_become_plain_numbers(tmp_path):
    path = write_csv(tmp_path / "t.csv", ["cls", "n", "acc"],
                     [["cat", np.int64(3), np.float32(0.25)]])  # fmt: skip
    assert path.read_text().splitlines() == ["cls,n,acc", "cat,3,0.25"]


def test_a_csv_without_a_header_is_refused(tmp_path):
    with pytest.raises(ValueError, match="needs a header row"):
        write_csv(tmp_path / "t.csv", [], [[1]])


def test_json_takes_numpy_arrays_and_scalars(tmp_path):
    data = {"a": np.arange(3), "b": np.float64(math.pi), "c": [np.int32(7)]}
    path = write_json(tmp_path / "t.json", data)
    assert json.loads(path.read_text()) == {"a": [0, 1, 2], "b": math.pi, "c": [7]}
    assert path.read_text().endswith("}\n")


def test_json_refuses_what_it_cannot_write(tmp_path):
    with pytest.raises(TypeError, match="object is not JSON serializable"):
        write_json(tmp_path / "t.json", {"x": object()})
