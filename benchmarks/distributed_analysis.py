"""Grad-CAM analysis with 1 and with N processes (torchrun): images/s and their ratio.

Trains a small shapes run once (1 epoch, ``--images`` eval images), then runs
``explainkit analyze RUN --plugin gradcam`` in one process and
``torchrun --nproc-per-node N -m explainkit analyze ...`` on copies of it, checks that the
two attributions.h5 hold the same maps, and prints images/s of the analyzer (from its
manifest: the explanation pass, writing, joining the parts and the figure; the processes'
start-up is not counted) and of the whole command, best of ``--repeats`` alternating runs.

    python benchmarks/distributed_analysis.py --images 2048 --processes 2 --device cpu

On the CPU each process gets ``cores / N`` threads, so both runs use the same cores; on GPUs
pass ``--device cuda`` and each process takes ``cuda:LOCAL_RANK``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=2048, help="eval images to explain")
    p.add_argument("--processes", type=int, default=2, help="processes of the torchrun run")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="CPU cores to use")
    p.add_argument("--threads", type=int, help="threads per process (default: cores / processes)")
    p.add_argument("--repeats", type=int, default=3, help="runs of each, alternating; best kept")
    p.add_argument("--keep", type=Path, help="keep the runs in this folder")
    return p.parse_args(argv)


def explainkit(args: list[str], processes: int, threads: int) -> float:
    """Run the CLI (under torchrun when processes > 1); returns its wall-clock seconds."""
    env = {**os.environ, "EXPLAINKIT_LOAD_PLUGINS": "", "OMP_NUM_THREADS": str(threads)}
    if processes > 1:
        torchrun = str(Path(sys.executable).with_name("torchrun"))
        command = [torchrun, "--standalone", "--nproc-per-node", str(processes), "-m"]
    else:
        command = [sys.executable, "-m"]
    start = time.perf_counter()
    result = subprocess.run(
        [*command, "explainkit", *args], env=env, capture_output=True, text=True
    )
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"explainkit {' '.join(args[:2])} failed:\n{result.stderr[-3000:]}")
    return seconds


def analyze(run: Path, opts: argparse.Namespace, processes: int) -> dict:
    threads = opts.threads or max(1, opts.cores // processes)
    wall = explainkit(
        ["analyze", str(run), "--plugin", "gradcam", "--device", opts.device,
         "--batch-size", str(opts.batch_size)],
        processes, threads,
    )  # fmt: skip
    folder = run / "analyses" / "gradcam"
    manifest = json.loads((folder / "manifest.json").read_text())
    summary = json.loads((folder / "gradcam.json").read_text())
    n = summary["num_images"]
    return {
        "processes": processes,
        "threads": threads,
        "analyzer_s": manifest["seconds"],
        "analyzer_img_s": n / manifest["seconds"],
        "pass_img_s": summary["images_per_s"],
        "command_s": wall,
        "command_img_s": n / wall,
    }


def same_maps(a: Path, b: Path) -> float:
    """Largest difference between two runs' Grad-CAM maps."""
    import h5py
    import numpy as np

    worst = 0.0
    with (
        h5py.File(a / "analyses" / "gradcam" / "attributions.h5", "r") as fa,
        h5py.File(b / "analyses" / "gradcam" / "attributions.h5", "r") as fb,
    ):
        for start in range(0, fa["maps"].shape[0], 1024):  # bounded memory, like the analyzer
            x = fa["maps"][start : start + 1024].astype(np.float32)
            y = fb["maps"][start : start + 1024].astype(np.float32)
            worst = max(worst, float(np.abs(x - y).max()))
    return worst


def main(argv: list[str] | None = None) -> None:
    opts = parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="explainkit-dist-bench-"))
    try:
        base = root / "run"
        explainkit(
            ["train", "--dataset", "shapes", "--width", str(opts.width), "--epochs", "1",
             "--limit-train", "256", "--limit-eval", str(opts.images), "--cutout", "0",
             "--device", opts.device, "--quiet", "--out", str(base)],
            1, opts.cores,
        )  # fmt: skip
        best: dict[int, dict] = {}
        for _ in range(opts.repeats):  # alternating, so a busy moment hits both alike
            for processes in (1, opts.processes):
                run = root / f"run-{processes}"
                shutil.rmtree(run, ignore_errors=True)
                shutil.copytree(base, run)
                row = analyze(run, opts, processes)
                if processes not in best or row["analyzer_s"] < best[processes]["analyzer_s"]:
                    best[processes] = row
        rows = [best[1], best[opts.processes]]
        diff = same_maps(root / "run-1", root / f"run-{opts.processes}")
        print(
            f"gradcam on {opts.images} shapes images (32 px, width {opts.width}, batch "
            f"{opts.batch_size}, {opts.device}, {opts.cores} cores); max map difference {diff:.1e}"
        )
        print(f"{'processes':>9} {'threads':>7} {'analyzer img/s':>14} {'pass img/s':>10} "
              f"{'command s':>9} {'command img/s':>13}")  # fmt: skip
        for r in rows:
            print(
                f"{r['processes']:>9} {r['threads']:>7} {r['analyzer_img_s']:>14.0f} "
                f"{r['pass_img_s']:>10.0f} {r['command_s']:>9.1f} {r['command_img_s']:>13.0f}"
            )
        one, many = rows
        print(
            f"ratio {opts.processes} : 1 processes: analyzer "
            f"{many['analyzer_img_s'] / one['analyzer_img_s']:.2f}x, whole command "
            f"{many['command_img_s'] / one['command_img_s']:.2f}x"
        )
        if opts.keep:
            shutil.copytree(root, opts.keep, dirs_exist_ok=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
