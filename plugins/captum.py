"""Built-in analyzer ``captum``: native Grad-CAM checked against Captum, and other methods.

Two parts. (1) Agreement: Captum's ``LayerGradCam`` runs on the same images, layer and targets
as the native engine, batch by batch in the same process; the analyzer reports how far apart
the maps are and the time per image of each. (2) Side by side: a few images explained by
several methods (run through :mod:`explainkit.explain.attribution`, so each is reduced to a
map by its one rule), with the pairwise Spearman rank correlations of their maps and each
method's time per image.

A transformer's token layer (N, tokens, C), which the native engine views as a grid of
patches (``reshape="auto"``), is something Captum's layer methods cannot turn into maps: the
agreement check is skipped and Guided Grad-CAM is left out of the side by side, each said in
a sentence; the pixel methods and the native Grad-CAM column still run.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from typing import Any

import click

from explainkit import hookimpl
from explainkit.analyzer import AnalysisContext, Analyzer, Option
from explainkit.errors import AnalyzerError
from explainkit.explain.methods import CAPTUM_METHODS, METHODS, PERTURBATION_METHODS

__all__ = ["CaptumAnalyzer"]

# What the figure can show; smoothgrad:NAME of each is accepted too.
SIDE_BY_SIDE = ("gradcam", *CAPTUM_METHODS, *PERTURBATION_METHODS)
DEFAULT_METHODS = "gradcam,integrated_gradients,saliency,guided_gradcam,occlusion"
MAP_CMAP = "inferno"
TOKEN_SKIP = "captum's LayerGradCam cannot compare a token layer; the agreement check is skipped"
TOKEN_LEFT_OUT = (
    "captum's GuidedGradCam cannot explain a token layer; {names} is left out of the side by side"
)


def _title(name: str) -> str:
    """Column title: the native engine's Grad-CAM is marked as such."""
    method = METHODS[name]
    return f"{method.label} (native)" if method.source == "native" else method.label


class CaptumAnalyzer(Analyzer):
    """Native Grad-CAM against Captum's LayerGradCam, plus Captum's other attribution methods.

    Captum (Kokhlikyan et al. 2020, https://arxiv.org/abs/2009.07896) is the reference
    implementation: its ``LayerGradCam`` must give the native maps to float tolerance, and
    Integrated Gradients, Saliency, Guided Grad-CAM and Occlusion show how much the choice of
    method changes an explanation (rank correlations between their maps).

    Example:
        explainkit analyze runs/cifar --plugin captum --captum-methods gradcam,saliency,occlusion
    """

    name = "captum"
    title = "Captum comparison"
    summary = (
        "Native Grad-CAM vs Captum LayerGradCam (agreement, speed); IG, Saliency, ... side by side."
    )
    needs = frozenset({"store", "checkpoint"})
    requires = ("captum",)
    order = 45
    options = (
        Option(
            "layer",
            str,
            None,
            "Target layer for Grad-CAM, a name from model.named_modules() (default: the run's "
            "default layer).",
        ),
        Option(
            "target",
            str,
            "predicted",
            "Class each map explains: predicted, true, a class index or a class name.",
        ),
        Option(
            "limit",
            click.IntRange(0),
            512,
            "Eval images (the first N) for the LayerGradCam agreement check; 0 means all.",
        ),
        Option(
            "methods",
            str,
            DEFAULT_METHODS,
            "Comma-separated methods for the side-by-side figure, from: "
            f"{', '.join(SIDE_BY_SIDE)}; smoothgrad:NAME averages NAME over noisy copies.",
        ),
        Option("count", click.IntRange(1, 64), 8, "Images in the side-by-side figure."),
        Option(
            "n_steps",
            click.IntRange(2, 1000),
            32,
            "Integrated Gradients steps (the path is batched by --batch-size).",
        ),
        Option(
            "occlusion_window",
            click.IntRange(1),
            None,
            "Occlusion patch side in pixels; the stride equals the window (default: an eighth "
            "of the image side, 4 at 32 px and 28 at 224 px: 64 patches per image).",
        ),
        Option(
            "map_images",
            click.IntRange(0),
            0,
            "Eval images (the first N) explained by every method besides the figure's, into "
            "attributions-METHOD.h5 for `explainkit serve`.",
        ),
    )

    def run(
        self,
        context: AnalysisContext,
        *,
        layer: str | None,
        target: str,
        limit: int,
        methods: str,
        count: int,
        n_steps: int,
        occlusion_window: int | None,
        map_images: int,
    ) -> list[dict]:
        from explainkit.explain.attribution import attribution_fn
        from explainkit.explain.methods import parse_methods
        from explainkit.map_files import write_maps
        from explainkit.selection import parse_target

        chosen = parse_methods(methods, "--captum-methods", list(SIDE_BY_SIDE))
        target_arg = parse_target(target, context.classes, "--captum-target")
        model = context.model()
        layer = context.target_layer(layer, model)
        side = min(int(v) for v in context.store.attrs["input_shape"][1:])
        occlusion_window = occlusion_window or max(1, side // 8)
        with warnings.catch_warnings():
            # Captum warns that it sets requires_grad on inputs and hooks on ReLUs: expected.
            warnings.filterwarnings("ignore", module=r"captum\.")
            agreement = _agreement(context, model, layer, target_arg, limit)
            chosen, left_out = _runnable(context, chosen, token_layer=bool(agreement["skipped"]))
            side = _side_by_side(
                context, model, layer, target_arg, chosen, count, n_steps, occlusion_window
            )
            side["left_out"] = left_out
            bs = max(1, int(context.batch_size))
            side["files"] = write_maps(
                context, model, layer, target_arg, target, side, map_images,
                lambda name: attribution_fn(name, layer=layer, ig_steps=n_steps,
                                            internal_batch_size=bs,
                                            occlusion_window=occlusion_window),
            )  # fmt: skip
        report = _report(context, layer, target, agreement, side, n_steps, occlusion_window)
        _write_tables(context, report, side)
        _write_figures(context, side, layer)
        return _artifacts(context, layer, agreement, side)


def _report(
    context: AnalysisContext,
    layer: str,
    target: str,
    agreement: dict,
    side: dict,
    n_steps: int,
    occlusion_window: int,
) -> dict:
    return {
        "layer": layer,
        "target": str(target),
        "epoch": context.epoch,
        "device": str(context.device),
        "batch_size": max(1, int(context.batch_size)),
        **agreement,
        "side_by_side": {
            "methods": side["methods"],
            "images": side["indices"].tolist(),
            "n_steps": n_steps,
            "occlusion_window": occlusion_window,
            "left_out": side["left_out"],
            "map_files": side["files"],
            "ms_per_image": side["ms_per_image"],
            "spearman": side["spearman"].tolist(),
        },
    }


def _write_tables(context: AnalysisContext, report: dict, side: dict) -> None:
    from explainkit.tables import write_csv, write_json

    out = context.output_dir
    write_json(out / "agreement.json", report)
    names = side["methods"]
    write_csv(
        out / "rank_correlation.csv",
        ["method", *names, "ms_per_image"],
        [[m, *side["spearman"][i].tolist(), side["ms_per_image"][m]] for i, m in enumerate(names)],
    )
    if report["skipped"]:
        return
    rows = [
        [which, m["max_abs_diff"], m["rel_diff"], m["pearson"]]
        for which, m in report["agreement"].items()
    ]
    write_csv(out / "agreement.csv", ["maps", "max_abs_diff", "rel_diff", "pearson"], rows)
    write_csv(
        out / "timing.csv",
        ["method", "images", "seconds", "ms_per_image", "images_per_s"],
        [
            [k, v["images"], v["seconds"], v["ms_per_image"], v["images_per_s"]]
            for k, v in report["timing"].items()
        ],
    )


def _write_figures(context: AnalysisContext, side: dict, layer: str) -> None:
    from explainkit.figures import save_figure

    out = context.output_dir
    save_figure(_methods_figure(side, context.classes, layer), out / "methods.png")
    if len(side["methods"]) > 1:
        fig = _correlation_figure(side["spearman"], side["methods"], side["ms_per_image"])
        save_figure(fig, out / "rank_correlation.png")


def _agreement_artifacts(context: AnalysisContext, layer: str, agreement: dict) -> list[dict]:
    title = "Native Grad-CAM vs Captum LayerGradCam"
    if agreement["skipped"]:
        caption = f"Layer {layer} outputs (N, tokens, C) tokens: {agreement['skipped']}."
        return [context.artifact("agreement.json", title, "json", caption)]
    up = agreement["agreement"]["upsampled"]
    timing = agreement["timing"]
    speed = timing["native"]["ms_per_image"] / max(timing["captum"]["ms_per_image"], 1e-12)
    return [
        context.artifact(
            "agreement.json",
            title,
            "json",
            f"{agreement['num_images']} images at {layer}: relative difference "
            f"{up['rel_diff']:.2g}, Pearson r {up['pearson']:.6f}; native takes "
            f"{speed:.2f}x Captum's time per image.",
        ),
        context.artifact(
            "agreement.csv",
            "Agreement (raw and upsampled maps)",
            "table",
            "rel_diff = max |native - captum| / max |captum|.",
        ),
        context.artifact("timing.csv", "Grad-CAM time per image", "table", "Same batches."),
    ]


def _artifacts(context: AnalysisContext, layer: str, agreement: dict, side: dict) -> list[dict]:
    left_out = f" Left out: {side['left_out']}." if side["left_out"] else ""
    artifacts = [
        *_agreement_artifacts(context, layer, agreement),
        context.artifact(
            "methods.png",
            "Attribution methods side by side",
            "image",
            f"Rows: {len(side['indices'])} eval images (true/predicted); columns: methods. "
            "Pixel methods are reduced over channels as each method defines (Saliency: the "
            "largest |gradient|; the others: the sum of |attribution|); every map is scaled "
            f"to [0, 1] per image ({MAP_CMAP}).{left_out}",
        ),
        context.artifact(
            "rank_correlation.csv",
            "Spearman rank correlation between methods",
            "table",
            "Mean over the shown images of the per-image Spearman correlation of the maps "
            "(a constant map counts as 0); last column: time per image.",
        ),
    ]
    for name, path in zip(side["methods"], side["files"], strict=False):
        artifacts.append(
            context.artifact(
                path,
                f"{_title(name)} maps",
                "h5",
                "One map in [0, 1] per eval image that was explained (the 'index' dataset); "
                "the others are NaN with a target of -1. Shown by explainkit serve.",
            )
        )
    if len(side["methods"]) > 1:
        artifacts.append(
            context.artifact(
                "rank_correlation.png",
                "Rank correlation between methods",
                "image",
                "Mean per-image Spearman correlation; method labels show ms per image.",
            )
        )
    return artifacts


def _recorded_if_predicted(target: Any, recorded: Any) -> Any:
    """Per-image targets from the recorded predictions when ``target`` is "predicted"."""
    import torch

    return torch.from_numpy(recorded) if target == "predicted" else target


def _sync(context: AnalysisContext) -> Callable[[], None]:
    import torch

    return torch.cuda.synchronize if context.device.type == "cuda" else (lambda: None)


def _runnable(
    context: AnalysisContext, methods: list[str], token_layer: bool
) -> tuple[list[str], str | None]:
    """The side-by-side methods that can run, and the sentence saying which were left out.

    Captum's layer methods (Guided Grad-CAM) read the layer as (N, C, H, W); on a token layer
    Captum returns an empty tensor, so they are left out there.
    """
    layered = [m for m in methods if METHODS[m].source == "captum" and METHODS[m].uses_layer]
    if not token_layer or not layered:
        return methods, None
    note = TOKEN_LEFT_OUT.format(names=", ".join(layered))
    kept = [m for m in methods if m not in layered]
    if not kept:
        raise AnalyzerError(
            f"{note.split(';')[0]}; choose other --captum-methods, e.g. gradcam,saliency"
        )
    context.say(note)
    return kept, note


def _agreement(context: AnalysisContext, model: Any, layer: str, target: Any, limit: int) -> dict:
    """Native vs Captum LayerGradCam on the first ``limit`` images, batch by batch.

    Statistics are accumulated in float64 so memory stays bounded for any ``limit``. A token
    layer (the native engine's layout is not NCHW) is skipped after the first native batch,
    with :data:`TOKEN_SKIP` as ``skipped``.
    """
    import numpy as np
    import torch
    from captum.attr import LayerAttribution, LayerGradCam

    from explainkit.explain.gradcam import GradCAM, normalize_maps

    store = context.store
    n = store.num_images if limit == 0 else min(limit, store.num_images)
    bs = max(1, int(context.batch_size))
    labels = store.targets
    recorded = store.predictions(context.epoch)
    sync = _sync(context)
    stats = {k: _Stats() for k in ("raw", "upsampled")}
    seconds = {"native": 0.0, "captum": 0.0}
    with GradCAM(model, layer, context.layer_reshape(layer)) as cam:
        captum_cam = LayerGradCam(model, dict(model.named_modules())[layer])
        batches = list(range(0, n, bs))
        for b, start in enumerate(context.progress(batches, desc="agreement")):
            x = context.normalize(store.images(np.arange(start, min(start + bs, n))))
            true = torch.from_numpy(labels[start : start + len(x)])
            batch_target = _recorded_if_predicted(target, recorded[start : start + len(x)])
            runs = 2 if b == 0 else 1  # the first batch once untimed: warm-up
            for r in range(runs):
                sync()
                t0 = time.perf_counter()
                native = cam(x, target=batch_target, true_targets=true)
                if cam.layout.kind != "nchw":
                    context.say(TOKEN_SKIP)
                    return {"num_images": 0, "skipped": TOKEN_SKIP, "agreement": None,
                            "timing": None, "native_speedup": None}  # fmt: skip
                sync()
                t1 = time.perf_counter()
                with torch.inference_mode(False), torch.enable_grad():
                    ref = captum_cam.attribute(x, target=native.targets, relu_attributions=True)
                ref = ref.detach()
                ref_up = LayerAttribution.interpolate(ref, tuple(x.shape[-2:]), "bilinear")
                ref_maps = normalize_maps(ref_up[:, 0])
                sync()
                t2 = time.perf_counter()
                if r == runs - 1:
                    seconds["native"] += t1 - t0
                    seconds["captum"] += t2 - t1
            stats["raw"].add(native.raw, ref[:, 0])
            stats["upsampled"].add(native.maps, ref_maps)
    return {
        "num_images": n,
        "skipped": None,
        "agreement": {k: v.result() for k, v in stats.items()},
        "timing": {k: _timing(n, s) for k, s in seconds.items()},
        "native_speedup": seconds["captum"] / seconds["native"] if seconds["native"] else None,
    }


def _timing(n: int, seconds: float) -> dict:
    return {
        "images": n,
        "seconds": seconds,
        "ms_per_image": 1000 * seconds / n,
        "images_per_s": n / seconds if seconds > 0 else None,
    }


class _Stats:
    """Running max |a - b|, max |b| and Pearson sums of two streams of maps (float64)."""

    def __init__(self) -> None:
        self.max_diff = 0.0
        self.max_ref = 0.0
        self.sums = None

    def add(self, a: Any, b: Any) -> None:
        import torch

        a, b = a.detach().double().flatten(), b.detach().double().flatten()
        self.max_diff = max(self.max_diff, float((a - b).abs().max()))
        self.max_ref = max(self.max_ref, float(b.abs().max()))
        sums = torch.stack([a.sum(), b.sum(), (a * a).sum(), (b * b).sum(), (a * b).sum()])
        sums = torch.cat([sums, torch.tensor([a.numel()], dtype=torch.float64, device=a.device)])
        self.sums = sums if self.sums is None else self.sums + sums

    def result(self) -> dict:
        sa, sb, saa, sbb, sab, n = (float(v) for v in self.sums.cpu())
        cov = sab - sa * sb / n
        var_a, var_b = saa - sa * sa / n, sbb - sb * sb / n
        pearson = cov / (var_a * var_b) ** 0.5 if var_a > 0 and var_b > 0 else None
        rel = self.max_diff / self.max_ref if self.max_ref > 0 else None
        return {"max_abs_diff": self.max_diff, "rel_diff": rel, "pearson": pearson}


def _side_by_side(
    context: AnalysisContext,
    model: Any,
    layer: str,
    target: Any,
    methods: list[str],
    count: int,
    n_steps: int,
    window: int,
) -> dict:
    """Maps of every method for ``count`` images (mixed right/wrong), with time per image."""
    import numpy as np
    import torch

    from explainkit.explain.gradcam import compute_cam
    from explainkit.explain.stats import mean_spearman_matrix
    from explainkit.selection import select_right_and_wrong

    store = context.store
    labels = store.targets
    recorded = store.predictions(context.epoch)
    indices = select_right_and_wrong(labels, recorded, count, "mixed", context.rng)
    images = store.images(indices)
    x = context.normalize(images)
    bs = max(1, int(context.batch_size))
    # The targets, as the native engine resolves them, are shared by every method;
    # "predicted" is the run's recorded prediction, as in every analyzer.
    native = compute_cam(
        model,
        x,
        layer,
        target=_recorded_if_predicted(target, recorded[indices]),
        batch_size=bs,
        true_targets=torch.from_numpy(labels[indices]),
        reshape=context.layer_reshape(layer),
    )
    maps, ms = {}, {}
    for name in methods:
        maps[name], ms[name] = _method_maps(context, model, name, x, native.targets, layer,
                                            n_steps, window)  # fmt: skip
    stacked = np.stack([maps[m] for m in methods])  # (methods, N, H, W)
    return {
        "indices": indices,
        "images": images,
        "labels": labels[indices],
        "predicted": recorded[indices],
        "targets": native.targets.cpu().numpy(),
        "methods": methods,
        "maps": stacked,
        "ms_per_image": ms,
        "spearman": mean_spearman_matrix(stacked),
    }


def _method_maps(
    context: AnalysisContext,
    model: Any,
    name: str,
    x: Any,
    targets: Any,
    layer: str,
    n_steps: int,
    window: int,
) -> tuple[Any, float]:
    """One method's maps of ``x`` batch by batch, and its time per image in ms."""
    import numpy as np
    import torch

    from explainkit.explain.attribution import attribution_fn

    bs = max(1, int(context.batch_size))
    fn = attribution_fn(
        name, layer=layer, ig_steps=n_steps, internal_batch_size=bs, occlusion_window=window
    )
    sync = _sync(context)
    parts, seconds = [], 0.0
    for s in range(0, len(x), bs):
        sync()
        t0 = time.perf_counter()
        parts.append(fn(model, x[s : s + bs], targets[s : s + bs]))
        sync()
        seconds += time.perf_counter() - t0
    maps = torch.cat(parts).float().cpu().numpy()
    if not np.isfinite(maps).all():
        raise AnalyzerError(f"captum method {name} produced non-finite attributions")
    return maps, 1000 * seconds / max(len(x), 1)


# -- figures -------------------------------------------------------------------------------


def _methods_figure(side: dict, classes: list[str], layer: str) -> Any:
    import numpy as np

    from explainkit.figures import get_colormap, grid_figure, heat_rgb, short

    methods = side["methods"]
    n = len(side["indices"])
    cmap = get_colormap(MAP_CMAP)
    cols = 1 + len(methods)
    tiles = np.empty((n, cols, *side["images"].shape[1:3], 3), np.uint8)
    tiles[:, 0] = side["images"][..., :3]
    for j in range(len(methods)):
        tiles[:, j + 1] = heat_rgb(side["maps"][j], cmap)
    captions = []
    for i in range(n):
        true, pred = classes[side["labels"][i]], classes[side["predicted"][i]]
        mark = "✓" if true == pred else "✗"
        captions.append(f"{short(true, 11)}/{short(pred, 11)} {mark}")
        for name in methods:
            ms = side["ms_per_image"][name]
            captions.append(f"{METHODS[name].short}\n{ms:.1f} ms/image" if i == 0 else "")
    return grid_figure(
        tiles.reshape(n * cols, *tiles.shape[2:]),
        cols,
        captions=captions,
        title=f"Attribution methods, same images (Grad-CAM at {layer}; bright = important)",
        caption_lines=2,
        font_size=8.5,
    )


def _correlation_figure(rho: Any, names: list[str], ms: dict[str, float]) -> Any:
    import numpy as np

    from explainkit.figures import new_figure

    k = len(names)
    fig = new_figure(1.2 * k + 3.2, 1.0 * k + 1.6)
    ax = fig.add_subplot()
    im = ax.imshow(rho, cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
    labels = [f"{_title(n)}\n{ms[n]:.1f} ms/img" for n in names]
    ax.set_xticks(np.arange(k), [_title(n) for n in names], rotation=30, ha="right", fontsize=9)
    ax.set_yticks(np.arange(k), labels, fontsize=9)
    for (r, c), value in np.ndenumerate(rho):
        text = "n/a" if not np.isfinite(value) else f"{value:.2f}"
        color = "white" if np.isfinite(value) and abs(value) > 0.6 else "black"
        ax.text(c, r, text, ha="center", va="center", fontsize=9, color=color)
    fig.colorbar(im, ax=ax, shrink=0.8, label="Spearman ρ")
    ax.set_title("Mean per-image rank correlation of attribution maps", fontsize=11)
    return fig


@hookimpl
def register_analyzers(register):
    register(CaptumAnalyzer)
