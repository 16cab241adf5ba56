"""The explorer's routes on a real served run: what each answers, checked against the store
and the analyzers' files read independently here."""

from __future__ import annotations

import csv
import io
import math

import h5py
import numpy as np
import pytest
from PIL import Image

from explainkit.serve.maps import colorize
from explainkit.store import open_store


def decode(content: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(content)).convert("RGB"))


@pytest.fixture(scope="module")
def truth(explorer_run):
    """The run's labels and best-epoch predictions, read straight from the store."""
    with open_store(explorer_run) as store:
        epoch = store.best_epoch
        return {
            "targets": store.targets,
            "predicted": store.predictions(epoch),
            "probs": store.probabilities(epoch),
            "sources": store.sources(),
            "images": store.images(),
            "classes": store.classes,
        }


def test_pages_render(client, explorer_run):
    assert "explorer" in client.get("/").text  # two runs: a list of them
    grid = client.get("/runs/0/")
    assert grid.status_code == 200 and "circle" in grid.text
    assert "script-src 'self'" in grid.headers["content-security-policy"]
    detail = client.get("/runs/0/images/5")
    assert detail.status_code == 200 and "shapes #5" in detail.text
    assert client.get("/static/explorer.js").status_code == 200


def test_grid_pages_cover_every_image_once(client, truth):
    n = len(truth["targets"])
    seen = []
    first = client.get("/api/runs/0/images?per_page=24").json()
    assert first["total"] == n and first["pages"] == math.ceil(n / 24)
    for page in range(first["pages"]):
        seen += [
            x["index"]
            for x in client.get(f"/api/runs/0/images?per_page=24&page={page}").json()["items"]
        ]
    assert sorted(seen) == list(range(n))
    item = first["items"][3]
    assert item["source"] == truth["sources"][item["index"]]
    assert item["true"] == truth["classes"][truth["targets"][item["index"]]]


def test_filters_match_the_store(client, truth):
    t, p = truth["targets"], truth["predicted"]
    wrong = client.get("/api/runs/0/images?correct=0&per_page=192").json()
    assert {x["index"] for x in wrong["items"]} == set(np.flatnonzero(t != p).tolist())
    matrix = client.get("/api/runs/0/confusion").json()["matrix"]
    k = len(truth["classes"])
    expected = np.bincount(t * k + p, minlength=k * k).reshape(k, k)
    assert np.array_equal(np.array(matrix), expected)
    a, b = np.unravel_index(np.argmax(expected - np.diag(np.diag(expected))), expected.shape)
    cell = client.get(f"/api/runs/0/images?true={a}&pred={b}&per_page=192").json()
    assert cell["total"] == expected[a, b] > 0
    assert {x["index"] for x in cell["items"]} == set(np.flatnonzero((t == a) & (p == b)).tolist())
    conf = truth["probs"].max(axis=1)
    ranged = client.get("/api/runs/0/images?conf_min=0.2&conf_max=0.6&per_page=192").json()
    assert ranged["total"] == int(((conf >= 0.2 - 1e-6) & (conf <= 0.6 + 1e-6)).sum())


def test_sorts(client, truth):
    items = client.get("/api/runs/0/images?sort=confidence&desc=1&per_page=192").json()["items"]
    values = [x["confidence"] for x in items]
    assert values == sorted(values, reverse=True)
    i = items[0]["index"]
    assert values[0] == pytest.approx(truth["probs"][i].max(), abs=1e-5)
    losses = [
        x["loss"] for x in client.get("/api/runs/0/images?sort=loss&per_page=192").json()["items"]
    ]
    assert losses == sorted(losses)
    expected = -np.log(truth["probs"][np.arange(len(truth["targets"])), truth["targets"]])
    assert max(losses) == pytest.approx(expected.max(), rel=1e-4)


def test_quality_scores_sort_and_show(client, explorer_run):
    sorts = client.get("/api/runs").json()[0]["sorts"]
    assert "gradcam:deletion_auc" in sorts
    rows = list(csv.DictReader((explorer_run / "analyses/quality/per_image.csv").open()))
    assert len(rows) == 16
    items = client.get("/api/runs/0/images?sort=gradcam:deletion_auc&per_page=192").json()["items"]
    scored = [x for x in items if x["score"] is not None]
    assert len(scored) == 16 and items[:16] == scored  # the unscored images come last
    assert [x["score"] for x in scored] == sorted(x["score"] for x in scored)
    by_index = {int(r["index"]): float(r["gradcam:deletion_auc"]) for r in rows}
    assert scored[0]["score"] == pytest.approx(by_index[scored[0]["index"]], abs=1e-6)
    detail = client.get(f"/api/runs/0/images/{scored[0]['index']}").json()
    assert detail["scores"]["gradcam:deletion_auc"] == pytest.approx(scored[0]["score"], abs=1e-6)


def test_detail_top_predictions_and_methods(client, truth):
    d = client.get("/api/runs/0/images/7").json()
    probs = truth["probs"][7]
    order = np.argsort(-probs)[:5]
    assert [x["class"] for x in d["top"]] == [truth["classes"][k] for k in order]
    assert [x["probability"] for x in d["top"]] == pytest.approx(probs[order].tolist(), abs=1e-5)
    keys = {m["key"]: m for m in d["methods"]}
    assert keys["gradcam"]["stored"] and not keys["live-gradcampp"]["stored"]
    assert "live-gradcam" not in keys  # stored already
    assert [e["epoch"] for e in d["epochs"]] == [1, 2]


def test_images_and_stored_maps_are_the_files_pixels(client, explorer_run, truth):
    image = decode(client.get("/img/0/9.png").content)
    assert np.array_equal(image, truth["images"][9])
    thumb = decode(client.get("/img/0/9.png?size=16").content)
    assert max(thumb.shape[:2]) == 16
    with h5py.File(explorer_run / "analyses/gradcam/attributions.h5", "r") as f:
        expected = colorize(f["maps"][9].astype(np.float32))
    assert np.array_equal(decode(client.get("/map/0/9/gradcam.png").content), expected)


def test_captum_maps_beside_the_cams_for_the_images_it_explained(client, explorer_run):
    """The captum analyzer's attributions-saliency.h5 (the first 8 images and the figure's)
    is a map source: its rows are served, an image it did not explain is one sentence."""
    with h5py.File(explorer_run / "analyses/captum/attributions-saliency.h5", "r") as f:
        index, maps = f["index"][:].tolist(), f["maps"]
        first = colorize(maps[3].astype(np.float32))
        missing = next(i for i in range(64) if i not in index)
    assert index[:8] == list(range(8))
    d = client.get("/api/runs/0/images/3").json()
    keys = {m["key"]: m for m in d["methods"]}
    assert keys["captum-saliency"]["stored"] and "gradcam" in keys
    assert "Saliency" in keys["captum-saliency"]["label"] and not d["unexplained"]
    assert np.array_equal(decode(client.get("/map/0/3/captum-saliency.png").content), first)
    r = client.get(f"/map/0/{missing}/captum-saliency.png")
    assert r.status_code == 404 and "did not explain image" in r.text
    d = client.get(f"/api/runs/0/images/{missing}").json()
    assert "captum-saliency" not in {m["key"] for m in d["methods"]}
    assert any("Saliency" in label for label in d["unexplained"])
    page = client.get(f"/runs/0/images/{missing}").text
    assert 'id="unexplained"' in page


def test_a_map_computed_on_demand_agrees_with_the_analyzer(client, explorer_run):
    """The engine's Grad-CAM of an image (layer, target, normalization chosen as the analyzer
    chooses them) matches the map the gradcam analyzer stored, to float16 storage."""
    from explainkit.serve import open_runs
    from explainkit.serve.maps import Engine
    from tests.helpers import registries

    (run,) = open_runs([explorer_run])
    try:
        engine = Engine(registries(), "cpu")
        with h5py.File(explorer_run / "analyses/gradcam/attributions.h5", "r") as f:
            stored, epoch = f["maps"][11].astype(np.float32), int(f.attrs["epoch"])
        live = engine.compute(run, 11, "gradcam", epoch, "predicted")
        assert np.abs(live - stored).max() < 2e-3
        pp = decode(client.get("/map/0/11/live-gradcampp.png").content)
        assert pp.shape[:2] == stored.shape
    finally:
        run.close()


def test_epoch_maps(client):
    one = client.get("/map/0/3/epoch/1.png")
    two = client.get("/map/0/3/epoch/2.png")
    assert one.status_code == two.status_code == 200
    assert one.content != two.content  # another checkpoint, another map
    assert client.get("/map/0/3/epoch/9.png").status_code == 404


def test_selection_csv_names_the_files(client, truth):
    r = client.get("/api/runs/0/selection.csv?correct=0&sort=confidence&desc=1")
    assert r.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(r.text)))
    wrong = np.flatnonzero(truth["targets"] != truth["predicted"])
    assert sorted(int(x["index"]) for x in rows) == wrong.tolist()
    assert all(x["source"] == truth["sources"][int(x["index"])] for x in rows)
    assert [float(x["confidence"]) for x in rows] == sorted(
        (float(x["confidence"]) for x in rows), reverse=True
    )


def test_compare_two_runs_on_one_eval_set(client, truth, other_run):
    with open_store(other_run) as store:
        theirs = store.predictions(store.best_epoch) == store.targets
    mine = truth["predicted"] == truth["targets"]
    counts = client.get("/api/runs/0/compare/1").json()["counts"]
    assert counts == {
        "only_this": int((mine & ~theirs).sum()),
        "only_other": int((~mine & theirs).sum()),
        "both_right": int((mine & theirs).sum()),
        "both_wrong": int((~mine & ~theirs).sum()),
    }
    only = client.get("/api/runs/0/images?vs=1&outcome=only_other&per_page=192").json()
    assert {x["index"] for x in only["items"]} == set(np.flatnonzero(~mine & theirs).tolist())


def test_report_links_into_the_explorer(client, explorer_run):
    from explainkit.report import build_report
    from tests.helpers import registries

    build_report(explorer_run, registries())
    page = client.get("/runs/0/report.html")
    assert page.status_code == 200 and 'href="explore/gradcam"' in page.text
    link = client.get("/runs/0/explore/gradcam", follow_redirects=False)
    assert link.status_code == 302 and link.headers["location"] == "/runs/0/?method=gradcam"
    assert client.get("/runs/1/report.html").status_code == 404  # the other run has none
