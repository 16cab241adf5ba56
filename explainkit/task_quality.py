"""The ``quality`` analyzer on a multi-label, segmentation or detection run.

A seeded sample of the run's items (:mod:`explainkit.task_explain`: detections, class
regions, labels) is explained by each CAM method and by the random baseline, then judged:

- **faithfulness**: deletion and insertion (Petsiuk et al. 2018) on the item's own bounded
  score (the matched detection's confidence, the class's mean probability over its region,
  the label's sigmoid), and each method's gain over the random baseline;
- **localization** against the ground truth: the pointing game (is the map's maximum inside
  the true box or mask?) and the share of the map's energy inside it, for the items that have
  a ground-truth region (a false detection has none).

Each number is a mean over items with a 95% bootstrap confidence interval, as on a
classifier run. ROAD and the randomization sanity check stay the classifier's.
"""

from __future__ import annotations

from typing import Any

from explainkit.analyzer import AnalysisContext
from explainkit.errors import AnalyzerError

__all__ = ["assess_task_run", "localization"]

HEADER = ("method", "metric", "mean", "ci_low", "ci_high", "n")
CLASS_HEADER = ("method", "metric", "class", "mean", "ci_low", "ci_high", "n")
SCORE_NAME = {
    "detection": "confidence of the matched detection",
    "segmentation": "mean class probability over the region",
    "multilabel": "probability (sigmoid) of the label",
}
NOT_RUN = "ROAD and the randomization sanity check are run on classifier runs only"


def localization(maps: Any, regions: Any) -> tuple[Any, Any]:
    """Per map, the pointing game (its maximum inside the region: 1.0 or 0.0) and the share
    of its energy inside the region; ``maps`` (M, H, W) non-negative, ``regions`` (M, H, W)."""
    import torch

    from explainkit.explain.metrics import energy_in_mask, pointing_game

    maps = torch.as_tensor(maps).float()
    regions = torch.as_tensor(regions).to(maps.device)
    return pointing_game(maps, regions).double(), energy_in_mask(maps, regions)


def assess_task_run(
    context: AnalysisContext,
    *,
    methods: str,
    count: int,
    steps: int,
    baseline: str,
    layer: str | None,
    target: str,
) -> list[dict]:
    """Faithfulness and localization of each method on a sample of a task run's items."""
    from explainkit.explain.methods import parse_methods
    from explainkit.explain.stats import curve_summary
    from explainkit.task_explain import explained_model

    store = context.store
    names = _methods(parse_methods(methods, "--quality-methods"))
    sample, total, regions, truth = _sample(context, count, target)
    model = context.model()
    layer = context.target_layer(layer, model)
    explained = explained_model(model, store.task)
    images = _images(context, sample)
    maps = _maps(context, explained, model, layer, names, images, sample, regions)
    scores, curves = _scores(
        context, explained, images, maps, sample, regions, truth, (steps, baseline)
    )
    rows, class_rows = _tables(context, scores, names, sample, truth[1])
    _write_per_image(context, sample, scores, truth[1])
    known = truth[1]
    fraction = float(truth[0][known].mean()) if known.any() else None
    report = {
        "task": store.task,
        "epoch": context.epoch,
        "layer": layer,
        "target": target,
        "count": len(sample),
        "items_in_run": total,
        "steps": steps,
        "baseline": baseline,
        "methods": names,
        "score": SCORE_NAME[store.task],
        "confidence": 0.95,
        "bootstrap_resamples": 1000,
        "table": rows,
        "per_class": class_rows,
        "curves": {name: curve_summary(c, context.seed) for name, c in curves.items()},
        "localization": {
            "region": truth[2],
            "items_with_region": int(known.sum()),
            "mask_fraction": fraction,
        }
        if known.any()
        else None,
        "localization_skipped": None if known.any() else f"no item has a region ({truth[2]})",
        "road": None,
        "sanity": None,
        "not_run": NOT_RUN,
    }
    return _write_outputs(context, report)


def _methods(names: list[str]) -> list[str]:
    """The methods asked for, the random baseline last."""
    return [n for n in names if n != "random"] + ["random"]


def _sample(context: AnalysisContext, count: int, target: str) -> tuple[Any, int, Any, tuple]:
    """A seeded sample of the run's items, how many there are, their target regions
    (segmentation) and their ground truth: (regions, known, what)."""
    from explainkit.selection import sample_indices
    from explainkit.task_explain import choose_items, target_regions, truth_regions

    store = context.store
    items = choose_items(store, context.epoch, target)
    if not len(items):
        raise AnalyzerError(
            f"this {store.task} run has no {target} items to explain at epoch {context.epoch}"
        )
    sample = items.take(sample_indices(len(items), count, context.rng))
    return (
        sample,
        len(items),
        target_regions(store, context.epoch, sample),
        truth_regions(store, sample),
    )


def _images(context: AnalysisContext, sample: Any) -> Any:
    """The sampled items' images, normalized, on the device (an image once per item)."""
    import numpy as np
    import torch

    unique, inverse = np.unique(sample.image, return_inverse=True)
    parts = [context.normalize(context.store.images(unique[s : s + 256]))
             for s in range(0, len(unique), 256)]  # fmt: skip
    return torch.cat(parts)[torch.from_numpy(inverse.reshape(-1)).to(context.device)]


def _maps(
    context: AnalysisContext, explained: Any, model: Any, layer: str, names: list[str],
    images: Any, sample: Any, regions: Any,
) -> dict[str, Any]:  # fmt: skip
    """Each method's (M, H, W) maps: the native CAMs from one pass per batch, the others
    (Captum's, the perturbation CAMs, random) one by one, all on the items' targets."""
    from explainkit.explain.attribution import attribute, attribution_fn
    from explainkit.explain.gradcam import CAM_CLASSES, compute_cams
    from explainkit.task_explain import item_target

    target, reshape = item_target(sample, regions), context.layer_reshape(layer)
    bs = max(1, int(context.batch_size))
    cams = [n for n in names if n in CAM_CLASSES]
    out: dict[str, Any] = {}
    if cams:
        module = dict(model.named_modules())[layer]
        results = compute_cams(explained, images, module, cams, target=target, batch_size=bs,
                               reshape=reshape)  # fmt: skip
        out = {name: r.maps.detach().float() for name, r in results.items()}
    # The explained model wraps a detector: its layers' names gain the wrapper's prefix.
    inner = layer if explained is model else f"model.{layer}"
    for name in (n for n in names if n not in out):
        fn = attribution_fn(name, layer=inner, seed=context.seed, reshape=reshape)
        out[name] = attribute(fn, explained, images, target, bs).detach().float()
    return {name: out[name] for name in names}


def _scores(
    context: AnalysisContext, explained: Any, images: Any, maps: dict, sample: Any,
    regions: Any, truth: tuple, settings: tuple[int, str],
) -> tuple[dict, dict]:  # fmt: skip
    """(method, metric) -> per-item values, and each method's deletion/insertion curves."""
    import torch

    from explainkit.task_explain import score_target, target_curves

    steps, baseline = settings
    score = score_target(sample, regions)
    gen = torch.Generator().manual_seed(context.seed)
    curves, scores = {}, {}
    bs = max(1, int(context.batch_size))
    for name in context.progress(list(maps), desc="deletion/insertion"):
        curves[name] = target_curves(
            explained, images, maps[name], score, steps=steps, baseline=baseline,
            max_batch=8 * bs, generator=gen,
        )  # fmt: skip
        scores[(name, "deletion_auc")] = curves[name].deletion_auc
        scores[(name, "insertion_auc")] = curves[name].insertion_auc
    rnd = curves["random"]
    for name, c in curves.items():
        if name != "random":
            scores[(name, "deletion_gain_vs_random")] = rnd.deletion_auc - c.deletion_auc
            scores[(name, "insertion_gain_vs_random")] = c.insertion_auc - rnd.insertion_auc
    regions_true, known = truth[0], torch.from_numpy(truth[1])
    if known.any():
        for name in maps:
            kept = maps[name][known.to(maps[name].device)]
            pointing, energy = localization(kept, regions_true[truth[1]])
            scores[(name, "pointing_game")] = pointing
            scores[(name, "energy_in_mask")] = energy
    return scores, curves


def _tables(
    context: AnalysisContext, scores: dict, names: list[str], sample: Any, known: Any
) -> tuple[list[dict], list[dict]]:
    """Table rows (method, metric) and localization rows per class of the explained item."""
    from explainkit.explain.stats import summarize

    seed = context.seed
    host = {k: v.detach().double().cpu().numpy() for k, v in scores.items()}
    rows = [{"method": n, "metric": m, **summarize(host[(n, m)], seed)} for n, m in host]
    class_rows = []
    classes = sample.cls[known]
    for name in names:
        for metric in ("pointing_game", "energy_in_mask"):
            if (name, metric) not in host:
                continue
            for k, cls in enumerate(context.classes):
                sel = host[(name, metric)][classes == k]
                if sel.size:
                    row = {"method": name, "metric": metric, **summarize(sel, seed)}
                    class_rows.append({"class": cls, **row})
    return rows, class_rows


def _write_per_image(context: AnalysisContext, sample: Any, scores: dict, known: Any) -> None:
    """per_item.csv: each sampled item (its image and class) and its scores; localization is
    empty for an item without a ground-truth region."""
    import numpy as np

    from explainkit.tables import write_csv

    m, columns = len(sample), []
    for values in scores.values():
        values = values.detach().double().cpu().numpy()
        if values.shape[0] != m:  # localization: only the items with a region
            full = np.full(m, np.nan)
            full[known] = values
            values = full
        columns.append(values)
    header = ["image", "class", *(f"{n}:{metric}" for n, metric in scores)]
    rows = [
        [int(sample.image[j]), context.classes[int(sample.cls[j])],
         *("" if np.isnan(c[j]) else float(c[j]) for c in columns)]
        for j in range(m)
    ]  # fmt: skip
    write_csv(context.output_dir / "per_item.csv", header, rows)


def _write_outputs(context: AnalysisContext, report: dict) -> list[dict]:
    """quality.csv, quality.json, per-class localization and the figures, with records."""
    from explainkit.figures import save_figure
    from explainkit.quality_figures import curves_figure, localization_figure, per_class_figure
    from explainkit.tables import write_csv, write_json

    out, n, task = context.output_dir, report["count"], report["task"]
    rows, class_rows, names = report["table"], report["per_class"], report["methods"]
    write_csv(out / "quality.csv", HEADER, [[r[h] for h in HEADER] for r in rows])
    write_json(out / "quality.json", report)
    fig = curves_figure(report["curves"], n, report["baseline"], report["epoch"])
    for ax in fig.axes[:2]:
        ax.set_ylabel(report["score"])
    fig.suptitle(f"Deletion / insertion of {n} {task} items' scores, epoch {report['epoch']}, "
                 f"{report['baseline']} baseline")  # fmt: skip
    save_figure(fig, out / "deletion_insertion.png")
    artifacts = [
        context.artifact(
            "quality.csv",
            "Explanation quality table",
            "table",
            f"Mean and 95% bootstrap CI (1000 resamples) over {n} sampled {task} items "
            f"(of {report['items_in_run']}), per method and metric. {NOT_RUN}.",
        ),  # fmt: skip
        context.artifact(
            "quality.json",
            "Explanation quality (all results)",
            "json",
            "Table, per-class localization, mean curves and what each score is.",
        ),  # fmt: skip
        context.artifact(
            "per_item.csv",
            "Scores per item",
            "table",
            "Each sampled item (image, class) and its deletion/insertion AUCs.",
        ),  # fmt: skip
        context.artifact(
            "deletion_insertion.png",
            "Deletion and insertion curves",
            "image",
            f"Mean {report['score']} as the most-attributed pixels are removed (deletion, lower "
            f"AUC is better) or added (insertion, higher is better); {report['baseline']} "
            f"baseline, {report['steps']} steps, {n} items, bands: 95% bootstrap CI.",
        ),  # fmt: skip
    ]
    loc = report["localization"]
    if loc is None:
        return artifacts
    k = loc["items_with_region"]
    fig = localization_figure(rows, names, loc["mask_fraction"], k)
    fig.suptitle(f"Localization against the ground truth ({k} {task} items, 95% bootstrap CI)")
    save_figure(fig, out / "localization.png")
    write_csv(out / "localization_per_class.csv", CLASS_HEADER,
              [[r[h] for h in CLASS_HEADER] for r in class_rows])  # fmt: skip
    save_figure(per_class_figure(class_rows, names, context.classes),
                out / "localization_per_class.png")  # fmt: skip
    return artifacts + [
        context.artifact(
            "localization.png",
            "Localization (pointing game, energy in the true region)",
            "image",
            f"{k} items with a ground-truth region ({loc['region']}); error bars: 95% bootstrap "
            "CI; dashed: a map that knows nothing (the region's mean share of the image).",
        ),  # fmt: skip
        context.artifact(
            "localization_per_class.csv",
            "Localization per class",
            "table",
            "Pointing game and energy in the true region per explained class, 95% CIs.",
        ),  # fmt: skip
        context.artifact(
            "localization_per_class.png",
            "Localization per class",
            "image",
            "Pointing-game hit rate and energy in the true region per explained class, 95% CIs.",
        ),  # fmt: skip
    ]
