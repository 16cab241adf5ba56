"""The explorer's memory does not grow with the number of images: 5,000 images served page by
page take about what 500 take (benchmarks/serve_load.py measures 50,000 224-px images)."""

from __future__ import annotations

import gc
import tracemalloc

from tests.helpers import synthetic_explorer_run

THUMBS = 1 << 20


def serve_everything(run) -> int:
    """Peak traced bytes while opening ``run`` and asking for every grid page, a CSV of
    every image, the confusion matrix and 50 images and maps spread over the set."""
    from starlette.testclient import TestClient

    from explainkit.serve import build_app

    gc.collect()
    tracemalloc.start()
    try:
        app = build_app([run])
        app.state.thumbs.max_bytes = THUMBS  # the grid's thumbnail cache: bounded in bytes
        with TestClient(app) as c:
            first = c.get("/api/runs/0/images?per_page=192&sort=confidence").json()
            n = first["total"]
            for page in range(first["pages"]):
                r = c.get(f"/api/runs/0/images?per_page=192&sort=loss&desc=1&page={page}")
                assert len(r.json()["items"]) == min(192, n - 192 * page)
            assert c.get("/api/runs/0/selection.csv").text.count("\n") == n + 1
            assert c.get("/api/runs/0/confusion").status_code == 200
            for i in range(0, n, max(1, n // 50)):
                assert c.get(f"/img/0/{i}.png?size=96").status_code == 200
                assert c.get(f"/map/0/{i}/gradcam.png").status_code == 200
        assert 0 < app.state.thumbs.bytes <= THUMBS
        for served in app.state.runs:
            served.close()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_stays_bounded_with_5000_images(tmp_path):
    small = synthetic_explorer_run(tmp_path / "small", 500, side=32)
    large = synthetic_explorer_run(tmp_path / "large", 5000, side=32)
    serve_everything(small)  # imports and first-use caches (the colour table) before measuring
    peak_small, peak_large = serve_everything(small), serve_everything(large)
    images_and_maps = 5000 * 32 * 32 * (3 + 2)  # what reading them all would hold: 25 MB
    # The CSV of all 5,000 file names and the per-image columns grow with N (about 200 bytes
    # an image); images and maps never sit in memory together.
    assert peak_large - peak_small < 4500 * 400 + THUMBS, (peak_small, peak_large)
    print(
        f"peak traced memory: 500 images {peak_small / 1e6:.1f} MB, 5000 {peak_large / 1e6:.1f} MB"
    )
    assert peak_large < images_and_maps / 3, (peak_small, peak_large)
