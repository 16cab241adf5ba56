"""What a CAM method returns for a batch, and the per-image scaling every method shares."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from explainkit.errors import AnalyzerError

__all__ = ["SHOWN", "CAMResult", "normalize_maps"]

_EPS = 1e-12


@dataclass
class CAMResult:
    """The maps of one batch, all on the model's device.

    Attributes:
        maps: (N, H, W) float32, upsampled (bilinear, as Captum's ``interpolate``) to the
            input size and scaled per image to [0, 1]; an all-zero map stays zero.
        raw: (N, h, w) float32 at the layer's resolution (a token layer's patch grid), after
            ReLU, not normalized.
        targets: (N,) int64, the class each map explains.
        predicted: (N,) int64, the model's predicted class.
        logits: (N, C) a classifier's output (detached); for other models (detectors,
            segmenters, embeddings) the explained scores as (N, 1).
        scores: (N,) the scalar per image whose gradient was explained (the target's score),
            or None.
        images: The explained images as a person sees them, uint8 (N, H, W, 3), or None;
            :func:`explainkit.explain_image` fills it, so the result draws itself.
        classes: Class names for captions, or None (captions then show class ids).

    Video clips (N, C, T, H, W) give ``maps`` (N, T, H, W) and ``raw`` (N, t, h, w): one map
    per frame, scaled to [0, 1] per clip. Targets without a class (an embedding) are -1, and
    so is ``predicted`` for a model that is no classifier.

    As the last expression of a notebook cell the result draws itself (``_repr_png_``,
    ``_repr_html_``: image | heatmap | overlay of up to :data:`SHOWN` images), whether or not
    ``%matplotlib inline`` is on.
    """

    maps: Tensor
    raw: Tensor
    targets: Tensor
    predicted: Tensor
    logits: Tensor
    scores: Tensor | None = None
    images: Any = None
    classes: Sequence[str] | None = None

    def __len__(self) -> int:
        return self.maps.shape[0]

    def to(self, device: torch.device | str) -> CAMResult:
        """Move every tensor, e.g. to the CPU before saving."""
        moved = CAMResult(*(_to(getattr(self, f), device) for f in _FIELDS))
        moved.images, moved.classes = self.images, self.classes
        return moved

    def captions(self) -> list[str]:
        """``predicted tabby (0.91), map of tabby`` per image: names when ``classes`` are
        known, ids otherwise; the probability is the softmax of the logits."""
        probs = self.logits.detach().float().softmax(-1).cpu()
        name = (lambda i: str(self.classes[i])) if self.classes else (lambda i: str(i))  # type: ignore[index]
        out = []
        for row, (p, t) in enumerate(
            zip(self.predicted.tolist(), self.targets.tolist(), strict=True)
        ):
            if p < 0 or t < 0:  # no class: a detector's box, a region, an embedding
                out.append("explained score" if self.scores is None else
                           f"explained score {float(self.scores[row]):.3g}")  # fmt: skip
                continue
            out.append(f"predicted {name(p)} ({float(probs[row, p]):.2f}), map of {name(t)}")
        return out

    def figure(self, limit: int | None = None) -> Any:
        """The matplotlib figure of :meth:`show` for the first ``limit`` images (default
        all), using the explained images when known (else the maps themselves, in gray)."""
        import numpy as np

        n = len(self) if limit is None else min(limit, len(self))
        if self.images is not None:
            images = self.images[:n]
        else:
            gray = (self.maps[:n].detach().float().cpu().numpy() * 255).astype(np.uint8)
            images = np.repeat(gray[..., None], 3, axis=-1)
        sub = CAMResult(*(_head(getattr(self, f), n) for f in _FIELDS), classes=self.classes)
        return sub.show(images, captions=sub.captions())

    def _repr_png_(self) -> bytes:
        """PNG bytes of :meth:`figure` (the first :data:`SHOWN` images), for notebooks."""
        import io

        import matplotlib.pyplot as plt

        fig = self.figure(SHOWN)
        buffer = io.BytesIO()
        try:
            fig.savefig(buffer, format="png", dpi=80)
        finally:
            plt.close(fig)
        return buffer.getvalue()

    def _repr_html_(self) -> str:
        """The figure as an inline <img>, and how many images the result holds."""
        import base64

        png = base64.b64encode(self._repr_png_()).decode("ascii")
        more = f" (the first {SHOWN} of {len(self)} shown)" if len(self) > SHOWN else ""
        return (
            f'<div><img src="data:image/png;base64,{png}" alt="CAM maps"/>'
            f"<div>CAMResult: {len(self)} map(s){more}</div></div>"
        )

    def show(
        self,
        images: Any,
        captions: Sequence[str] | None = None,
        colormap: str = "turbo",
        alpha: float = 0.5,
    ) -> Any:
        """A figure of each image | heatmap | overlay; a notebook displays it inline.

        Args:
            images: The explained images as uint8 (N, H, W, 3), a numpy array or a tensor
                (un-normalized: what a person sees).
            captions: One line per image (default: the predicted and explained class ids).
            colormap: A matplotlib colormap name.
            alpha: Heatmap opacity in the overlay.
        """
        import numpy as np

        from explainkit.figures import cam_grid, get_colormap

        pixels = images.cpu().numpy() if isinstance(images, Tensor) else np.asarray(images)
        if captions is None:
            captions = self.captions()
        maps = self.maps.detach().float().cpu().numpy()
        return cam_grid(pixels, maps, captions, get_colormap(colormap), alpha)

    @staticmethod
    def cat(results: Sequence[CAMResult]) -> CAMResult:
        """Join batch results along the image dimension."""
        if not results:
            raise AnalyzerError("no CAM results to join; pass at least one image")
        return CAMResult(*(_cat([getattr(r, f) for r in results]) for f in _FIELDS))


_FIELDS = ("maps", "raw", "targets", "predicted", "logits", "scores")
SHOWN = 8  # images a notebook draws of one result, so a big batch stays a legible figure


def _to(t: Tensor | None, device: torch.device | str) -> Tensor | None:
    return None if t is None else t.to(device)


def _cat(parts: list[Tensor | None]) -> Tensor | None:
    return None if any(p is None for p in parts) else torch.cat(parts)  # type: ignore[arg-type]


def _head(t: Tensor | None, n: int) -> Tensor | None:
    return None if t is None else t[:n]


def normalize_maps(maps: Tensor, rtol: float = 1e-5) -> Tensor:
    """Scale each map of (N, H, W) (or (N, T, H, W) clips) to [0, 1]; a constant map is zero.

    "Constant" allows float noise: a map whose range is within ``rtol`` of its magnitude
    (a 1x1 layer upsampled leaves ripples of ~1e-8) is constant, and stretching that noise
    to [0, 1] would paint a confident picture of nothing.
    """
    maps = maps if maps.is_floating_point() else maps.float()
    low, high = torch.aminmax(maps.flatten(1), dim=1)  # one pass over the maps, not two
    span = high - low
    scale = torch.maximum(high.abs(), low.abs())
    constant = span <= rtol * scale
    shape = (-1,) + (1,) * (maps.dim() - 1)
    span = torch.where(constant, 1.0, span).clamp_min(_EPS).view(shape)
    out = (maps - low.view(shape)).div_(span)  # one new tensor, changed in place
    return out.masked_fill_(constant.view(shape), 0.0)
