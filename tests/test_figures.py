"""explainkit.figures: mosaics place every tile exactly, overlays blend as documented."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from explainkit.errors import AnalyzerError
from explainkit.figures import (
    cam_grid,
    class_font_size,
    get_colormap,
    heat_rgb,
    message_figure,
    mosaic,
    overlay,
    save_figure,
    scale_for,
    short,
    upscale,
)


def test_mosaic_puts_each_tile_at_its_corner_and_leaves_the_rest_blank():
    rng = np.random.default_rng(0)
    tiles = rng.integers(0, 256, (5, 4, 6, 3), dtype=np.uint8)
    canvas, corners = mosaic(tiles, cols=2, pad=3, label_px=2)
    assert canvas.shape == (3 * (2 + 4) + 4 * 3, 2 * 6 + 3 * 3, 3)
    assert len(corners) == 5
    covered = np.zeros(canvas.shape[:2], bool)
    for tile, (y, x) in zip(tiles, corners, strict=True):
        assert np.allclose(canvas[y : y + 4, x : x + 6], tile / 255.0, atol=1e-7)
        covered[y : y + 4, x : x + 6] = True
    assert (canvas[~covered] == 1.0).all()  # white background, the sixth cell empty


def test_upscale_repeats_pixels_and_scale_for_aims_at_the_tile_size():
    image = np.arange(12, dtype=np.uint8).reshape(1, 2, 2, 3)
    big = upscale(image, 3)
    assert big.shape == (1, 6, 6, 3) and (big[0, :3, :3] == image[0, 0, 0]).all()
    assert upscale(image, 1) is image
    assert scale_for(32) == 4 and scale_for(224) == 1 and scale_for(0) >= 1


def test_overlay_blends_image_and_heat_with_alpha():
    cmap = get_colormap("gray")
    images = np.full((1, 2, 2, 3), 100, np.uint8)
    maps = np.array([[[0.0, 1.0], [np.nan, 0.5]]])
    heat = heat_rgb(maps, cmap)
    assert heat[0, 0, 0].tolist() == [0, 0, 0] and heat[0, 0, 1].tolist() == [255, 255, 255]
    assert heat[0, 1, 0].tolist() == [0, 0, 0]  # NaN shows as zero
    blended = overlay(images, maps, cmap, alpha=0.25)
    expected = np.round(0.75 * 100 + 0.25 * heat.astype(np.float32))
    assert np.array_equal(blended, expected.astype(np.uint8))


def test_an_unknown_colormap_is_one_sentence():
    with pytest.raises(AnalyzerError, match="'nope' is not a matplotlib colormap; try turbo"):
        get_colormap("nope", flag="--colormap")


def test_labels_shrink_and_shorten_for_many_classes():
    assert short("a" * 18) == "a" * 18 and short("a" * 30) == "a" * 17 + "…"
    sizes = [class_font_size(n) for n in (2, 12, 25, 50, 1000)]
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] >= 5


def test_cam_grid_and_message_figure_save_as_png(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
    maps = rng.random((6, 16, 16))
    fig = cam_grid(images, maps, [f"image {i}" for i in range(6)], get_colormap("turbo"))
    save_figure(fig, tmp_path / "grid.png")
    save_figure(message_figure("nothing to plot", "Empty"), tmp_path / "empty.png")
    for name in ("grid.png", "empty.png"):
        with Image.open(tmp_path / name) as img:
            assert img.format == "PNG" and min(img.size) >= 100
