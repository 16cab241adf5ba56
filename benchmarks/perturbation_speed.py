"""Perturbation CAMs and ROAD: explainkit beside pytorch-grad-cam, torch-cam and Quantus.

Same model (explainkit's resnet18-s8, random weights), same images, same layer, same targets
(the model's predictions), one process, round-robin (_timing.py). Every method's images/s,
explainkit's speed-up over each peer, and how far the peer's maps are from explainkit's (max
|difference| of maps scaled to [0, 1], Pearson r) so the speeds compare equal maps. Each
peer runs with ``--max-batch`` masks per forward pass, as explainkit does.

    python benchmarks/perturbation_speed.py --width 16 --images 8 --size 32

Peers: pip install -r benchmarks/requirements.txt (grad-cam, torchcam, quantus).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from _timing import round_robin

from explainkit.explain import perturbation as P
from explainkit.explain.cam_result import normalize_maps
from explainkit.explain.metrics_road import road_curves


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=8, help="images per call")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--layer", default="layer4")
    p.add_argument(
        "--max-batch", type=int, default=None, help="masks per pass (default: 64 CPU, 256 GPU)"
    )
    p.add_argument("--samples", type=int, default=4, help="SS-CAM / IS-CAM samples")
    p.add_argument("--device", default="auto")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument(
        "--threads", type=int, default=1, help="CPU threads (1 beats oversubscribed shared cores)"
    )
    p.add_argument("--methods", default="scorecam,ablationcam,sscam,iscam,rise,road")
    return p.parse_args(argv)


def _agree(ours: torch.Tensor, theirs: torch.Tensor) -> tuple[float, float]:
    if theirs.shape[-2:] != ours.shape[-2:]:
        theirs = F.interpolate(theirs[:, None].float(), size=ours.shape[-2:], mode="bilinear")
        theirs = theirs[:, 0]
    a, b = ours.double().flatten(), normalize_maps(theirs.float()).double().flatten()
    return (a - b).abs().max().item(), torch.corrcoef(torch.stack([a, b]))[0, 1].item()


def _quiet(fn: Callable) -> Callable:
    """Run ``fn`` with the peers' progress bars (tqdm on stderr) silenced."""

    def wrapped(*args):
        stderr, sys.stderr = sys.stderr, open(os.devnull, "w")  # noqa: SIM115
        try:
            return fn(*args)
        finally:
            sys.stderr.close()
            sys.stderr = stderr

    return wrapped


def contenders(method: str, model, layer: str, args, targets_of) -> dict[str, Callable]:
    """explainkit and every installed peer that has ``method``, as ``fn(batch) -> maps``."""
    module = dict(model.named_modules())[layer]
    mb, k = args.max_batch, args.samples
    shape = (3, args.size, args.size)
    out: dict[str, Callable] = {}
    engines = {
        "scorecam": lambda: P.ScoreCAM(model, layer, max_batch=mb),
        "ablationcam": lambda: P.AblationCAM(model, layer, max_batch=mb),
        "sscam": lambda: P.SSCAM(model, layer, max_batch=mb, samples=k, std=2.0),
        "iscam": lambda: P.ISCAM(model, layer, max_batch=mb, samples=k),
        "rise": lambda: P.RISE(model, max_batch=mb, masks=500),
    }
    if method in engines:
        engine = engines[method]()
        out["explainkit"] = lambda x: engine(x, targets_of(x)).maps
    have = importlib.util.find_spec
    if method in ("scorecam", "ablationcam") and have("pytorch_grad_cam"):
        import pytorch_grad_cam as pgc
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        if method == "scorecam":
            cam = pgc.ScoreCAM(model, [module])
            cam.batch_size = mb
        else:
            cam = pgc.AblationCAM(model, [module], batch_size=mb)

        def pgc_fn(x, cam=cam):
            wanted = [ClassifierOutputTarget(int(c)) for c in targets_of(x)]
            return torch.from_numpy(cam(x, wanted))

        out["pytorch-grad-cam"] = _quiet(pgc_fn)
    if method in ("scorecam", "sscam", "iscam") and have("torchcam"):
        import torchcam.methods as tcm

        logging.getLogger("torchcam").setLevel(logging.ERROR)
        cls = {"scorecam": tcm.ScoreCAM, "sscam": tcm.SSCAM, "iscam": tcm.ISCAM}[method]
        extra = {} if method == "scorecam" else {"num_samples": k}
        tc = cls(model, layer, batch_size=mb, input_shape=shape, **extra)

        def tc_fn(x, tc=tc):
            with torch.no_grad():
                model(x)
            return tc(targets_of(x).tolist())[0].detach()

        out["torch-cam"] = tc_fn
    if method == "road":
        out.update(_road_contenders(model, args, targets_of))
    return out


def _road_contenders(model, args, targets_of) -> dict[str, Callable]:
    """ROAD MoRF + LeRF at 9 fractions of one map per image (its maps: the Gaussian blob)."""
    fractions = tuple(f / 10 for f in range(1, 10))
    maps_of = {}

    def maps(x):
        if id(x) not in maps_of:
            g = torch.Generator().manual_seed(0)
            raw = torch.rand(x.shape[0], 1, x.shape[-2], x.shape[-1], generator=g)
            maps_of[id(x)] = F.avg_pool2d(raw, 5, 1, 2)[:, 0].to(x.device)
        return maps_of[id(x)]

    def ours(x):
        road_curves(model, x, maps(x), targets_of(x), fractions=fractions,
                    max_batch=args.max_batch)  # fmt: skip

    out: dict[str, Callable] = {"explainkit": ours}
    if importlib.util.find_spec("pytorch_grad_cam"):
        from pytorch_grad_cam.metrics.road import ROADCombined
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

        combined = ROADCombined(percentiles=[int(100 * f) for f in fractions])

        def pgc_road(x):
            ts = [ClassifierOutputSoftmaxTarget(int(c)) for c in targets_of(x)]
            combined(x.cpu(), maps(x).cpu().numpy(), ts, model.cpu())

        out["pytorch-grad-cam"] = pgc_road
    if importlib.util.find_spec("quantus"):
        import quantus

        road = quantus.ROAD(noise=0.01, percentages=[int(100 * f) for f in fractions],
                            normalise=False, disable_warnings=True)  # fmt: skip

        def quantus_road(x):  # MoRF only (Quantus's ROAD), on one channel: see tests
            gray = x[:, :1]
            road(model=_OneChannel(model).eval(), x_batch=gray.cpu().numpy(),
                 y_batch=targets_of(x).cpu().numpy(), a_batch=maps(x)[:, None].cpu().numpy(),
                 device="cpu")  # fmt: skip

        out["quantus (MoRF only)"] = quantus_road
    return out


class _OneChannel(torch.nn.Module):
    """The model fed a one-channel image repeated to three (Quantus's ROAD is one-channel)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x.expand(-1, 3, -1, -1))


def main(argv: list[str] | None = None) -> None:
    from explainkit.api import load_registries

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if args.device == "auto" else args.device)
    args.max_batch = args.max_batch or (256 if device.type == "cuda" else 64)
    torch.manual_seed(0)
    model = load_registries().build_model("resnet18-s8", 10, width=args.width).to(device).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.images, 3, args.size, args.size, generator=g).to(device)
    with torch.no_grad():
        targets = model(x).argmax(1)
    batches = x.split(args.batch_size)
    by_batch = dict(zip(map(id, batches), targets.split(args.batch_size), strict=True))

    def targets_of(batch):
        return by_batch[id(batch)]

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    print(
        f"device {device}, {args.images} images of {args.size} px, resnet18-s8 width "
        f"{args.width}, layer {args.layer}, max_batch {args.max_batch}, samples "
        f"{args.samples}, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print("\n| method | implementation | img/s | explainkit x | max abs diff | Pearson r |")
    print("|---|---|---|---|---|---|")
    for method in args.methods.split(","):
        fns = contenders(method, model, args.layer, args, targets_of)
        per_batch = {name: (lambda i, fn=fn: fn(batches[i])) for name, fn in fns.items()}
        best, outs = round_robin(per_batch, len(batches), args.repeats, sync)
        rates = {name: args.images / best[name] for name in fns}
        ours = outs["explainkit"]
        for name in fns:
            diff = r = ""
            if name != "explainkit" and outs[name][0] is not None and ours[0] is not None:
                d, c = _agree(torch.cat(ours).cpu(), torch.cat(outs[name]).float().cpu())
                diff, r = f"{d:.1e}", f"{c:.6f}"
            speed = "" if name == "explainkit" else f"{rates['explainkit'] / rates[name]:.1f}"
            print(f"| {method} | {name} | {rates[name]:.1f} | {speed} | {diff} | {r} |")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
