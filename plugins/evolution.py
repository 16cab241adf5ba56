"""Built-in analyzer ``evolution``: how the model's attention forms during training.

Grad-CAM (or another native CAM) of the same eval images at every saved epoch checkpoint,
shown as a grid (rows: images, columns: epochs), and the faithfulness (deletion/insertion
AUC) and localization (pointing game, energy in mask, when the store has masks) of the maps
against the epoch. Maps explain the *true* class, so every epoch answers the same question.
"""

from __future__ import annotations

from typing import Any

import click

from explainkit import hookimpl
from explainkit.analyzer import AnalysisContext, Analyzer, Option
from explainkit.errors import AnalyzerError

__all__ = ["EvolutionAnalyzer", "overlay"]

CAM_CHOICES = ("gradcam", "gradcampp", "xgradcam", "layercam")
HEADER = ("epoch", "metric", "mean", "ci_low", "ci_high", "n")


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
        Option("method", str, "gradcam", "CAM method of the maps.", choices=CAM_CHOICES),
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
        import torch
        from explainkit.plugins import _plot
        from explainkit.plugins.quality import select_images

        from explainkit.explain import metrics as M
        from explainkit.explain.gradcam import compute_cam, resolve_layer
        from explainkit.train.checkpoint import list_checkpoints, load_model

        store = context.store
        checkpoints = list_checkpoints(context.run_dir)
        if not checkpoints:
            raise AnalyzerError(
                f"{context.run_dir} has no per-epoch checkpoints (checkpoints/epoch_NNN.pt); "
                "train with checkpoints kept to see the evolution."
            )
        epochs = list(checkpoints)
        layer = layer or store.attrs.get("default_layer") or "layer4"
        sample = select_images(store.num_images, max(count, metric_count), context.rng)
        grid_idx = _spread(sample, store.targets[sample], count)
        metric_idx = sample[:metric_count]
        grid_x = context.normalize(store.images(grid_idx))
        metric_x = context.normalize(store.images(metric_idx))
        device = context.device
        grid_t = torch.as_tensor(store.targets[grid_idx], device=device)
        metric_t = torch.as_tensor(store.targets[metric_idx], device=device)
        masks = None
        if store.has_masks:
            masks = torch.from_numpy(store.masks[metric_idx]).to(device)
        bs = context.batch_size
        gen = torch.Generator().manual_seed(context.seed)

        grid_maps, grid_probs = [], []
        per_epoch: dict[int, dict[str, Any]] = {}
        for epoch in context.progress(epochs, desc="epochs"):
            model = load_model(checkpoints[epoch], device=device)
            for p in model.parameters():
                p.requires_grad_(False)
            resolve_layer(model, layer)
            res = compute_cam(model, grid_x, layer, method, target=grid_t, batch_size=bs)
            grid_maps.append(res.maps)
            grid_probs.append(res.logits.float().softmax(1).gather(1, grid_t[:, None])[:, 0])
            maps = compute_cam(model, metric_x, layer, method, target=metric_t, batch_size=bs).maps
            c = M.perturbation_curves(
                model, metric_x, maps, metric_t, steps=steps, max_batch=8 * bs, generator=gen
            )
            values = {"deletion_auc": c.deletion_auc, "insertion_auc": c.insertion_auc}
            if masks is not None:
                values["pointing_game"] = M.pointing_game(maps, masks).double()
                values["energy_in_mask"] = M.energy_in_mask(maps, masks)
            per_epoch[epoch] = values
            del model

        rows = []
        for epoch, values in per_epoch.items():
            for metric, v in values.items():
                mean, low, high, n = M.bootstrap_ci(v, seed=context.seed)
                rows.append({"epoch": epoch, "metric": metric, "mean": mean, "ci_low": low,
                             "ci_high": high, "n": n})  # fmt: skip
        maps_np = torch.stack(grid_maps, 1).cpu().numpy()  # (count, epochs, H, W)
        probs_np = torch.stack(grid_probs, 1).cpu().numpy()
        history = store.history
        acc = {int(e): float(a) for e, a in zip(history["epoch"], history["eval_acc"], strict=True)}

        out = context.output_dir
        classes = context.classes
        images = store.images(grid_idx)
        fig = _grid_figure(images, maps_np, probs_np, epochs, grid_idx, store.targets[grid_idx],
                           classes, method, layer)  # fmt: skip
        _plot.save_figure(fig, out / "evolution.png")
        artifacts = [
            context.artifact(
                "evolution.png",
                f"{method} across training",
                "image",
                f"Rows: {len(grid_idx)} eval images; columns: the image, then the {method} map "
                f"of its true class at each of {len(epochs)} saved epoch(s) (layer {layer}); "
                "captions: probability of the true class.",
            )  # fmt: skip
        ]
        fig = _metrics_figure(rows, epochs, acc, masks is not None, len(metric_idx), method)
        _plot.save_figure(fig, out / "evolution_metrics.png")
        artifacts.append(
            context.artifact(
                "evolution_metrics.png",
                "Map quality against the epoch",
                "image",
                f"Deletion/insertion AUC{' and localization' if masks is not None else ''} of "
                f"the {method} maps of {len(metric_idx)} eval images per saved epoch, with 95% "
                "bootstrap CIs.",
            )  # fmt: skip
        )
        _plot.write_csv(out / "evolution.csv", HEADER, [[r[h] for h in HEADER] for r in rows])
        artifacts.append(
            context.artifact(
                "evolution.csv",
                "Map quality per epoch",
                "table",
                "Mean, 95% bootstrap CI and n of each metric at each saved epoch.",
            )  # fmt: skip
        )
        _plot.write_json(
            out / "evolution.json",
            {
                "epochs": epochs,
                "method": method,
                "layer": layer,
                "target": "true",
                "steps": steps,
                "grid_images": grid_idx.tolist(),
                "grid_true_prob": {str(e): probs_np[:, i].tolist() for i, e in enumerate(epochs)},
                "metric_images": int(len(metric_idx)),
                "eval_acc": {str(e): acc.get(e) for e in epochs},
                "has_masks": masks is not None,
                "table": rows,
            },
        )
        artifacts.append(
            context.artifact(
                "evolution.json",
                "Evolution data",
                "json",
                "Epochs, the grid's images and true-class probabilities, and the metric table.",
            )  # fmt: skip
        )
        return artifacts


def _spread(sample: Any, labels: Any, count: int) -> Any:
    """Up to ``count`` positions from ``sample``, round-robin over classes (more variety)."""
    import numpy as np

    by_class = {c: list(sample[labels == c]) for c in np.unique(labels)}
    chosen: list[int] = []
    while len(chosen) < min(count, len(sample)):
        for c in list(by_class):
            if by_class[c] and len(chosen) < count:
                chosen.append(int(by_class[c].pop(0)))
    return np.sort(np.asarray(chosen, dtype=np.int64))


def overlay(images: Any, maps: Any, alpha: float = 0.5) -> Any:
    """uint8 (N,H,W,3) images blended with (N,H,W) [0, 1] maps in the jet colormap."""
    import numpy as np
    from matplotlib import colormaps

    heat = colormaps["jet"](np.clip(maps, 0, 1))[..., :3]
    return ((1 - alpha) * images / 255.0 + alpha * heat).clip(0, 1).__mul__(255).astype(np.uint8)


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
    from explainkit.plugins import _plot

    n, e = maps.shape[:2]
    tiles, captions = [], []
    for i in range(n):
        tiles.append(images[i])
        captions.append(f"{_plot.short(classes[targets[i]], 12)}\n#{indices[i]}")
        blended = overlay(np.repeat(images[i][None], e, 0), maps[i])
        for j in range(e):
            tiles.append(blended[j])
            captions.append(f"epoch {epochs[j]}\np={probs[i, j]:.2f}")
    return _plot.grid_figure(
        np.stack(tiles),
        cols=e + 1,
        captions=captions,
        title=f"{method} ({layer}) of the true class at each saved epoch",
        tile_px=96,
    )


def _metrics_figure(
    rows: list[dict], epochs: list[int], acc: dict[int, float], masks: bool, n: int, method: str
) -> Any:
    from explainkit.plugins import _plot

    panels = [("deletion_auc", "insertion_auc")]
    if masks:
        panels.append(("pointing_game", "energy_in_mask"))
    fig = _plot.new_figure(6 * len(panels) + 1, 4.2)
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
