"""Peak memory of the Grad-CAM engine at N and 10xN images: bounded by the batch, not by N.

Each measurement runs in a fresh child process, so ``ru_maxrss`` (the process's peak resident
memory) belongs to that measurement alone. Two ways of driving the engine are measured:

* ``stream``: what the gradcam analyzer does. uint8 images (as the store holds them) are
  normalized one batch at a time and explained with ``iter_cam``; each batch's maps are
  reduced and dropped (the analyzer writes them to HDF5). Peak memory should not grow with N.
* ``all``: ``compute_cam`` on one float tensor of all N images, returning all N maps. Its peak
  grows with N by design (input and output are N-sized); shown for contrast.

A third measurement, ``--folder``, is the data path at 224 px: it generates an ImageFolder of
N JPEGs, runs ``explainkit train`` on it (one epoch on 64 training images, then evaluating
and storing all N eval images) with default settings, and reports that process's peak RSS
beside the eval split's decoded size. Below the memory budget the split is decoded into
memory; above it, it streams (docs/datasets.md). The model is a two-convolution network, so
the figure is the data's cost (a real model adds its activations: on a GPU, device memory).

Usage:
    python benchmarks/memory.py                       # 1,000 vs 10,000 images, batch 256, width 8
    python benchmarks/memory.py --sizes 500 5000 --batch-size 128 --device cuda
    python benchmarks/memory.py --folder 2000 8000    # 224-px folders: in memory, streamed

Figures are recorded in docs/reliability.md (Grad-CAM) and docs/performance.md (folders).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
import tracemalloc


def _rss_mb() -> float:
    """Current resident memory of this process in MB (Linux /proc)."""
    import os

    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(n: int, mode: str, batch_size: int, width: int, device: str) -> dict:
    """Run one measurement in this process and return its figures."""
    import numpy as np
    import torch

    from explainkit.explain.gradcam import compute_cam, iter_cam
    from explainkit.models import build_model

    torch.manual_seed(0)
    dev = torch.device(device)
    model = build_model("resnet18-s8", num_classes=10, width=width).to(dev).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    images = np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    mean = torch.tensor([0.49, 0.48, 0.45], device=dev).view(1, 3, 1, 1)
    std = torch.tensor([0.25, 0.24, 0.26], device=dev).view(1, 3, 1, 1)

    def normalize(batch: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(batch).to(dev).permute(0, 3, 1, 2).float().div_(255)
        return (x - mean) / std

    # Warm up (allocator pools, lazy inits) so the baseline includes fixed costs.
    for _ in iter_cam(model, normalize(images[:batch_size]), "layer4", batch_size=batch_size):
        pass
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base_rss = _rss_mb()
    tracemalloc.start()
    start = time.perf_counter()
    checksum = 0.0
    if mode == "stream":
        for lo in range(0, n, batch_size):
            x = normalize(images[lo : lo + batch_size])
            for result in iter_cam(model, x, "layer4", batch_size=batch_size):
                checksum += float(result.maps.float().mean()) * len(result)
    else:
        x = normalize(images)
        result = compute_cam(model, x, "layer4", batch_size=batch_size)
        checksum = float(result.maps.float().mean()) * n
    if dev.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    _, py_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux
    out = {
        "images": n,
        "mode": mode,
        "batch_size": batch_size,
        "width": width,
        "device": str(dev),
        "seconds": round(seconds, 2),
        "images_per_s": round(n / seconds, 1),
        "baseline_rss_mb": round(base_rss, 1),
        "max_rss_mb": round(max_rss, 1),
        "rss_growth_mb": round(max_rss - base_rss, 1),
        "tracemalloc_peak_mb": round(py_peak / 2**20, 2),
        "mean_map": round(checksum / n, 4),
    }
    if dev.type == "cuda":
        out["cuda_max_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


TINY_MODEL = """
from collections import OrderedDict

from explainkit import hookimpl
from explainkit.hookspecs import ModelEntry


def build(num_classes):
    from torch import nn

    return nn.Sequential(OrderedDict(
        stem=nn.Conv2d(3, 8, 8, stride=8), act=nn.ReLU(),
        features=nn.Conv2d(8, 16, 3, stride=2, padding=1), relu=nn.ReLU(),
        pool=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(), head=nn.Linear(16, num_classes),
    ))


@hookimpl
def register_models(register):
    register(ModelEntry("tiny224", build, default_layer="features"))
"""


def make_folder(root, count: int, size: int = 224, distinct: int = 32) -> None:
    """``count`` JPEGs in 10 class folders; ``distinct`` of them drawn, the rest copies (each
    file is decoded all the same, and writing copies is fast)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    drawn = []
    for i in range(min(count, distinct)):
        pixels = rng.integers(0, 256, (size + 16, size + 32, 3), dtype=np.uint8)
        folder = root / f"class{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"img{i:06d}.jpg"
        Image.fromarray(pixels).resize((size + 32, size + 16)).save(path, quality=85)
        drawn.append(path.read_bytes())
    for i in range(len(drawn), count):
        folder = root / f"class{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"img{i:06d}.jpg").write_bytes(drawn[i % len(drawn)])


def measure_folder(n: int, device: str) -> dict:
    """Train one epoch on a generated 224-px folder with N eval images in a child process;
    its peak RSS (decoding workers are separate processes, not counted) and timings."""
    import os
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "plugins").mkdir()
        (root / "plugins" / "tiny224.py").write_text(TINY_MODEL)
        make_folder(root / "data" / "train", 64)
        make_folder(root / "data" / "val", n)
        env = {**os.environ, "EXPLAINKIT_PLUGINS_DIR": str(root / "plugins")}
        cmd = [sys.executable, "-m", "explainkit", "train", "--dataset", "folder"]
        cmd += ["--data-dir", str(root / "data"), "--image-size", "224", "--model", "tiny224"]
        cmd += ["--epochs", "1", "--device", device, "--quiet", "--out", str(root / "run")]
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE)
        stderr = proc.stderr.read() if proc.stderr else b""
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(stderr.decode(errors="replace"))
    from explainkit.data.lazy import memory_budget

    decoded = n * 224 * 224 * 3
    return {
        "images": n,
        "decoded_mb": round(decoded / 2**20, 1),
        "split": "streamed" if decoded > memory_budget() else "in memory",
        "max_rss_mb": round(usage.ru_maxrss / 1024, 1),
        "seconds": round(seconds, 1),
        "device": device,
    }


def folder_table(sizes: list[int], device: str) -> None:
    print("| eval images (224 px) | decoded MB | eval split | max RSS MB | seconds |")
    print("|---|---|---|---|---|")
    for n in sizes:
        r = measure_folder(n, device)
        print(json.dumps(r), file=sys.stderr)
        cells = [r["images"], r["decoded_mb"], r["split"], r["max_rss_mb"], r["seconds"]]
        print("| " + " | ".join(str(c) for c in cells) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--modes", nargs="+", default=["stream", "all"])
    parser.add_argument("--folder", type=int, nargs="+", metavar="N", help="224-px folders")
    parser.add_argument("--child", nargs=2, metavar=("N", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = args.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.folder:
        folder_table(args.folder, device)
        return
    if args.child:
        n, mode = int(args.child[0]), args.child[1]
        print(json.dumps(measure(n, mode, args.batch_size, args.width, device)))
        return
    rows = []
    for mode in args.modes:
        for n in args.sizes:
            cmd = [sys.executable, __file__, "--child", str(n), mode]
            cmd += ["--batch-size", str(args.batch_size), "--width", str(args.width)]
            cmd += ["--device", device]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            row = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    cuda = "cuda_max_allocated_mb" in rows[0]
    header = "| mode | images | batch | max RSS MB | RSS growth MB | tracemalloc peak MB |"
    header += " CUDA max allocated MB |" if cuda else ""
    header += " images/s |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for r in rows:
        cells = [r["mode"], r["images"], r["batch_size"], r["max_rss_mb"], r["rss_growth_mb"]]
        cells.append(r["tracemalloc_peak_mb"])
        if cuda:
            cells.append(r["cuda_max_allocated_mb"])
        cells.append(r["images_per_s"])
        print("| " + " | ".join(str(c) for c in cells) + " |")


if __name__ == "__main__":
    main()
