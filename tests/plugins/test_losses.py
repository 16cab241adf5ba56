"""The ``losses`` analyzer: training curves and the history table."""

from __future__ import annotations

import numpy as np

from explainkit.store import open_store, truncate_store
from tests.plugins.helpers import check_png, load, make_run, run_one


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


def test_analyzer_losses_csv_has_the_plain_train_cross_entropy(tiny_run):
    run_one(tiny_run, "losses")
    path = load(tiny_run, "losses", "history.csv")
    header = path.read_text().splitlines()[0].split(",")
    assert header[:3] == ["epoch", "train_loss", "train_ce"]
    with open_store(tiny_run) as store:
        np.testing.assert_array_equal(read_csv(path)["train_ce"], store.history["train_ce"])


def legend(run) -> tuple[list[str], str, str]:
    """The loss panel's legend labels, title and y label, drawn as the analyzer draws them."""
    import json

    from explainkit.plugins.losses import _curves_figure, _loss_lines

    config = json.loads((run / "config.json").read_text())
    with open_store(run) as store:
        history, attrs = store.history, store.attrs
    fig = _curves_figure(history, _loss_lines(history, config, attrs), None, None, "t")
    ax = fig.axes[0]
    return [t.get_text() for t in ax.get_legend().get_texts()], ax.get_title(), ax.get_ylabel()


def test_losses_figure_says_what_each_line_measures(tiny_run):
    labels, title, ylabel = legend(tiny_run)  # default preset: smoothing 0.1, EMA, flip TTA
    assert labels == [
        "train: cross-entropy (raw weights, augmented images)",
        "eval: cross-entropy (EMA weights, flip TTA)",
        "train: objective, cross-entropy with label smoothing 0.1",
    ]
    assert title in ("Loss", "Loss, log scale") and "scale" in ylabel  # the scale is stated


def test_losses_without_smoothing_or_ema_have_no_objective_line(tmp_path):
    from tests.helpers import train_run

    run = train_run(tmp_path / "seed", epochs=1, limit_train=64, limit_eval=16, preset="seed",
                    flip=False, label_smoothing=0.0, ema=0.0, tta=False)  # fmt: skip
    labels, _, _ = legend(run)
    assert labels == [
        "train: cross-entropy (raw weights, augmented images)",
        "eval: cross-entropy (raw weights, no TTA)",
    ]


def test_an_early_eval_spike_puts_the_loss_on_a_log_scale():
    from explainkit.plugins.losses import _log_scale

    smooth = np.r_[np.linspace(2.0, 0.5, 10), np.linspace(1.8, 0.6, 10)]
    assert not _log_scale(smooth)
    assert _log_scale(np.r_[smooth, 9.0])  # one epoch at 9 would squeeze the rest
    assert _log_scale(np.r_[np.linspace(2.3, 0.05, 10)])  # spans more than 20x
    assert not _log_scale(np.array([0.7]))


def test_a_store_without_train_ce_still_opens_and_plots(tiny_run):
    """A run whose writer did not record train_ce: it opens, history.csv lacks it, the figure
    says the plain train cross-entropy was not recorded."""
    from explainkit.store import append_epoch, create_store

    path = tiny_run / "predictions.h5"
    with open_store(tiny_run) as store:  # written again, its rows without train_ce
        a = store.attrs
        split = dict(
            images=store.images(),
            targets=store.targets,
            index=store.index,
            classes=store.classes,
            dataset=a["dataset"],
            model=a["model"],
            mean=store.mean,
            std=store.std,
            masks=store.masks,
            eval_weights=a["eval_weights"],
            eval_tta=bool(a["eval_tta"]),
        )
        epochs = [
            (store.logits(e), {k: float(v[e - 1]) for k, v in store.history.items()})
            for e in store.epochs
        ]
    create_store(path, **split)
    for logits, row in epochs:
        append_epoch(path, logits, {k: v for k, v in row.items() if k != "train_ce"})
    with open_store(tiny_run) as store:
        assert "train_ce" not in store.history and store.epochs == [1, 2]
    manifest = run_one(tiny_run, "losses")
    assert manifest["status"] == "ok", manifest["error"]
    assert "train_ce" not in load(tiny_run, "losses", "history.csv").read_text().splitlines()[0]
    labels, _, _ = legend(tiny_run)
    assert labels[0] == "eval: cross-entropy (EMA weights, flip TTA)"
    assert "not recorded" in labels[1]

    # Resuming such a run keeps train_ce not recorded.
    with open_store(tiny_run) as store:
        row = {name: float(value[-1]) for name, value in store.history.items()}
        logits = store.logits(2)
    append_epoch(path, logits, {**row, "epoch": 3, "train_ce": 0.5})
    with open_store(tiny_run) as store:
        assert store.epochs == [1, 2, 3] and "train_ce" not in store.history
