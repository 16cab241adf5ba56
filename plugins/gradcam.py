"""Built-in analyzer ``gradcam``: native batched Grad-CAM maps for the whole eval set.

Also home of the helpers the ``captum`` analyzer shares: choosing the target layer (run
metadata → ``resolve_target_layer`` hook → the model's default), parsing ``--*-target`` and
picking the images a figure shows.
"""

from __future__ import annotations

import logging
from typing import Any

import click

from explainkit import hookimpl
from explainkit.analyzer import AnalysisContext, Analyzer, Option
from explainkit.errors import AnalyzerError

__all__ = [
    "GradCAMAnalyzer",
    "METHOD_CHOICES",
    "METHOD_LABELS",
    "SELECT_CHOICES",
    "choose_layer",
    "parse_target",
    "select_images",
]

log = logging.getLogger(__name__)

METHOD_CHOICES = ("gradcam", "gradcampp", "xgradcam", "layercam")
METHOD_LABELS = {
    "gradcam": "Grad-CAM",
    "gradcampp": "Grad-CAM++",
    "xgradcam": "XGrad-CAM",
    "layercam": "LayerCAM",
}
SELECT_CHOICES = ("mixed", "misclassified", "correct")
DTYPE_CHOICES = ("float16", "float32")
GAP_PX = 2  # white gap between image, heatmap and overlay (image pixels, before upscaling)


class GradCAMAnalyzer(Analyzer):
    """Grad-CAM (Selvaraju et al. 2017, https://arxiv.org/abs/1610.02391) for every eval image.

    Weights the target layer's activation channels by their mean gradient of the target
    class score and keeps the positive part: where the layer saw evidence for the class. The
    native engine does one forward and one backward pass per batch (the backward stops at the
    layer), so the whole eval set is explained and written to ``attributions.h5`` batch by
    batch; the figure shows a few images as image | heatmap | overlay.

    Example:
        explainkit analyze runs/cifar --plugin gradcam --gradcam-layer layer3.1 --gradcam-target cat
    """

    name = "gradcam"
    title = "Grad-CAM"
    summary = (
        "Native batched Grad-CAM (and ++/XGrad/LayerCAM) maps for all eval images (HDF5 + PNG)."
    )
    needs = frozenset({"store", "checkpoint"})
    order = 40
    options = (
        Option(
            "layer",
            str,
            None,
            "Target layer, a name from model.named_modules() such as layer4 or layer3.1 "
            "(default: the run's default layer).",
        ),
        Option("method", str, "gradcam", "CAM variant to compute.", choices=METHOD_CHOICES),
        Option(
            "target",
            str,
            "predicted",
            "Class each map explains: predicted, true, a class index or a class name.",
        ),
        Option("count", click.IntRange(1, 100), 10, "How many images the figure shows."),
        Option(
            "select",
            str,
            "mixed",
            "Which images the figure shows: half misclassified and half correct, or only one "
            "kind (seeded by --seed).",
            choices=SELECT_CHOICES,
        ),
        Option("colormap", str, "turbo", "Matplotlib colormap of the heatmaps."),
        Option(
            "alpha", click.FloatRange(0.0, 1.0), 0.5, "Heatmap opacity in the overlay (0 to 1)."
        ),
        Option(
            "dtype",
            str,
            "float16",
            "Storage type of the upsampled maps in attributions.h5 (raw maps are float32).",
            choices=DTYPE_CHOICES,
        ),
    )

    def run(
        self,
        context: AnalysisContext,
        *,
        layer: str | None,
        method: str,
        target: str,
        count: int,
        select: str,
        colormap: str,
        alpha: float,
        dtype: str,
    ) -> list[dict]:
        import time

        import h5py
        import numpy as np
        import torch
        from explainkit.plugins import _plot

        from explainkit.explain.gradcam import METHODS

        if method not in METHODS:
            raise AnalyzerError(
                f"unknown CAM method {method!r}; available: {', '.join(sorted(METHODS))}."
            )
        cmap = get_colormap(colormap, "--gradcam-colormap")
        store = context.store
        classes = list(store.classes)
        target_arg = parse_target(target, classes, "--gradcam-target")
        model = context.model()
        layer = choose_layer(context, model, layer)
        cam = METHODS[method](model, layer)  # an unknown layer fails here, listing valid names

        n = store.num_images
        labels = store.targets
        bs = max(1, int(context.batch_size))
        out = context.output_dir
        path = out / "attributions.h5"
        seconds = 0.0
        sync = torch.cuda.synchronize if context.device.type == "cuda" else (lambda: None)
        with cam, h5py.File(path, "w") as f:
            maps_ds = raw_ds = None
            targets_ds = _dataset(f, "targets", (n,), "int64", bs)
            predicted_ds = _dataset(f, "predicted", (n,), "int64", bs)
            starts = range(0, n, bs)
            for start in context.progress(starts, desc="maps", total=len(starts)):
                stop = min(start + bs, n)
                x = context.normalize(store.images(np.arange(start, stop)))
                true = torch.from_numpy(labels[start:stop])
                sync()
                t0 = time.perf_counter()
                res = cam(x, target=target_arg, true_targets=true)
                sync()
                seconds += time.perf_counter() - t0
                if maps_ds is None:  # shapes are known after the first batch
                    maps_ds = _dataset(f, "maps", (n, *res.maps.shape[1:]), dtype, bs)
                    raw_ds = _dataset(f, "raw", (n, *res.raw.shape[1:]), "float32", bs)
                maps_ds[start:stop] = res.maps.cpu().numpy().astype(dtype)
                raw_ds[start:stop] = res.raw.cpu().numpy()
                targets_ds[start:stop] = res.targets.cpu().numpy()
                predicted_ds[start:stop] = res.predicted.cpu().numpy()
            f.attrs.update(
                {
                    "layer": layer,
                    "method": method,
                    "epoch": context.epoch,
                    "target": str(target),
                    "num_images": n,
                    "upsampling": "bilinear, then per-image min-max scaling to [0, 1]",
                    "classes": np.array(classes, dtype=h5py.string_dtype()),
                }
            )
            predicted = predicted_ds[:]
            targets = targets_ds[:]
            chosen = select_images(labels, predicted, count, select, context.rng)
            order = np.argsort(chosen, kind="stable")  # h5py reads increasing indices
            shown_maps = np.empty((len(chosen), *maps_ds.shape[1:]), np.float32)
            shown_maps[order] = maps_ds[np.sort(chosen)] if len(chosen) else shown_maps
            raw_shape = raw_ds.shape[1:]
            maps_shape = maps_ds.shape[1:]

        wrong = int((predicted != labels).sum())
        label = METHOD_LABELS[method]
        items = [
            {
                "index": int(i),
                "true": classes[labels[i]],
                "predicted": classes[predicted[i]],
                "target": classes[targets[i]],
                "correct": bool(labels[i] == predicted[i]),
            }
            for i in chosen
        ]
        summary = {
            "layer": layer,
            "method": method,
            "target": str(target),
            "epoch": context.epoch,
            "device": str(context.device),
            "batch_size": bs,
            "num_images": n,
            "num_misclassified": wrong,
            "raw_shape": list(raw_shape),
            "map_shape": list(maps_shape),
            "maps_dtype": dtype,
            "seconds": seconds,
            "images_per_s": n / seconds if seconds > 0 else None,
            "select": select,
            "shown": items,
        }
        _plot.write_json(out / "gradcam.json", summary)

        title = (
            f"{label} at {layer}, epoch {context.epoch}, target {target}: "
            "image | heatmap | overlay (caption true/predicted)"
        )
        if items:
            images = store.images(chosen)
            fig = cam_figure(images, shown_maps, items, cmap, alpha, title)
            caption = (
                f"{len(items)} of {n} eval images ({select}; {wrong} misclassified overall): "
                f"each shows the image (captioned true/predicted), the {label} heatmap of the "
                "target class "
                f"({colormap}: low → high, scaled per image), overlay at alpha {alpha:g}."
            )
        else:
            fig = _plot.message_figure(f"No {select} images to show among {n}.", title)
            caption = f"no {select} images at epoch {context.epoch}"
        _plot.save_figure(fig, out / "gradcam.png")
        rate = f", {summary['images_per_s']:.0f} images/s" if summary["images_per_s"] else ""
        return [
            context.artifact("gradcam.png", f"{label} examples", "image", caption),
            context.artifact(
                "attributions.h5",
                f"{label} maps of all eval images",
                "h5",
                f"maps ({n}, {maps_shape[0]}, {maps_shape[1]}) {dtype} in [0, 1], raw "
                f"({n}, {raw_shape[0]}, {raw_shape[1]}) at {layer}, targets, predicted.",
            ),
            context.artifact(
                "gradcam.json",
                f"{label} summary",
                "json",
                f"Layer, method, timing ({n} images{rate}) and the shown images.",
            ),
        ]


def _dataset(f: Any, name: str, shape: tuple[int, ...], dtype: str, batch: int) -> Any:
    """A chunked, compressed, checksummed dataset; one chunk holds about one batch."""
    chunks = (max(1, min(batch, shape[0])), *shape[1:])
    return f.create_dataset(
        name,
        shape=shape,
        dtype=dtype,
        chunks=chunks,
        compression="gzip",
        compression_opts=4,
        shuffle=True,
        fletcher32=True,
    )


# -- shared with the captum analyzer -------------------------------------------------------


def choose_layer(context: AnalysisContext, model: Any, layer: str | None) -> str:
    """The layer to explain: the user's, else run metadata, the hook, or the model default.

    A name the user gave is checked by the engine (which lists valid names); a default that
    is not a module of the model is an error naming where it came from.
    """
    if layer:
        return layer
    from explainkit.manager import load_plugins
    from explainkit.models import default_target_layer

    modules = dict(model.named_modules())
    name = context.analyzer_name or "gradcam"
    meta = context.store.attrs.get("default_layer")
    if meta and meta in modules:
        chosen, source = str(meta), "the run metadata"
    else:
        pm = context.plugin_manager or load_plugins()
        answer = pm.hook.resolve_target_layer(model=model, analyzer_name=name)
        if answer is not None:
            if answer not in modules:
                raise AnalyzerError(
                    f"a plugin's resolve_target_layer answered {answer!r}, which is not a "
                    f"module of the model; pass --{name}-layer (e.g. layer4) to override it."
                )
            chosen, source = str(answer), "the resolve_target_layer hook"
        else:
            chosen, source = default_target_layer(model), "the model's default"
    log.warning("%s: no layer given; using %r from %s", name, chosen, source)
    return chosen


def parse_target(target: Any, classes: list[str], flag: str) -> str | int:
    """``predicted``/``true`` as is; a class index or class name as an int index."""
    if isinstance(target, int) and not isinstance(target, bool):
        text = str(target)
    else:
        text = str(target).strip()
    if text in ("predicted", "true"):
        return text
    if text.lstrip("-").isdigit():
        index = int(text)
        if 0 <= index < len(classes):
            return index
        raise AnalyzerError(
            f"{flag} {index} is not a class index of this run; use 0 to {len(classes) - 1}."
        )
    if text in classes:
        return classes.index(text)
    raise AnalyzerError(
        f"{flag} {text!r} is not predicted, true, a class index or a class name; "
        f"classes: {', '.join(classes)}."
    )


def select_images(labels: Any, predicted: Any, count: int, select: str, rng: Any) -> Any:
    """Up to ``count`` eval positions, misclassified first, each group in index order.

    ``mixed`` takes half (rounded down) misclassified and fills up with correct ones (or the
    other way round when one kind runs short); the sample within each kind is seeded.
    """
    import numpy as np

    wrong = np.flatnonzero(predicted != labels)
    right = np.flatnonzero(predicted == labels)
    if select == "misclassified":
        want_wrong, want_right = count, 0
    elif select == "correct":
        want_wrong, want_right = 0, count
    elif select == "mixed":
        want_wrong = min(count // 2, wrong.size)
        want_right = min(count - want_wrong, right.size)
        want_wrong = min(count - want_right, wrong.size)
    else:
        raise AnalyzerError(f"unknown selection {select!r}; use {', '.join(SELECT_CHOICES)}.")

    def sample(pool: Any, k: int) -> Any:
        k = min(k, pool.size)
        return np.sort(rng.choice(pool, size=k, replace=False)) if k else pool[:0]

    return np.concatenate([sample(wrong, want_wrong), sample(right, want_right)]).astype(np.int64)


def get_colormap(name: str, flag: str) -> Any:
    """A matplotlib colormap by name; an unknown name lists a few good ones."""
    import matplotlib

    try:
        return matplotlib.colormaps[name]
    except KeyError:
        raise AnalyzerError(
            f"{flag} {name!r} is not a matplotlib colormap; try turbo, jet, inferno or viridis."
        ) from None


def heat_rgb(maps: Any, cmap: Any) -> Any:
    """(N,H,W) maps in [0, 1] -> uint8 (N,H,W,3) colour images."""
    import numpy as np

    rgba = cmap(np.clip(np.nan_to_num(maps), 0.0, 1.0))
    return (rgba[..., :3] * 255 + 0.5).astype(np.uint8)


def _caption(item: dict) -> str:
    from explainkit.plugins._plot import short

    mark = "✓" if item["correct"] else "✗"
    caption = f"{short(item['true'], 14)}/{short(item['predicted'], 14)} {mark}"
    if item["target"] != item["predicted"]:
        caption += f"  (map of {short(item['target'], 14)})"
    return caption


def cam_figure(
    images: Any, maps: Any, items: list[dict], cmap: Any, alpha: float, title: str
) -> Any:
    """One wide tile per image (image | heatmap | overlay), two tiles per row."""
    import numpy as np
    from explainkit.plugins import _plot

    heat = heat_rgb(maps, cmap)
    overlay = ((1 - alpha) * images.astype(np.float32) + alpha * heat).round()
    overlay = overlay.clip(0, 255).astype(np.uint8)
    n, h = images.shape[:2]
    gap = np.full((n, h, GAP_PX, 3), 255, np.uint8)  # white, before the integer upscaling
    tiles = np.concatenate([images[..., :3], gap, heat, gap, overlay], axis=2)
    return _plot.grid_figure(
        tiles,
        cols=2 if n > 4 else 1,
        captions=[_caption(item) for item in items],
        title=title,
        caption_lines=1,
        font_size=10,
        pad=28,
    )


@hookimpl
def register_analyzers(register):
    register(GradCAMAnalyzer)
