"""Grad-CAM throughput: native engine vs plain inference, Captum and a naive PyTorch version.

Same model (random init), same images, same device, one process. Each method is warmed up,
then timed ``--repeats`` times over all ``--images``; the best pass is reported.

    python benchmarks/gradcam_speed.py --width 64 --batch-size 64 --images 512 --device auto

Targets: native >= 0.9x plain inference and >= 2x Captum at batch 64. The native engine
gets there because its backward pass stops at the target layer and computes no parameter
gradients; Captum and the naive version backpropagate through the whole network.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from explainkit.explain.gradcam import GradCAM, normalize_maps
from explainkit.models import build_model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet18-s8")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--layer", default="layer4")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2, help="warm-up batches per method")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA; CPU too if asked)")
    p.add_argument("--no-captum", action="store_true", help="skip Captum even if installed")
    p.add_argument("--seed", type=int, default=0)
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
    model = build_model(args.arch, width=args.width).to(device, memory_format=memory_format)
    model.eval()  # parameters keep requires_grad=True, as users have them
    layer = dict(model.named_modules())[args.layer]
    g = torch.Generator().manual_seed(args.seed)
    images = torch.randn(args.images, 3, 32, 32, generator=g)
    images = images.to(device, memory_format=memory_format)
    batches = list(images.split(args.batch_size))

    def amp():
        if args.amp:
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def plain(x):
        with torch.inference_mode(), amp():
            return model(x)

    cam = GradCAM(model, args.layer)

    def native(x):
        with amp():
            return cam(x, target="predicted").maps

    def naive(x):
        with amp():
            return naive_gradcam(model, layer, x)

    methods: dict[str, Callable[[torch.Tensor], object]] = {
        "plain inference": plain,
        "native Grad-CAM": native,
        "naive PyTorch Grad-CAM": naive,
    }
    if not args.no_captum:
        try:
            from captum.attr import LayerAttribution, LayerGradCam
        except ImportError:
            print("captum not installed: skipping it")
        else:
            captum_cam = LayerGradCam(model, layer)
            # Users pass targets they already have (predictions); not timed, to be fair.
            with torch.no_grad(), amp():
                preds = [model(x).argmax(1) for x in batches]
            targets = {id(x): t for x, t in zip(batches, preds, strict=True)}

            def captum(x):
                with amp():
                    attr = captum_cam.attribute(x, target=targets[id(x)], relu_attributions=True)
                    return LayerAttribution.interpolate(attr, tuple(x.shape[-2:]), "bilinear")

            methods["Captum LayerGradCam"] = captum
            x = batches[0]
            ours, theirs = native(x).float(), normalize_maps(captum(x).detach().float()[:, 0])
            rel = float((ours - theirs).abs().max() / theirs.abs().max().clamp_min(1e-12))
            print(f"native vs Captum maps, first batch: max rel diff {rel:.2e}")

    for fn in methods.values():
        for x in batches[: max(args.warmup, 1)]:
            fn(x)
    sync()
    # Interleave methods across repeats so drift (clocks, other load) hits all alike.
    best = dict.fromkeys(methods, float("inf"))
    for _ in range(args.repeats):
        for name, fn in methods.items():
            sync()
            t0 = time.perf_counter()
            for x in batches:
                fn(x)
            sync()
            best[name] = min(best[name], time.perf_counter() - t0)
    results = {name: args.images / seconds for name, seconds in best.items()}

    gpu = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    print(
        f"device={device}{gpu} torch={torch.__version__} arch={args.arch} width={args.width} "
        f"batch={args.batch_size} images={args.images} layer={args.layer} "
        f"channels_last={args.channels_last} amp={args.amp} threads={torch.get_num_threads()}"
    )
    print(f"{'method':<26}{'images/s':>12}{'vs plain':>10}")
    for name, ips in results.items():
        print(f"{name:<26}{ips:>12.1f}{ips / results['plain inference']:>9.2f}x")
    nat = results["native Grad-CAM"]
    print(f"native/plain  = {nat / results['plain inference']:.2f}x  (target >= 0.9x)")
    if "Captum LayerGradCam" in results:
        print(f"native/captum = {nat / results['Captum LayerGradCam']:.2f}x  (target >= 2x)")
    print(f"native/naive  = {nat / results['naive PyTorch Grad-CAM']:.2f}x")


if __name__ == "__main__":
    main()
