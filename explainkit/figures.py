"""Figures every analyzer can use: image grids, CAM overlays, colormaps (public API).

Figures are ``matplotlib.figure.Figure`` objects on an explicit Agg canvas, so nothing depends
on a display, the global backend or pyplot's figure registry (no leaks in long runs).
Image grids are composed into one numpy mosaic and drawn with a single ``imshow``: a grid of
hundreds of tiles costs one draw call, not one axes per image.

Import this module inside ``Analyzer.run`` only; it imports numpy and matplotlib. Tables and
JSON files go through :mod:`explainkit.tables`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DPI = 100
MAX_SIDE_PX = 4000  # no figure is wider or taller: 16 MP at most, whatever the run holds
MIN_FONT_PT = 7  # the smallest text a figure draws (at DPI); fewer labels, not smaller ones
MAX_LABELED = 50  # the most classes a figure names one by one; the rest go to tables
TILE_PX = 128  # displayed side of one gallery image (32 px images are upscaled 4x)
BG = 1.0  # white mosaic background
GAP_PX = 2  # white gap between image, heatmap and overlay in a CAM tile (before upscaling)

__all__ = [
    "DPI",
    "Figure",
    "new_figure",
    "save_figure",
    "figure_facts",
    "message_figure",
    "upscale",
    "scale_for",
    "mosaic",
    "fit_tiles",
    "draw_mosaic",
    "grid_figure",
    "short",
    "class_font_size",
    "get_colormap",
    "heat_rgb",
    "overlay",
    "cam_grid",
]


def new_figure(width: float, height: float) -> Figure:
    """A figure of ``width`` x ``height`` inches on an Agg canvas (no global backend switch)."""
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: Path) -> Path:
    """Save as PNG (white background) no larger than MAX_SIDE_PX a side; drop its memory.

    A figure drawn larger than the cap is saved at a lower resolution (the last guard: the
    analyzers size their figures to fit), and the PNG records its smallest text size in
    points at DPI (``explainkit:min-font-pt``), so a test or a reader can check legibility.
    """
    width, height = fig.get_size_inches() * DPI
    dpi = DPI * min(1.0, MAX_SIDE_PX / max(width, 1), MAX_SIDE_PX / max(height, 1))
    dpi = math.floor(dpi * 100) / 100  # never rounds up past the cap
    smallest = _smallest_font(fig) * dpi / DPI
    fig.savefig(
        path, dpi=dpi, facecolor="white", metadata={"explainkit:min-font-pt": f"{smallest:.2f}"}
    )
    fig.clear()
    return path


def _smallest_font(fig: Figure) -> float:
    """The smallest size (points) of any visible, non-empty text of the figure."""
    from matplotlib.text import Text

    sizes = [
        t.get_fontsize()
        for t in fig.findobj(Text)
        if t.get_visible() and t.get_text().strip() and t.get_figure() is not None
    ]
    return float(min(sizes, default=MIN_FONT_PT))


def figure_facts(path: Path) -> dict[str, float]:
    """Width and height (px) of a PNG written by :func:`save_figure`, and its smallest text
    size in points (``min_font_pt``; NaN when the file does not record it)."""
    from PIL import Image

    with Image.open(path) as im:
        width, height = im.size
        text = getattr(im, "text", {}) or {}
    return {
        "width": width,
        "height": height,
        "min_font_pt": float(text.get("explainkit:min-font-pt", "nan")),
    }


def message_figure(text: str, title: str = "") -> Figure:
    """A small figure that says why there is nothing to plot (better than no file at all)."""
    fig = new_figure(6, 2)
    ax = fig.add_subplot()
    ax.axis("off")
    if title:
        ax.set_title(title, fontsize=12, weight="bold")
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=11, wrap=True)
    return fig


def upscale(images: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour upscaling of (N,H,W,C) images by an integer factor (crisp pixels)."""
    if factor <= 1:
        return images
    return images.repeat(factor, axis=1).repeat(factor, axis=2)


def scale_for(side: int, target: int = TILE_PX) -> int:
    """Integer upscaling factor that brings an image side close to ``target`` pixels."""
    return max(1, round(target / max(side, 1)))


def mosaic(
    images: np.ndarray, cols: int, pad: int = 4, rows: int | None = None, label_px: int = 0
) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Tile (N,H,W,3) uint8 images into one float RGB array, row-major.

    Args:
        images: The tiles (already upscaled).
        cols: Tiles per row.
        pad: Blank pixels between tiles and around the edge.
        rows: Number of rows (default: as many as needed); empty cells stay blank.
        label_px: Blank band above each tile, for a caption.

    Returns:
        The mosaic in [0, 1] and the top-left (y, x) of each tile.
    """
    n, h, w = images.shape[:3]
    rows = rows if rows is not None else max(1, math.ceil(n / cols))
    cell_h = label_px + h
    canvas = np.full(
        (rows * cell_h + (rows + 1) * pad, cols * w + (cols + 1) * pad, 3), BG, dtype=np.float32
    )
    corners = []
    for i in range(n):  # at most a few hundred tiles: the figure's content, not the data set
        r, c = divmod(i, cols)
        y, x = pad + r * (cell_h + pad) + label_px, pad + c * (w + pad)
        canvas[y : y + h, x : x + w] = images[i, ..., :3] / 255.0
        corners.append((y, x))
    return canvas, corners


def grid_figure(
    images: np.ndarray,
    cols: int,
    *,
    rows: int | None = None,
    positions: Sequence[int] | None = None,
    captions: Sequence[str] | None = None,
    row_labels: Sequence[str] | None = None,
    title: str = "",
    tile_px: int = TILE_PX,
    caption_lines: int = 2,
    font_size: float = 8,
    pad: int = 6,
) -> Figure:
    """One figure showing images as a pixel-exact grid, with captions and row labels.

    Images are upscaled by an integer factor (nearest neighbour) to about ``tile_px``; the
    figure is sized so one mosaic pixel is one output pixel, so text stays the same size
    however many tiles there are.

    Args:
        images: uint8 (N,H,W,3).
        cols: Tiles per row.
        rows: Rows of the grid (default: as many as needed).
        positions: Grid cell of each image (default 0..N-1), for grids with gaps.
        captions: One caption per image, drawn above it.
        row_labels: One label per row, drawn left of the row.
        title: Figure title.
        tile_px: Target tile side in pixels.
        caption_lines: Lines reserved for each caption.
        font_size: Caption and label size in points.
        pad: Pixels between tiles.
    """
    n = len(images)
    positions = list(range(n)) if positions is None else list(positions)
    cells = (max(positions) + 1) if positions else 1
    rows = rows if rows is not None else max(1, math.ceil(cells / cols))
    scale = scale_for(images.shape[1], tile_px) if n else 1
    line_px = font_size * DPI / 72 * 1.25
    label_px = int(math.ceil(caption_lines * line_px + 4)) if captions is not None else 0
    left_px = 0
    if row_labels is not None:
        longest = max((len(label) for label in row_labels), default=0)
        left_px = int(longest * (font_size + 1) * 0.62 * DPI / 72) + 12
    title_px = 34 if title else 0
    room = (
        (MAX_SIDE_PX - title_px - (rows + 1) * pad) / rows - label_px,
        (MAX_SIDE_PX - left_px - (cols + 1) * pad) / cols,
    )
    tiles = fit_tiles(upscale(images, scale), room)
    h, w = (tiles.shape[1], tiles.shape[2]) if n else (tile_px, tile_px)
    placed = np.zeros((rows * cols, h, w, 3), np.uint8)
    present = np.zeros(rows * cols, bool)
    if n:
        placed[positions] = tiles
        present[positions] = True
    canvas, corners = mosaic(placed, cols, pad=pad, rows=rows, label_px=label_px)
    for i in np.flatnonzero(~present):  # unused cells stay background, not black
        y, x = corners[i]
        canvas[y : y + h, x : x + w] = BG
    width_px = canvas.shape[1] + left_px
    if title:  # wrapped to the figure's width, so a narrow grid does not cut it off
        title = _wrap_to(title, width_px, 11)
        title_px = 16 + 18 * (title.count("\n") + 1)
    height_px = canvas.shape[0] + title_px
    fig = Figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_axes(
        (left_px / width_px, 0, canvas.shape[1] / width_px, canvas.shape[0] / height_px)
    )
    draw_mosaic(ax, canvas)
    if title:
        fig.text(0.5, 1 - 8 / height_px, title, ha="center", va="top", fontsize=11)
    if captions is not None:
        for (y, x), pos_text in zip((corners[p] for p in positions), captions, strict=True):
            ax.text(
                x + w / 2, y - 3, pos_text, ha="center", va="bottom", fontsize=font_size,
                linespacing=1.1,
            )  # fmt: skip
    if row_labels is not None:
        for r, label in enumerate(row_labels):
            y = corners[r * cols][0] + h / 2
            ax.text(-8, y, label, ha="right", va="center", fontsize=font_size + 1, clip_on=False)
    return fig


def fit_tiles(tiles: np.ndarray, room: tuple[float, float], least: int = 16) -> np.ndarray:
    """(N,H,W,C) tiles shrunk (nearest neighbour, aspect kept) to fit ``room`` = (height,
    width) pixels, so a grid of many large images stays within MAX_SIDE_PX; never below
    ``least`` pixels a side."""
    h, w = tiles.shape[1:3]
    factor = min(1.0, room[0] / max(h, 1), room[1] / max(w, 1))
    if factor >= 1.0:
        return tiles
    nh, nw = max(least, int(h * factor)), max(least, int(w * factor))
    ys = (np.arange(nh) * h / nh).astype(np.intp)
    xs = (np.arange(nw) * w / nw).astype(np.intp)
    return tiles[:, ys][:, :, xs]


def _wrap_to(text: str, width_px: float, size: float) -> str:
    """``text`` wrapped into lines about ``width_px`` wide at ``size`` points."""
    import textwrap

    chars = max(16, int((width_px - 16) / (size * 0.6 * DPI / 72)))
    return "\n".join(textwrap.wrap(text, chars)) or text


def draw_mosaic(ax: Any, canvas: np.ndarray) -> None:
    """Show a mosaic pixel-exact (nearest interpolation) on an axes without frame or ticks."""
    ax.imshow(canvas, interpolation="nearest")
    ax.set_axis_off()


def short(name: str, limit: int = 18) -> str:
    """Shorten a long class name for a caption (the full names are in the CSV/JSON files)."""
    return name if len(name) <= limit else name[: limit - 1] + "…"


def class_font_size(num_classes: int) -> float:
    """Tick label size for up to MAX_LABELED classes (never below MIN_FONT_PT: a figure of
    more classes names fewer of them instead)."""
    if num_classes <= 12:
        return 10
    if num_classes <= 25:
        return 8
    return MIN_FONT_PT


def get_colormap(name: str, flag: str = "colormap") -> Any:
    """A matplotlib colormap by name; an unknown name lists a few good ones."""
    import matplotlib

    from explainkit.errors import AnalyzerError

    try:
        return matplotlib.colormaps[name]
    except KeyError:
        raise AnalyzerError(
            f"{flag} {name!r} is not a matplotlib colormap; try turbo, jet, inferno or viridis"
        ) from None


def heat_rgb(maps: np.ndarray, cmap: Any) -> np.ndarray:
    """(N,H,W) maps in [0, 1] -> uint8 (N,H,W,3) colour images (NaN shows as 0)."""
    rgba = cmap(np.clip(np.nan_to_num(maps), 0.0, 1.0))
    return (rgba[..., :3] * 255 + 0.5).astype(np.uint8)


def overlay(images: np.ndarray, maps: np.ndarray, cmap: Any, alpha: float = 0.5) -> np.ndarray:
    """uint8 (N,H,W,3) images blended with their (N,H,W) [0, 1] maps: ``(1-a) img + a heat``."""
    heat = heat_rgb(maps, cmap).astype(np.float32)
    blended = (1 - alpha) * images[..., :3].astype(np.float32) + alpha * heat
    return blended.round().clip(0, 255).astype(np.uint8)


def cam_grid(
    images: np.ndarray,
    maps: np.ndarray,
    captions: Sequence[str],
    cmap: Any,
    alpha: float = 0.5,
    title: str = "",
) -> Figure:
    """One wide tile per image (image | heatmap | overlay), two tiles per row from 5 images.

    Args:
        images: uint8 (N,H,W,3).
        maps: (N,H,W) maps in [0, 1], at the images' size.
        captions: One line per image.
        cmap: A colormap (:func:`get_colormap`).
        alpha: Heatmap opacity in the overlay.
        title: Figure title.
    """
    n, h = images.shape[:2]
    gap = np.full((n, h, GAP_PX, 3), 255, np.uint8)  # white, before the integer upscaling
    heat = heat_rgb(maps, cmap)
    tiles = np.concatenate(
        [images[..., :3], gap, heat, gap, overlay(images, maps, cmap, alpha)], axis=2
    )
    return grid_figure(
        tiles,
        cols=2 if n > 4 else 1,
        captions=list(captions),
        title=title,
        caption_lines=max((c.count("\n") + 1 for c in captions), default=1),
        font_size=10,
        pad=28,
    )
