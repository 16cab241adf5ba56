"""Built-in analyzer ``evolution``: how the model's attention forms during training.

Grad-CAM (or another native CAM) of the same eval images at every saved epoch checkpoint,
shown as a grid (rows: images, columns: epochs), and the faithfulness (deletion/insertion
AUC) and localization (pointing game, energy in mask, when the store has masks) of the maps
against the epoch. Maps explain the *true* class, so every epoch answers the same question.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import click

from explainkit import hookimpl
from explainkit.analyzer import AnalysisContext, Analyzer, Option
from explainkit.errors import AnalyzerError
from explainkit.explain.methods import CAM_METHODS

__all__ = ["EvolutionAnalyzer"]

HEADER = ("epoch", "metric", "mean", "ci_low", "ci_high", "n")
MAX_GRID_EPOCHS = 12  # columns of maps in the grid; the metrics cover every saved epoch


class EvolutionAnalyzer(Analyzer):
    """CAMs of fixed images at every saved epoch, plus their quality against the epoch.

    Example:
        explainkit analyze runs/shapes --plugin evolution --evolution-count 12
    """

    name = "evolution"
    title = "Attention during training"
    summary = (
        "Grad-CAM of the same images at every saved epoch (grid) and deletion AUC / "
        "localization against the epoch."
    )
    order = 75
    needs = frozenset({"store", "checkpoint"})
    options = (
        Option("count", click.IntRange(1, 64), 8, "Images in the grid (rows)."),
        Option("layer", str, None, "Target layer (default: the run's default layer)."),
        Option("method", str, "gradcam", "CAM method of the maps.", choices=CAM_METHODS),
        Option(
            "metric_count",
            click.IntRange(1),
            128,
            "Eval images (seeded sample) for the deletion AUC and localization per epoch.",
        ),
        Option("steps", click.IntRange(1, 256), 16, "Deletion/insertion steps."),
    )

    def run(
        self,
        context: AnalysisContext,
        *,
        count: int,
        layer: str | None,
        method: str,
        metric_count: int,
        steps: int,
    ) -> list[dict]:
        epochs = _checkpoint_epochs(context)
        layer = context.target_layer(layer, context.model())
        inputs = _Inputs.sample(context, count, metric_count)
        grid, per_epoch = _explain_epochs(context, epochs, inputs, layer, method, steps)
        result = _Evolution(
            method=method,
            layer=layer,
            steps=steps,
            epochs=epochs,
            eval_acc=_eval_accuracy(context.store.history),
            inputs=inputs,
            grid=grid,
            rows=_table(per_epoch, context.seed),
        )
        return [
            *_write_grid(context, result),
            *_write_metrics(context, result),
            *_write_json(context, result),
        ]


# -- step 1: the checkpoints and the images -----------------------------------------------


def _checkpoint_epochs(context: AnalysisContext) -> list[int]:
    """The epochs with a checkpoint, in order; an error when the run kept none."""
    epochs = context.checkpoint_epochs()
    if not epochs:
        raise AnalyzerError(
            f"{context.run_dir} has no per-epoch checkpoints (checkpoints/epoch_NNN.pt); "
            "train with checkpoints kept to see the evolution"
        )
    return epochs


@dataclass
class _Inputs:
    """The grid's images (spread over classes) and the metric sample, on the device.

    Both are drawn from one seeded sample; the maps explain each image's true class.
    """

    grid_idx: Any  # store positions of the grid's rows
    metric_idx: Any  # store positions of the metric sample
    grid_x: Any
    grid_t: Any
    metric_x: Any
    metric_t: Any
    masks: Any  # ground-truth masks of the metric sample, or None

    @classmethod
    def sample(cls, context: AnalysisContext, count: int, metric_count: int) -> _Inputs:
        import torch

        from explainkit.selection import sample_indices, spread_over_classes

        store, device, targets = context.store, context.device, context.store.targets
        sample = sample_indices(store.num_images, max(count, metric_count), context.rng)
        grid_idx = spread_over_classes(sample, targets[sample], count)
        metric_idx = sample[:metric_count]
        masks = None
        if store.has_masks:
            masks = torch.from_numpy(store.masks[metric_idx]).to(device)
        return cls(
            grid_idx=grid_idx,
            metric_idx=metric_idx,
            grid_x=context.normalize(store.images(grid_idx)),
            grid_t=torch.as_tensor(targets[grid_idx], device=device),
            metric_x=context.normalize(store.images(metric_idx)),
            metric_t=torch.as_tensor(targets[metric_idx], device=device),
            masks=masks,
        )


# -- step 2: maps and metrics at every saved epoch ----------------------------------------


@dataclass
class _Grid:
    """The grid's maps and true-class probabilities, (images, epochs, ...) numpy arrays."""

    maps: Any  # (count, epochs, H, W)
    probs: Any  # (count, epochs)


def _explain_epochs(
    context: AnalysisContext,
    epochs: list[int],
    inputs: _Inputs,
    layer: str,
    method: str,
    steps: int,
) -> tuple[_Grid, dict[int, dict[str, Any]]]:
    """Explain the inputs with each epoch's model in turn (one in memory at a time)."""
    import torch

    from explainkit.explain.gradcam import compute_cam

    bs = context.batch_size
    reshape = context.layer_reshape(layer)
    gen = torch.Generator().manual_seed(context.seed)
    grid_maps, grid_probs = [], []
    per_epoch: dict[int, dict[str, Any]] = {}
    started = time.perf_counter()
    for i, epoch in enumerate(context.progress(epochs, desc="epochs")):
        if i == 1 and len(epochs) > 2:  # timed on the first epoch, said before the rest
            n = len(inputs.metric_t)
            context.estimate(
                f"{len(epochs)} saved epochs, {n} images each",
                (time.perf_counter() - started) * (len(epochs) - 1),
                "--evolution-metric-count sets how many images",
            )
        model = context.model(epoch)  # one at a time: only the analyzed epoch's is kept
        res = compute_cam(
            model, inputs.grid_x, layer, method, target=inputs.grid_t, batch_size=bs,
            reshape=reshape,
        )  # fmt: skip
        grid_maps.append(res.maps)
        grid_probs.append(res.logits.float().softmax(1).gather(1, inputs.grid_t[:, None])[:, 0])
        per_epoch[epoch] = _epoch_metrics(model, inputs, (layer, reshape), method, steps, bs, gen)
        del model
    grid = _Grid(
        maps=torch.stack(grid_maps, 1).cpu().numpy(),
        probs=torch.stack(grid_probs, 1).cpu().numpy(),
    )
    return grid, per_epoch


def _epoch_metrics(
    model: Any,
    inputs: _Inputs,
    layer: tuple[str, str],
    method: str,
    steps: int,
    bs: int,
    gen: Any,
) -> dict[str, Any]:
    """Per-image deletion/insertion AUC (and localization with masks) of one epoch's maps."""
    from explainkit.explain import metrics as M
    from explainkit.explain.gradcam import compute_cam

    x, t = inputs.metric_x, inputs.metric_t
    name, reshape = layer  # the layer and how its output becomes maps
    maps = compute_cam(model, x, name, method, target=t, batch_size=bs, reshape=reshape).maps
    c = M.perturbation_curves(model, x, maps, t, steps=steps, max_batch=8 * bs, generator=gen)
    values = {"deletion_auc": c.deletion_auc, "insertion_auc": c.insertion_auc}
    if inputs.masks is not None:
        values["pointing_game"] = M.pointing_game(maps, inputs.masks).double()
        values["energy_in_mask"] = M.energy_in_mask(maps, inputs.masks)
    return values


def _table(per_epoch: dict[int, dict[str, Any]], seed: int) -> list[dict]:
    """One row per (epoch, metric): mean, 95% bootstrap CI and n."""
    from explainkit.explain.stats import summarize

    return [
        {"epoch": epoch, "metric": metric, **summarize(v, seed=seed)}
        for epoch, values in per_epoch.items()
        for metric, v in values.items()
    ]


# -- step 3: figures, table and JSON ------------------------------------------------------


@dataclass
class _Evolution:
    """Everything the files show: the grid's maps and the metric table of every epoch."""

    method: str
    layer: str
    steps: int
    epochs: list[int]
    eval_acc: dict[int, float]
    inputs: _Inputs
    grid: _Grid
    rows: list[dict]

    @property
    def has_masks(self) -> bool:
        return self.inputs.masks is not None


def _eval_accuracy(history: dict) -> dict[int, float]:
    return {int(e): float(a) for e, a in zip(history["epoch"], history["eval_acc"], strict=True)}


def _write_grid(context: AnalysisContext, r: _Evolution) -> list[dict]:
    import numpy as np

    from explainkit.figures import save_figure

    store, idx = context.store, r.inputs.grid_idx
    cols = np.unique(np.linspace(0, len(r.epochs) - 1, min(MAX_GRID_EPOCHS, len(r.epochs))).round())
    cols = cols.astype(int)  # evenly spaced saved epochs, the first and the last included
    epochs = [r.epochs[i] for i in cols]
    fig = _grid_figure(store.images(idx), r.grid.maps[:, cols], r.grid.probs[:, cols], epochs,
                       idx, store.targets[idx], context.classes, r.method, r.layer)  # fmt: skip
    save_figure(fig, context.output_dir / "evolution.png")
    which = f"each of {len(epochs)}" if len(epochs) == len(r.epochs) else (
        f"{len(epochs)} evenly spaced of the {len(r.epochs)}"
    )  # fmt: skip
    return [
        context.artifact(
            "evolution.png",
            f"{r.method} across training",
            "image",
            f"Rows: {len(idx)} eval images; columns: the image, then the {r.method} map "
            f"of its true class at {which} saved epoch(s) (layer {r.layer}); "
            "captions: probability of the true class.",
        )
    ]


def _write_metrics(context: AnalysisContext, r: _Evolution) -> list[dict]:
    from explainkit import figures, tables

    out, n = context.output_dir, len(r.inputs.metric_idx)
    fig = _metrics_figure(r.rows, r.epochs, r.eval_acc, r.has_masks, n, r.method)
    figures.save_figure(fig, out / "evolution_metrics.png")
    tables.write_csv(out / "evolution.csv", HEADER, [[row[h] for h in HEADER] for row in r.rows])
    return [
        context.artifact(
            "evolution_metrics.png",
            "Map quality against the epoch",
            "image",
            f"Deletion/insertion AUC{' and localization' if r.has_masks else ''} of the "
            f"{r.method} maps of {n} eval images per saved epoch, with 95% bootstrap CIs.",
        ),
        context.artifact(
            "evolution.csv",
            "Map quality per epoch",
            "table",
            "Mean, 95% bootstrap CI and n of each metric at each saved epoch.",
        ),
    ]


def _write_json(context: AnalysisContext, r: _Evolution) -> list[dict]:
    from explainkit.tables import write_json

    probs = r.grid.probs
    write_json(
        context.output_dir / "evolution.json",
        {
            "epochs": r.epochs,
            "method": r.method,
            "layer": r.layer,
            "target": "true",
            "steps": r.steps,
            "grid_images": r.inputs.grid_idx.tolist(),
            "grid_true_prob": {str(e): probs[:, i].tolist() for i, e in enumerate(r.epochs)},
            "metric_images": int(len(r.inputs.metric_idx)),
            "eval_acc": {str(e): r.eval_acc.get(e) for e in r.epochs},
            "has_masks": r.has_masks,
            "table": r.rows,
        },
    )
    return [
        context.artifact(
            "evolution.json",
            "Evolution data",
            "json",
            "Epochs, the grid's images and true-class probabilities, and the metric table.",
        )
    ]


def _grid_figure(
    images: Any,
    maps: Any,
    probs: Any,
    epochs: list[int],
    indices: Any,
    targets: Any,
    classes: list[str],
    method: str,
    layer: str,
) -> Any:
    import numpy as np

    from explainkit import figures

    jet = figures.get_colormap("jet")
    n, e = maps.shape[:2]
    tiles, captions = [], []
    for i in range(n):
        tiles.append(images[i])
        captions.append(f"{figures.short(classes[targets[i]], 12)}\n#{indices[i]}")
        blended = figures.overlay(np.repeat(images[i][None], e, 0), maps[i], jet, 0.5)
        for j in range(e):
            tiles.append(blended[j])
            captions.append(f"epoch {epochs[j]}\np={probs[i, j]:.2f}")
    return figures.grid_figure(
        np.stack(tiles),
        cols=e + 1,
        captions=captions,
        title=f"{method} ({layer}) of the true class at each saved epoch",
        tile_px=96,
    )


def _metrics_figure(
    rows: list[dict], epochs: list[int], acc: dict[int, float], masks: bool, n: int, method: str
) -> Any:
    from explainkit.figures import new_figure

    panels = [("deletion_auc", "insertion_auc")]
    if masks:
        panels.append(("pointing_game", "energy_in_mask"))
    fig = new_figure(6 * len(panels) + 1, 4.2)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    lookup = {(r["epoch"], r["metric"]): r for r in rows}
    for ax, metrics in zip(axes, panels, strict=True):
        for metric in metrics:
            rs = [lookup[(e, metric)] for e in epochs]
            mean = [r["mean"] for r in rs]
            line = ax.plot(epochs, mean, marker="o", label=metric.replace("_", " "))[0]
            ax.fill_between(epochs, [r["ci_low"] for r in rs], [r["ci_high"] for r in rs],
                            color=line.get_color(), alpha=0.2, lw=0)  # fmt: skip
        accs = [acc.get(e) for e in epochs]
        if all(a is not None for a in accs):
            ax.plot(epochs, accs, ls=":", color="0.4", label="eval accuracy")
        ax.set_xlabel("epoch")
        ax.set_ylim(0, 1.02)
        if len(epochs) == 1:
            ax.set_xlim(epochs[0] - 1, epochs[0] + 1)
        ax.set_xticks(epochs if len(epochs) <= 20 else epochs[:: max(1, len(epochs) // 10)])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title(
            "Faithfulness (deletion lower, insertion higher is better)"
            if metrics[0] == "deletion_auc"
            else "Localization with ground-truth masks"
        )
    fig.suptitle(f"{method} maps of {n} eval images across training (95% bootstrap CI)")
    return fig


@hookimpl
def register_analyzers(register):
    register(EvolutionAnalyzer)
