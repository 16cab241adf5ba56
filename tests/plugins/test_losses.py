"""The ``losses`` analyzer: training curves and the history table."""

from __future__ import annotations

import numpy as np

from explainkit.store import open_store, truncate_store

from .test_gallery import check_png, load, make_run, run_one


def read_csv(path) -> np.ndarray:
    return np.genfromtxt(path, delimiter=",", names=True)


def test_analyzer_losses_csv_equals_history(tiny_run):
    manifest = run_one(tiny_run, "losses")
    assert manifest["status"] == "ok", manifest["error"]
    table = read_csv(load(tiny_run, "losses", "history.csv"))
    with open_store(tiny_run) as store:
        history, best = store.history, store.best_epoch
    assert list(table.dtype.names) == list(history)
    for name, values in history.items():
        np.testing.assert_array_equal(table[name], values.astype(np.float64))
    check_png(load(tiny_run, "losses", "curves.png"))
    assert f"best epoch {best}" in manifest["artifacts"][0]["caption"]


def test_analyzer_losses_interrupted_run_has_committed_epochs_only(tiny_run):
    truncate_store(tiny_run / "predictions.h5", 1)  # as if killed during epoch 2
    manifest = run_one(tiny_run, "losses")
    assert manifest["status"] == "ok", manifest["error"]
    table = np.atleast_1d(read_csv(load(tiny_run, "losses", "history.csv")))
    assert table["epoch"].tolist() == [1]
    assert "1 committed epoch(s)" in manifest["artifacts"][0]["caption"]


def test_analyzer_losses_single_epoch(tmp_path, tiny_run_master):
    run = make_run(tmp_path / "run", tiny_run_master, num_classes=4, epochs=1)
    manifest = run_one(run, "losses")
    assert manifest["status"] == "ok", manifest["error"]
    table = np.atleast_1d(read_csv(load(run, "losses", "history.csv")))
    assert table["epoch"].tolist() == [1] and table["lr"].tolist() == [0.1]
    check_png(load(run, "losses", "curves.png"))
