"""Built-in analyzer ``captum``: native Grad-CAM checked against Captum, and other methods.

Two parts. (1) Agreement: Captum's ``LayerGradCam`` runs on the same images, layer and targets
as the native engine, batch by batch in the same process; the analyzer reports how far apart
the maps are and the time per image of each. (2) Side by side: a few images explained by
several Captum methods and native Grad-CAM, with the pairwise Spearman rank correlations of
their maps and each method's time per image.
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

__all__ = ["CaptumAnalyzer", "METHODS", "rank_rows", "spearman_matrix"]

# name -> column title; the first five are the default.
METHODS = {
    "gradcam": "Grad-CAM (native)",
    "integrated_gradients": "Integrated Gradients",
    "saliency": "Saliency",
    "guided_gradcam": "Guided Grad-CAM",
    "occlusion": "Occlusion",
    "input_x_gradient": "Input x Gradient",
    "guided_backprop": "Guided Backprop",
}
DEFAULT_METHODS = "gradcam,integrated_gradients,saliency,guided_gradcam,occlusion"
SHORT_LABELS = {  # column headers: fit a 128 px tile
    "gradcam": "Grad-CAM",
    "integrated_gradients": "Integrated Grad.",
    "saliency": "Saliency",
    "guided_gradcam": "Guided Grad-CAM",
    "occlusion": "Occlusion",
    "input_x_gradient": "Input x Grad.",
    "guided_backprop": "Guided Backprop",
}
MAP_CMAP = "inferno"


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
            f"Comma-separated methods for the side-by-side figure, from: {', '.join(METHODS)}.",
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
            4,
            "Occlusion patch side in pixels; the stride equals the window.",
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
        occlusion_window: int,
    ) -> list[dict]:
        from explainkit.plugins import _plot
        from explainkit.plugins.gradcam import choose_layer, parse_target

        chosen_methods = parse_methods(methods)
        store = context.store
        classes = list(store.classes)
        target_arg = parse_target(target, classes, "--captum-target")
        model = context.model()
        layer = choose_layer(context, model, layer)
        out = context.output_dir
        bs = max(1, int(context.batch_size))

        with warnings.catch_warnings():
            # Captum warns that it sets requires_grad on inputs and hooks on ReLUs: expected.
            warnings.filterwarnings("ignore", module=r"captum\.")
            agreement = _agreement(context, model, layer, target_arg, limit, bs)
            side = _side_by_side(
                context, model, layer, target_arg, chosen_methods, count, n_steps,
                occlusion_window, bs,
            )  # fmt: skip

        report = {
            "layer": layer,
            "target": str(target),
            "epoch": context.epoch,
            "device": str(context.device),
            "batch_size": bs,
            **agreement,
            "side_by_side": {
                "methods": chosen_methods,
                "images": side["indices"].tolist(),
                "n_steps": n_steps,
                "occlusion_window": occlusion_window,
                "ms_per_image": side["ms_per_image"],
                "spearman": side["spearman"].tolist(),
            },
        }
        _plot.write_json(out / "agreement.json", report)
        rows = [
            [which, m["max_abs_diff"], m["rel_diff"], m["pearson"]]
            for which, m in agreement["agreement"].items()
        ]
        _plot.write_csv(
            out / "agreement.csv", ["maps", "max_abs_diff", "rel_diff", "pearson"], rows
        )
        timing = agreement["timing"]
        _plot.write_csv(
            out / "timing.csv",
            ["method", "images", "seconds", "ms_per_image", "images_per_s"],
            [
                [k, v["images"], v["seconds"], v["ms_per_image"], v["images_per_s"]]
                for k, v in timing.items()
            ],
        )
        names = chosen_methods
        _plot.write_csv(
            out / "rank_correlation.csv",
            ["method", *names, "ms_per_image"],
            [
                [m, *side["spearman"][i].tolist(), side["ms_per_image"][m]]
                for i, m in enumerate(names)
            ],
        )

        fig = _methods_figure(side, classes, layer)
        _plot.save_figure(fig, out / "methods.png")
        if len(names) > 1:
            fig = _correlation_figure(side["spearman"], names, side["ms_per_image"])
            _plot.save_figure(fig, out / "rank_correlation.png")

        up = agreement["agreement"]["upsampled"]
        speed = timing["native"]["ms_per_image"] / max(timing["captum"]["ms_per_image"], 1e-12)
        artifacts = [
            context.artifact(
                "agreement.json",
                "Native Grad-CAM vs Captum LayerGradCam",
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
            ),  # fmt: skip
            context.artifact("timing.csv", "Grad-CAM time per image", "table", "Same batches."),
            context.artifact(
                "methods.png",
                "Attribution methods side by side",
                "image",
                f"Rows: {len(side['indices'])} eval images (true/predicted); columns: methods. "
                "Pixel methods are summed |attribution| over channels; every map is scaled to "
                f"[0, 1] per image ({MAP_CMAP}).",
            ),
            context.artifact(
                "rank_correlation.csv",
                "Spearman rank correlation between methods",
                "table",
                "Mean over the shown images of the per-image Spearman correlation of the maps; "
                "last column: time per image.",
            ),
        ]
        if len(names) > 1:
            artifacts.append(
                context.artifact(
                    "rank_correlation.png",
                    "Rank correlation between methods",
                    "image",
                    "Mean per-image Spearman correlation; method labels show ms per image.",
                )
            )
        return artifacts


def parse_methods(text: str) -> list[str]:
    """Comma list -> known method names, in the given order, without duplicates."""
    names = [m.strip().lower().replace("-", "_") for m in str(text).split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        raise AnalyzerError(
            f"--captum-methods {text!r} names unknown methods ({', '.join(unknown) or 'none'}); "
            f"choose from: {', '.join(METHODS)}."
        )
    return list(dict.fromkeys(names))


def _sync(context: AnalysisContext) -> Callable[[], None]:
    import torch

    return torch.cuda.synchronize if context.device.type == "cuda" else (lambda: None)


def _agreement(
    context: AnalysisContext, model: Any, layer: str, target: Any, limit: int, bs: int
) -> dict:
    """Native vs Captum LayerGradCam on the first ``limit`` images, batch by batch.

    Statistics are accumulated in float64 so memory stays bounded for any ``limit``.
    """
    import numpy as np
    import torch
    from captum.attr import LayerAttribution, LayerGradCam

    from explainkit.explain.gradcam import GradCAM, normalize_maps

    store = context.store
    n = store.num_images if limit == 0 else min(limit, store.num_images)
    labels = store.targets
    module = dict(model.named_modules()).get(layer)
    sync = _sync(context)
    stats = {k: _Stats() for k in ("raw", "upsampled")}
    seconds = {"native": 0.0, "captum": 0.0}
    with GradCAM(model, layer) as cam:  # an unknown layer fails here, listing valid names
        captum_cam = LayerGradCam(model, module)
        batches = list(range(0, n, bs))
        for b, start in enumerate(context.progress(batches, desc="agreement")):
            stop = min(start + bs, n)
            x = context.normalize(store.images(np.arange(start, stop)))
            true = torch.from_numpy(labels[start:stop])
            runs = 2 if b == 0 else 1  # the first batch once untimed: warm-up
            for r in range(runs):
                sync()
                t0 = time.perf_counter()
                native = cam(x, target=target, true_targets=true)
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

    def timing(s: float) -> dict:
        return {
            "images": n,
            "seconds": s,
            "ms_per_image": 1000 * s / n,
            "images_per_s": n / s if s > 0 else None,
        }

    return {
        "num_images": n,
        "agreement": {k: v.result() for k, v in stats.items()},
        "timing": {"native": timing(seconds["native"]), "captum": timing(seconds["captum"])},
        "native_speedup": seconds["captum"] / seconds["native"] if seconds["native"] else None,
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
    bs: int,
) -> dict:
    """Maps of every method for ``count`` images (mixed right/wrong), with time per image."""
    import numpy as np
    import torch
    from explainkit.plugins.gradcam import select_images

    from explainkit.explain.gradcam import GradCAM, normalize_maps

    store = context.store
    labels = store.targets
    predicted = store.predictions(context.epoch)
    indices = select_images(labels, predicted, count, "mixed", context.rng)
    images = store.images(indices)
    x_all = context.normalize(images)
    true_all = torch.from_numpy(labels[indices])
    module = dict(model.named_modules())[layer]
    sync = _sync(context)

    # The targets, as the native engine resolves them, are shared by every method.
    with GradCAM(model, layer) as cam:
        gradcam_batches = [
            cam(x_all[s : s + bs], target=target, true_targets=true_all[s : s + bs])
            for s in range(0, len(indices), bs)
        ]
    targets = torch.cat([r.targets for r in gradcam_batches])
    model_pred = torch.cat([r.predicted for r in gradcam_batches]).cpu().numpy()

    maps: dict[str, Any] = {}
    ms: dict[str, float] = {}
    for name in methods:
        attribute = _method(name, model, module, layer, n_steps, window, bs, len(indices))
        parts, seconds = [], 0.0
        for s in range(0, len(indices), bs):
            x, t, true = x_all[s : s + bs], targets[s : s + bs], true_all[s : s + bs]
            sync()
            t0 = time.perf_counter()
            with torch.inference_mode(False), torch.enable_grad():
                a = attribute(x, t, true)
            a = a.detach()
            m = normalize_maps(a.abs().sum(1) if a.dim() == 4 else a)
            sync()
            seconds += time.perf_counter() - t0
            parts.append(m)
        maps[name] = torch.cat(parts).float().cpu().numpy()
        ms[name] = 1000 * seconds / max(len(indices), 1)
        if not np.isfinite(maps[name]).all():
            raise AnalyzerError(f"captum method {name} produced non-finite attributions.")
    stacked = np.stack([maps[m] for m in methods])  # (methods, N, H, W)
    return {
        "indices": indices,
        "images": images,
        "labels": labels[indices],
        "predicted": model_pred,
        "targets": targets.cpu().numpy(),
        "methods": methods,
        "maps": stacked,
        "ms_per_image": ms,
        "spearman": spearman_matrix(stacked),
    }


def _method(
    name: str, model: Any, module: Any, layer: str, n_steps: int, window: int, bs: int, n: int
) -> Callable[[Any, Any, Any], Any]:
    """A function ``(x, targets, true) -> attributions`` for one method, memory bounded."""
    import torch
    from captum import attr

    from explainkit.explain.gradcam import GradCAM

    if name == "gradcam":
        cam = GradCAM(model, layer)
        return lambda x, t, true: cam(x, target=t).maps
    if name == "integrated_gradients":
        ig = attr.IntegratedGradients(model)
        # internal_batch_size bounds the n_steps x images expansion to one --batch-size.
        return lambda x, t, true: ig.attribute(
            x, baselines=torch.zeros_like(x), target=t, n_steps=n_steps, internal_batch_size=bs
        )
    if name == "saliency":
        sal = attr.Saliency(model)
        return lambda x, t, true: sal.attribute(x, target=t, abs=True)
    if name == "guided_gradcam":
        ggc = attr.GuidedGradCam(model, module)
        return lambda x, t, true: ggc.attribute(x, target=t)
    if name == "input_x_gradient":
        ixg = attr.InputXGradient(model)
        return lambda x, t, true: ixg.attribute(x, target=t)
    if name == "guided_backprop":
        gbp = attr.GuidedBackprop(model)
        return lambda x, t, true: gbp.attribute(x, target=t)
    if name == "occlusion":
        occ = attr.Occlusion(model)

        def occlude(x: Any, t: Any, true: Any) -> Any:
            w = min(window, x.shape[-1], x.shape[-2])
            per_eval = max(1, bs // max(x.shape[0], 1))  # patches per forward: <= --batch-size
            return occ.attribute(
                x, target=t, sliding_window_shapes=(x.shape[1], w, w),
                strides=(x.shape[1], w, w), baselines=0.0, perturbations_per_eval=per_eval,
            )  # fmt: skip

        return occlude
    raise AnalyzerError(f"unknown captum method {name!r}; choose from: {', '.join(METHODS)}.")


# -- rank correlation (numpy) --------------------------------------------------------------


def rank_rows(values: Any) -> Any:
    """Average ranks (ties share their mean rank) of each row of a 2-D array, via argsort."""
    import numpy as np

    values = np.asarray(values, dtype=np.float64)
    rows, k = values.shape
    order = np.argsort(values, axis=1, kind="stable")
    ordered = np.take_along_axis(values, order, axis=1)
    new_group = np.ones((rows, k), bool)
    new_group[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    group = np.cumsum(new_group, axis=1) - 1 + (np.arange(rows) * k)[:, None]
    position = np.broadcast_to(np.arange(k, dtype=np.float64), (rows, k))
    sums = np.bincount(group.ravel(), weights=position.ravel(), minlength=rows * k)
    counts = np.bincount(group.ravel(), minlength=rows * k)
    mean_rank = sums / np.maximum(counts, 1)
    ranks = np.empty((rows, k))
    np.put_along_axis(ranks, order, mean_rank[group], axis=1)
    return ranks


def spearman_matrix(maps: Any) -> Any:
    """(M methods, N images, ...) -> (M, M) mean over images of per-image Spearman rho.

    An image where a method's map is constant has no defined correlation and is left out of
    that pair's mean; the diagonal is exactly 1 and the matrix exactly symmetric.
    """
    import numpy as np

    m, n = maps.shape[:2]
    ranks = rank_rows(np.asarray(maps).reshape(m * n, -1)).reshape(m, n, -1)
    centered = ranks - ranks.mean(axis=2, keepdims=True)
    norms = np.sqrt((centered**2).sum(axis=2))  # (M, N)
    out = np.eye(m)
    for i in range(m):
        for j in range(i + 1, m):
            num = (centered[i] * centered[j]).sum(axis=1)
            den = norms[i] * norms[j]
            valid = den > 0
            rho = float(np.mean(num[valid] / den[valid])) if valid.any() else float("nan")
            out[i, j] = out[j, i] = rho
    return out


# -- figures -------------------------------------------------------------------------------


def _methods_figure(side: dict, classes: list[str], layer: str) -> Any:
    import numpy as np
    from explainkit.plugins import _plot
    from explainkit.plugins.gradcam import get_colormap, heat_rgb

    methods = side["methods"]
    n = len(side["indices"])
    cmap = get_colormap(MAP_CMAP, "colormap")
    cols = 1 + len(methods)
    tiles = np.empty((n, cols, *side["images"].shape[1:3], 3), np.uint8)
    tiles[:, 0] = side["images"][..., :3]
    for j in range(len(methods)):
        tiles[:, j + 1] = heat_rgb(side["maps"][j], cmap)
    captions = []
    for i in range(n):
        true, pred = classes[side["labels"][i]], classes[side["predicted"][i]]
        mark = "✓" if true == pred else "✗"
        captions.append(f"{_plot.short(true, 11)}/{_plot.short(pred, 11)} {mark}")
        for name in methods:
            if i == 0:
                captions.append(f"{SHORT_LABELS[name]}\n{side['ms_per_image'][name]:.1f} ms/image")
            else:
                captions.append("")
    return _plot.grid_figure(
        tiles.reshape(n * cols, *tiles.shape[2:]),
        cols,
        captions=captions,
        title=f"Attribution methods, same images (Grad-CAM at {layer}; bright = important)",
        caption_lines=2,
        font_size=8.5,
    )


def _correlation_figure(rho: Any, names: list[str], ms: dict[str, float]) -> Any:
    import numpy as np
    from explainkit.plugins import _plot

    k = len(names)
    fig = _plot.new_figure(1.2 * k + 3.2, 1.0 * k + 1.6)
    ax = fig.add_subplot()
    im = ax.imshow(rho, cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
    labels = [f"{METHODS[n]}\n{ms[n]:.1f} ms/img" for n in names]
    ax.set_xticks(np.arange(k), [METHODS[n] for n in names], rotation=30, ha="right", fontsize=9)
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
