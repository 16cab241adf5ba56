"""Images and maps as PNG bytes, one image at a time: read from the store and the attributions
files, or computed on demand on the run's device.

Maps are coloured with one fixed lookup table (turbo, 256 entries) at their own resolution,
and the page scales them up without smoothing, so what the browser draws can be checked pixel
by pixel against what was served (tests/serve/test_browser.py does).
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np

from explainkit.errors import AnalyzerError, ExplainkitError
from explainkit.serve.runs import MapSource, ServedRun

COLORMAP = "turbo"
CACHE_MAPS = 512  # computed maps kept (each H x W float32: 200 KiB at 224 px; ~100 MiB)
CACHE_THUMB_BYTES = 32 << 20  # thumbnails kept (about 2,000 at 112 px of a 224-px image)
CACHE_MODELS = 2  # models kept per server (a checkpoint per saved epoch can be many)
_lut: np.ndarray | None = None
_lut_lock = threading.Lock()


class MapError(ExplainkitError):
    """A map that cannot be shown: an error on that view, not a dead server."""


class NotExplained(LookupError):
    """An image a partial attributions file (the captum analyzer's) did not explain: 404."""


def lut() -> np.ndarray:
    """uint8 (256, 3): the colormap as a table (matplotlib is asked once)."""
    global _lut
    with _lut_lock:
        if _lut is None:
            import matplotlib

            table = matplotlib.colormaps[COLORMAP](np.linspace(0, 1, 256))[:, :3]
            _lut = np.round(table * 255).astype(np.uint8)
    return _lut


def colorize(m: np.ndarray) -> np.ndarray:
    """(H, W) map in [0, 1] -> uint8 (H, W, 3) through :func:`lut` (NaN shows as 0)."""
    m = np.nan_to_num(np.asarray(m, dtype=np.float32), nan=0.0)
    return lut()[np.clip(np.round(m * 255), 0, 255).astype(np.uint8)]


def png(pixels: np.ndarray, size: int | None = None) -> bytes:
    """uint8 (H, W, 3) or (H, W) -> PNG bytes; ``size``: fit the longer side to it."""
    from PIL import Image

    img = Image.fromarray(np.ascontiguousarray(pixels))
    if size and max(img.size) > size:
        img.thumbnail((size, size), Image.Resampling.BILINEAR)
    out = io.BytesIO()
    img.save(out, format="PNG", compress_level=1)
    return out.getvalue()


def image_png(run: ServedRun, i: int, size: int | None = None) -> bytes:
    image = run.store.images([i])[0]
    return png(image[..., 0] if image.shape[-1] == 1 else image, size)


class Thumbnails:
    """A grid page's thumbnails, made together when its JSON is asked for and kept in a cache
    bounded in bytes: one read of the store for the page's images (they share compressed
    chunks) instead of one per thumbnail, which the browser then fetches at once."""

    def __init__(self, max_bytes: int = CACHE_THUMB_BYTES) -> None:
        self.max_bytes = max_bytes
        self._bytes = 0
        self._cache: OrderedDict[tuple[int, int, int], bytes] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def bytes(self) -> int:
        return self._bytes

    def prefetch(self, run: ServedRun, indices: Any, size: int) -> None:
        with self._lock:
            todo = [int(i) for i in indices if (run.position, int(i), size) not in self._cache]
        if not todo:
            return
        images = run.store.images(np.asarray(todo))
        made = [
            (i, png(im[..., 0] if im.shape[-1] == 1 else im, size))
            for i, im in zip(todo, images, strict=True)
        ]
        with self._lock:
            for i, data in made:
                self._put((run.position, i, size), data)

    def get(self, run: ServedRun, i: int, size: int) -> bytes:
        key = (run.position, i, size)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        data = image_png(run, i, size)
        with self._lock:
            self._put(key, data)
        return data

    def _put(self, key: tuple[int, int, int], data: bytes) -> None:
        if key in self._cache:
            return
        self._cache[key] = data
        self._bytes += len(data)
        while self._bytes > self.max_bytes and self._cache:
            _, old = self._cache.popitem(last=False)
            self._bytes -= len(old)


def explained(source: MapSource, i: int) -> bool:
    """Whether ``source`` holds a map of image ``i`` (a damaged file: True, so that its view
    says what is wrong)."""
    if not source.partial:
        return True
    import h5py

    try:
        with h5py.File(source.path, "r") as f:
            return int(f["targets"][i]) >= 0
    except (OSError, KeyError, ValueError, TypeError, IndexError):
        return True


def stored_map(source: MapSource, i: int, n: int) -> np.ndarray:
    """Row ``i`` of an attributions file's ``maps``: one chunk read, never the whole set."""
    import h5py

    try:
        with h5py.File(source.path, "r") as f:
            ds = f["maps"]
            if ds.ndim != 3 or ds.shape[0] != n:
                raise MapError(
                    f"{source.key}/attributions.h5 holds maps of shape {ds.shape}, not one "
                    f"(height, width) map for each of the run's {n} images"
                )
            if source.partial and int(f["targets"][i]) < 0:
                raise NotExplained(
                    f"the {source.key} analysis did not explain image {i}; it explained "
                    f"{int(f.attrs.get('explained', 0))} images (its 'index' dataset)"
                )
            return np.asarray(ds[i], dtype=np.float32)
    except (MapError, NotExplained):
        raise
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise MapError(f"{source.key}/attributions.h5 cannot be read: {e}") from e


class Engine:
    """Computes maps the files do not hold, on the run's device, one request at a time.

    Models are loaded when first needed and a few are kept; computed maps are kept in a
    bounded cache, so a page that asks twice computes once. One lock per server: two
    computations at once would only compete for the same device.
    """

    def __init__(self, registries: Any, device: str | None = None) -> None:
        self.registries = registries
        self.device = device
        self._lock = threading.Lock()
        self._models: OrderedDict[tuple[int, int], Any] = OrderedDict()
        self._maps: OrderedDict[tuple, np.ndarray] = OrderedDict()

    def run_device(self, run: ServedRun) -> Any:
        """``--device`` when given, else the device the run was trained on, else the CPU
        (a CUDA run opened on a machine without CUDA is explained on its CPU)."""
        from explainkit.device import resolve_device

        wanted = self.device or str(run.config.get("device") or "auto")
        try:
            return resolve_device(wanted)
        except ExplainkitError:
            if self.device:
                raise
            return resolve_device("cpu")

    def _model(self, run: ServedRun, epoch: int) -> Any:
        from explainkit.train.checkpoint import load_model

        key = (run.position, epoch)
        if key in self._models:
            self._models.move_to_end(key)
            return self._models[key]
        if self.registries is None:
            raise MapError("no model registry was handed to the explorer; maps cannot be computed")
        model = load_model(run.run.path, self.registries, epoch, self.run_device(run))
        self._models[key] = model
        while len(self._models) > CACHE_MODELS:
            self._models.popitem(last=False)
        return model

    def compute(self, run: ServedRun, i: int, method: str, epoch: int, target: str) -> np.ndarray:
        """The ``method`` map of image ``i`` with the checkpoint of ``epoch``, explaining the
        run's recorded prediction (``target="predicted"``) or the true class."""
        key = (run.position, i, method, epoch, target)
        what = f"the {method} map of image {i}"
        return self._cached(key, what, lambda: self._explain(run, i, method, epoch, target))

    def compute_item(self, run: ServedRun, i: int, item: Any, method: str) -> np.ndarray:
        """The ``method`` map of one item of a task image (:mod:`explainkit.serve.items`),
        with the checkpoint of the epoch that chose the item."""
        from explainkit.serve.items import explain_item

        def explain() -> Any:
            model = self._model(run, item.epoch)
            return explain_item(run, model, i, item, method, run.items.layer)

        what = f"the {method} map of item {item.index} of image {i}"
        return self._cached((run.position, i, method, item.key), what, explain)

    def _cached(self, key: tuple, what: str, compute: Callable[[], Any]) -> Any:
        """``compute()`` once per key (the last :data:`CACHE_MAPS` kept, one at a time under
        the lock); its failure is a MapError saying ``what`` cannot be computed."""
        with self._lock:
            if key in self._maps:
                self._maps.move_to_end(key)
                return self._maps[key]
            try:
                result = compute()
            except ExplainkitError as e:
                raise MapError(f"{what} cannot be computed: {e}") from e
            except (OSError, RuntimeError, ValueError) as e:  # torch's own, a bad checkpoint
                raise MapError(f"{what} cannot be computed: {e}") from e
            self._maps[key] = result
            while len(self._maps) > CACHE_MAPS:
                self._maps.popitem(last=False)
            return result

    def _explain(self, run: ServedRun, i: int, method: str, epoch: int, target: str) -> Any:
        import torch

        from explainkit.explain.gradcam import compute_cam

        model = self._model(run, epoch)
        device = next(model.parameters()).device
        x = torch.from_numpy(run.store.images([i])).to(device).permute(0, 3, 1, 2).float() / 255
        mean = torch.tensor(run.store.mean, device=device).view(1, -1, 1, 1)
        std = torch.tensor(run.store.std, device=device).view(1, -1, 1, 1)
        x = (x - mean) / std
        cls = run.targets[i] if target == "true" else run.predicted[i]
        layer = _layer(run, model)  # None: the engine chooses, as the analyzers do
        res = compute_cam(model, x, layer, method, target=torch.tensor([int(cls)]))
        return res.maps[0].detach().float().cpu().numpy()


def _layer(run: ServedRun, model: Any) -> str | None:
    """The layer the run's gradcam analysis explained, else the run's default layer (None:
    let explainkit.explain.layers choose, as the analyzers do)."""
    for source in run.sources.values():
        if source.path is not None and source.layer:
            return source.layer
    layer = run.store.attrs.get("default_layer") or None
    if layer and layer not in dict(model.named_modules()):
        raise AnalyzerError(f"the run's default layer {layer!r} is not a module of its model")
    return layer
