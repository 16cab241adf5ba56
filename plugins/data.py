"""Built-in analyzer ``data``: what the model was trained and evaluated on."""

from __future__ import annotations

from typing import Any

import click

from explainkit import hookimpl
from explainkit.analyzer import AnalysisContext, Analyzer, Option
from explainkit.errors import ExplainkitError

__all__ = ["DataAnalyzer", "load_train_split", "sample_per_class"]


class DataAnalyzer(Analyzer):
    """Class balance, sample images, channel statistics and image sizes of the run's data.

    The eval split comes from the prediction store alone; the train split is re-loaded from
    the dataset named in ``config.json`` when it is available here (never downloaded), and its
    figures are skipped with a note when it is not.

    Example:
        explainkit analyze runs/cifar --plugin data --data-per-class 4
    """

    name = "data"
    title = "Data"
    summary = "Class distribution, sample images per class, channel mean/std, image sizes."
    order = 5
    options = (
        Option("per_class", click.IntRange(1, 32), 8, "Sample eval images per class in the grid."),
    )

    def run(
        self,
        context: AnalysisContext,
        *,
        per_class: int,
    ) -> list[dict]:
        import numpy as np
        from explainkit.plugins import _plot

        from explainkit.data import channel_stats

        store = context.store
        classes = list(store.classes)
        k = len(classes)
        out = context.output_dir
        artifacts = []
        run_config = context.config
        data_info = run_config.get("data", {}) if isinstance(run_config, dict) else {}
        dataset_name = store.attrs.get("dataset") or data_info.get("dataset", "")

        targets = store.targets
        eval_counts = np.bincount(targets, minlength=k)[:k]
        train, train_reason = load_train_split(run_config, classes)
        train_counts = np.bincount(train.targets, minlength=k)[:k] if train is not None else None

        # Class distribution.
        rows = []
        for i, name in enumerate(classes):
            row = [name, int(eval_counts[i]), float(eval_counts[i] / max(len(targets), 1))]
            if train_counts is not None:
                row += [int(train_counts[i]), float(train_counts[i] / max(len(train), 1))]
            else:
                row += ["", ""]
            rows.append(row)
        _plot.write_csv(
            out / "class_distribution.csv",
            ["class", "eval_count", "eval_fraction", "train_count", "train_fraction"],
            rows,
        )
        fig = _distribution_figure(classes, eval_counts, train_counts, train_reason)
        _plot.save_figure(fig, out / "class_distribution.png")
        caption = f"Eval split from the store ({len(targets)} images)"
        caption += (
            f"; train split re-loaded from {dataset_name} ({len(train)} images)."
            if train is not None
            else f"; train split skipped: {train_reason}."
        )
        artifacts.append(
            context.artifact("class_distribution.png", "Class distribution", "image", caption)
        )
        artifacts.append(
            context.artifact("class_distribution.csv", "Class distribution", "table", caption)
        )

        # Sample images per class (eval split).
        chosen, positions = sample_per_class(targets, k, per_class, context.rng)
        images = store.images(chosen)
        row_labels = [
            f"{_plot.short(c, 24)} ({int(n)})" for c, n in zip(classes, eval_counts, strict=True)
        ]
        fig = _plot.grid_figure(
            images,
            cols=per_class,
            rows=k,
            positions=positions,
            row_labels=row_labels,
            title=f"Eval images per class (up to {per_class}; eval count in brackets)",
            tile_px=96 if k <= 15 else 64,
            pad=4,
        )
        _plot.save_figure(fig, out / "samples.png")
        artifacts.append(
            context.artifact(
                "samples.png",
                "Sample images per class",
                "image",
                f"Up to {per_class} eval images per class, un-normalized, nearest-neighbour "
                "upscaled.",
            )
        )

        # Channel statistics and image sizes.
        eval_mean, eval_std = channel_stats(store.images())
        h, w = (int(v) for v in store.attrs["input_shape"][1:3])
        sizes = _size_summary(train, dataset_name, (h, w), train_reason)
        summary = {
            "dataset": dataset_name,
            "classes": classes,
            "eval": {
                "source": "prediction store",
                "num_images": int(len(targets)),
                "class_counts": eval_counts.tolist(),
                "mean": list(eval_mean),
                "std": list(eval_std),
            },
            "train": {
                "available": train is not None,
                "reason": train_reason,
                "num_images": int(len(train)) if train is not None else data_info.get("num_train"),
                "class_counts": train_counts.tolist() if train_counts is not None else None,
                "mean": data_info.get("mean"),
                "std": data_info.get("std"),
                "stats_source": "config.json data.mean/std" if "mean" in data_info else None,
            },
            "normalization": {"mean": list(store.mean), "std": list(store.std)},
            "image_sizes": {k2: v for k2, v in sizes.items() if k2 != "table"},
        }
        _plot.write_json(out / "data.json", summary)
        artifacts.append(
            context.artifact(
                "data.json",
                "Data summary",
                "json",
                "Per-channel mean/std in [0,1] units (eval: computed from the stored images; "
                "train: as recorded in config.json), class counts, image sizes.",
            )
        )
        if sizes["varying"]:
            table = sizes["table"]
            _plot.write_csv(out / "image_sizes.csv", ["height", "width", "count"], table)
            _plot.save_figure(_sizes_figure(table, dataset_name), out / "image_sizes.png")
            artifacts.append(
                context.artifact("image_sizes.png", "Image sizes", "image", sizes["note"])
            )
            artifacts.append(
                context.artifact("image_sizes.csv", "Image sizes", "table", sizes["note"])
            )
        return artifacts


def load_train_split(run_config: dict, classes: list[str]) -> tuple[Any, str | None]:
    """Re-load the run's train split as configured, or None and the reason it is unavailable.

    Never downloads; any failure to read the data (missing folder, unreadable files) is a
    reason to skip the train figures, not an analyzer failure.
    """
    from explainkit.data import load_dataset

    cfg = run_config.get("config") if isinstance(run_config, dict) else None
    if not cfg:
        return None, "the run has no config.json with the training config"
    try:
        ds = load_dataset(
            cfg.get("dataset", ""),
            "train",
            cfg.get("data_dir"),
            image_size=int(cfg.get("image_size", 32)),
            seed=int(cfg.get("seed", 0)),
            limit=cfg.get("limit_train"),
            download=False,
        )
    except (ExplainkitError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return None, f"the {cfg.get('dataset')} training data is not available here ({first})"
    if list(ds.classes) != list(classes):
        return None, "the training data found here has other classes than the run"
    return ds, None


def sample_per_class(targets: Any, num_classes: int, per_class: int, rng: Any) -> tuple[Any, Any]:
    """Up to ``per_class`` random eval positions per class, and their grid cells (row = class)."""
    import numpy as np

    perm = rng.permutation(len(targets))
    order = perm[np.argsort(targets[perm], kind="stable")]
    sorted_targets = targets[order]
    rank = np.arange(len(order)) - np.searchsorted(sorted_targets, sorted_targets, side="left")
    keep = rank < per_class
    return order[keep], sorted_targets[keep] * per_class + rank[keep]


def _size_summary(
    train: Any, dataset_name: str, stored_hw: tuple[int, int], reason: str | None
) -> dict:
    import numpy as np

    stored = f"{stored_hw[0]}x{stored_hw[1]}"
    if train is None or train.sizes is None:
        if train is None and dataset_name == "folder":
            note = f"original image sizes unknown ({reason}); stored at {stored}"
        else:
            note = f"{dataset_name or 'this dataset'} images all have one size; stored at {stored}"
        return {"varying": False, "note": note, "stored": stored}
    uniq, counts = np.unique(train.sizes, axis=0, return_counts=True)
    table = [[int(hh), int(ww), int(c)] for (hh, ww), c in zip(uniq, counts, strict=True)]
    if len(uniq) == 1:
        note = f"all {len(train)} train images are {uniq[0][0]}x{uniq[0][1]}; stored at {stored}"
        return {"varying": False, "note": note, "stored": stored}
    note = (
        f"{len(uniq)} distinct original sizes (height x width) among {len(train)} train "
        f"images; all resized to {stored}"
    )
    return {
        "varying": True,
        "note": note,
        "stored": stored,
        "distinct": len(uniq),
        "height": {"min": int(uniq[:, 0].min()), "max": int(uniq[:, 0].max())},
        "width": {"min": int(uniq[:, 1].min()), "max": int(uniq[:, 1].max())},
        "table": table,
    }


def _distribution_figure(
    classes: list[str], eval_counts: Any, train_counts: Any, train_reason: str | None
) -> Any:
    import numpy as np
    from explainkit.plugins import _plot
    from matplotlib.ticker import MaxNLocator

    k = len(classes)
    height = max(3.0, 0.24 * k + 1.6)
    fig = _plot.new_figure(12, height)
    font = _plot.class_font_size(k)
    y = np.arange(k)
    labels = [_plot.short(c, 24) for c in classes]
    panels = (
        ("eval split (prediction store)", eval_counts, "C1"),
        ("train split", train_counts, "C0"),
    )
    axes = [fig.add_subplot(1, 2, 1)]
    axes.append(fig.add_subplot(1, 2, 2, sharey=axes[0]))
    for ax, (name, counts, color) in zip(axes, panels, strict=True):
        ax.set_title(name, fontsize=11)
        ax.set_yticks(y, labels, fontsize=font)
        ax.set_ylim(k - 0.5, -0.5)
        if counts is None:
            ax.text(
                0.5, 0.5, "not available:\n" + _wrap(train_reason or "", 45), ha="center",
                va="center", transform=ax.transAxes, fontsize=10, color="0.3",
            )  # fmt: skip
            ax.set_xticks([])
            ax.tick_params(left=False, labelleft=False)
            continue
        ax.barh(y, counts, color=color, height=0.75)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelleft=True)
        ax.set_xlabel("images")
        ax.grid(axis="x", alpha=0.3)
        ax.set_xlim(0, max(int(counts.max()), 1) * 1.18)
        total = max(int(counts.sum()), 1)
        if k <= 60:
            for yi, c in zip(y, counts, strict=True):
                ax.text(c, yi, f" {int(c)} ({100 * c / total:.0f}%)", va="center", fontsize=font)
    fig.suptitle("Class distribution", fontsize=12)
    return fig


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width)) or text


def _sizes_figure(table: list[list[int]], dataset_name: str) -> Any:
    import numpy as np
    from explainkit.plugins import _plot

    data = np.asarray(table, dtype=np.int64)
    heights, widths, counts = data[:, 0], data[:, 1], data[:, 2]
    fig = _plot.new_figure(11, 4.2)
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    area = 20 + 280 * counts / counts.max()
    ax1.scatter(widths, heights, s=area, alpha=0.5, color="C0", edgecolor="none")
    ax1.set_xlabel("width (px)")
    ax1.set_ylabel("height (px)")
    ax1.set_title("Original sizes (marker area ∝ images)", fontsize=11)
    ax1.grid(alpha=0.3)
    side = np.sqrt(heights * widths)
    ax2.hist(side, bins=min(40, max(5, len(side))), weights=counts, color="C0")
    ax2.set_xlabel("√(height × width) (px)")
    ax2.set_ylabel("images")
    ax2.set_title("Image size distribution", fontsize=11)
    ax2.grid(alpha=0.3)
    fig.suptitle(f"{dataset_name} train images before resizing ({int(counts.sum())})")
    return fig


@hookimpl
def register_analyzers(register):
    register(DataAnalyzer)
