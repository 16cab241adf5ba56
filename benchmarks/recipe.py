"""Recipe comparison: the seed preset vs. the default preset (and single changes), N seeds each.

Trains on the real CIFAR-10 sample (4,068 train / 1,017 test images) by default and prints final
and best eval accuracy, mean and spread over seeds, and seconds per epoch:

    python benchmarks/recipe.py --width 16 --seeds 3 --epochs 20
    python benchmarks/recipe.py --variants seed,seed+ls,seed+ema,seed+tta,default
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from explainkit.config import PRESETS, TrainConfig
from explainkit.store import open_store
from explainkit.train.trainer import train

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-mini"
# A variant is a preset plus single changes, written preset+change+change.
CHANGES = {"ls": {"label_smoothing": 0.1}, "ema": {"ema": 0.999}, "tta": {"tta": True}}


def variant_config(name: str, base: dict) -> TrainConfig:
    preset, *changes = name.split("+")
    values = {**base, **PRESETS[preset], "preset": preset}
    for change in changes:
        values.update(CHANGES[change])
    return TrainConfig(**values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--dataset", default="cifar10")
    parser.add_argument("--data-dir", default=str(SHARED))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--model", default="resnet18-s8")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--variants", default="seed,default")
    parser.add_argument("--limit-train", type=int, default=None)
    args = parser.parse_args()

    base = dict(
        dataset=args.dataset,
        data_dir=args.data_dir,
        width=args.width,
        epochs=args.epochs,
        device=args.device,
        model=args.model,
        batch_size=args.batch_size,
        limit_train=args.limit_train,
    )
    rows = []
    for variant in args.variants.split(","):
        finals, bests, epoch_s = [], [], []
        for seed in range(args.seeds):
            config = variant_config(variant, {**base, "seed": seed})
            with tempfile.TemporaryDirectory() as tmp:
                start = time.perf_counter()
                run = train(config, out=Path(tmp) / "run", quiet=True)
                elapsed = time.perf_counter() - start
                with open_store(run) as store:
                    acc = store.history["eval_acc"]
            finals.append(100 * acc[-1])
            bests.append(100 * acc.max())
            epoch_s.append(elapsed / args.epochs)
            print(
                f"{variant:<16} seed {seed}: final {finals[-1]:.2f}%  best {bests[-1]:.2f}%  "
                f"{epoch_s[-1]:.1f} s/epoch",
                flush=True,
            )
        rows.append((variant, finals, bests, epoch_s))

    spread = lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0  # noqa: E731
    print(
        f"\n{args.dataset} {args.model} width {args.width}, {args.epochs} epochs, "
        f"{args.seeds} seeds"
    )
    print(f"{'variant':<16}{'final acc %':>16}{'best acc %':>16}{'s/epoch':>10}")
    for variant, finals, bests, epoch_s in rows:
        print(
            f"{variant:<16}{statistics.mean(finals):>9.2f} ± {spread(finals):<4.2f}"
            f"{statistics.mean(bests):>9.2f} ± {spread(bests):<4.2f}"
            f"{statistics.mean(epoch_s):>10.1f}"
        )


if __name__ == "__main__":
    main()
