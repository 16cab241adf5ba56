"""Built-in analyzer ``gradcam``: native batched Grad-CAM maps for the whole eval set."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import click

from explainkit import hookimpl
from explainkit.analyzer import AnalysisContext, Analyzer, Option
from explainkit.explain.methods import CAM_METHODS, METHODS, PERTURBATION_METHODS
from explainkit.selection import SELECT_CHOICES

__all__ = ["GradCAMAnalyzer"]

DTYPE_CHOICES = ("float16", "float32")
# explainkit.explain.layers.RESHAPES, named here so that listing options imports no torch.
RESHAPE_CHOICES = ("auto", "nchw", "vit", "swin")
# explainkit.task_explain.TASKS: runs explained per item by explainkit.task_cams.
TASKS = ("multilabel", "segmentation", "detection")
UPSAMPLING = "bilinear, then per-image min-max scaling to [0, 1]"


@dataclass
class _Maps:
    """What the pass over the eval set produced, read back from attributions.h5 (1-D per-image
    columns only: the maps themselves stay in the file)."""

    predicted: Any  # the run's recorded prediction (stored logits: its eval weights and TTA)
    model_predicted: Any  # what the explained forward pass alone predicted
    targets: Any
    raw_shape: tuple[int, ...]
    map_shape: tuple[int, ...]
    seconds: float  # the slowest process's explanation time
    reshape: str  # how the layer's output was viewed as maps, in words
    processes: int  # how many processes shared the images (torchrun), else 1


class GradCAMAnalyzer(Analyzer):
    """Grad-CAM (Selvaraju et al. 2017, https://arxiv.org/abs/1610.02391) for every eval image.

    Weights the target layer's activation channels by their mean gradient of the target
    class score and keeps the positive part: where the layer saw evidence for the class. The
    native engine does one forward and one backward pass per batch (the backward stops at the
    layer), so the whole eval set is explained and written to ``attributions.h5`` batch by
    batch; the figure shows a few images as image | heatmap | overlay.

    Shardable: under ``torchrun --nproc-per-node N -m explainkit analyze`` each process
    explains a contiguous block of images on its own device, and rank 0 joins the blocks
    into one attributions.h5 (docs/distributed.md).

    Example:
        explainkit analyze runs/cifar --plugin gradcam --gradcam-layer layer3.1 --gradcam-target cat
    """

    shardable = True  # read by the host (explainkit.sharding)

    name = "gradcam"
    title = "Grad-CAM"
    summary = (
        "Native batched Grad-CAM, or any CAM method of --gradcam-method, for all eval images "
        "(HDF5 + PNG)."
    )
    needs = frozenset({"store", "checkpoint"})
    tasks = ("classification", "video", *TASKS)
    order = 40
    options = (
        Option(
            "layer",
            str,
            None,
            "Target layer, a name from model.named_modules() such as layer4 or layer3.1 "
            "(default: the run's default layer).",
        ),
        Option(
            "method",
            str,
            "gradcam",
            "CAM variant to compute (the perturbation CAMs and RISE run masks in batches).",
            choices=CAM_METHODS + PERTURBATION_METHODS,
        ),
        Option(
            "reshape",
            str,
            "auto",
            "How the layer's output becomes maps: nchw (N, C, H, W); vit (N, tokens, C): class "
            "and register tokens dropped, patch tokens on their grid; swin (N, H, W, C); auto: "
            "4-D is nchw, 3-D is vit (5-D video layers: one map per frame).",
            choices=RESHAPE_CHOICES,
        ),
        Option(
            "target",
            str,
            "predicted",
            "What each map explains: predicted, true, a class index or a class name; prefix "
            "probability: (softmax) or sigmoid: (a multi-label output) to explain that score "
            "instead of the logit, e.g. probability:cat.",
        ),
        Option(
            "compare",
            str,
            None,
            "Comma-separated further methods (any of explainkit plugins' list: scorecam, "
            "fullgrad, saliency, ...) drawn beside --gradcam-method for the shown images: "
            "gradcam_compare.png, a row per image and a column per method.",
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
        reshape: str,
        target: str,
        compare: str | None,
        count: int,
        select: str,
        colormap: str,
        alpha: float,
        dtype: str,
    ) -> list[dict]:
        from explainkit.figures import get_colormap
        from explainkit.selection import parse_target

        if context.store.task in TASKS:  # one map per detection, class region or label
            from explainkit.task_cams import explain_task_run

            return explain_task_run(
                context, layer=layer, method=method, target=target, count=count, select=select,
                colormap=colormap, alpha=alpha, dtype=dtype, reshape=reshape,
            )  # fmt: skip
        cmap = get_colormap(colormap, "--gradcam-colormap")
        from explainkit.explain.targets import split_score_kind

        kind, target_text = split_score_kind(target)
        target_arg = parse_target(target_text, context.classes, "--gradcam-target")
        others = _parse_compare(compare, method)  # before the pass: a bad name fails now
        model = context.model()
        layer = context.target_layer(layer, model)
        reshape = context.layer_reshape(layer) if reshape == "auto" else reshape
        shard = context.shard  # every image, unless torchrun shares them among processes
        attributes = {**_attributes(context, layer, method, target), "reshape": reshape}
        seconds, layout = _write_maps(
            context, model, layer, method, reshape, (kind, target_arg), dtype, shard, attributes
        )
        reports = shard.merge("attributions.h5", seconds=seconds, layout=layout)
        if not shard.is_main:
            return []  # rank 0 writes the summary and the figure
        path = context.output_dir / "attributions.h5"
        maps = _read_maps(path, reports or [])
        labels = context.store.targets
        chosen = _choose_shown(context, labels, maps.predicted, count, select)
        sources = context.store.sources(chosen)
        items = _shown_items(chosen, labels, maps, context.classes, sources)
        summary = _summary(context, layer, method, target, select, dtype, maps, items)
        figure_caption = _write_figure(context, path, chosen, items, cmap, alpha, summary)
        compared = []
        if others:
            captions = [_caption(item) for item in items]
            shown = dict(chosen=chosen, path=path, targets=maps.targets[chosen], kind=kind,
                         captions=captions, layer=layer, reshape=reshape)  # fmt: skip
            compared = _write_comparison(context, model, others, shown, summary, cmap, alpha)
        _write_json(context, summary)
        if context.store.task == "video" and len(chosen):
            compared.append(_write_frames(context, path, int(chosen[0]), items[0], cmap, alpha))
        return _artifacts(context, summary, figure_caption) + compared


def _write_maps(
    context: AnalysisContext,
    model: Any,
    layer: str,
    method: str,
    reshape: str,
    target: Any,
    dtype: str,
    shard: Any,
    attributes: dict[str, Any],
) -> tuple[float, str | None]:
    """Explain this process's images (``shard``: all of them in one process), batch by batch,
    straight into its attributions.h5 (its part of it under torchrun).

    Returns the seconds spent explaining and the layout in words (None without images).
    The file is written through Python I/O (:func:`explainkit.h5files.open_h5_for_writing`),
    streamed with bounded memory: a full disk stops the pass with one AnalyzerError sentence
    instead of crashing libhdf5, and the file appears only when it is complete.
    """
    import numpy as np
    import torch

    from explainkit.errors import AnalyzerError
    from explainkit.explain.gradcam import CAM_CLASSES
    from explainkit.explain.perturbation import PERTURBATION_CLASSES
    from explainkit.explain.targets import class_target
    from explainkit.h5files import batched_dataset, open_h5_for_writing

    store = context.store
    first, n, bs = shard.start, shard.size, max(1, int(context.batch_size))
    if n == 0:  # more processes than images: this one has none
        return 0.0, None
    labels = store.targets[first : first + n]
    recorded = store.predictions(context.epoch)[first : first + n]  # "predicted" everywhere
    sync = torch.cuda.synchronize if context.device.type == "cuda" else (lambda: None)
    seconds = 0.0
    writer = open_h5_for_writing(shard.part_path("attributions.h5"), AnalyzerError)
    engine = {**CAM_CLASSES, **PERTURBATION_CLASSES}[method]
    with engine(model, layer, reshape) as cam, writer as f:
        f.attrs.update(attributes)
        maps_ds = raw_ds = frames_ds = None
        targets_ds = batched_dataset(f, "targets", (n,), "int64", bs)
        alone_ds = batched_dataset(f, "model_predicted", (n,), "int64", bs)
        batched_dataset(f, "predicted", (n,), "int64", bs)[:] = recorded
        starts = range(0, n, bs)
        for start in context.progress(starts, desc="maps", total=len(starts)):
            stop = min(start + bs, n)
            x = context.model_inputs(np.arange(first + start, first + stop))
            true = torch.from_numpy(labels[start:stop])
            kind, which = target
            batch_target = torch.from_numpy(recorded[start:stop]) if which == "predicted" else which
            if kind != "logit":  # a score other than the logit: explained as a Target
                batch_target = class_target(kind, true if which == "true" else batch_target)
            sync()
            t0 = time.perf_counter()
            res = cam(x, target=batch_target, true_targets=true)
            sync()
            seconds += time.perf_counter() - t0
            maps, raw = res.maps, res.raw
            if maps.dim() == 4:  # a clip's map per frame; "maps": the middle (stored) frame's
                if frames_ds is None:
                    frames_ds = batched_dataset(f, "frame_maps", (n, *maps.shape[1:]), dtype, bs)
                frames_ds[start:stop] = maps.cpu().numpy().astype(dtype)
                maps, raw = maps[:, maps.shape[1] // 2], raw[:, raw.shape[1] // 2]
            if maps_ds is None:  # shapes are known after the first batch
                maps_ds = batched_dataset(f, "maps", (n, *maps.shape[1:]), dtype, bs)
                raw_ds = batched_dataset(f, "raw", (n, *raw.shape[1:]), "float32", bs)
            maps_ds[start:stop] = maps.cpu().numpy().astype(dtype)
            raw_ds[start:stop] = raw.cpu().numpy()
            targets_ds[start:stop] = res.targets.cpu().numpy()
            alone_ds[start:stop] = res.predicted.cpu().numpy()
            writer.check()  # a full disk ends the pass now, not after the last batch
        f.attrs["layout"] = cam.layout.kind
        return seconds, _layout_text(cam.layout)


def _read_maps(path: Any, reports: list[dict]) -> _Maps:
    """The per-image columns and shapes of the finished attributions.h5, and the pass's
    timing: the slowest process's seconds (processes explain at the same time)."""
    import h5py

    with h5py.File(path, "r") as f:
        columns = {name: f[name][:] for name in ("predicted", "model_predicted", "targets")}
        raw_shape, map_shape = f["raw"].shape[1:], f["maps"].shape[1:]
    return _Maps(
        columns["predicted"],
        columns["model_predicted"],
        columns["targets"],
        raw_shape,
        map_shape,
        max(report["seconds"] for report in reports),
        next(report["layout"] for report in reports if report["layout"]),
        len(reports),
    )


def _attributes(context: AnalysisContext, layer: str, method: str, target: str) -> dict:
    """The root attributes of attributions.h5."""
    import h5py
    import numpy as np

    return {
        "layer": layer,
        "method": method,
        "epoch": context.epoch,
        "target": str(target),
        "num_images": context.store.num_images,
        "upsampling": UPSAMPLING,
        "classes": np.array(context.classes, dtype=h5py.string_dtype()),
    }


def _choose_shown(
    context: AnalysisContext, labels: Any, predicted: Any, count: int, select: str
) -> Any:
    from explainkit.selection import select_right_and_wrong

    return select_right_and_wrong(labels, predicted, count, select, context.rng)


def _shown_items(
    chosen: Any, labels: Any, maps: _Maps, classes: list[str], sources: list[str]
) -> list[dict]:
    return [
        {
            "index": int(i),
            "source": source,  # the user's own file (folder datasets), else dataset #index
            "true": classes[labels[i]],
            "predicted": classes[maps.predicted[i]],
            "target": classes[maps.targets[i]],
            "model_predicted": classes[maps.model_predicted[i]],
            "correct": bool(labels[i] == maps.predicted[i]),
        }
        for i, source in zip(chosen, sources, strict=True)
    ]


def _summary(
    context: AnalysisContext,
    layer: str,
    method: str,
    target: str,
    select: str,
    dtype: str,
    maps: _Maps,
    items: list[dict],
) -> dict:
    n = context.store.num_images
    return {
        "layer": layer,
        "method": method,
        "target": str(target),
        "epoch": context.epoch,
        "device": str(context.device),
        "processes": maps.processes,
        "batch_size": max(1, int(context.batch_size)),
        "num_images": n,
        "num_misclassified": int((maps.predicted != context.store.targets).sum()),
        "predicted_from": "the run's recorded predictions (predictions.h5)",
        "num_model_disagrees": int((maps.model_predicted != maps.predicted).sum()),
        "reshape": maps.reshape,
        "raw_shape": list(maps.raw_shape),
        "map_shape": list(maps.map_shape),
        "maps_dtype": dtype,
        "seconds": maps.seconds,
        "images_per_s": n / maps.seconds if maps.seconds > 0 else None,
        "select": select,
        "shown": items,
    }


SHOWN_HEADER = ("index", "source", "true", "predicted", "target", "model_predicted", "correct")


def _layout_text(layout: Any) -> str:
    """How the maps were read off the layer, e.g. "vit: 1 leading token dropped, 4x4 grid"."""
    h, w = layout.grid
    if layout.kind == "vit":
        s = "" if layout.leading == 1 else "s"
        return f"vit: {layout.leading} leading token{s} dropped, {h}x{w} grid of patch tokens"
    return "swin: (N, H, W, C) channels-last" if layout.kind == "swin" else "nchw"


def _write_json(context: AnalysisContext, summary: dict) -> None:
    """gradcam.json (everything) and shown.csv (the figure's images, naming their files)."""
    from explainkit.tables import write_csv, write_json

    write_json(context.output_dir / "gradcam.json", summary)
    rows = [[item[h] for h in SHOWN_HEADER] for item in summary["shown"]]
    write_csv(context.output_dir / "shown.csv", SHOWN_HEADER, rows)


def _write_figure(
    context: AnalysisContext,
    path: Any,
    chosen: Any,
    items: list[dict],
    cmap: Any,
    alpha: float,
    summary: dict,
) -> str:
    """gradcam.png: the shown images as image | heatmap | overlay; returns its caption."""
    import h5py
    import numpy as np

    from explainkit.figures import cam_grid, message_figure, save_figure

    label = METHODS[summary["method"]].label
    n, select, epoch = summary["num_images"], summary["select"], summary["epoch"]
    title = (
        f"{label} at {summary['layer']}, epoch {epoch}, target {summary['target']}: "
        "image | heatmap | overlay (caption true/predicted)"
    )
    out = context.output_dir / "gradcam.png"
    if not items:
        save_figure(message_figure(f"No {select} images to show among {n}.", title), out)
        return f"no {select} images at epoch {epoch}"
    order = np.argsort(chosen, kind="stable")  # h5py reads increasing indices
    shown = np.empty((len(chosen), *summary["map_shape"]), np.float32)
    with h5py.File(path, "r") as f:
        shown[order] = f["maps"][np.sort(chosen)]
    images = context.store.images(chosen)
    fig = cam_grid(images, shown, [_caption(item) for item in items], cmap, alpha, title)
    save_figure(fig, out)
    disagree = summary["num_model_disagrees"]
    alone = (
        f" Predictions are the run's recorded ones; this forward pass alone predicts otherwise "
        f"for {disagree} of {n} images (marked 'this pass alone')."
        if disagree
        else ""
    )
    return (
        f"{len(items)} of {n} eval images ({select}; {summary['num_misclassified']} "
        f"misclassified overall): each shows the image (captioned true/predicted), the {label} "
        f"heatmap of the target class ({cmap.name}: low → high, scaled per image), overlay at "
        f"alpha {alpha:g}." + alone
    )


def _parse_compare(text: str | None, main: str) -> list[str]:
    """The methods ``--gradcam-compare`` names, other than ``main``."""
    from explainkit.explain.methods import parse_methods

    if not text or not str(text).strip():
        return []
    return [name for name in parse_methods(text, "--gradcam-compare") if name != main]


def _write_comparison(
    context: AnalysisContext,
    model: Any,
    others: list[str],
    shown: dict,
    summary: dict,
    cmap: Any,
    alpha: float,
) -> list[dict]:
    """gradcam_compare.png: the shown images explained by the main method (read back from
    attributions.h5) and by ``others`` (computed for these images only, so the cost does not
    grow with the eval set); their timings go to ``summary["compare"]``."""
    import h5py
    import numpy as np
    import torch

    from explainkit.explain.side_by_side import compare_maps, side_by_side_figure
    from explainkit.explain.targets import class_target
    from explainkit.figures import message_figure, save_figure

    main, chosen, out = summary["method"], np.asarray(shown["chosen"]), "gradcam_compare.png"
    title = (
        f"Methods side by side at {summary['layer']}, epoch {summary['epoch']}, target "
        f"{summary['target']}: one row per image, one column per method (overlay)"
    )
    if len(chosen) == 0 or len(summary["map_shape"]) != 2:
        why = "no images to show" if len(chosen) == 0 else "the maps are per frame (video)"
        save_figure(message_figure(f"No comparison: {why}.", title), context.output_dir / out)
        summary["compare"] = {"methods": [main, *others], "ms_per_image": {}, "failed": {}}
        return [context.artifact(out, "Methods side by side", "image", why)]
    order = np.argsort(chosen, kind="stable")  # h5py reads increasing indices
    with h5py.File(shown["path"], "r") as f:
        stored = np.empty((len(chosen), *f["maps"].shape[1:]), np.float32)
        stored[order] = f["maps"][np.sort(chosen)]
    x = context.normalize(context.store.images(chosen))
    t = torch.as_tensor(shown["targets"], dtype=torch.int64, device=x.device)
    targets = t if shown["kind"] == "logit" else class_target(shown["kind"], t)
    maps, ms, failed = compare_maps(
        model, x, targets, others, layer=shown["layer"], reshape=shown["reshape"],
        seed=context.seed, batch_size=int(context.batch_size),
    )  # fmt: skip
    maps[main], ms[main] = stored, 1000 * summary["seconds"] / max(1, summary["num_images"])
    drawn = [n for n in (main, *others) if n in maps]
    summary["compare"] = {"methods": drawn, "ms_per_image": ms, "failed": failed}
    fig = side_by_side_figure(context.store.images(chosen), [maps[n] for n in drawn], drawn, ms,
                              shown["captions"], cmap, alpha, title)  # fmt: skip
    save_figure(fig, context.output_dir / out)
    caption = (
        f"The same {len(chosen)} images as the examples figure, explained for the same class by "
        f"{', '.join(METHODS[n].label for n in drawn)}: overlays ({cmap.name}: low → high, "
        f"scaled per image, alpha {alpha:g}); the first row's captions give milliseconds per "
        f"image ({main}: over the whole eval set; the others: on these images)."
    )
    if failed:
        caption += " Left out: " + "; ".join(f"{n}: {why}" for n, why in failed.items())
    return [context.artifact(out, "Methods side by side", "image", caption)]


def _write_frames(
    context: AnalysisContext, path: Any, clip: int, item: dict, cmap: Any, alpha: float
) -> dict:
    """gradcam_frames.png: eight frames of the first shown clip, each with its own map (a
    video layer's map is one map per frame)."""
    import h5py
    import numpy as np

    from explainkit.clip_files import read_clips
    from explainkit.figures import cam_grid, save_figure

    with h5py.File(path, "r") as f:
        maps = f["frame_maps"][clip].astype(np.float32)
    frames = read_clips(context.run_dir, [clip], len(context.store.targets))[0]
    picked = np.unique(np.linspace(0, len(frames) - 1, 8).round().astype(int))
    captions = [f"frame {t + 1} of {len(frames)}" for t in picked]
    title = f"clip {clip} ({_caption(item)}): image | heatmap | overlay per frame"
    fig = cam_grid(frames[picked], maps[picked], captions, cmap, alpha, title)
    save_figure(fig, context.output_dir / "gradcam_frames.png")
    return context.artifact(
        "gradcam_frames.png",
        "Maps of a clip, frame by frame",
        "image",
        f"Eight of the {len(frames)} frames of clip {clip} with the map of each frame "
        "(attributions.h5: frame_maps (N, T, H, W); maps holds each clip's middle frame).",
    )


def _caption(item: dict) -> str:
    from explainkit.figures import short

    mark = "✓" if item["correct"] else "✗"
    caption = f"{short(item['true'], 14)}/{short(item['predicted'], 14)} {mark}"
    if item["target"] != item["predicted"]:
        caption += f"  (map of {short(item['target'], 14)})"
    if item["model_predicted"] != item["predicted"]:  # e.g. the recorded one used flip TTA
        caption += f"\nthis pass alone: {short(item['model_predicted'], 14)}"
    return caption


def _artifacts(context: AnalysisContext, summary: dict, figure_caption: str) -> list[dict]:
    label = METHODS[summary["method"]].label
    n, layer, dtype = summary["num_images"], summary["layer"], summary["maps_dtype"]
    (mh, mw), (rh, rw) = summary["map_shape"], summary["raw_shape"]
    rate = f", {summary['images_per_s']:.0f} images/s" if summary["images_per_s"] else ""
    return [
        context.artifact("gradcam.png", f"{label} examples", "image", figure_caption),
        context.artifact(
            "shown.csv",
            "Images in the figure",
            "table",
            "source: the image's file; target: the class its map explains; model_predicted: "
            "what the explained forward pass alone predicts.",
        ),
        context.artifact(
            "attributions.h5",
            f"{label} maps of all eval images",
            "h5",
            f"maps ({n}, {mh}, {mw}) {dtype} in [0, 1], raw ({n}, {rh}, {rw}) at {layer} "
            f"({summary['reshape']}), targets, predicted.",
        ),
        context.artifact(
            "gradcam.json",
            f"{label} summary",
            "json",
            f"Layer, method, timing ({n} images{rate}) and the shown images.",
        ),
    ]


@hookimpl
def register_analyzers(register):
    register(GradCAMAnalyzer)
