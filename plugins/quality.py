"""Built-in analyzer ``quality``: can these saliency maps be trusted?

Faithfulness (deletion/insertion against a random order, ROAD most/least relevant first,
Average Drop / Increase in Confidence), the model-parameter randomization sanity check and,
when the store has object masks, localization (pointing game, energy in the mask). Every
number comes with the image count and a bootstrap confidence interval. The metrics live in
:mod:`explainkit.explain.metrics` and :mod:`explainkit.explain.metrics_road`; this module
chooses images, runs them and writes tables and figures. See docs/explanation-quality.md
for how to read them.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

import click

from explainkit import hookimpl
from explainkit.analyzer import AnalysisContext, Analyzer, Option
from explainkit.quality_figures import (
    curves_figure,
    localization_figure,
    per_class_figure,
    road_figure,
    sanity_figure,
)

__all__ = ["QualityAnalyzer"]

TARGETS = ("predicted", "true")
# explainkit.task_explain.TASKS: runs assessed per item by explainkit.task_quality.
TASKS = ("multilabel", "segmentation", "detection")
HEADER = ("method", "metric", "mean", "ci_low", "ci_high", "n")
CLASS_HEADER = ("method", "metric", "class", "mean", "ci_low", "ci_high", "n")
DEFAULT_METHODS = ",".join(
    ["gradcam", "gradcampp", "random"]
    + (["saliency"] if importlib.util.find_spec("captum") is not None else [])
)
_CHANCE_NOTE = (
    "A map that knows nothing about the object hits it in the pointing game, and puts energy "
    "inside it, in proportion to the mask's area: mask_fraction is that chance level."
)


@dataclass
class _Sample:
    """The evaluated images, on the model's device."""

    indices: Any
    images: Any
    labels: Any
    targets: Any
    masks: Any


class QualityAnalyzer(Analyzer):
    """Faithfulness, sanity and localization of attribution methods, with confidence intervals.

    Example:
        explainkit analyze runs/shapes --plugin quality --quality-methods gradcam,saliency,random
    """

    name = "quality"
    title = "Explanation quality"
    summary = (
        "Are the maps true? Deletion/insertion AUC, randomization sanity check and "
        "localization (masks), with bootstrap CIs."
    )
    order = 70
    needs = frozenset({"store", "checkpoint"})
    tasks = ("classification", *TASKS)
    options = (
        Option(
            "methods",
            str,
            DEFAULT_METHODS,
            "Comma-separated attribution methods (any native CAM: gradcam, hirescam, eigencam, "
            "shapleycam, ... (explainkit plugins lists them); scorecam, sscam, iscam, "
            "ablationcam, rise; with Captum: saliency, "
            "integrated_gradients, deeplift, gradient_shap, lrp, ...; smoothgrad:NAME of any; "
            "random). random is always added as the baseline.",
        ),
        Option("count", click.IntRange(1), 256, "Eval images to evaluate (seeded sample)."),
        Option("steps", click.IntRange(1, 256), 16, "Deletion/insertion steps."),
        Option(
            "baseline",
            str,
            "blur",
            "What removed pixels become: the blurred image or the dataset mean.",
            choices=("blur", "mean"),
        ),
        Option(
            "road",
            bool,
            True,
            "ROAD: remove 10-90% of the pixels, most and least relevant first, filled by noisy "
            "linear imputation.",
        ),
        Option("sanity", bool, True, "Run the model-parameter randomization sanity check."),
        Option("layer", str, None, "Target layer of the CAM methods (default: the run's)."),
        Option(
            "target",
            str,
            "predicted",
            "Class each map explains: the run's recorded prediction or the true label.",
            choices=TARGETS,
        ),
    )

    def run(
        self,
        context: AnalysisContext,
        *,
        methods: str,
        count: int,
        steps: int,
        baseline: str,
        road: bool,
        sanity: bool,
        layer: str | None,
        target: str,
    ) -> list[dict]:
        from explainkit.explain.methods import parse_methods
        from explainkit.explain.metrics_road import summarize_road

        if context.store.task in TASKS:  # items: detections, class regions, labels
            from explainkit.task_quality import assess_task_run

            return assess_task_run(
                context, methods=methods, count=count, steps=steps, baseline=baseline,
                layer=layer, target=target,
            )  # fmt: skip
        names = parse_methods(methods, "--quality-methods")
        names += [] if "random" in names else ["random"]
        model = context.model()
        layer = context.target_layer(layer, model)
        fns = _attribution_fns(names, layer, context.layer_reshape(layer), context.seed)
        cascade = _cascade(model, layer) if sanity else None
        sample = _load_sample(context, count, target)
        extra: dict = {}  # ROAD and confidence scores, per (method, metric)
        maps, curves, roads = _faithfulness(
            context, model, sample, fns, (steps, baseline, road), cascade, extra
        )
        scores = {**_per_image_scores(maps, curves, sample.masks), **extra}
        verdicts = None
        if cascade is not None:
            verdicts = _sanity(context, model, sample, fns, maps, scores, cascade)
        rows, class_rows = _tables(context, scores, names, sample)
        _write_per_image(context, sample.indices, scores)
        from explainkit.explain.stats import curve_summary

        report = {
            "epoch": context.epoch,
            "layer": layer,
            "target": target,
            "count": int(len(sample.indices)),
            "steps": steps,
            "baseline": baseline,
            "methods": names,
            "confidence": 0.95,
            "bootstrap_resamples": 1000,
            "table": rows,
            "per_class": class_rows,
            "curves": {name: curve_summary(c, context.seed) for name, c in curves.items()},
            "road": summarize_road(roads, context.seed) if roads else None,
            **_localization_note(sample.masks),
            "sanity": verdicts,
        }
        return _write_outputs(context, report)


@dataclass
class _Methods:
    """Attribution functions by name, and the native CAMs' joint function (or None)."""

    fns: dict[str, Any]
    together: Any

    def __len__(self) -> int:
        return len(self.fns)


def _attribution_fns(names: list[str], layer: str, reshape: str, seed: int) -> _Methods:
    """Each method's function; two or more native CAMs also share one pass per batch."""
    from explainkit.explain.attribution import attribution_fn
    from explainkit.explain.gradcam import compute_cams
    from explainkit.explain.methods import CAM_METHODS

    fns = {name: attribution_fn(name, layer=layer, seed=seed, reshape=reshape) for name in names}
    cams = [name for name in names if name in CAM_METHODS]
    if len(cams) < 2:
        return _Methods(fns, None)

    def together(model: Any, images: Any, targets: Any) -> dict[str, Any]:
        results = compute_cams(model, images, layer, cams, target=targets, reshape=reshape)
        return {name: r.maps.detach().float() for name, r in results.items()}

    return _Methods(fns, together)


def _cascade(model: Any, layer: str) -> tuple[list, str]:
    """The sanity check's randomization cascade for this model, and its verdict depth."""
    from explainkit.explain.metrics import model_cascade

    return model_cascade(model, layer)


def _load_sample(context: AnalysisContext, count: int, target: str) -> _Sample:
    """A seeded sample of eval images, their targets and (when the store has them) masks."""
    import torch

    from explainkit.selection import sample_indices

    store = context.store
    indices = sample_indices(store.num_images, count, context.rng)
    images = context.normalize(store.images(indices))
    labels = store.targets[indices]
    recorded = store.predictions(context.epoch)[indices]
    chosen = labels if target == "true" else recorded  # "predicted": the run's recorded one
    targets = torch.as_tensor(chosen, dtype=torch.int64, device=images.device)
    masks = None
    if store.has_masks:
        masks = torch.from_numpy(store.masks[indices]).to(context.device)
    return _Sample(indices, images, labels, targets, masks)


def _faithfulness(
    context: AnalysisContext,
    model: Any,
    sample: _Sample,
    fns: _Methods,
    settings: tuple[int, str, bool],
    cascade: tuple[list, str] | None,
    extra: dict,
) -> tuple[dict, dict, dict]:
    """Each method's maps, its deletion/insertion curves and (``settings[2]``) ROAD curves;
    confidence and ROAD scores go to ``extra``. After the first method, says how long the
    rest will take (timed on it, so the estimate is this machine's)."""
    import time

    import torch

    from explainkit.explain.methods import CAM_METHODS
    from explainkit.explain.metrics import attribute_all, inference_model, perturbation_curves

    steps, baseline, road = settings
    bs = context.batch_size
    gen = torch.Generator().manual_seed(context.seed)
    road_gen = torch.Generator().manual_seed(context.seed + 1)
    fast = inference_model(model)  # batch norms folded once for every method's curves
    maps, curves, roads = {}, {}, {}
    for i, name in enumerate(context.progress(list(fns.fns), desc="deletion/insertion")):
        start = time.perf_counter()
        if name not in maps:  # the native CAMs come all at once, with the first of them
            joint = fns.together if name in CAM_METHODS else None
            group = [n for n in fns.fns if n in CAM_METHODS] if joint else [name]
            wanted = {n: fns.fns[n] for n in group}
            maps.update(attribute_all(wanted, model, sample.images, sample.targets, bs, joint))
        mapped = time.perf_counter()
        curves[name] = perturbation_curves(
            fast, sample.images, maps[name], sample.targets, steps=steps, baseline=baseline,
            max_batch=8 * bs, generator=gen,
        )  # fmt: skip
        road_curve = _road_and_confidence(fast, sample, name, maps[name], extra, road, bs,
                                          road_gen)  # fmt: skip
        if road_curve is not None:
            roads[name] = road_curve
        if i == 0 and len(fns) > 1:
            done = time.perf_counter()
            redo = len(cascade[0]) if cascade else 0  # the sanity check redoes every map
            _announce(context, sample, len(fns), redo, mapped - start, done - start)
    return maps, curves, roads


def _announce(
    context: AnalysisContext,
    sample: _Sample,
    methods: int,
    redo: int,
    map_seconds: float,
    seconds: float,
) -> None:
    """Say the sample size and how long the rest takes (from the first method's time);
    ``redo``: how many times the sanity check recomputes every method's maps."""
    n, total = len(sample.indices), context.store.num_images
    rest = (methods - 1) * seconds + methods * redo * map_seconds
    sampled = f"{n} of {total} eval images" + (" (a seeded sample)" if n < total else "")
    context.estimate(
        f"{sampled}: the other {methods - 1} methods" + (" and the sanity check" if redo else ""),
        rest,
        "timed on the first method; --quality-count sets how many images",
    )


def _per_image_scores(maps: dict, curves: dict, masks: Any) -> dict[tuple[str, str], Any]:
    """(method, metric) -> per-image values (tensors on the device)."""
    from explainkit.explain.metrics import energy_in_mask, pointing_game

    scores: dict[tuple[str, str], Any] = {}
    for name, c in curves.items():
        scores[(name, "deletion_auc")] = c.deletion_auc
        scores[(name, "insertion_auc")] = c.insertion_auc
    rnd = curves["random"]
    for name, c in curves.items():
        if name != "random":
            scores[(name, "deletion_gain_vs_random")] = rnd.deletion_auc - c.deletion_auc
            scores[(name, "insertion_gain_vs_random")] = c.insertion_auc - rnd.insertion_auc
    if masks is not None:
        for name in curves:
            scores[(name, "pointing_game")] = pointing_game(maps[name], masks).double()
            scores[(name, "energy_in_mask")] = energy_in_mask(maps[name], masks)
    return scores


def _road_and_confidence(
    fast: Any, sample: _Sample, name: str, maps: Any, extra: dict, road: bool, bs: int, gen: Any
) -> Any:
    """One method's Average Drop / Increase in Confidence and, with ``road``, its ROAD scores,
    added to ``extra``; returns its ROAD curves (None without)."""
    from explainkit.explain.metrics_road import confidence_change, road_curves

    drop, increase = confidence_change(fast, sample.images, maps, sample.targets, 8 * bs)
    extra[(name, "average_drop")] = drop
    extra[(name, "increase_in_confidence")] = increase.double()
    if not road:
        return None
    r = road_curves(fast, sample.images, maps, sample.targets, max_batch=8 * bs, generator=gen)
    extra[(name, "road_morf")] = r.morf_score
    extra[(name, "road_lerf")] = r.lerf_score
    extra[(name, "road_combined")] = r.combined
    return r


def _sanity(
    context: AnalysisContext,
    model: Any,
    sample: _Sample,
    fns: _Methods,
    maps: dict,
    scores: dict,
    cascade: tuple[list, str],
) -> dict[str, Any]:
    """The randomization check: adds its per-image similarities to ``scores``."""
    from explainkit.explain.metrics import randomization_check

    groups, depth = cascade
    results = randomization_check(
        model, sample.images, sample.targets, fns.fns, cascade=groups,
        batch_size=context.batch_size, seed=context.seed, original=maps, together=fns.together,
    )  # fmt: skip
    for name, res in results.items():
        for i, step in enumerate(res.layers):
            scores[(name, f"sanity_spearman:{step}")] = res.spearman[i]
            scores[(name, f"sanity_ssim:{step}")] = res.ssim[i]
    return _sanity_summary(results, depth)


def _tables(
    context: AnalysisContext, scores: dict, names: list[str], sample: _Sample
) -> tuple[list[dict], list[dict]]:
    """Table rows (method, metric) and, with masks, localization rows per true class."""
    from explainkit.explain.stats import summarize

    seed = context.seed
    # One transfer to the CPU for everything that gets bootstrapped.
    host = {k: v.detach().double().cpu().numpy() for k, v in scores.items()}
    rows = [{"method": n, "metric": m, **summarize(host[(n, m)], seed)} for n, m in host]
    class_rows = []
    if sample.masks is not None:
        for name in names:
            for metric in ("pointing_game", "energy_in_mask"):
                values = host[(name, metric)]
                for k, cls in enumerate(context.classes):
                    sel = values[sample.labels == k]
                    if sel.size:
                        row = {"method": name, "metric": metric, **summarize(sel, seed)}
                        class_rows.append({"class": cls, **row})
    return rows, class_rows


PER_IMAGE = ("deletion_auc", "insertion_auc", "pointing_game", "energy_in_mask")


def _write_per_image(context: AnalysisContext, indices: Any, scores: dict) -> None:
    """per_image.csv: each sampled image's scores, one "method:metric" column each, for
    tools that sort images by them (``explainkit serve``)."""
    from explainkit.tables import write_csv

    keys = [k for k in scores if k[1] in PER_IMAGE]
    values = [scores[k].detach().double().cpu().numpy() for k in keys]
    rows = [[int(i), *(float(v[j]) for v in values)] for j, i in enumerate(indices)]
    write_csv(context.output_dir / "per_image.csv", ["index", *(f"{m}:{n}" for m, n in keys)], rows)


def _localization_note(masks: Any) -> dict[str, Any]:
    if masks is None:
        return {"localization": None, "localization_skipped": "the store has no masks"}
    fraction = float(masks.double().mean())
    note = {"mask_fraction": fraction, "chance_note": _CHANCE_NOTE}
    return {"localization": note, "localization_skipped": None}


def _sanity_summary(results: dict[str, Any], depth: str) -> dict[str, Any]:
    from explainkit.explain import metrics as M
    from explainkit.explain.stats import summarize

    methods = {}
    for name, res in results.items():
        passed, value, step = M.sanity_verdict(res, depth)
        steps = [
            {
                "randomized": layer,
                "spearman": summarize(res.spearman[i]),
                "ssim": summarize(res.ssim[i]),
            }
            for i, layer in enumerate(res.layers)
        ]
        methods[name] = {
            "passed": passed,
            "spearman_at_depth": value,
            "depth_step": step,
            "verdict": _verdict(name, passed, value, step),
            "steps": steps,
        }
    return {
        "rule": (
            f"A method fails when the mean Spearman rank correlation between its maps on the "
            f"trained model and on the model with the layers down to {depth} "
            f"re-initialized (cascading from the top) exceeds {M.SANITY_THRESHOLD}."
        ),
        "threshold": M.SANITY_THRESHOLD,
        "depth": depth,
        "passed": [n for n, m in methods.items() if m["passed"]],
        "failed": [n for n, m in methods.items() if not m["passed"]],
        "methods": methods,
    }


def _verdict(name: str, passed: bool, value: float, step: str) -> str:
    from explainkit.explain.metrics import SANITY_THRESHOLD

    if passed:
        return (
            f"{name} PASSES: with the layers down to {step} re-initialized its maps keep a "
            f"mean rank correlation of {value:.2f} (<= {SANITY_THRESHOLD}) with the trained "
            "model's maps, so they depend on what the model learned."
        )
    return (
        f"{name} FAILS: with the layers down to {step} re-initialized its maps still have "
        f"a mean rank correlation of {value:.2f} (> {SANITY_THRESHOLD}) with the trained "
        "model's maps; they do not depend on the learned weights and should not be "
        "trusted as explanations of this model."
    )


def _write_outputs(context: AnalysisContext, report: dict[str, Any]) -> list[dict]:
    """Tables, the JSON report and the figures, with their manifest records."""
    from explainkit.tables import write_csv, write_json

    out = context.output_dir
    rows, class_rows, n = report["table"], report["per_class"], report["count"]
    write_csv(out / "quality.csv", HEADER, [[r[h] for h in HEADER] for r in rows])
    write_json(out / "quality.json", report)
    artifacts = [
        context.artifact(
            "quality.csv",
            "Explanation quality table",
            "table",
            f"Mean and 95% bootstrap CI (1000 resamples) over {n} eval images, per method "
            "and metric.",
        ),
        context.artifact(
            "quality.json",
            "Explanation quality (all results)",
            "json",
            "Table, per-class localization, mean curves and the sanity-check verdicts.",
        ),
    ]
    if class_rows:
        write_csv(
            out / "localization_per_class.csv",
            CLASS_HEADER,
            [[r[h] for h in CLASS_HEADER] for r in class_rows],
        )
        artifacts.append(
            context.artifact(
                "localization_per_class.csv",
                "Localization per class",
                "table",
                "Pointing game and energy in mask per true class, with 95% bootstrap CIs.",
            )
        )
    return artifacts + _write_figures(context, report)


def _write_figures(context: AnalysisContext, report: dict[str, Any]) -> list[dict]:
    from explainkit.explain.metrics import SANITY_THRESHOLD
    from explainkit.figures import save_figure

    out, n = context.output_dir, report["count"]
    steps, baseline = report["steps"], report["baseline"]
    fig = curves_figure(report["curves"], n, baseline, report["epoch"])
    save_figure(fig, out / "deletion_insertion.png")
    artifacts = [
        context.artifact(
            "deletion_insertion.png",
            "Deletion and insertion curves",
            "image",
            "Mean target-class probability as the most-attributed pixels are removed "
            "(deletion, lower AUC is better) or added (insertion, higher is better); "
            f"{baseline} baseline, {steps} steps, {n} images, bands: 95% bootstrap CI.",
        )
    ]
    if report.get("road"):
        save_figure(road_figure(report["road"], n, report["epoch"]), out / "road.png")
        artifacts.append(
            context.artifact(
                "road.png",
                "ROAD: remove and debias",
                "image",
                "Mean target-class probability with 10-90% of the pixels filled by noisy "
                "linear imputation, most relevant first (MoRF, lower is better) and least "
                f"relevant first (LeRF, higher is better); {n} images, bands: 95% bootstrap CI.",
            )
        )
    verdicts = report["sanity"]
    if verdicts is not None:
        save_figure(sanity_figure(verdicts, n), out / "sanity.png")
        failed = ", ".join(verdicts["failed"]) or "none"
        artifacts.append(
            context.artifact(
                "sanity.png",
                "Model-parameter randomization sanity check",
                "image",
                "Similarity of each method's maps to the trained model's as layers are "
                f"re-initialized from the top; {n} images, error bars: 95% bootstrap CI. "
                f"Fails (rank correlation > {SANITY_THRESHOLD} with layers down to "
                f"{verdicts['depth']} randomized): {failed}.",
            )
        )
    if report["localization"] is not None:
        artifacts += _localization_figures(context, report)
    return artifacts


def _localization_figures(context: AnalysisContext, report: dict[str, Any]) -> list[dict]:
    from explainkit.figures import save_figure

    out, n, names = context.output_dir, report["count"], report["methods"]
    fraction = report["localization"]["mask_fraction"]
    save_figure(localization_figure(report["table"], names, fraction, n), out / "localization.png")
    fig = per_class_figure(report["per_class"], names, context.classes)
    save_figure(fig, out / "localization_per_class.png")
    return [
        context.artifact(
            "localization.png",
            "Localization (pointing game, energy in mask)",
            "image",
            f"{n} images; error bars: 95% bootstrap CI; dashed: a map that knows "
            "nothing (mean mask area).",
        ),
        context.artifact(
            "localization_per_class.png",
            "Localization per class",
            "image",
            "Pointing-game hit rate and energy in mask per true class, 95% CIs.",
        ),
    ]


@hookimpl
def register_analyzers(register):
    register(QualityAnalyzer)
