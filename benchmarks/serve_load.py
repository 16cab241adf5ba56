"""Load and memory of ``explainkit serve``: requests/s and p95 latency, server peak RSS.

Builds a synthetic run (``--images`` images of ``--side`` px, streamed to disk, with a
gradcam attributions.h5 of the same size; tests/helpers.synthetic_explorer_run) or uses
``--run``, starts the real CLI (``python -m explainkit serve RUN --port 0``) in a
subprocess, and sends a bounded load from ``--concurrency`` client threads:

* ``grid``: a grid page's JSON (random filters, sorts and pages) and its 48 thumbnails
  counted as one view, as the browser loads them;
* ``detail``: one image's JSON, its picture and its stored map.

Each kind is timed on its own (``--requests`` views each). Reports views/s, p50 and p95
latency, the server's start time and its peak resident memory (VmHWM from /proc), then
prints one JSON line. Figures are recorded in docs/explorer.md.

Usage:
    python benchmarks/serve_load.py                              # 5,000 32-px images
    python benchmarks/serve_load.py --images 50000 --side 224    # the issue's memory bound
    python benchmarks/serve_load.py --run runs/cifar --requests 400 --concurrency 16
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=120) as r:
        return r.read()


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident memory (VmHWM), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start(run: Path) -> tuple[subprocess.Popen, str, float]:
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "explainkit", "serve", str(run), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "EXPLAINKIT_LOAD_PLUGINS": ""},
    )
    for line in proc.stdout:
        if " at http://" in line:
            url = line.split(" at ")[1].split()[0]
            get(url + "api/runs")
            return proc, url, time.perf_counter() - t0
    proc.kill()
    raise SystemExit(f"the server did not start: {proc.wait()}")


def grid_view(url: str, n: int, classes: int, rng: random.Random) -> None:
    query = {
        "sort": rng.choice(["index", "confidence", "loss"]),
        "desc": rng.choice(["", "1"]),
        "correct": rng.choice(["", "0", "1"]),
        "true": rng.choice(["", str(rng.randrange(classes))]),
    }
    pages = max(1, n // 48 // (classes if query["true"] else 1))
    query["page"] = str(rng.randrange(pages))
    q = "&".join(f"{k}={v}" for k, v in query.items() if v)
    items = json.loads(get(f"{url}api/runs/0/images?per_page=48&{q}"))["items"]
    for item in items:
        get(f"{url}img/0/{item['index']}.png?size=112")


def detail_view(url: str, n: int, rng: random.Random) -> None:
    i = rng.randrange(n)
    get(f"{url}api/runs/0/images/{i}")
    get(f"{url}img/0/{i}.png")
    get(f"{url}map/0/{i}/gradcam.png")


def measure(fn, requests: int, concurrency: int) -> dict:
    latencies: list[float] = []

    def one(seed: int) -> None:
        t = time.perf_counter()
        fn(random.Random(seed))
        latencies.append(time.perf_counter() - t)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(requests)))
    seconds = time.perf_counter() - t0
    latencies.sort()
    return {
        "views": requests,
        "views_per_s": requests / seconds,
        "p50_ms": 1000 * statistics.median(latencies),
        "p95_ms": 1000 * latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--side", type=int, default=32)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--run", type=Path, help="serve this run instead of a synthetic one")
    parser.add_argument("--requests", type=int, default=200, help="views of each kind")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--keep", type=Path, help="build the synthetic run here and keep it")
    args = parser.parse_args()

    from tests.helpers import synthetic_explorer_run

    tmp = tempfile.TemporaryDirectory()
    run = args.run
    built = None
    if run is None:
        run = args.keep or Path(tmp.name) / "run"
        if not (run / "predictions.h5").exists():
            t = time.perf_counter()
            synthetic_explorer_run(run, args.images, args.side, args.classes)
            built = time.perf_counter() - t
    proc, url, started = start(run)
    try:
        info = json.loads(get(url + "api/runs"))[0]
        n, classes = info["num_images"], len(info["classes"])
        rss_started = peak_rss_mb(proc.pid)
        grid = measure(lambda rng: grid_view(url, n, classes, rng), args.requests, args.concurrency)
        detail = measure(lambda rng: detail_view(url, n, rng), args.requests, args.concurrency)
        result = {
            "images": n,
            "side": args.side if args.run is None else None,
            "concurrency": args.concurrency,
            "build_s": built,
            "start_s": started,
            "rss_after_start_mb": rss_started,
            "peak_rss_mb": peak_rss_mb(proc.pid),
            "grid": grid,
            "detail": detail,
        }
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        tmp.cleanup()
    for kind in ("grid", "detail"):
        r = result[kind]
        print(
            f"{kind:6s} {r['views_per_s']:7.1f} views/s  p50 {r['p50_ms']:7.1f} ms  "
            f"p95 {r['p95_ms']:7.1f} ms  ({r['views']} views, {args.concurrency} clients)"
        )
    print(
        f"{n} images: server started in {started:.1f} s, peak RSS {result['peak_rss_mb']:.0f} MB "
        f"({result['rss_after_start_mb']:.0f} MB after start)"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
