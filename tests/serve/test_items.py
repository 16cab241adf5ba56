"""A task run's maps in the explorer: one per item (a detection, a class region, a label).

Runs 0, 1, 2 of ``item_client`` are the detection, segmentation and multi-label runs with the
gradcam analyzer's per-item ``attributions.h5``; ``task_client``'s are the same runs without
it. What is served is checked against the file and the store, read independently here, and a
map computed on demand against explainkit.task_cams' own map of that item.
"""

from __future__ import annotations

import io
import re
import shutil

import h5py
import numpy as np
import pytest
from PIL import Image

from explainkit.serve.maps import colorize
from explainkit.store import open_store
from tests.helpers import registries

TASKS = ("detection", "segmentation", "multilabel")


def read_file(run) -> dict[str, np.ndarray]:
    with h5py.File(run / "analyses" / "gradcam" / "attributions.h5", "r") as f:
        return {k: f[k][:] for k in ("image", "class", "box", "recorded_score", "correct", "maps")}


def decode(content: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(content)).convert("RGB"))


@pytest.mark.parametrize("position", [0, 1, 2])
def test_each_item_is_a_row_of_the_file_and_its_map_is_that_row(
    item_client, analyzed_task_runs, position
):
    task = TASKS[position]
    f = read_file(analyzed_task_runs[task])
    with open_store(analyzed_task_runs[task]) as store:
        classes, n = store.classes, store.num_images
    assert len(f["image"]) and len(np.unique(f["image"])) >= 2
    for i in range(n):
        rows = np.flatnonzero(f["image"] == i)
        d = item_client.get(f"/api/runs/{position}/images/{i}").json()
        assert d["items_from"] == "gradcam" and d["items_error"] is None
        assert [x["class"] for x in d["items"]] == [classes[c] for c in f["class"][rows]]
        assert [x["correct"] for x in d["items"]] == f["correct"][rows].tolist()
        for x, row in zip(d["items"], rows, strict=True):
            if task == "multilabel":
                assert x["box"] is None and x["outline"] is None
                assert x["label"].startswith(f"label {x['class']} {f['recorded_score'][row]:.2f}")
            else:
                np.testing.assert_allclose(x["box"], f["box"][row], rtol=0, atol=0)
            np.testing.assert_allclose(x["score"], f["recorded_score"][row], rtol=1e-6)
            served = item_client.get(f"{x['maps']}gradcam.png")
            assert served.status_code == 200, served.text
            np.testing.assert_array_equal(decode(served.content), colorize(f["maps"][row]))
        assert "gradcam" in [m["key"] for m in d["item_methods"] if m["stored"]]
        assert "live-gradcam" not in [m["key"] for m in d["item_methods"]]  # the file has it


def test_on_demand_item_maps_equal_task_cams_maps(analyzed_task_runs, task_client, task_runs):
    """Grad-CAM of an item computed here equals the analyzer's row for it (each analyzed in a
    pass of its own); the items chosen here for a run without the file are the file's."""
    import torch

    from explainkit.serve import open_runs
    from explainkit.serve.maps import Engine

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    runs = open_runs([analyzed_task_runs[t] for t in TASKS])
    try:
        engine = Engine(registries(), "cpu")
        for position, run in enumerate(runs):
            f = read_file(analyzed_task_runs[run.task])
            images = np.unique(f["image"])[:3]
            worst, count = 0.0, 0
            for i in images:
                rows = np.flatnonzero(f["image"] == i)
                items = run.items.of(run, int(i))[0]
                bare = task_client.get(f"/api/runs/{position}/images/{i}").json()
                assert bare["items_from"] is None  # no file: chosen here, the analyzer's way
                file_items = [
                    (int(c), None if np.isnan(b).any() else tuple(float(v) for v in b))
                    for c, b in zip(f["class"][rows], f["box"][rows], strict=True)
                ]
                bare_items = [
                    (
                        int(run.classes.index(x["class"])),
                        None if x["box"] is None else tuple(x["box"]),
                    )
                    for x in bare["items"]
                ]
                assert bare_items == file_items
                for item, row in zip(items, rows, strict=True):
                    m = engine.compute_item(run, int(i), item, "gradcam")
                    assert m.shape == f["maps"][row].shape
                    worst = max(worst, float(np.abs(m - f["maps"][row]).max()))
                    count += 1
            assert count and worst < 1e-5, (run.task, worst)
        # a computed map as served: the engine's, coloured (the run without the file)
        i = int(read_file(analyzed_task_runs["segmentation"])["image"][0])
        served = task_client.get(f"/map/1/{i}/item/0/live-gradcampp.png")
        assert served.status_code == 200, served.text
        bare = open_runs([task_runs["segmentation"]])[0]
        try:
            item = bare.items.of(bare, i)[0][0]
            want = Engine(registries(), "cpu").compute_item(bare, i, item, "gradcampp")
        finally:
            bare.close()
        np.testing.assert_array_equal(decode(served.content), colorize(want))
    finally:
        for run in runs:
            run.close()
        torch.set_num_threads(threads)


def border_edges(mask: np.ndarray) -> set[tuple]:
    """Every unit pixel edge between a pixel of ``mask`` and one outside it (or the frame)."""
    p = np.pad(mask, 1)
    edges = set()
    for y, x in zip(*np.nonzero(mask), strict=True):
        if not p[y, x + 1]:
            edges.add(("h", y, x))  # above
        if not p[y + 2, x + 1]:
            edges.add(("h", y + 1, x))
        if not p[y + 1, x]:
            edges.add(("v", x, y))  # left
        if not p[y + 1, x + 2]:
            edges.add(("v", x + 1, y))
    return edges


def path_edges(d: str) -> set[tuple]:
    edges = set()
    for x, y, kind, end in re.findall(r"M(\d+) (\d+)([HV])(\d+)", d):
        x, y, end = int(x), int(y), int(end)
        if kind == "H":
            edges |= {("h", y, k) for k in range(x, end)}
        else:
            edges |= {("v", x, k) for k in range(y, end)}
    return edges


def test_outlines_trace_the_explained_box_and_region(item_client, analyzed_task_runs):
    f = read_file(analyzed_task_runs["detection"])
    d = item_client.get(f"/api/runs/0/images/{int(f['image'][0])}").json()
    x0, y0, x1, y1 = f["box"][0]
    numbers = [float(v) for v in re.findall(r"[\d.]+", d["items"][0]["outline"])]
    np.testing.assert_allclose(numbers, [x0, y0, x1, y1, x0], atol=0.006)
    with open_store(analyzed_task_runs["segmentation"]) as store:
        pred = store.epoch_data("masks", None, slice(0, 4))
    classes = item_client.get("/api/runs").json()[1]["classes"]
    for i in range(4):
        for x in item_client.get(f"/api/runs/1/images/{i}").json()["items"]:
            region = pred[i] == classes.index(x["class"])
            assert region.any() and path_edges(x["outline"]) == border_edges(region)


def test_a_damaged_item_file_is_an_error_on_its_views_only(analyzed_task_runs, tmp_path):
    from starlette.testclient import TestClient

    from explainkit.serve import build_app

    run = shutil.copytree(analyzed_task_runs["multilabel"], tmp_path / "run")
    path = run / "analyses" / "gradcam" / "attributions.h5"
    path.write_bytes(b"not an HDF5 file" * 10)
    with TestClient(build_app([run], registries(), "cpu"), raise_server_exceptions=False) as c:
        d = c.get("/api/runs/0/images/3").json()
        assert "gradcam/attributions.h5 cannot be read" in d["items_error"]
        assert d["items_from"] is None and d["items"]  # chosen here instead
        r = c.get("/map/0/3/item/0/gradcam.png")
        assert r.status_code == 500 and "cannot be read" in r.text and "Traceback" not in r.text
        assert c.get("/map/0/3/item/0/live-gradcam.png").status_code == 200
        page = c.get("/runs/0/images/3")
        assert page.status_code == 200 and 'id="items-error"' in page.text
        assert c.get("/api/runs/0/images?per_page=24").status_code == 200


def test_an_item_map_reads_its_row_not_the_file(analyzed_task_runs, tmp_path):
    """A file of 3,200 items (13 MB of maps): one item's map costs a row, not the maps."""
    import tracemalloc

    from starlette.testclient import TestClient

    from explainkit.serve import build_app

    run = shutil.copytree(analyzed_task_runs["multilabel"], tmp_path / "run")
    path = run / "analyses" / "gradcam" / "attributions.h5"
    with h5py.File(path, "r") as f:
        attrs, k = dict(f.attrs), len(f.attrs["classes"])
    n, per = int(attrs["num_images"]), 200
    rng = np.random.default_rng(0)
    maps = rng.random((n * per, 32, 32), dtype=np.float32)
    path.unlink()
    with h5py.File(path, "w") as f:
        f.attrs.update({**attrs, "num_items": n * per})
        f["image"] = np.repeat(np.arange(n), per)
        f["class"] = rng.integers(0, k, n * per)
        f["box"] = np.full((n * per, 4), np.nan, np.float32)
        f["recorded_score"] = rng.random(n * per, dtype=np.float32)
        f["correct"] = rng.random(n * per) > 0.5
        f.create_dataset("maps", data=maps, chunks=(1, 32, 32), compression="gzip")
    with TestClient(build_app([run], registries(), "cpu"), raise_server_exceptions=False) as c:
        assert c.get("/map/0/7/item/0/gradcam.png").status_code == 200  # warm up
        tracemalloc.start()
        try:
            r = c.get("/map/0/7/item/150/gradcam.png")
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert r.status_code == 200, r.text
        np.testing.assert_array_equal(decode(r.content), colorize(maps[7 * per + 150]))
        assert peak < maps.nbytes / 8, peak
        assert len(c.get("/api/runs/0/images/7").json()["items"]) == per
