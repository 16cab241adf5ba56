"""The ``gradcam`` analyzer on a multi-label, segmentation or detection run.

Each eval image's items (:mod:`explainkit.task_explain`: its top detections, its predicted
class regions, its predicted labels, or the ground truth's with ``--gradcam-target true``)
get one map each, explained with the item's target: a :class:`Detection` on the explained
box, a :class:`SegmentationRegion` over the class's region, a :class:`MultiLabel` label. The
maps are streamed into ``attributions.h5``, one row per item, with what each explains; the
figure shows a few items as image (with the box or mask outline) | heatmap | overlay.

Every ``--gradcam-method`` works here: the perturbation CAMs (Score-CAM, SS-CAM, IS-CAM,
Ablation-CAM, RISE) score each item's target on every masked copy of its image, the box
matched by IoU on each copy's detections (:mod:`explainkit.explain.perturbation_targets`).
"""

from __future__ import annotations

import time
from typing import Any

from explainkit.analyzer import AnalysisContext
from explainkit.errors import AnalyzerError

__all__ = ["explain_task_run", "outline"]

UPSAMPLING = "bilinear, then per-map min-max scaling to [0, 1]"
OUTLINE = (255, 255, 255)
SHOWN_HEADER = ("item", "image", "source", "class", "recorded_score", "correct", "box")


def explain_task_run(
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
    reshape: str = "auto",
) -> list[dict]:
    """Grad-CAM (or another native CAM, or a perturbation CAM: Score-CAM, Ablation-CAM,
    RISE...) of every item of a task run; returns the artifacts."""
    from explainkit.explain.gradcam import CAM_CLASSES
    from explainkit.explain.perturbation import PERTURBATION_CLASSES
    from explainkit.figures import get_colormap
    from explainkit.task_explain import choose_items, explained_model

    store = context.store
    engines = {**CAM_CLASSES, **PERTURBATION_CLASSES}
    if method not in engines:
        raise AnalyzerError(
            f"a {store.task} run is explained by the CAM methods ({', '.join(sorted(engines))}), "
            f"not {method}"
        )
    if context.shard.world_size > 1:
        raise AnalyzerError(
            f"gradcam explains a {store.task} run in one process; run analyze without torchrun"
        )
    cmap = get_colormap(colormap, "--gradcam-colormap")
    items = choose_items(store, context.epoch, target)
    model = context.model()
    layer = context.target_layer(layer, model)
    reshape = context.layer_reshape(layer) if reshape == "auto" else reshape
    module = dict(model.named_modules())[layer]
    path = context.output_dir / "attributions.h5"
    engine = engines[method](explained_model(model, store.task), module, reshape)
    seconds, shapes = _write_maps(context, engine, items, dtype, path, (layer, method))
    rows = _shown(context, items, count, select)
    summary = _summary(context, items, (layer, method, target, select), seconds, shapes, rows)
    from explainkit.tables import write_csv, write_json

    write_json(context.output_dir / "gradcam.json", summary)
    write_csv(context.output_dir / "shown.csv", SHOWN_HEADER,
              [[r[h] for h in SHOWN_HEADER] for r in summary["shown"]])  # fmt: skip
    caption = _figure(context, path, items, rows, cmap, alpha, summary)
    return _artifacts(context, summary, caption)


def _write_maps(
    context: AnalysisContext, engine: Any, items: Any, dtype: str, path: Any, what: tuple
) -> tuple[float, tuple]:
    """Explain the items a batch at a time straight into ``path``; returns the seconds spent
    explaining and the (map, raw) shapes per item."""
    import h5py
    import numpy as np
    import torch

    from explainkit.h5files import batched_dataset, open_h5_for_writing
    from explainkit.task_explain import EXPLAINED, item_target, target_regions

    store, m, bs = context.store, len(items), max(1, int(context.batch_size))
    h, w = (int(v) for v in store.images([0]).shape[1:3])
    sync = torch.cuda.synchronize if context.device.type == "cuda" else (lambda: None)
    seconds, raw_shape = 0.0, (0, 0)
    writer = open_h5_for_writing(path, AnalyzerError)
    with writer as f, engine as cam:
        f.attrs.update(
            task=store.task, target=items.target, layer=what[0], method=what[1],
            epoch=context.epoch, explained=EXPLAINED[store.task], upsampling=UPSAMPLING,
            num_images=store.num_images, num_items=m,
            classes=np.array(context.classes, dtype=h5py.string_dtype()),
        )  # fmt: skip
        columns = {"image": items.image, "class": items.cls, "box": items.box,
                   "recorded_score": items.score, "correct": items.correct}  # fmt: skip
        for name, values in columns.items():
            batched_dataset(f, name, values.shape, values.dtype.str, bs)[:] = values
        maps_ds = batched_dataset(f, "maps", (m, h, w), dtype, bs)
        raw_ds = scores_ds = targets_ds = None
        starts = range(0, m, bs)
        for start in context.progress(starts, desc="maps", total=len(starts)):
            part = items.take(slice(start, min(start + bs, m)))
            images, inverse = np.unique(part.image, return_inverse=True)
            x = context.normalize(store.images(images))[torch.from_numpy(inverse.reshape(-1))]
            target = item_target(part, target_regions(store, context.epoch, part))
            sync()
            t0 = time.perf_counter()
            res = cam(x, target=target)
            sync()
            seconds += time.perf_counter() - t0
            if raw_ds is None:
                raw_shape = tuple(res.raw.shape[1:])
                raw_ds = batched_dataset(f, "raw", (m, *raw_shape), "float32", bs)
                scores_ds = batched_dataset(f, "explained_score", (m,), "float32", bs)
                targets_ds = batched_dataset(f, "targets", (m,), "int64", bs)
            stop = start + len(part)
            maps_ds[start:stop] = res.maps.detach().cpu().numpy().astype(dtype)
            raw_ds[start:stop] = res.raw.detach().cpu().numpy()
            scores_ds[start:stop] = res.scores.detach().float().cpu().numpy()
            targets_ds[start:stop] = res.targets.cpu().numpy()
            writer.check()  # a full disk ends the pass now
        f.attrs["layout"] = cam.layout.kind if cam.layout is not None else "nchw"
    return seconds, ((h, w), raw_shape)


def _shown(context: AnalysisContext, items: Any, count: int, select: str) -> Any:
    """Up to ``count`` items for the figure: ``select`` picks right, wrong or both (an item is
    wrong when it disagrees with the ground truth), at most one per image while others are
    left, seeded."""
    import numpy as np

    from explainkit.selection import select_right_and_wrong

    first = np.unique(items.image, return_index=True)[1]  # each image's first item
    pool = items.take(first)
    chosen = select_right_and_wrong(
        pool.correct.astype(np.int64), np.ones(len(pool), np.int64), count, select, context.rng
    )
    return np.sort(first[chosen])


def _summary(
    context: AnalysisContext, items: Any, what: tuple, seconds: float, shapes: tuple, rows: Any
) -> dict:
    import numpy as np

    from explainkit.task_explain import EXPLAINED

    layer, method, target, select = what
    store, classes = context.store, context.classes
    sources = store.sources(items.image[rows]) if len(rows) else []
    shown = [
        {
            "item": int(r),
            "image": int(items.image[r]),
            "source": source,
            "class": classes[int(items.cls[r])],
            "recorded_score": None if np.isnan(items.score[r]) else round(float(items.score[r]), 4),
            "correct": bool(items.correct[r]),
            "box": None
            if np.isnan(items.box[r]).any()
            else [round(float(v), 1) for v in items.box[r]],
        }
        for r, source in zip(rows, sources, strict=True)
    ]
    m = len(items)
    return {
        "task": store.task,
        "layer": layer,
        "method": method,
        "target": target,
        "explained": EXPLAINED[store.task],
        "epoch": context.epoch,
        "device": str(context.device),
        "num_images": store.num_images,
        "num_items": m,
        "images_with_items": int(len(np.unique(items.image))),
        "num_disagreeing": int((~items.correct).sum()),
        "map_shape": list(shapes[0]),
        "raw_shape": list(shapes[1]),
        "seconds": seconds,
        "items_per_s": m / seconds if seconds > 0 else None,
        "select": select,
        "shown": shown,
    }


def outline(region: Any) -> Any:
    """(H, W) bool: the pixels of ``region`` with a neighbour outside it (its border)."""
    import numpy as np

    padded = np.pad(region, 1, constant_values=False)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return region & ~inner


def _figure(
    context: AnalysisContext, path: Any, items: Any, rows: Any, cmap: Any, alpha: float,
    summary: dict,
) -> str:  # fmt: skip
    """gradcam.png: each shown item as image | heatmap | overlay with its box or region
    outlined; returns the caption."""
    import h5py
    import numpy as np

    from explainkit.figures import cam_grid, message_figure, save_figure, scale_for, short
    from explainkit.task_explain import box_masks, target_regions

    task, epoch = summary["task"], summary["epoch"]
    title = (f"{summary['method']} at {summary['layer']}, epoch {epoch}, {task}: "
             f"{summary['target']} items: image | heatmap | overlay")  # fmt: skip
    out = context.output_dir / "gradcam.png"
    if not len(rows):
        save_figure(message_figure(f"no {summary['select']} items to show", title), out)
        return f"no {summary['select']} items among {len(items)} at epoch {epoch}"
    with h5py.File(path, "r") as f:
        maps = f["maps"][np.sort(rows)].astype(np.float32)
    shown = items.take(rows)
    images = context.store.images(shown.image)
    h, w = images.shape[1:3]
    factor = scale_for(h)
    big = images.repeat(factor, 1).repeat(factor, 2)
    if task == "detection":
        regions = box_masks(shown.box * factor, h * factor, w * factor)
    elif task == "segmentation":
        small = target_regions(context.store, epoch, shown) > 0
        regions = small.repeat(factor, 1).repeat(factor, 2)
    else:
        regions = None
    if regions is not None:
        for k in range(len(rows)):
            border = outline(regions[k])
            border |= outline(regions[k] & ~border)  # two pixels wide at the upscaled size
            big[k][border] = OUTLINE
    captions = [
        f"#{s['image']} {short(s['class'], 14)}"
        + (f" {s['recorded_score']:.2f}" if s["recorded_score"] is not None else "")
        + (" ✓" if s["correct"] else " ✗")
        for s in summary["shown"]
    ]
    fig = cam_grid(big, maps.repeat(factor, 1).repeat(factor, 2), captions, cmap, alpha, title)
    save_figure(fig, out)
    agree = "matches a true box of its class at IoU 0.5" if task == "detection" else (
        "is in the true mask" if task == "segmentation" else "is a true label")  # fmt: skip
    if summary["target"] == "true":
        agree = "was predicted by the model"
    return (
        f"{len(rows)} of {len(items)} items of {summary['images_with_items']} images "
        f"({summary['select']}): each map explains {summary['explained']}; the explained "
        f"{'box' if task == 'detection' else 'region'} is outlined in white"
        + ("" if regions is not None else " (a label has no region)")
        + f". Caption: image, class, recorded score, ✓ when the item {agree}. "
        f"Heatmap {cmap.name} (low → high, scaled per map), overlay at alpha {alpha:g}."
    )


def _artifacts(context: AnalysisContext, summary: dict, caption: str) -> list[dict]:
    m, (mh, mw), task = summary["num_items"], summary["map_shape"], summary["task"]
    raw = "x".join(str(v) for v in summary["raw_shape"])
    rate = f", {summary['items_per_s']:.0f} items/s" if summary["items_per_s"] else ""
    return [
        context.artifact("gradcam.png", f"{summary['method']} per {task} item", "image", caption),
        context.artifact(
            "shown.csv",
            "Items in the figure",
            "table",
            "image: its store position; source: its file; correct: agrees with the ground "
            "truth (or, for true items, with the predictions).",
        ),  # fmt: skip
        context.artifact(
            "attributions.h5",
            f"{summary['method']} maps of every {task} item",
            "h5",
            f"maps ({m}, {mh}, {mw}) in [0, 1] and raw ({m}, {raw}) at {summary['layer']}, one "
            "row per item; image, class, box, recorded_score, explained_score, correct say "
            "what each explains.",
        ),  # fmt: skip
        context.artifact(
            "gradcam.json",
            f"{summary['method']} summary",
            "json",
            f"Layer, method, target, timing ({m} items{rate}) and the shown items.",
        ),  # fmt: skip
    ]
