"""Built-in analyzer ``losses``: training curves from the run's history table."""

from __future__ import annotations

from typing import Any

from explainkit import hookimpl
from explainkit.analyzer import AnalysisContext, Analyzer

__all__ = ["LossesAnalyzer"]


class LossesAnalyzer(Analyzer):
    """Loss and accuracy curves per epoch, with the learning rate and the best epoch.

    Plots the train and eval loss and accuracy that the trainer committed to the prediction
    store, one point per epoch, so an interrupted run shows exactly the epochs it finished.
    The best epoch (highest eval accuracy) is marked in every panel.

    Example:
        explainkit analyze runs/cifar --plugin losses
    """

    name = "losses"
    title = "Training curves"
    summary = "Train/eval loss and accuracy per epoch, learning rate, best epoch (PNG + CSV)."
    order = 10

    def run(self, context: AnalysisContext) -> list[dict]:
        from explainkit import figures, tables

        store = context.store
        history = store.history
        columns = list(history)
        out = context.output_dir
        tables.write_csv(
            out / "history.csv", columns, list(zip(*(history[c] for c in columns), strict=True))
        )
        best = store.best_epoch
        best_row = _row_of(history["epoch"], best)
        fig = _curves_figure(history, best, best_row, _figure_title(store.attrs, history))
        figures.save_figure(fig, out / "curves.png")
        return [
            context.artifact(
                "curves.png", "Loss and accuracy", "image", _caption(history, best, best_row)
            ),
            context.artifact(
                "history.csv", "Training history", "table", "One row per committed epoch."
            ),
        ]


def _row_of(epochs: Any, epoch: int | None) -> int | None:
    """The history row of ``epoch`` (None when there is no best epoch)."""
    import numpy as np

    return int(np.flatnonzero(epochs == epoch)[0]) if epoch is not None else None


def _figure_title(attrs: dict, history: dict) -> str:
    n = len(history["epoch"])
    return (
        f"{attrs.get('dataset', '')} · {attrs.get('model', {}).get('arch', '')}"
        f" · {n} epoch{'s' if n != 1 else ''} committed"
    )


def _caption(history: dict, best: int | None, best_row: int | None) -> str:
    epochs = history["epoch"]
    caption = f"{len(epochs)} committed epoch(s), last {int(epochs[-1])}"
    if best_row is not None:
        caption += (
            f"; best epoch {best}: eval accuracy {100 * history['eval_acc'][best_row]:.2f}%, "
            f"eval loss {history['eval_loss'][best_row]:.4f}"
        )
    return caption


def _curves_figure(history: dict, best: int | None, best_row: int | None, title: str) -> Any:
    """Three panels: loss, accuracy, learning rate; the best epoch marked in each."""
    from explainkit.figures import new_figure

    epochs = history["epoch"]
    fig = new_figure(13, 4.2)
    grid = fig.add_gridspec(1, 3, width_ratios=[1, 1, 0.6])
    ax_loss, ax_acc, ax_lr = (fig.add_subplot(grid[0, i]) for i in range(3))
    style = {"marker": "o" if len(epochs) <= 40 else None, "markersize": 4, "linewidth": 1.6}
    _plot_loss(ax_loss, history, style)
    _plot_accuracy(ax_acc, history, style)
    ax_lr.plot(epochs, history["lr"], color="C2", **style)
    ax_lr.set_title("Learning rate (end of epoch)")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    for ax in (ax_loss, ax_acc, ax_lr):
        _epoch_axis(ax, epochs, best)
    if best_row is not None:
        _mark_best(ax_loss, ax_acc, history, best, best_row)
    ax_loss.legend(fontsize=9)
    ax_acc.legend(fontsize=9, loc="lower right")
    fig.suptitle(title, fontsize=12)
    return fig


def _plot_loss(ax: Any, history: dict, style: dict) -> None:
    """Train and eval loss; log scale when one exploding epoch would flatten the rest."""
    import numpy as np
    from matplotlib.ticker import LogFormatter

    epochs = history["epoch"]
    ax.plot(epochs, history["train_loss"], label="train", color="C0", **style)
    ax.plot(epochs, history["eval_loss"], label="eval", color="C1", **style)
    losses = np.concatenate([history["train_loss"], history["eval_loss"]])
    finite = losses[np.isfinite(losses)]
    if finite.size and finite.min() > 0 and finite.max() / finite.min() > 20:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(LogFormatter())
        ax.yaxis.set_minor_formatter(LogFormatter(minor_thresholds=(2, 0.5)))
        ax.tick_params(axis="y", which="minor", labelsize=7)
        ax.set_ylabel("cross-entropy (log scale)")
    else:
        ax.set_ylabel("cross-entropy")
    ax.set_title("Loss")


def _plot_accuracy(ax: Any, history: dict, style: dict) -> None:
    from matplotlib.ticker import PercentFormatter

    epochs = history["epoch"]
    ax.plot(epochs, 100 * history["train_acc"], label="train", color="C0", **style)
    ax.plot(epochs, 100 * history["eval_acc"], label="eval", color="C1", **style)
    ax.yaxis.set_major_formatter(PercentFormatter(decimals=0))
    ax.set_title("Accuracy")


def _epoch_axis(ax: Any, epochs: Any, best: int | None) -> None:
    """Integer epoch ticks, a grid, and a dashed line at the best epoch."""
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if len(epochs) == 1:
        ax.set_xlim(epochs[0] - 1, epochs[0] + 1)
    if best is not None:
        ax.axvline(best, color="0.4", linestyle="--", linewidth=1, zorder=0)


def _mark_best(ax_loss: Any, ax_acc: Any, history: dict, best: int, best_row: int) -> None:
    """A star on the best epoch's eval accuracy and eval loss."""
    best_acc = 100 * float(history["eval_acc"][best_row])
    ax_acc.plot(
        [best], [best_acc], marker="*", markersize=16, color="C3", linestyle="none",
        label=f"best: epoch {best} ({best_acc:.1f}%)", zorder=5,
    )  # fmt: skip
    ax_loss.plot(
        [best], [history["eval_loss"][best_row]], marker="*", markersize=16, color="C3",
        linestyle="none", label=f"best epoch {best}", zorder=5,
    )  # fmt: skip


@hookimpl
def register_analyzers(register):
    register(LossesAnalyzer)
