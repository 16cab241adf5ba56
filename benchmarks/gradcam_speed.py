"""Grad-CAM throughput: native engine vs plain inference, the peers and a naive PyTorch version.

Same model (random init), same images, same targets (the model's predictions), same device,
one process. The peers (Captum, torch-cam, pytorch-grad-cam) are installed for the benchmark
only (pip install -r benchmarks/requirements.txt); those missing are skipped. Each method is
warmed up, then timed round-robin ``--repeats`` times over all ``--images`` (see _timing.py);
the best pass counts. Printed: images/s, the ratio to plain inference, the native engine's
speed-up over each method and how far each method's maps are from the native ones.

    python benchmarks/gradcam_speed.py --width 64 --batch-size 64 --images 512 --device auto

``--methods all`` (or a comma list of native names) instead times every native CAM beside
each peer's version of it (pytorch-grad-cam, torch-cam, Captum where they have it;
benchmarks/cam_peers.py), all round-robin in one process, and prints a Markdown table.

Targets: native >= 0.9x plain inference, and faster than every peer. The native engine gets
there because its backward pass stops at the target layer and computes no parameter
gradients.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from _timing import round_robin
from cam_peers import PEERS, peer_fns
from gradcam_models import peers

from explainkit.api import load_registries
from explainkit.explain.gradcam import CAM_CLASSES, GradCAM, normalize_maps

PEER_NAMES = {
    "captum": "Captum LayerGradCam",
    "torch-cam": "torch-cam GradCAM",
    "pytorch-grad-cam": "pytorch-grad-cam GradCAM",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet18-s8")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--layer", default="layer4")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1, help="warm-up passes per method")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA; CPU too if asked)")
    p.add_argument("--no-captum", action="store_true", help="skip Captum even if installed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", default="gradcam",
                   help="gradcam (the detailed Grad-CAM table), all, or native names")  # fmt: skip
    return p.parse_args(argv)


def naive_gradcam(model: torch.nn.Module, layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Grad-CAM the textbook way: retain_grad on the layer, full backward incl. param grads."""
    store = {}

    def keep(_, __, out):
        out.retain_grad()
        store["a"] = out

    handle = layer.register_forward_hook(keep)
    try:
        logits = model(x)
        logits.gather(1, logits.argmax(1, keepdim=True)).sum().backward()
    finally:
        handle.remove()
    a = store["a"]
    with torch.no_grad():
        cam = F.relu((a.grad.float().mean((2, 3), keepdim=True) * a.float()).sum(1, keepdim=True))
        maps = normalize_maps(F.interpolate(cam, x.shape[-2:], mode="bilinear")[:, 0])
    model.zero_grad(set_to_none=True)
    return maps


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    torch.manual_seed(args.seed)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = load_registries().build_model(args.arch, 10, width=args.width)
    model = model.to(device, memory_format=memory_format)
    model.eval()  # parameters keep requires_grad=True, as users have them
    layer = dict(model.named_modules())[args.layer]
    g = torch.Generator().manual_seed(args.seed)
    images = torch.randn(args.images, 3, 32, 32, generator=g)
    images = images.to(device, memory_format=memory_format)
    batches = list(images.split(args.batch_size))
    # Users pass targets they already have (predictions); not timed, to be fair to the peers.
    with torch.no_grad():
        targets = torch.cat([model(x).argmax(1) for x in batches])

    def amp():
        if args.amp:
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def plain(x):
        with torch.inference_mode(), amp():
            model(x)

    target_of = dict(zip((id(x) for x in batches), targets.split(args.batch_size), strict=True))
    if args.methods != "gradcam":
        every_method(args, model, batches, lambda x: target_of[id(x)], plain, sync, device)
        return
    cam = GradCAM(model, args.layer)

    def native(x):
        with amp():
            return cam(x, target=target_of[id(x)]).maps

    def naive(x):
        with amp():
            return naive_gradcam(model, layer, x)

    methods: dict[str, Callable[[torch.Tensor], object]] = {
        "plain inference": plain,
        "native Grad-CAM": native,
        "naive PyTorch Grad-CAM": naive,
    }
    skip = {"captum"} if args.no_captum else set()
    for name, fn in peers(model, args.layer, "nchw", lambda x: target_of[id(x)], 32).items():
        if name in skip or isinstance(fn, str):
            continue

        def peer(x, fn=fn):
            with amp():
                return fn(x)

        methods[PEER_NAMES[name]] = peer

    def per_batch(fn):
        return lambda i: fn(batches[i])

    passes = {name: per_batch(fn) for name, fn in methods.items()}
    best, outs = round_robin(passes, len(batches), args.repeats, sync, args.warmup)
    maps = {n: torch.cat(o).float() if o[0] is not None else None for n, o in outs.items()}
    results = {name: args.images / seconds for name, seconds in best.items()}

    gpu = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    print(
        f"device={device}{gpu} torch={torch.__version__} arch={args.arch} width={args.width} "
        f"batch={args.batch_size} images={args.images} layer={args.layer} "
        f"channels_last={args.channels_last} amp={args.amp} threads={torch.get_num_threads()} "
        f"timing=round-robin, best of {args.repeats}"
    )
    ours = maps["native Grad-CAM"]
    nat = results["native Grad-CAM"]
    print(f"{'method':<26}{'images/s':>10}{'x plain':>9}{'native x':>10}{'max|d| maps':>13}")
    for name, ips in results.items():
        speedup = f"{nat / ips:9.2f}x" if name not in ("plain inference", "native Grad-CAM") else ""
        diff = ""
        if maps[name] is not None and name != "native Grad-CAM":
            diff = f"{float((ours - normalize_maps(maps[name].to(ours))).abs().max()):13.1e}"
        print(f"{name:<26}{ips:>10.1f}{ips / results['plain inference']:>8.2f}x"
              f"{speedup:>10}{diff}")  # fmt: skip
    print(f"native/plain = {nat / results['plain inference']:.2f}x  (target >= 0.9x)")


def every_method(args, model, batches, target_of, plain, sync, device) -> None:
    """One round-robin over every chosen native CAM and each peer's version of it."""
    names = list(PEERS) if args.methods == "all" else args.methods.split(",")
    fns: dict[tuple[str, str], Callable] = {("plain inference", ""): plain}
    for name in names:
        engine = CAM_CLASSES[name](model, args.layer)
        fns[(name, "explainkit")] = lambda x, e=engine: e(x, target=target_of(x)).maps
        for lib, fn in peer_fns(name, model, args.layer, target_of, 32).items():
            fns[(name, lib)] = fn
    keys = list(fns)
    passes = {str(i): (lambda u, f=fns[k]: f(batches[u])) for i, k in enumerate(keys)}
    best, outs = round_robin(passes, len(batches), args.repeats, sync, args.warmup)
    n = sum(x.shape[0] for x in batches)
    rate = {k: n / best[str(i)] for i, k in enumerate(keys)}
    maps = {k: torch.cat(outs[str(i)]).float() for i, k in enumerate(keys) if outs[str(i)][0]
            is not None}  # fmt: skip
    print(
        f"device={device} torch={torch.__version__} arch={args.arch} width={args.width} "
        f"batch={args.batch_size} images={n} layer={args.layer} "
        f"threads={torch.get_num_threads()} timing=round-robin, best of {args.repeats}"
    )
    base = rate[("plain inference", "")]
    print(f"plain inference: {base:.1f} images/s\n")
    libs = ["pytorch-grad-cam", "torch-cam", "Captum"]
    print("| method | explainkit images/s | x plain | " + " | ".join(libs)
          + " | explainkit / fastest peer |")  # fmt: skip
    print("|---" * (len(libs) + 4) + "|")
    for name in names:
        ours = rate[(name, "explainkit")]
        cells, fastest = [], 0.0
        for lib in libs:
            if (name, lib) not in rate:
                cells.append("-")
                continue
            fastest = max(fastest, rate[(name, lib)])
            diff = (maps[(name, "explainkit")] - normalize_maps(maps[(name, lib)])).abs().max()
            cells.append(f"{rate[(name, lib)]:.1f} (max\\|d\\| {float(diff):.0e})")
        ratio = f"{ours / fastest:.2f}x" if fastest else "-"
        print(f"| {name} | {ours:.1f} | {ours / base:.2f} | " + " | ".join(cells)
              + f" | {ratio} |")  # fmt: skip


if __name__ == "__main__":
    main()
