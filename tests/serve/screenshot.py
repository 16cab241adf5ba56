"""docs/explorer.png: the explorer's detail view of a run, drawn by headless Chromium.

Serves RUN, opens its grid filtered to the most frequent confusion, opens the first image,
lays Grad-CAM++ over it (computed on demand) and saves the page. Not a test (the browser test,
test_browser.py, checks the same steps pixel by pixel); a script for the README's picture:

    python -m tests.serve.screenshot runs/shapes docs/explorer.png
"""

from __future__ import annotations

import sys
import threading
import time

from tests.helpers import registries


def main(run: str, out: str) -> None:
    import uvicorn
    from playwright.sync_api import sync_playwright

    from explainkit.serve import bind, build_app

    app = build_app([run], registries(), "cpu")
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/runs/0/"
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path="/usr/bin/chromium", headless=True, args=["--no-sandbox"]
        )
        page = browser.new_page(viewport={"width": 1280, "height": 820})
        page.goto(url)
        page.wait_for_selector("#confusion td.cell")
        cells = page.eval_on_selector_all(
            "#confusion td.off",
            "cs => cs.map(c => [Number(c.textContent), c.dataset.true, c.dataset.pred])",
        )
        _, true, pred = max(cells, key=lambda c: c[0])
        page.click(f'#confusion td.cell[data-true="{true}"][data-pred="{pred}"]')
        page.wait_for_timeout(1000)
        page.click("#grid a.thumb")
        page.wait_for_function("() => document.querySelector('#overlay').dataset.ready")
        page.select_option("#method", "live-gradcampp")
        page.wait_for_function(
            "() => document.querySelector('#overlay').dataset.ready === 'live-gradcampp'",
            timeout=120_000,
        )
        page.screenshot(path=out)
        browser.close()
    server.should_exit = True


if __name__ == "__main__":
    main(*sys.argv[1:3])
