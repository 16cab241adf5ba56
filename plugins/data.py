"""Built-in analyzer ``data``: what the model was trained and evaluated on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import click

from explainkit import hookimpl
from explainkit.analyzer import AnalysisContext, Analyzer, Option
from explainkit.errors import ExplainkitError

__all__ = ["DataAnalyzer"]

MAX_SAMPLE_CLASSES = 24  # rows of the sample grid; more classes: a seeded choice of them
RAREST = 20  # the rarest classes named in the distribution figure of many classes
CHANNELS = ("red", "green", "blue")  # names of the rows of channel_stats.csv for RGB images


class DataAnalyzer(Analyzer):
    """Class balance, sample images, channel statistics and image sizes of the run's data.

    The eval split comes from the prediction store alone (its images, and the original sizes
    recorded at training time); the train split is re-loaded from the dataset named in
    ``config.json`` when it is available here (never downloaded), and what needs it is skipped
    with a note when it is not.

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
        stats = _ChannelStats.of(context)
        sizes = _sizes_of(context, splits)
        return [
            *_write_distribution(context, splits),
            *_write_samples(context, splits, per_class),
            *_write_channel_stats(context, stats),
            *_write_sizes(context, sizes),
            *_write_summary(context, splits, stats, sizes),
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
    evaluated: bool  # written by evaluate: there never was a train split

    @classmethod
    def of(cls, context: AnalysisContext) -> _Splits:
        import numpy as np

        store, classes = context.store, context.classes
        k = len(classes)
        run_config = context.config
        data_info = run_config.get("data", {}) if isinstance(run_config, dict) else {}
        dataset = store.attrs.get("dataset") or data_info.get("dataset", "")
        train, reason = _train_split(context, classes)
        return cls(
            classes=classes,
            dataset=dataset,
            data_info=data_info,
            num_eval=int(len(store.targets)),
            eval_counts=np.bincount(store.targets, minlength=k)[:k],
            train=train,
            train_counts=np.bincount(train.targets, minlength=k)[:k] if train is not None else None,
            reason=reason,
            evaluated=context.config.get("command", "train") != "train",
        )

    @property
    def num_train(self) -> int | None:
        """Train images: re-loaded, else as recorded in config.json (None when unknown)."""
        if self.train is not None:
            return len(self.train)
        value = self.data_info.get("num_train") if isinstance(self.data_info, dict) else None
        return value if isinstance(value, int) and not isinstance(value, bool) else None


# -- step 2: class distribution -----------------------------------------------------------


def _write_distribution(context: AnalysisContext, s: _Splits) -> list[dict]:
    from explainkit import figures, tables

    out = context.output_dir
    header = ["class", "eval_count", "eval_fraction", "train_count", "train_fraction"]
    rows = []
    for i, name in enumerate(s.classes):
        row = [name, int(s.eval_counts[i]), float(s.eval_counts[i] / max(s.num_eval, 1))]
        if s.train_counts is not None:
            row += [int(s.train_counts[i]), float(s.train_counts[i] / max(len(s.train), 1))]
        else:
            row += ["", ""]
        rows.append(row[:3] if s.evaluated else row)
    tables.write_csv(out / "class_distribution.csv", header[: 3 if s.evaluated else 5], rows)
    reason = None if s.evaluated else s.reason  # None: no train panel at all
    fig = _distribution_figure(s.classes, s.eval_counts, s.train_counts, reason)
    figures.save_figure(fig, out / "class_distribution.png")
    caption = f"Eval split from the store ({s.num_eval} images)"
    if s.evaluated:
        caption += "; the run was evaluated, not trained, so it has no train split."
    elif s.train is not None:
        caption += f"; train split re-loaded from {s.dataset} ({len(s.train)} images)."
    else:
        caption += f"; train split skipped: {s.reason}."
    return [
        context.artifact("class_distribution.png", "Class distribution", "image", caption),
        context.artifact("class_distribution.csv", "Class distribution", "table", caption),
    ]


# -- step 3: sample images per class ------------------------------------------------------


def _write_samples(context: AnalysisContext, s: _Splits, per_class: int) -> list[dict]:
    import numpy as np

    from explainkit import figures
    from explainkit.selection import per_class_sample

    k = len(s.classes)
    shown = np.arange(k)
    if k > MAX_SAMPLE_CLASSES:  # a seeded choice of classes, in class order
        shown = np.sort(context.rng.choice(k, MAX_SAMPLE_CLASSES, replace=False))
    row_of = np.full(k, -1)
    row_of[shown] = np.arange(len(shown))
    rows = row_of[context.store.targets]
    among = np.flatnonzero(rows >= 0)  # only the shown classes' images are read
    picked, positions = per_class_sample(rows[among], len(shown), per_class, context.rng)
    row_labels = [f"{figures.short(s.classes[c], 24)} ({int(s.eval_counts[c])})" for c in shown]
    fig = figures.grid_figure(
        context.store.images(among[picked]),
        cols=per_class,
        rows=len(shown),
        positions=positions,
        row_labels=row_labels,
        title=f"Eval images per class (up to {per_class}; eval count in brackets)",
        tile_px=96 if len(shown) <= 15 else 64,
        pad=4,
    )
    figures.save_figure(fig, context.output_dir / "samples.png")
    which = "" if len(shown) == k else f" of {len(shown)} of the {k} classes (a seeded sample)"
    return [
        context.artifact(
            "samples.png",
            "Sample images per class",
            "image",
            f"Up to {per_class} eval images per class{which}, un-normalized, "
            "nearest-neighbour scaled.",
        )
    ]


# -- step 4: per-channel mean and std -----------------------------------------------------


@dataclass
class _ChannelStats:
    """Per-channel mean and std in [0, 1] units of both splits.

    Eval: computed from the stored images. Train: the store's ``mean``/``std``, computed from
    the train split at training time (the model's normalization), so no data folder is needed.
    """

    channels: list[str]
    eval_mean: tuple[float, ...]
    eval_std: tuple[float, ...]
    train_mean: tuple[float, ...]
    train_std: tuple[float, ...]
    num_eval: int
    evaluated: bool = False  # the store's mean/std are the model's, not a train split's

    @classmethod
    def of(cls, context: AnalysisContext) -> _ChannelStats:
        from explainkit.data import channel_stats
        from explainkit.data.lazy import RowReader

        store = context.store
        h, w = (int(v) for v in store.attrs["input_shape"][1:])
        # Streamed from the store (a seeded sample of 4,096 images in a larger store).
        eval_mean, eval_std = channel_stats(RowReader(store.images, (h, w), store.num_images))
        names = CHANNELS if len(store.mean) == len(CHANNELS) else None
        return cls(
            channels=list(names or (str(i) for i in range(len(store.mean)))),
            eval_mean=eval_mean,
            eval_std=eval_std,
            train_mean=tuple(store.mean),
            train_std=tuple(store.std),
            num_eval=store.num_images,
            evaluated=context.config.get("command", "train") != "train",
        )

    def rows(self) -> list[list]:
        return [
            [split, name, float(m), float(sd)]
            for split, means, stds in (
                (
                    "normalization" if self.evaluated else "train",
                    self.train_mean,
                    self.train_std,
                ),
                ("eval", self.eval_mean, self.eval_std),
            )
            for name, m, sd in zip(self.channels, means, stds, strict=True)
        ]


def _write_channel_stats(context: AnalysisContext, st: _ChannelStats) -> list[dict]:
    from explainkit import tables

    tables.write_csv(
        context.output_dir / "channel_stats.csv", ["split", "channel", "mean", "std"], st.rows()
    )
    first = (
        "normalization: the model's input normalization the run records (given to evaluate, "
        "or computed from the eval images)"
        if st.evaluated
        else "train: computed from the train split at training time (the model's input "
        "normalization, stored in predictions.h5)"
    )
    caption = (
        f"Per-channel mean and std of the pixel values in [0, 1] units. {first}; eval: "
        f"computed from the {st.num_eval} stored eval images."
    )
    return [context.artifact("channel_stats.csv", "Channel mean and std", "table", caption)]


# -- step 5: original image sizes of both splits ------------------------------------------


@dataclass
class _SplitSizes:
    """The original (height, width) of one split's images, or why they are unknown."""

    split: str
    sizes: Any  # int (N, 2), or None when unknown
    total: int | None  # images in the split, when known
    reason: str | None = None  # why the sizes are unknown

    def table(self) -> list[list[int]]:
        """Distinct sizes ``[height, width, count]``, the most common first."""
        import numpy as np

        if self.sizes is None or len(self.sizes) == 0:
            return []
        uniq, counts = np.unique(self.sizes, axis=0, return_counts=True)
        order = np.lexsort((uniq[:, 1], uniq[:, 0], -counts))
        return [[int(uniq[i, 0]), int(uniq[i, 1]), int(counts[i])] for i in order]

    def note(self) -> str:
        table = self.table()
        if not table:
            return f"{self.split} sizes unknown ({self.reason})"
        if len(table) == 1:
            h, w, n = table[0]
            return f"all {n} {self.split} images are {h}x{w}"
        heights = [row[0] for row in table]
        widths = [row[1] for row in table]
        return (
            f"{len(table)} distinct sizes among {len(self.sizes)} {self.split} images "
            f"(height {min(heights)}–{max(heights)}, width {min(widths)}–{max(widths)})"
        )

    def summary(self) -> dict:
        table = self.table()
        if not table:
            return {"known": False, "reason": self.reason, "num_images": self.total}
        return {
            "known": True,
            "source": "prediction store" if self.split == "eval" else "re-loaded train split",
            "num_images": int(len(self.sizes)),
            "distinct": len(table),
            "height": {"min": min(r[0] for r in table), "max": max(r[0] for r in table)},
            "width": {"min": min(r[1] for r in table), "max": max(r[1] for r in table)},
            "note": self.note(),
        }


@dataclass
class _Sizes:
    stored: str  # "HxW" the images were resized to
    splits: list[_SplitSizes]  # train, eval
    evaluated: bool = False  # no train split to speak of

    @property
    def shown(self) -> list[_SplitSizes]:
        return self.splits[1:] if self.evaluated else self.splits

    @property
    def varying(self) -> bool:
        return any(len(s.table()) > 1 for s in self.shown)

    def caption(self) -> str:
        notes = "; ".join(s.note() for s in self.shown)
        return f"Original sizes (height x width) before resizing: {notes}; stored at {self.stored}."


def _sizes_of(context: AnalysisContext, s: _Splits) -> _Sizes:
    """Train sizes from the re-loaded split, eval sizes from the store (recorded at training)."""
    store = context.store
    h, w = (int(v) for v in store.attrs["input_shape"][1:3])
    train = _SplitSizes(
        "train",
        None if s.train is None else s.train.sizes,
        s.num_train,
        s.reason if s.train is None else "the dataset does not report them",
    )
    evals = _SplitSizes(
        "eval",
        store.sizes,
        store.num_images,
        "this store does not record them: it was written before explainkit did",
    )
    return _Sizes(stored=f"{h}x{w}", splits=[train, evals], evaluated=s.evaluated)


def _write_sizes(context: AnalysisContext, sizes: _Sizes) -> list[dict]:
    """A table of the sizes of both splits always; a figure when some split's sizes vary."""
    from explainkit import figures, tables

    out = context.output_dir
    rows: list[list] = []
    for split in sizes.shown:
        table = split.table()
        rows += [[split.split, *row] for row in table] or [
            [split.split, "", "", "" if split.total is None else split.total]
        ]
    tables.write_csv(out / "image_sizes.csv", ["split", "height", "width", "count"], rows)
    caption = sizes.caption()
    artifacts = []
    if sizes.varying:
        figures.save_figure(_sizes_figure(sizes), out / "image_sizes.png")
        artifacts.append(context.artifact("image_sizes.png", "Image sizes", "image", caption))
    artifacts.append(context.artifact("image_sizes.csv", "Image sizes", "table", caption))
    return artifacts


# -- step 6: the summary JSON -------------------------------------------------------------


def _write_summary(
    context: AnalysisContext, s: _Splits, st: _ChannelStats, sizes: _Sizes
) -> list[dict]:
    from explainkit import tables

    train_sizes, eval_sizes = sizes.splits
    summary = {
        "dataset": s.dataset,
        "classes": s.classes,
        "eval": {
            "source": "prediction store",
            "num_images": s.num_eval,
            "class_counts": s.eval_counts.tolist(),
            "mean": list(st.eval_mean),
            "std": list(st.eval_std),
        },
        "train": {
            "available": s.train is not None,
            "reason": s.reason,
            "num_images": s.num_train,
            "class_counts": s.train_counts.tolist() if s.train_counts is not None else None,
            "mean": list(st.train_mean),
            "std": list(st.train_std),
            "stats_source": "prediction store mean/std (computed at training time)",
        }
        if not s.evaluated
        else {"available": False, "reason": s.reason},
        "normalization": {"mean": list(st.train_mean), "std": list(st.train_std)},
        "image_sizes": {
            "stored": sizes.stored,
            "varying": sizes.varying,
            "train": train_sizes.summary(),
            "eval": eval_sizes.summary(),
        },
    }
    tables.write_json(context.output_dir / "data.json", summary)
    return [
        context.artifact(
            "data.json",
            "Data summary",
            "json",
            "Class counts, per-channel mean/std in [0,1] units and original image sizes of "
            "both splits, as in the tables above.",
        )
    ]


def _train_split(context: AnalysisContext, classes: list[str]) -> tuple[Any, str | None]:
    """The run's train split as configured, or None and the reason it is unavailable.

    Never downloads; any failure to read the data (missing folder, unreadable files) is a
    reason to skip the train figures, not an analyzer failure.
    """
    if context.config.get("command", "train") != "train":
        return None, "the run was not trained by explainkit, so it has no training split"
    try:
        ds = context.dataset_split("train")
    except (ExplainkitError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        dataset = context.config.get("config", {}).get("dataset")
        return None, f"the {dataset} training data is not available here ({first})"
    if list(ds.classes) != list(classes):
        return None, "the training data found here has other classes than the run"
    return ds, None


def _distribution_figure(
    classes: list[str], eval_counts: Any, train_counts: Any, train_reason: str | None
) -> Any:
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    from explainkit import figures

    k = len(classes)
    if k > figures.MAX_LABELED:
        return _ranked_distribution_figure(classes, eval_counts, train_counts, train_reason)
    height = max(3.0, 0.24 * k + 1.6)
    font = figures.class_font_size(k)
    y = np.arange(k)
    labels = [figures.short(c, 24) for c in classes]
    panels = [("eval split (prediction store)", eval_counts, "C1")]
    if train_counts is not None or train_reason is not None:  # None and None: never trained
        panels.append(("train split", train_counts, "C0"))
    fig = figures.new_figure(6 * len(panels), height)
    axes = [fig.add_subplot(1, len(panels), 1)]
    if len(panels) > 1:
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
        if k <= figures.MAX_LABELED:
            for yi, c in zip(y, counts, strict=True):
                ax.text(c, yi, f" {int(c)} ({100 * c / total:.0f}%)", va="center", fontsize=font)
    fig.suptitle("Class distribution", fontsize=12)
    return fig


def _ranked_distribution_figure(
    classes: list[str], eval_counts: Any, train_counts: Any, train_reason: str | None
) -> Any:
    """Many classes: images per class of each split, classes ranked by count, and the
    rarest eval classes by name (every class is in class_distribution.csv)."""
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    from explainkit import figures

    k = len(classes)
    fig = figures.new_figure(13, max(4.2, 0.3 * RAREST + 1.6))
    ranked, rare = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for name, counts, color in (("eval", eval_counts, "C1"), ("train", train_counts, "C0")):
        if counts is None:
            continue
        order = np.sort(counts)[::-1]
        label = f"{name}: min {order[-1]}, median {np.median(order):g}, max {order[0]}"
        ranked.step(np.arange(1, k + 1), order, where="mid", color=color, label=label)
    ranked.set_xlabel(f"class rank (of {k}, by images)")
    ranked.set_ylabel("images")
    ranked.set_ylim(bottom=0)
    ranked.yaxis.set_major_locator(MaxNLocator(integer=True))
    ranked.grid(alpha=0.3)
    ranked.legend(fontsize=9)
    title = "Images per class, ranked"
    if train_counts is None and train_reason:
        title += f"\n(train split not available: {figures.short(train_reason or '', 60)})"
    ranked.set_title(title, fontsize=11)
    rarest = np.lexsort((np.arange(k), eval_counts))[:RAREST]
    y = np.arange(len(rarest))
    rare.barh(y, eval_counts[rarest], color="C1", height=0.7)
    rare.set_yticks(y, [figures.short(classes[c], 28) for c in rarest], fontsize=9)
    rare.set_ylim(len(rarest) - 0.5, -0.5)
    rare.set_xlim(0, max(int(eval_counts[rarest].max()), 1) * 1.2)
    rare.set_xlabel("eval images")
    rare.xaxis.set_major_locator(MaxNLocator(integer=True))
    rare.grid(axis="x", alpha=0.3)
    rare.set_title(f"The {len(rarest)} rarest eval classes", fontsize=11)
    fig.suptitle(f"Class distribution of {k} classes", fontsize=12)
    return fig


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width)) or text


def _sizes_figure(sizes: _Sizes) -> Any:
    """Original sizes of each split: height against width, and the spread of √(h·w)."""
    import numpy as np

    from explainkit import figures

    fig = figures.new_figure(11, 4.2)
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    known = [(split, np.asarray(split.table(), np.int64)) for split in sizes.shown]
    known = [(split, table) for split, table in known if len(table)]
    peak = max(int(table[:, 2].max()) for _, table in known)
    sides = np.concatenate([np.sqrt(table[:, 0] * table[:, 1]) for _, table in known])
    bins = np.histogram_bin_edges(sides, bins=min(40, max(5, len(sides))))
    for split, table in known:
        heights, widths, counts = table[:, 0], table[:, 1], table[:, 2]
        color = "C0" if split.split == "train" else "C1"
        label = f"{split.split} ({int(counts.sum())})"
        ax1.scatter(
            widths, heights, s=20 + 280 * counts / peak, alpha=0.5, color=color,
            edgecolor="none", label=label,
        )  # fmt: skip
        ax2.hist(
            np.sqrt(heights * widths), bins=bins, weights=counts / counts.sum(), color=color,
            histtype="step", linewidth=1.8, label=label,
        )  # fmt: skip
    ax1.set_xlabel("width (px)")
    ax1.set_ylabel("height (px)")
    ax1.set_title("Original sizes (marker area ∝ images)", fontsize=11)
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=9)
    ax2.set_xlabel("√(height × width) (px)")
    ax2.set_ylabel("fraction of the split's images")
    ax2.set_title("Image size distribution", fontsize=11)
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=9)
    missing = [split.split for split in sizes.shown if not split.table()]
    title = f"Image sizes before resizing to {sizes.stored}"
    if missing:
        title += f" ({' and '.join(missing)} unknown)"
    fig.suptitle(title)
    return fig


@hookimpl
def register_analyzers(register):
    register(DataAnalyzer)
