"""Quality analyzer speed: the previous deletion/insertion and SSIM code beside today's.

One process, one run, the same images, maps and targets. The previous implementations are
kept here, as they were, so before and after are measured side by side, round-robin (see
_timing.py), and checked to give the same numbers:

- curves: deletion and insertion of one method's Grad-CAM maps. Before: ``2 * (steps + 1)``
  versions per image through the model as trained. Now: ``2 * steps`` distinct versions (both
  curves start or end at the intact and the baseline image) through
  ``metrics.inference_model`` (batch norms folded into the convolutions, channels-last).
- ssim: the sanity check's map comparison. Before: five 2-D Gaussian filterings. Now: one
  separable filtering of the five quantities stacked.
- ``--analyzer``: the whole ``quality`` analyzer (default methods, sanity check on), with the
  previous curves and SSIM patched in and each native CAM computed on its own pass (as
  before), then as it is, alternating ``--analyzer-repeats`` times.

    python benchmarks/quality_speed.py --images 1000 --width 16 --repeats 3 --analyzer

Without ``--run`` it trains a small shapes run (1 epoch, ``--images`` eval images) in a
temporary folder; the speed of a forward pass does not depend on how well the model learned.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _timing import round_robin

from explainkit.explain import metrics as M


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", help="an existing run directory (default: train a shapes run)")
    p.add_argument("--images", type=int, default=1000, help="eval images to score")
    p.add_argument("--width", type=int, default=16, help="width of the trained shapes run")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=64, help="as the analyzer's default")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--analyzer", action="store_true", help="also time the whole analyzer")
    p.add_argument("--analyzer-repeats", type=int, default=1)
    return p.parse_args(argv)


@torch.no_grad()
def previous_curves(model, images, maps, targets, *, steps=16, baseline="blur", max_batch=512,
                    generator=None) -> M.PerturbationCurves:  # fmt: skip
    """Deletion/insertion as it was: every step of both curves classified, model as it is."""
    n, c, h, w = images.shape
    device = images.device
    targets = targets.to(device)
    base = M.perturbation_baseline(images, baseline)
    flat = maps.flatten(1)
    noise = torch.rand(flat.shape, generator=generator).to(flat.device)
    shuffle = noise.argsort(1)
    order = shuffle.gather(1, flat.gather(1, shuffle).argsort(dim=1, descending=True, stable=True))
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(order.shape[1]).expand_as(order))
    counts = torch.round(torch.linspace(0, h * w, steps + 1, device=device)).long()
    versions = 2 * (steps + 1)
    per_chunk = max(1, max_batch // versions)
    deletion, insertion = [], []
    for s in range(0, n, per_chunk):
        x, b, r, t = (v[s : s + per_chunk] for v in (images, base, ranks, targets))
        m = x.shape[0]
        top = (r[:, None, :] < counts[None, :, None]).view(m, steps + 1, 1, h, w)
        deleted = torch.where(top, b[:, None], x[:, None])
        inserted = torch.where(top, x[:, None], b[:, None])
        batch = torch.cat([deleted, inserted], 1).reshape(m * versions, c, h, w)
        probs = model(batch).float().softmax(1)
        p = probs.gather(1, t.repeat_interleave(versions)[:, None]).view(m, 2, steps + 1)
        deletion.append(p[:, 0])
        insertion.append(p[:, 1])
    fractions = counts.float() / (h * w)
    return M.PerturbationCurves(fractions, torch.cat(deletion), torch.cat(insertion))


def previous_ssim(a, b, *, window=11, sigma=1.5, data_range=1.0):
    """SSIM as it was: five filterings with the full 2-D window."""
    x, y = a[:, None].double(), b[:, None].double()
    size = min(window, a.shape[-1], a.shape[-2])
    size -= 1 - size % 2
    r = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    k1 = torch.exp(-(r**2) / (2 * sigma**2))
    k1 = (k1 / k1.sum()).double()
    kernel = (k1[:, None] * k1[None, :])[None, None]
    mx, my = F.conv2d(x, kernel), F.conv2d(y, kernel)
    sxx = F.conv2d(x * x, kernel) - mx**2
    syy = F.conv2d(y * y, kernel) - my**2
    sxy = F.conv2d(x * y, kernel) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
    return s.mean((1, 2, 3))


def make_run(folder: Path, images: int, width: int) -> Path:
    from explainkit.config import TrainConfig
    from explainkit.train.trainer import train

    config = TrainConfig(dataset="shapes", device="cpu", width=width, epochs=1, batch_size=64,
                         limit_train=256, limit_eval=images, cutout=0)  # fmt: skip
    return train(config, out=folder / "run", overwrite=True, quiet=True)


def load(run: Path, count: int):
    from explainkit import load_model
    from explainkit.store import open_store

    model = load_model(run, device="cpu").eval()
    with open_store(run) as store:
        x = torch.from_numpy(store.images()[:count]).permute(0, 3, 1, 2).float() / 255
        mean = torch.tensor(store.mean).view(1, 3, 1, 1)
        std = torch.tensor(store.std).view(1, 3, 1, 1)
    return model, (x - mean) / std


def time_parts(model, images, args) -> None:
    from explainkit.explain.gradcam import compute_cam

    cam = compute_cam(model, images, "layer4", batch_size=args.batch_size)
    maps, targets = cam.maps, cam.predicted
    kw = dict(steps=args.steps, baseline="blur", max_batch=8 * args.batch_size)
    fast = M.inference_model(model)  # built once per analyzer run, as quality does

    chunk = max(1, kw["max_batch"] // (2 * args.steps))  # images of one forward pass, as now
    parts = [slice(s, s + 4 * chunk) for s in range(0, len(images), 4 * chunk)]

    def curves(fn, net):
        def unit(i):
            sl = parts[i]  # the same tie-breaking noise either way: one seeded draw per part
            gen = torch.Generator().manual_seed(i)
            return fn(net, images[sl], maps[sl], targets[sl], generator=gen, **kw)

        return unit

    best, out = round_robin(
        {"before": curves(previous_curves, model), "now": curves(M.perturbation_curves, fast)},
        len(parts), repeats=args.repeats, warmup=1,
    )  # fmt: skip
    diff = max(float((getattr(a, k) - getattr(b, k)).abs().max())
               for a, b in zip(out["now"], out["before"], strict=True)
               for k in ("deletion", "insertion"))  # fmt: skip
    n = len(images)
    print(f"\ndeletion/insertion of {n} images, {args.steps} steps, blur baseline "
          f"(one method; round-robin by chunk, best of {args.repeats})")  # fmt: skip
    for name in best:
        print(f"  {name:<7} {best[name]:8.2f} s  {n / best[name]:8.1f} images/s")
    print(f"  speed-up {best['before'] / best['now']:.2f}x; max |difference| of the curves "
          f"{diff:.1e}")  # fmt: skip

    other = maps.flip(-1)  # another map of the same image: a typical SSIM below 1
    best, out = round_robin(
        {"before": lambda i: previous_ssim(maps, other), "now": lambda i: M.ssim(maps, other)},
        1, repeats=max(args.repeats, 5),
    )  # fmt: skip
    diff = float((out["now"][0] - out["before"][0]).abs().max())
    print(f"\nSSIM of {n} map pairs ({maps.shape[-2]}x{maps.shape[-1]})")
    for name in best:
        print(f"  {name:<7} {best[name] * 1000:8.1f} ms")
    print(f"  speed-up {best['before'] / best['now']:.2f}x; max |difference| {diff:.1e}")


def time_analyzer(run: Path, args) -> None:
    from explainkit.runner import analyze

    def once(previous: bool) -> float:
        saved = M.perturbation_curves, M.ssim, M.inference_model, M.attribute_all
        if previous:
            M.perturbation_curves, M.ssim = previous_curves, previous_ssim
            M.inference_model = lambda model: model
            M.attribute_all = lambda *a, together=None: saved[3](*a[:5])  # one CAM at a time
        shutil.rmtree(run / "analyses" / "quality", ignore_errors=True)
        try:
            start = time.perf_counter()
            (manifest,) = analyze(run, plugins=["quality"], device="cpu",
                                  quality_count=args.images, echo=lambda line: None)  # fmt: skip
            seconds = time.perf_counter() - start
        finally:
            M.perturbation_curves, M.ssim, M.inference_model, M.attribute_all = saved
        assert manifest["status"] == "ok", manifest.get("error")
        return seconds

    times: dict[str, list[float]] = {"before": [], "now": []}
    for _ in range(args.analyzer_repeats):
        times["before"].append(once(True))
        times["now"].append(once(False))
    print(f"\nwhole quality analyzer, {args.images} images, default methods and sanity check "
          f"(alternating, {args.analyzer_repeats}x)")  # fmt: skip
    for name, ts in times.items():
        print(f"  {name:<7} {min(ts):8.1f} s  (all: {', '.join(f'{t:.1f}' for t in ts)})")
    print(f"  speed-up {min(times['before']) / min(times['now']):.2f}x")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(args.run) if args.run else make_run(Path(tmp), args.images, args.width)
        model, images = load(run, args.images)
        time_parts(model, images, args)
        if args.analyzer:
            time_analyzer(run, args)


if __name__ == "__main__":
    main()
