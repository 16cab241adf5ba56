"""Grad-CAM on real architectures at 224 px: explainkit beside Captum, pytorch-grad-cam, torch-cam.

Same model (torchvision, random weights: nothing downloads), same images, same targets (the
model's predictions), same device, one process. Each method is warmed up, then timed
``--repeats`` times over all images; the best pass counts. Printed per model: images/s, the
ratio to plain inference, explainkit's speed-up over each peer, and how far each peer's maps
are from explainkit's (max |difference| of maps scaled to [0, 1], and Pearson r).

The peers are installed for the benchmark only (pip install -r benchmarks/requirements.txt):

    python benchmarks/gradcam_models.py --models resnet50,vit_b_16 --images 32 --batch-size 16

A peer that cannot explain a layer (Captum's LayerGradCam and torch-cam on ViT tokens) is
listed as n/a with the reason, rather than timed doing something else.
"""

from __future__ import annotations

import argparse
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from _timing import round_robin

from explainkit.explain.gradcam import GradCAM, normalize_maps

# Target layer and token layout for each model: what a user would pick for Grad-CAM.
LAYERS = {
    "resnet50": ("layer4", "nchw"),
    "vit_b_16": ("encoder.layers.encoder_layer_11.ln_1", "vit"),
}


@dataclass
class Row:
    method: str
    images_per_s: float | None
    note: str = ""
    max_diff: float | None = None
    pearson: float | None = None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet50,vit_b_16")
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--device", default="auto")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


Rates = dict[str, tuple[float, "torch.Tensor | None"]]


def best_rates(
    fns: dict[str, Callable], batches: tuple, repeats: int, sync: Callable[[], None]
) -> Rates:
    """Images/s of each method (round-robin by batch, _timing.py), and its maps."""
    per_batch = {name: (lambda i, fn=fn: fn(batches[i])) for name, fn in fns.items()}
    best, outs = round_robin(per_batch, len(batches), repeats, sync)
    n = sum(len(b) for b in batches)
    return {
        name: (n / best[name], torch.cat(outs[name]) if outs[name][0] is not None else None)
        for name in fns
    }


def agreement(ours: torch.Tensor, theirs: torch.Tensor) -> tuple[float, float]:
    a, b = ours.double().flatten(), normalize_maps(theirs.float()).double().flatten()
    r = torch.corrcoef(torch.stack([a, b]))[0, 1].item()
    return (a - b).abs().max().item(), r


def upsample(maps: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(maps[:, None].float(), size=(size, size), mode="bilinear")[:, 0]


def peers(model, layer: str, reshape: str, target_of: Callable, size: int) -> dict:
    """Each installed peer as ``fn(x) -> maps (N, size, size)``, or a reason it cannot run;
    ``target_of(x)`` gives the classes to explain for batch ``x``."""
    module = dict(model.named_modules())[layer]
    out: dict[str, Callable | str] = {}
    if importlib.util.find_spec("captum") and reshape == "nchw":
        from captum.attr import LayerGradCam

        lgc = LayerGradCam(model, module)

        def captum_fn(x):
            a = lgc.attribute(x, target=target_of(x), relu_attributions=True)
            return upsample(a[:, 0].detach(), size)

        out["captum"] = captum_fn
    elif reshape != "nchw":
        out["captum"] = "LayerGradCam averages over dims 2 and 3: not a token layer's grid"
    if importlib.util.find_spec("pytorch_grad_cam"):
        from pytorch_grad_cam import GradCAM as PGCGradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        def vit_tokens(t):  # (N, 1 + HW, C) -> (N, C, h, w), dropping the class token
            side = int((t.shape[1] - 1) ** 0.5)
            return t[:, 1:].reshape(t.shape[0], side, side, t.shape[2]).permute(0, 3, 1, 2)

        transform = vit_tokens if reshape == "vit" else None
        pgc = PGCGradCAM(model=model, target_layers=[module], reshape_transform=transform)

        def pgc_fn(x):
            ts = [ClassifierOutputTarget(int(c)) for c in target_of(x)]
            return torch.from_numpy(pgc(input_tensor=x, targets=ts))

        out["pytorch-grad-cam"] = pgc_fn
    if importlib.util.find_spec("torchcam") and reshape == "nchw":
        from torchcam.methods import GradCAM as TCGradCAM

        tc = TCGradCAM(model, target_layer=layer)

        def torchcam_fn(x):
            scores = model(x)
            (maps,) = tc(class_idx=target_of(x).tolist(), scores=scores)
            return upsample(maps.detach(), size)

        out["torch-cam"] = torchcam_fn
    elif reshape != "nchw":
        out["torch-cam"] = "its Grad-CAM needs an (N, C, H, W) layer"
    return out


def run_model(name: str, args: argparse.Namespace, device: torch.device) -> list[Row]:
    import torchvision

    torch.manual_seed(args.seed)
    # As a user has it (parameters require grad): the peers backpropagate into them, while
    # explainkit's engine freezes them for the call on its own.
    model = torchvision.models.get_model(name, weights=None).to(device).eval()
    if name.startswith("vit"):  # torchvision starts the ViT head at zero: every map would be 0
        torch.nn.init.normal_(model.heads.head.weight, std=0.02)
    layer, reshape = LAYERS[name]
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.images, 3, args.size, args.size, generator=g).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    bs = args.batch_size
    with torch.no_grad():
        targets = torch.cat([model(x[s : s + bs]).argmax(1) for s in range(0, len(x), bs)])
    batches = x.split(bs)
    by_batch = dict(zip(map(id, batches), targets.split(bs), strict=True))

    def target_of(batch: torch.Tensor) -> torch.Tensor:
        return by_batch[id(batch)]

    def plain(batch):
        with torch.no_grad():
            model(batch)

    cam = GradCAM(model, layer, reshape=reshape)

    def ours(batch):
        return cam(batch, target=target_of(batch)).maps

    fns: dict[str, Callable] = {"plain inference": plain, "explainkit": ours}
    notes: dict[str, str] = {}
    for peer, fn in peers(model, layer, reshape, target_of, args.size).items():
        if isinstance(fn, str):
            notes[peer] = fn
        else:
            fns[peer] = fn
    results = best_rates(fns, batches, args.repeats, sync)
    our_maps = results["explainkit"][1].cpu()
    rows = []
    for name, (rate, maps) in results.items():
        row = Row(name, rate)
        if maps is not None and name != "explainkit":
            row.max_diff, row.pearson = agreement(our_maps, maps.cpu())
        rows.append(row)
    rows += [Row(peer, None, f"n/a: {why}") for peer, why in notes.items()]
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if args.device == "auto" else args.device)
    print(f"device {device}, {args.images} images of {args.size} px, batch {args.batch_size}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")  # fmt: skip
    for name in args.models.split(","):
        rows = run_model(name, args, device)
        plain = rows[0].images_per_s
        ours = rows[1].images_per_s
        print(f"\n{name} at {LAYERS[name][0]} ({LAYERS[name][1]})")
        print(f"  {'method':<18} {'img/s':>8} {'x plain':>8} {'ours x':>8} {'max|d|':>8} {'r':>9}")
        for row in rows:
            if row.images_per_s is None:
                print(f"  {row.method:<18} {row.note}")
                continue
            speedup = f"{ours / row.images_per_s:8.2f}" if row.method not in (
                "plain inference", "explainkit") else " " * 8  # fmt: skip
            diff = f"{row.max_diff:8.1e}" if row.max_diff is not None else " " * 8
            r = f"{row.pearson:9.6f}" if row.pearson is not None else " " * 9
            print(f"  {row.method:<18} {row.images_per_s:8.1f} "
                  f"{row.images_per_s / plain:8.2f} {speedup} {diff} {r}")  # fmt: skip


if __name__ == "__main__":
    main()
