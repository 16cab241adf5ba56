"""Built-in analyzer ``losses``: training curves from the run's history table."""

from __future__ import annotations

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
        import numpy as np
        from explainkit.plugins import _plot
        from matplotlib.ticker import LogFormatter, MaxNLocator, PercentFormatter

        store = context.store
        history = store.history
        columns = list(history)
        epochs = history["epoch"]
        n = len(epochs)
        out = context.output_dir
        artifacts = []

        _plot.write_csv(
            out / "history.csv", columns, list(zip(*(history[c] for c in columns), strict=True))
        )
        best = store.best_epoch
        best_row = int(np.flatnonzero(epochs == best)[0]) if best is not None else None

        fig = _plot.new_figure(13, 4.2)
        grid = fig.add_gridspec(1, 3, width_ratios=[1, 1, 0.6])
        ax_loss, ax_acc, ax_lr = (fig.add_subplot(grid[0, i]) for i in range(3))
        marker = "o" if n <= 40 else None
        style = {"marker": marker, "markersize": 4, "linewidth": 1.6}
        ax_loss.plot(epochs, history["train_loss"], label="train", color="C0", **style)
        ax_loss.plot(epochs, history["eval_loss"], label="eval", color="C1", **style)
        losses = np.concatenate([history["train_loss"], history["eval_loss"]])
        finite = losses[np.isfinite(losses)]
        if finite.size and finite.min() > 0 and finite.max() / finite.min() > 20:
            ax_loss.set_yscale("log")  # one exploding epoch must not flatten the rest
            ax_loss.yaxis.set_major_formatter(LogFormatter())
            ax_loss.yaxis.set_minor_formatter(LogFormatter(minor_thresholds=(2, 0.5)))
            ax_loss.tick_params(axis="y", which="minor", labelsize=7)
            ax_loss.set_ylabel("cross-entropy (log scale)")
        else:
            ax_loss.set_ylabel("cross-entropy")
        ax_loss.set_title("Loss")
        ax_acc.plot(epochs, 100 * history["train_acc"], label="train", color="C0", **style)
        ax_acc.plot(epochs, 100 * history["eval_acc"], label="eval", color="C1", **style)
        ax_acc.yaxis.set_major_formatter(PercentFormatter(decimals=0))
        ax_acc.set_title("Accuracy")
        ax_lr.plot(epochs, history["lr"], color="C2", **style)
        ax_lr.set_title("Learning rate (end of epoch)")
        ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        for ax in (ax_loss, ax_acc, ax_lr):
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
            if n == 1:
                ax.set_xlim(epochs[0] - 1, epochs[0] + 1)
            if best is not None:
                ax.axvline(best, color="0.4", linestyle="--", linewidth=1, zorder=0)
        if best_row is not None:
            best_acc = 100 * float(history["eval_acc"][best_row])
            ax_acc.plot(
                [best], [best_acc], marker="*", markersize=16, color="C3", linestyle="none",
                label=f"best: epoch {best} ({best_acc:.1f}%)", zorder=5,
            )  # fmt: skip
            ax_loss.plot(
                [best], [history["eval_loss"][best_row]], marker="*", markersize=16, color="C3",
                linestyle="none", label=f"best epoch {best}", zorder=5,
            )  # fmt: skip
        ax_loss.legend(fontsize=9)
        ax_acc.legend(fontsize=9, loc="lower right")
        last = int(epochs[-1])
        fig.suptitle(
            f"{store.attrs.get('dataset', '')} · {store.attrs.get('model', {}).get('arch', '')}"
            f" · {n} epoch{'s' if n != 1 else ''} committed",
            fontsize=12,
        )
        _plot.save_figure(fig, out / "curves.png")

        caption = f"{n} committed epoch(s), last {last}"
        if best_row is not None:
            caption += (
                f"; best epoch {best}: eval accuracy {100 * history['eval_acc'][best_row]:.2f}%, "
                f"eval loss {history['eval_loss'][best_row]:.4f}"
            )
        artifacts.append(context.artifact("curves.png", "Loss and accuracy", "image", caption))
        artifacts.append(
            context.artifact(
                "history.csv", "Training history", "table", "One row per committed epoch."
            )
        )
        return artifacts


@hookimpl
def register_analyzers(register):
    register(LossesAnalyzer)
