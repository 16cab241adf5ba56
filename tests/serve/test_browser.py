"""The explorer in a real browser: Debian's Chromium, driven headless by Playwright (no
browser download). It filters the grid to a confusion, opens an image, switches methods and
checks what is drawn, pixel by pixel, against the maps the server serves."""

from __future__ import annotations

import io
import json
import os
import shutil
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import registries

DRAWN = 256  # the detail view draws 32-px shapes at 8x: 256 px


def find_chromium() -> str | None:
    for name in ("/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def decode(content: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(content)).convert("RGB")).astype(np.int16)


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=120) as r:
        return r.read()


def scaled(pixels: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Nearest-neighbour upscaling to ``shape``: what ``image-rendering: pixelated`` draws."""
    h, w = shape[:2]
    rows = np.arange(h) * pixels.shape[0] // h
    cols = np.arange(w) * pixels.shape[1] // w
    return pixels[rows][:, cols]


def differs(drawn: np.ndarray, served: np.ndarray, size: int = DRAWN) -> float:
    """Mean absolute difference between a screenshot and ``served`` pixels drawn at ``size``
    px: the best of the screenshot's alignments (an element at a fractional position adds a
    row or column to its screenshot)."""
    want = scaled(served, (size, size))
    best = np.inf
    for dy in range(drawn.shape[0] - size + 1):
        for dx in range(drawn.shape[1] - size + 1):
            best = min(best, float(np.abs(drawn[dy : dy + size, dx : dx + size] - want).mean()))
    return best


def serve_runs(runs):
    """The explorer over ``runs`` on a free local port, served by uvicorn in a thread."""
    import uvicorn

    from explainkit.serve import bind, build_app

    app = build_app(runs, registries(), "cpu")
    sock = bind("127.0.0.1", 0)
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/"
    srv.should_exit = True
    thread.join(timeout=30)
    sock.close()


@pytest.fixture(scope="module")
def server(explorer_run, other_run):
    yield from serve_runs([explorer_run, other_run])


@pytest.fixture(scope="module")
def task_server(analyzed_task_runs):
    yield from serve_runs([analyzed_task_runs["detection"], analyzed_task_runs["segmentation"]])


@pytest.fixture(scope="module")
def browser():
    binary = find_chromium()
    if binary is None:
        pytest.skip(
            "Chromium is not installed (apt-get install -y chromium); the explorer's browser "
            "test is skipped"
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=binary, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


def set_opacity(page, value: float) -> None:
    page.eval_on_selector(
        "#opacity",
        "(el, v) => { el.value = v; el.dispatchEvent(new Event('input')); }",
        str(value),
    )


def test_filter_to_a_confusion_open_an_image_and_switch_methods(server, browser, tmp_path):
    shots = Path(os.environ.get("EXPLAINKIT_SCREENSHOT_DIR", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server + "runs/0/")
    page.wait_for_selector("#confusion td.cell")
    page.wait_for_selector("#grid a.thumb")

    # the most frequent confusion, from the matrix the page drew
    cells = page.eval_on_selector_all(
        "#confusion td.off",
        "cells => cells.map(c => [Number(c.textContent), c.dataset.true, c.dataset.pred])",
    )
    count, true, pred = max(cells, key=lambda c: c[0])
    classes = json.loads(fetch(server + "api/runs"))[0]["classes"]
    page.click(f'#confusion td.cell[data-true="{true}"][data-pred="{pred}"]')
    page.wait_for_function(
        "n => document.querySelector('#status').textContent === n + ' images'", arg=count
    )
    captions = page.eval_on_selector_all("#grid a.thumb .caption", "s => s.map(x => x.textContent)")
    assert len(captions) == min(count, 48)
    assert all(c.startswith(f"{classes[int(true)]} → {classes[int(pred)]} ") for c in captions)
    assert f"true={true}" in page.url and f"pred={pred}" in page.url
    page.screenshot(path=str(shots / "explorer-grid.png"), full_page=False)

    # open the first image of that confusion
    href = page.get_attribute("#grid a.thumb", "href")
    index = int(href.split("/images/")[1].split("?")[0])
    with page.expect_navigation():  # else the wait below may look at the grid page
        page.click("#grid a.thumb")
    page.wait_for_function("() => document.querySelector('#overlay').dataset.ready === 'gradcam'")
    image = decode(fetch(server + f"img/0/{index}.png"))
    gradcam = decode(fetch(server + f"map/0/{index}/gradcam.png"))

    set_opacity(page, 1)
    drawn = decode(page.locator(".stack").screenshot())
    assert differs(drawn, gradcam) < 2
    assert differs(drawn, image) > 10
    set_opacity(page, 0)
    drawn = decode(page.locator(".stack").screenshot())
    assert differs(drawn, image) < 2
    set_opacity(page, 0.5)
    drawn = decode(page.locator(".stack").screenshot())
    assert differs(drawn, (image + gradcam) / 2) < 3

    # the side-by-side panel of the stored method shows the same map
    side = decode(page.locator('figure.method[data-key="gradcam"] img').screenshot())
    assert differs(side, gradcam) < 2

    # switch the overlay to Grad-CAM++, computed on demand by the server
    page.select_option("#method", "live-gradcampp")
    page.wait_for_function(
        "() => document.querySelector('#overlay').dataset.ready === 'live-gradcampp'",
        timeout=120_000,
    )
    set_opacity(page, 1)
    gradcampp = decode(fetch(server + f"map/0/{index}/live-gradcampp.png"))
    drawn = decode(page.locator(".stack").screenshot())
    assert differs(drawn, gradcampp) < 2
    if (
        float(np.abs(gradcampp - gradcam).mean()) > 4
    ):  # the two methods disagree here: the page shows which
        assert differs(drawn, gradcam) > 2

    # compute a missing method in the side by side, and the maps at each saved epoch
    page.click('figure.method[data-key="live-layercam"] button.compute')
    page.wait_for_selector('figure.method[data-key="live-layercam"] img', timeout=120_000)
    layercam = decode(fetch(server + f"map/0/{index}/live-layercam.png"))
    side = decode(page.locator('figure.method[data-key="live-layercam"] img').screenshot())
    assert differs(side, layercam) < 2
    page.click("#epochs-go")
    page.wait_for_function(
        "() => [...document.querySelectorAll('#epochs img')].every(i => i.complete && i.src)",
        timeout=120_000,
    )
    first = decode(page.locator("#epochs figure img").first.screenshot())
    epoch1 = decode(fetch(server + f"map/0/{index}/epoch/1.png"))
    assert differs(first, epoch1) < 2
    set_opacity(page, 0.5)
    page.screenshot(path=str(shots / "explorer.png"), full_page=True)
    assert not errors, errors


def set_range(page, selector: str, value: float) -> None:
    page.eval_on_selector(
        selector,
        "(el, v) => { el.value = v; el.dispatchEvent(new Event('input')); }",
        str(value),
    )


def rgb(text: str) -> np.ndarray:
    return np.array([int(v) for v in text[4:-1].split(",")], np.int16)


def edge_hits(drawn: np.ndarray, box, colour: np.ndarray, scale: int, at: tuple[int, int]) -> float:
    """The share of the rows of a box's left and right edges (their middle half) where the
    screenshot has ``colour`` within 2 px of where the store puts the edge."""
    dy, dx = at
    x0, y0, x1, y1 = (float(v) * scale for v in box)
    rows = range(int(y0 + (y1 - y0) / 4) + dy, int(y1 - (y1 - y0) / 4) + dy)
    hits = total = 0
    for x in (x0, x1):
        cols = slice(max(0, int(x) - 2 + dx), int(x) + 3 + dx)
        for y in rows:
            total += 1
            hits += bool((np.abs(drawn[y, cols] - colour).max(-1) < 40).any())
    return hits / max(total, 1)


def align(drawn: np.ndarray, image: np.ndarray) -> tuple[int, int]:
    """Where the image's top-left corner lies in a screenshot of the stack."""
    want = scaled(image, (DRAWN, DRAWN))
    shifts = [
        (dy, dx)
        for dy in range(drawn.shape[0] - DRAWN + 1)
        for dx in range(drawn.shape[1] - DRAWN + 1)
    ]
    return min(
        shifts,
        key=lambda s: np.abs(drawn[s[0] : s[0] + DRAWN, s[1] : s[1] + DRAWN] - want).mean(),
    )


def hide_item_map(page) -> None:
    """The item's map and outline off (an image without items has neither)."""
    if page.query_selector("#item"):
        page.wait_for_function("() => document.querySelector('#overlay').dataset.ready")
        set_opacity(page, 0)
        if page.query_selector("#show-item"):
            page.uncheck("#show-item")


def test_task_runs_draw_boxes_and_masks_where_the_store_says(
    task_server, analyzed_task_runs, browser, tmp_path
):
    from explainkit.serve.tasks import MIN_SCORE, palette
    from explainkit.store import open_store
    from explainkit.task_metrics import match_detections

    with open_store(analyzed_task_runs["detection"]) as store:
        dets, truth = store.detections(), store.boxes()
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))

    # the grid of the detection run: click "missed" of a class in the per-class table
    c = int(truth[0][1][0])
    missed = [
        match_detections(*d, *t, min_score=MIN_SCORE)[1] for d, t in zip(dets, truth, strict=True)
    ]
    want = [i for i, m in enumerate(missed) if c in truth[i][1][m]]
    page.goto(task_server + "runs/0/")
    page.wait_for_selector("#grid a.thumb")
    page.click(f'#confusion td.cell[data-label="{c}"][data-has="missed"]')
    page.wait_for_function(
        "n => document.querySelector('#status').textContent === n + ' images'", arg=len(want)
    )
    hrefs = page.eval_on_selector_all("#grid a.thumb", "a => a.map(x => x.getAttribute('href'))")
    assert sorted(int(h.split("/images/")[1].split("?")[0]) for h in hrefs) == want

    # the detail view of the first: true boxes drawn where the store puts them
    i = want[0]
    page.goto(task_server + f"runs/0/images/{i}")
    page.wait_for_selector("#boxes[data-drawn]")
    hide_item_map(page)
    image = decode(fetch(task_server + f"img/0/{i}.png"))
    page.uncheck("#show-truth")
    page.uncheck("#show-pred")
    bare = decode(page.locator(".stack").screenshot())
    assert differs(bare, image) < 2
    at = align(bare, image)
    page.check("#show-truth")
    drawn = decode(page.locator(".stack").screenshot())
    for box, is_missed in zip(
        truth[i][0], np.isin(np.arange(len(truth[i][1])), missed[i]), strict=True
    ):
        colour = rgb("rgb(255,40,40)") if is_missed else rgb("rgb(40,200,40)")
        assert edge_hits(drawn, box, colour, DRAWN // 32, at) > 0.8, box
    changed = np.abs(drawn - bare).max(-1) > 40
    near = np.zeros_like(changed)
    for x0, y0, x1, y1 in (np.asarray(truth[i][0]) * DRAWN // 32).astype(int):
        near[at[0] + y0 - 3 : at[0] + y1 + 4, at[1] + x0 - 3 : at[1] + x1 + 4] = True
    assert changed.any() and not (changed & ~near).any()  # nothing drawn away from the boxes

    # the detections scored at least the second best: only they are drawn
    page.uncheck("#show-truth")
    page.check("#show-pred")
    boxes, scores = dets[i][0], dets[i][1]
    second = float(np.sort(scores)[-2])
    set_range(page, "#min-score", f"{second - 1e-4:.4f}")
    page.wait_for_function("() => document.querySelector('#boxes').dataset.drawn.startsWith('2@')")
    drawn = decode(page.locator(".stack").screenshot())
    grey = rgb("rgb(160,160,160)")
    for j in np.argsort(-scores)[:2]:
        x0, y0, x1, y1 = boxes[j]
        if scores[j] < MIN_SCORE and y1 - y0 >= 1:  # under the threshold: drawn grey
            assert edge_hits(drawn, boxes[j], grey, DRAWN // 32, at) > 0.8, boxes[j]
    assert page.eval_on_selector_all("#boxes rect", "r => r.length") == 2
    assert not errors, errors
    shots = Path(os.environ.get("EXPLAINKIT_SCREENSHOT_DIR", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    page.check("#show-truth")
    page.screenshot(path=str(shots / "explorer-detection.png"), full_page=True)

    # segmentation: the predicted and the true mask, pixel by pixel, then none
    with open_store(analyzed_task_runs["segmentation"]) as store:
        pred, true = (
            store.epoch_data("masks", None, slice(3, 4))[0],
            store.truth("eval/segmentation", slice(3, 4))[0],
        )
        colours = palette(len(store.classes))
    page.goto(task_server + "runs/1/images/3")
    page.wait_for_function("() => document.querySelector('#mask').dataset.ready === 'predicted'")
    hide_item_map(page)
    image = decode(fetch(task_server + "img/1/3.png"))
    set_range(page, "#mask-opacity", 1)
    for which, mask in (("predicted", pred), ("true", true)):
        if which == "true":
            page.select_option("#mask-which", "true")
            page.wait_for_function("() => document.querySelector('#mask').dataset.ready === 'true'")
        rgba = colours[mask].astype(np.int16)
        expected = np.where(rgba[..., 3:] == 255, rgba[..., :3], image)
        drawn = decode(page.locator(".stack").screenshot())
        assert differs(drawn, expected) < 2, which
        if (mask > 0).any():
            assert differs(drawn, image) > 2
    set_range(page, "#mask-opacity", 0)
    assert differs(decode(page.locator(".stack").screenshot()), image) < 2
    set_range(page, "#mask-opacity", 0.6)
    page.screenshot(path=str(shots / "explorer-segmentation.png"), full_page=True)
    assert not errors, errors


def test_a_detection_item_map_is_drawn_from_the_served_map(
    task_server, analyzed_task_runs, browser, tmp_path
):
    """Open a detection image, pick an item: the overlay is that item's served map (and the
    image, at opacity 0), its box outlined in white where the file puts it."""
    import h5py

    with h5py.File(analyzed_task_runs["detection"] / "analyses/gradcam/attributions.h5") as f:
        images, boxes = f["image"][:], f["box"][:]
    i = int(np.bincount(images).argmax())  # the image with the most items
    rows = np.flatnonzero(images == i)
    j = len(rows) - 1  # its last item
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(task_server + f"runs/0/images/{i}")
    page.wait_for_function("() => document.querySelector('#overlay').dataset.ready === '0/gradcam'")
    page.select_option("#item", str(j))
    page.wait_for_function(
        "j => document.querySelector('#overlay').dataset.ready === j + '/gradcam'", arg=j
    )
    page.uncheck("#show-truth")
    page.uncheck("#show-pred")
    page.uncheck("#show-item")
    image = decode(fetch(task_server + f"img/0/{i}.png"))
    served = decode(fetch(task_server + f"map/0/{i}/item/{j}/gradcam.png"))
    set_opacity(page, 1)
    drawn = decode(page.locator(".stack").screenshot())
    assert differs(drawn, served) < 2
    assert differs(drawn, image) > 10
    set_opacity(page, 0)
    assert differs(decode(page.locator(".stack").screenshot()), image) < 2
    set_opacity(page, 0.5)
    bare = decode(page.locator(".stack").screenshot())
    assert differs(bare, (image + served) / 2) < 3
    side = decode(page.locator('#item-maps figure.method[data-key="gradcam"] img').screenshot())
    assert differs(side, served) < 2
    # the explained box, outlined in white on top of the map
    page.check("#show-item")
    drawn = decode(page.locator(".stack").screenshot())
    at = align(bare, (image + served) / 2)
    assert edge_hits(drawn, boxes[rows[j]], np.array([255, 255, 255]), DRAWN // 32, at) > 0.8
    assert not errors, errors
    shots = Path(os.environ.get("EXPLAINKIT_SCREENSHOT_DIR", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(shots / "explorer-detection-item.png"), full_page=True)
