"""Maps of some eval images as files: ``attributions-METHOD.h5``, one per method (the captum
analyzer writes them; ``explainkit serve`` reads them).

Each file has the gradcam analyzer's form (``attributions.h5``): a ``maps`` dataset of one
(H, W) map in [0, 1] per eval image, ``targets`` (the class each map explains) and
``predicted`` (the run's recorded prediction) per image, and the root attributes ``method``,
``epoch``, ``target``, ``num_images``, ``classes`` (and ``layer`` for a method that uses
one). So ``explainkit serve`` shows Captum's maps beside the CAMs. The captum analyzer
explains only some images (the figure's, and the first ``--captum-map-images``): the other
rows are never written, so they read as NaN maps and a ``targets`` of -1, and the ``index``
dataset lists the store positions that were explained. Files are streamed batch by batch
through :func:`explainkit.h5files.open_h5_for_writing` (bounded memory; a full disk is one
sentence).
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any

from explainkit.errors import AnalyzerError
from explainkit.explain.methods import METHODS

NOT_EXPLAINED = -1  # ``targets`` of an image the analyzer did not explain


def file_name(method: str) -> str:
    """``attributions-METHOD.h5``, a colon made a dash (``smoothgrad:saliency`` ->
    ``attributions-smoothgrad-saliency.h5``)."""
    return f"attributions-{method.replace(':', '-')}.h5"


def resolve_targets(target: Any, labels: Any, recorded: Any) -> Any:
    """The class each map explains, as the native engine resolves ``target``: the recorded
    prediction, the true class, or one class index for every image."""
    import numpy as np

    if target == "predicted":
        return np.asarray(recorded, np.int64)
    if target == "true":
        return np.asarray(labels, np.int64)
    return np.full(len(labels), int(target), np.int64)


def write_maps(
    context: Any,
    model: Any,
    layer: str,
    target: Any,
    target_text: str,
    side: dict,
    extra: int,
    method_fn: Any,
) -> list[str]:
    """Write every method's ``attributions-METHOD.h5`` into ``context.output_dir`` (an
    :class:`explainkit.analyzer.AnalysisContext`): the first ``extra`` eval images,
    explained batch by batch, and the side by side's images (``side``, already explained).

    ``method_fn(name)`` gives ``fn(model, x, targets) -> (n, H, W)`` maps. Returns the file
    names written.
    """
    import h5py
    import numpy as np
    import torch

    from explainkit.h5files import COMPRESSED, batched_dataset, open_h5_for_writing

    store = context.store
    n = store.num_images
    methods = side["methods"]
    shown = np.asarray(side["indices"], np.int64)
    first = np.arange(min(max(0, extra), n), dtype=np.int64)
    explained = np.union1d(first, shown)
    if not len(explained):
        return []
    labels = store.targets
    recorded = store.predictions(context.epoch)
    targets = resolve_targets(target, labels, recorded)
    bs = max(1, int(context.batch_size))
    shape = side["maps"].shape[2:]
    names = [file_name(m) for m in methods]
    with ExitStack() as stack:
        files = []
        for name, path in zip(methods, names, strict=True):
            f = stack.enter_context(open_h5_for_writing(context.output_dir / path, AnalyzerError))
            attrs = {
                "analysis": "captum",
                "method": name,
                "epoch": context.epoch,
                "target": str(target_text),
                "num_images": n,
                "explained": len(explained),
                "classes": np.array(context.classes, dtype=h5py.string_dtype()),
            }
            if METHODS[name].uses_layer:
                attrs["layer"] = layer
            f.attrs.update(attrs)
            maps = batched_dataset(f, "maps", (n, *shape), "float32", bs, fillvalue=np.nan)
            tds = batched_dataset(f, "targets", (n,), "int64", bs, fillvalue=NOT_EXPLAINED)
            f.create_dataset("predicted", data=recorded.astype(np.int64), **COMPRESSED)
            f.create_dataset("index", data=explained, **COMPRESSED)
            files.append((maps, tds))
        for start in range(0, len(first), bs):
            rows = first[start : start + bs]
            x = context.normalize(store.images(rows))
            t = torch.from_numpy(targets[rows])
            for name, (maps, tds) in zip(methods, files, strict=True):
                m = method_fn(name)(model, x, t).float().cpu().numpy()
                if not np.isfinite(m).all():
                    raise AnalyzerError(f"captum method {name} produced non-finite attributions")
                maps[int(rows[0]) : int(rows[-1]) + 1] = m
                tds[int(rows[0]) : int(rows[-1]) + 1] = targets[rows]
        for k, i in enumerate(shown):  # the figure's maps, as they were drawn
            for j, (maps, tds) in enumerate(files):
                maps[int(i)] = side["maps"][j, k]
                tds[int(i)] = int(side["targets"][k])
    return names
