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

    The two solid loss lines measure the same thing, the plain cross-entropy (``train_ce`` of
    the training batches, ``eval_loss`` of the stored eval logits), and the legend says which
    weights and images each comes from. The objective training minimised (``train_loss``,
    label smoothing included) is a dashed line of its own when label smoothing was on.

    Example:
        explainkit analyze runs/cifar --plugin losses
    """

    name = "losses"
    tasks = ("classification", "video")  # a video run: its clips' middle frames and logits
    title = "Training curves"
    summary = "Train/eval loss and accuracy per epoch, learning rate, best epoch (PNG + CSV)."
    order = 10

    def run(self, context: AnalysisContext) -> list[dict]:
        from explainkit import figures, tables

        store = context.store
        history = _recorded(store.history, context.config)
        columns = list(history)
        out = context.output_dir
        tables.write_csv(
            out / "history.csv", columns, list(zip(*(history[c] for c in columns), strict=True))
        )
        best = store.best_epoch
        best_row = _row_of(history["epoch"], best)
        lines = _loss_lines(history, context.config, store.attrs)
        fig = _curves_figure(history, lines, best, best_row, _figure_title(store.attrs, history))
        figures.save_figure(fig, out / "curves.png")
        return [
            context.artifact(
                "curves.png", "Loss and accuracy", "image", _caption(history, best, best_row)
            ),
            context.artifact(
                "history.csv", "Training history", "table", "One row per committed epoch."
            ),
        ]


TRAINING_COLUMNS = ("train_loss", "train_acc", "lr", "images_per_s", "train_ce")


def _recorded(history: dict, run_config: dict) -> dict:
    """The history without the training columns a run that was not trained holds as 0
    (``explainkit evaluate``); a RunWriter loop that logged them keeps them."""
    if not isinstance(run_config, dict) or run_config.get("command", "train") == "train":
        return history
    return {k: v for k, v in history.items() if k not in TRAINING_COLUMNS or bool(abs(v).sum() > 0)}


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
        if "train_ce" in history:
            caption += f", train cross-entropy {history['train_ce'][best_row]:.4f}"
    if "train_loss" not in history:
        return caption + ". The run was evaluated, not trained: eval loss and accuracy only."
    return caption + ". Solid loss lines: plain cross-entropy on both sides."


def _loss_lines(history: dict, run_config: dict, attrs: dict) -> list[dict[str, Any]]:
    """The loss curves to draw: column, legend label, colour and line style.

    The comparable pair is the plain cross-entropy on both sides. Without label smoothing the
    objective is that cross-entropy, so ``train_loss`` stands in for a ``train_ce`` that an
    older store lacks; with it, the objective is drawn dashed and labelled as such. Which
    weights and images each side saw comes from the store's ``eval_weights`` and
    ``eval_tta`` (the run's config where an older store lacks them).
    """
    config = run_config.get("config") if isinstance(run_config, dict) else None
    config = config if isinstance(config, dict) else {}
    smoothing = _number(config.get("label_smoothing", 0.0))
    augmented = any(config.get(k) for k in ("crop_padding", "flip", "cutout"))
    train_side = f"raw weights, {'augmented' if augmented else 'unaugmented'} images"
    ema = attrs.get("eval_weights", "ema" if _number(config.get("ema")) > 0 else "trained")
    tta = attrs.get("eval_tta", config.get("tta", False))
    eval_side = f"{'EMA' if ema == 'ema' else 'raw'} weights, {'flip TTA' if tta else 'no TTA'}"

    def line(column: str, label: str, color: str, linestyle: str = "-") -> dict[str, Any]:
        return {"column": column, "label": label, "color": color, "linestyle": linestyle}

    lines = []
    train_ce = "train_ce" if "train_ce" in history else "train_loss" if smoothing == 0 else None
    train_ce = train_ce if train_ce in history else None  # evaluated: no training side
    if train_ce is not None:
        lines.append(line(train_ce, f"train: cross-entropy ({train_side})", "C0"))
    lines.append(line("eval_loss", f"eval: cross-entropy ({eval_side})", "C1"))
    if smoothing > 0 and "train_loss" in history:
        label = f"train: objective, cross-entropy with label smoothing {smoothing:g}"
        if train_ce is None:
            label += " (the plain cross-entropy was not recorded)"
        lines.append(line("train_loss", label, "C0", "--"))
    return lines


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0


def _curves_figure(
    history: dict, lines: list[dict], best: int | None, best_row: int | None, title: str
) -> Any:
    """Three panels: loss, accuracy, learning rate; the best epoch marked in each."""
    from explainkit.figures import new_figure

    epochs = history["epoch"]
    has_lr = "lr" in history
    fig = new_figure(13 if has_lr else 10, 5.2)
    grid = fig.add_gridspec(1, 3 if has_lr else 2, width_ratios=[1, 1, 0.6][: 2 + has_lr])
    axes = [fig.add_subplot(grid[0, i]) for i in range(2 + has_lr)]
    ax_loss, ax_acc = axes[:2]
    style = {"marker": "o" if len(epochs) <= 40 else None, "markersize": 4, "linewidth": 1.6}
    _plot_loss(ax_loss, history, lines, style)
    _plot_accuracy(ax_acc, history, style)
    if has_lr:  # a run that was not trained has no learning rate
        axes[2].plot(epochs, history["lr"], color="C2", **style)
        axes[2].set_title("Learning rate (end of epoch)")
        axes[2].ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    for ax in axes:
        _epoch_axis(ax, epochs, best)
    if best_row is not None:
        _mark_best(ax_loss, ax_acc, history, best, best_row)
    # Below the panel: the labels say what each line measures, too long to sit on the curves.
    ax_loss.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16))
    ax_acc.legend(fontsize=9, loc="lower right")
    fig.suptitle(title, fontsize=12)
    return fig


def _plot_loss(ax: Any, history: dict, lines: list[dict], style: dict) -> None:
    """The loss lines; a log scale when one spiking epoch would flatten the rest (or the
    losses span more than 20x), said in the panel's title and axis label."""
    import numpy as np

    epochs = history["epoch"]
    for line in lines:
        ax.plot(epochs, history[line["column"]], label=line["label"], color=line["color"],
                **{**style, "linestyle": line["linestyle"]})  # fmt: skip
    losses = np.concatenate([history[line["column"]] for line in lines])
    if _log_scale(losses):
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(_plain_log_formatter())
        ax.yaxis.set_minor_formatter(_plain_log_formatter(minor_thresholds=(2, 0.5)))
        ax.tick_params(axis="y", which="minor", labelsize=7)
        ax.set_ylabel("loss (log scale)")
        ax.set_title("Loss, log scale")
    else:
        ax.set_ylabel("loss (linear scale)")
        ax.set_title("Loss")


def _plain_log_formatter(**options: Any) -> Any:
    """A log-axis formatter that labels the ticks LogFormatter picks with plain numbers
    (0.6, not 6e-01)."""
    from matplotlib.ticker import LogFormatter

    class Plain(LogFormatter):
        def __call__(self, x: float, pos: Any = None) -> str:
            return f"{x:g}" if super().__call__(x, pos) else ""

    return Plain(**options)


def _log_scale(losses: Any) -> bool:
    """Whether the loss axis needs a log scale: the values span more than 20x, or on a
    linear axis the highest one (an early eval spike) would squeeze all others into less
    than half of it."""
    import numpy as np

    finite = np.sort(losses[np.isfinite(losses)])
    if finite.size < 2 or finite[0] <= 0:
        return False
    low, second, high = finite[0], finite[-2], finite[-1]
    return bool(high / low > 20 or (second - low) < 0.5 * (high - low))


def _plot_accuracy(ax: Any, history: dict, style: dict) -> None:
    from matplotlib.ticker import PercentFormatter

    epochs = history["epoch"]
    if "train_acc" in history:
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
