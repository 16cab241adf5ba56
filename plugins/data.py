"""Built-in analyzer ``data``: what the model was trained and evaluated on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import click

from explainkit import hookimpl
from explainkit.analyzer import AnalysisContext, Analyzer, Option
from explainkit.errors import ExplainkitError

__all__ = ["DataAnalyzer", "load_train_split"]


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
        splits = _Splits.of(context)
        sizes = _size_summary(splits.train, splits.dataset, _stored_size(context), splits.reason)
        return [
            *_write_distribution(context, splits),
            *_write_samples(context, splits, per_class),
            *_write_summary(context, splits, sizes),
            *_write_sizes(context, sizes, splits.dataset),
        ]


# -- step 1: the two splits -----------------------------------------------------------------


@dataclass
class _Splits:
    """The eval split (from the store) and the train split (re-loaded, or the reason not)."""

    classes: list[str]
    dataset: str
    data_info: dict
    num_eval: int
    eval_counts: Any
    train: Any  # the train Dataset, or None
    train_counts: Any  # per class, or None
    reason: str | None  # why the train split is unavailable

    @classmethod
    def of(cls, context: AnalysisContext) -> _Splits:
        import numpy as np

        store, classes = context.store, context.classes
        k = len(classes)
        run_config = context.config
        data_info = run_config.get("data", {}) if isinstance(run_config, dict) else {}
        dataset = store.attrs.get("dataset") or data_info.get("dataset", "")
        train, reason = load_train_split(run_config, classes)
        return cls(
            classes=classes,
            dataset=dataset,
            data_info=data_info,
            num_eval=int(len(store.targets)),
            eval_counts=np.bincount(store.targets, minlength=k)[:k],
            train=train,
            train_counts=np.bincount(train.targets, minlength=k)[:k] if train is not None else None,
            reason=reason,
        )


def _stored_size(context: AnalysisContext) -> tuple[int, int]:
    """(height, width) of the images in the store."""
    h, w = (int(v) for v in context.store.attrs["input_shape"][1:3])
    return h, w


# -- step 2: class distribution -----------------------------------------------------------


def _write_distribution(context: AnalysisContext, s: _Splits) -> list[dict]:
    from explainkit import figures, tables

    out = context.output_dir
    rows = []
    for i, name in enumerate(s.classes):
        row = [name, int(s.eval_counts[i]), float(s.eval_counts[i] / max(s.num_eval, 1))]
        if s.train_counts is not None:
            row += [int(s.train_counts[i]), float(s.train_counts[i] / max(len(s.train), 1))]
        else:
            row += ["", ""]
        rows.append(row)
    tables.write_csv(
        out / "class_distribution.csv",
        ["class", "eval_count", "eval_fraction", "train_count", "train_fraction"],
        rows,
    )
    fig = _distribution_figure(s.classes, s.eval_counts, s.train_counts, s.reason)
    figures.save_figure(fig, out / "class_distribution.png")
    caption = f"Eval split from the store ({s.num_eval} images)"
    caption += (
        f"; train split re-loaded from {s.dataset} ({len(s.train)} images)."
        if s.train is not None
        else f"; train split skipped: {s.reason}."
    )
    return [
        context.artifact("class_distribution.png", "Class distribution", "image", caption),
        context.artifact("class_distribution.csv", "Class distribution", "table", caption),
    ]


# -- step 3: sample images per class ------------------------------------------------------


def _write_samples(context: AnalysisContext, s: _Splits, per_class: int) -> list[dict]:
    from explainkit import figures
    from explainkit.selection import per_class_sample

    k = len(s.classes)
    chosen, positions = per_class_sample(context.store.targets, k, per_class, context.rng)
    row_labels = [
        f"{figures.short(c, 24)} ({int(n)})" for c, n in zip(s.classes, s.eval_counts, strict=True)
    ]
    fig = figures.grid_figure(
        context.store.images(chosen),
        cols=per_class,
        rows=k,
        positions=positions,
        row_labels=row_labels,
        title=f"Eval images per class (up to {per_class}; eval count in brackets)",
        tile_px=96 if k <= 15 else 64,
        pad=4,
    )
    figures.save_figure(fig, context.output_dir / "samples.png")
    return [
        context.artifact(
            "samples.png",
            "Sample images per class",
            "image",
            f"Up to {per_class} eval images per class, un-normalized, nearest-neighbour upscaled.",
        )
    ]


# -- step 4: the summary JSON and image sizes ---------------------------------------------


def _write_summary(context: AnalysisContext, s: _Splits, sizes: dict) -> list[dict]:
    from explainkit import tables
    from explainkit.data import channel_stats

    store, info = context.store, s.data_info
    eval_mean, eval_std = channel_stats(store.images())
    summary = {
        "dataset": s.dataset,
        "classes": s.classes,
        "eval": {
            "source": "prediction store",
            "num_images": s.num_eval,
            "class_counts": s.eval_counts.tolist(),
            "mean": list(eval_mean),
            "std": list(eval_std),
        },
        "train": {
            "available": s.train is not None,
            "reason": s.reason,
            "num_images": int(len(s.train)) if s.train is not None else info.get("num_train"),
            "class_counts": s.train_counts.tolist() if s.train_counts is not None else None,
            "mean": info.get("mean"),
            "std": info.get("std"),
            "stats_source": "config.json data.mean/std" if "mean" in info else None,
        },
        "normalization": {"mean": list(store.mean), "std": list(store.std)},
        "image_sizes": {key: v for key, v in sizes.items() if key != "table"},
    }
    tables.write_json(context.output_dir / "data.json", summary)
    return [
        context.artifact(
            "data.json",
            "Data summary",
            "json",
            "Per-channel mean/std in [0,1] units (eval: computed from the stored images; "
            "train: as recorded in config.json), class counts, image sizes.",
        )
    ]


def _write_sizes(context: AnalysisContext, sizes: dict, dataset: str) -> list[dict]:
    """The original image sizes of the train split, only when they vary."""
    from explainkit import figures, tables

    if not sizes["varying"]:
        return []
    out, table = context.output_dir, sizes["table"]
    tables.write_csv(out / "image_sizes.csv", ["height", "width", "count"], table)
    figures.save_figure(_sizes_figure(table, dataset), out / "image_sizes.png")
    return [
        context.artifact("image_sizes.png", "Image sizes", "image", sizes["note"]),
        context.artifact("image_sizes.csv", "Image sizes", "table", sizes["note"]),
    ]


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
    from matplotlib.ticker import MaxNLocator

    from explainkit import figures

    k = len(classes)
    height = max(3.0, 0.24 * k + 1.6)
    fig = figures.new_figure(12, height)
    font = figures.class_font_size(k)
    y = np.arange(k)
    labels = [figures.short(c, 24) for c in classes]
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

    from explainkit import figures

    data = np.asarray(table, dtype=np.int64)
    heights, widths, counts = data[:, 0], data[:, 1], data[:, 2]
    fig = figures.new_figure(11, 4.2)
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
