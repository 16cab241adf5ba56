"""Training throughput: explainkit's epoch loop vs. a bare forward/backward/step loop.

Both run in one process on the same device with the same model, batch size and number of
steps. The bare loop uses random tensors already on the device and no augmentation, so the
ratio shows what explainkit's data path (indexing uint8 data on the device, crop/flip/cutout,
normalization, metrics) costs. Also times one store commit for the eval set.

    python benchmarks/train_throughput.py --width 16 --images 2048
    python benchmarks/train_throughput.py --width 64 --images 50000 --device cuda   # GPU
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from explainkit.config import TrainConfig
from explainkit.data import shapes
from explainkit.models import build_model
from explainkit.store import HISTORY_COLUMNS, append_epoch, create_store
from explainkit.train.trainer import Trainer, _StopFlag
from tests.helpers import registries


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_loop(trainer: Trainer, steps: int) -> float:
    """images/s of forward+backward+step on random device tensors, same settings as ours."""
    device, config = trainer.device, trainer.config
    model = build_model(config.model, len(trainer.classes), config.width).to(device)
    if trainer.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    opt = torch.optim.SGD(
        model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4
    )
    bs = config.batch_size
    x = torch.randn(bs, 3, config.image_size, config.image_size, device=device)
    if trainer.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, len(trainer.classes), (bs,), device=device)

    def step() -> None:
        with torch.autocast(
            device.type,
            dtype=trainer.amp_dtype or torch.float32,
            enabled=trainer.amp_dtype is not None,
        ):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        trainer.scaler.scale(loss).backward()
        trainer.scaler.step(opt)
        trainer.scaler.update()

    for _ in range(3):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return steps * bs / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--eval-images", type=int, default=10000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--model", default="resnet18-s8")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    # A CIFAR-sized synthetic training set: throughput does not depend on the pixels.
    shapes.SIZES["train"] = max(shapes.SIZES["train"], args.images)
    with tempfile.TemporaryDirectory() as tmp:
        config = TrainConfig(
            dataset="shapes",
            width=args.width,
            batch_size=args.batch_size,
            device=args.device,
            model=args.model,
            limit_train=args.images,
            limit_eval=256,
            epochs=10,
        )
        trainer = Trainer(config, Path(tmp), registries(), quiet=True)
        device = trainer.device
        steps = trainer.steps_per_epoch
        with _StopFlag() as stop:
            trainer.train_epoch_stats(stop)  # warm-up (cudnn autotuning, allocator)
            ours, bare, epoch_s = [], [], []
            for _ in range(args.repeats):
                bare.append(bare_loop(trainer, steps))
                start = time.perf_counter()
                ips = trainer.train_epoch_stats(stop)["images_per_s"]
                epoch_s.append(time.perf_counter() - start)
                ours.append(ips)

        n, c = args.eval_images, len(trainer.classes)
        store = Path(tmp) / "p.h5"
        rng = np.random.default_rng(0)
        create_store(
            store,
            images=rng.integers(0, 255, (n, 32, 32, 3), dtype=np.uint8),
            targets=rng.integers(0, c, n),
            index=np.arange(n),
            classes=trainer.classes,
            dataset="bench",
            model=trainer.model_spec,
            mean=trainer.mean,
            std=trainer.std,
        )
        commit = []
        for e in range(3):
            logits = rng.standard_normal((n, c)).astype(np.float32)
            start = time.perf_counter()
            append_epoch(store, logits, {k: float(e + 1) for k, _ in HISTORY_COLUMNS})
            commit.append(time.perf_counter() - start)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    threads = torch.get_num_threads()
    best_ours, best_bare = max(ours), max(bare)
    full_epoch = 50000 / best_ours
    print(
        f"device: {device} ({name}, {threads} threads)  model: {args.model} width "
        f"{args.width}  batch {args.batch_size}  steps/epoch {steps}"
    )
    print(f"{'loop':<34}{'images/s':>12}")
    print(f"{'bare forward+backward+step':<34}{best_bare:>12.0f}")
    print(f"{'explainkit epoch loop':<34}{best_ours:>12.0f}")
    print(f"ratio ours/bare: {best_ours / best_bare:.3f}")
    print(
        f"store commit ({n} eval images): {1000 * min(commit):.1f} ms = "
        f"{100 * min(commit) / full_epoch:.2f}% of a 50,000-image epoch at this speed "
        f"({full_epoch:.1f} s)"
    )


if __name__ == "__main__":
    main()
