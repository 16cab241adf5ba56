"""What the analyzer tests share: ``make_run``, a synthetic run of any number of classes and
images (no training), a real run on an image folder, and running one analyzer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from explainkit.runner import analyze
from explainkit.store import append_epoch, create_store


def make_run(
    path: Path,
    template: Path,
    num_classes: int = 37,
    num_images: int = 300,
    epochs: int = 2,
    accuracy: float = 0.6,
    seed: int = 0,
    image_size: int = 32,
    config: dict | None = None,
) -> Path:
    """A run directory with a real store and a config.json shaped like ``template``'s."""
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True)
    classes = [f"class_{i:02d}_{'abcdefghij'[i % 10] * (1 + i % 4)}" for i in range(num_classes)]
    targets = rng.integers(0, num_classes, num_images)
    # Low-entropy images compress fast and still differ per image.
    base = rng.integers(0, 256, (num_images, 1, 1, 3), dtype=np.uint8)
    ramp = np.linspace(0, 60, image_size, dtype=np.float32)[None, :, None, None]
    images = np.clip(base + ramp, 0, 255).astype(np.uint8).repeat(image_size, axis=2)
    run_config = json.loads((template / "config.json").read_text())
    run_config["config"].update({"dataset": "folder", "data_dir": str(path / "no-such-data")})
    run_config["config"].update(config or {})
    run_config["model"]["num_classes"] = num_classes
    run_config["data"].update(
        {"dataset": run_config["config"]["dataset"], "classes": classes, "num_eval": num_images}
    )
    (path / "config.json").write_text(json.dumps(run_config, indent=2))
    store = create_store(
        path / "predictions.h5",
        images=images,
        targets=targets,
        index=np.arange(num_images),
        classes=classes,
        dataset=run_config["config"]["dataset"],
        model=run_config["model"],
        mean=tuple(run_config["data"]["mean"]),
        std=tuple(run_config["data"]["std"]),
    )
    for epoch in range(1, epochs + 1):
        logits = rng.normal(0, 1, (num_images, num_classes)).astype(np.float32)
        right = rng.random(num_images) < accuracy
        logits[np.arange(num_images), targets] += np.where(right, 8.0, -8.0)
        acc = float((logits.argmax(1) == targets).mean())
        row = {
            "epoch": epoch,
            "train_loss": 2.0 / epoch,
            "train_acc": acc,
            "eval_loss": 2.5 / epoch,
            "eval_acc": acc,
            "lr": 0.1 / epoch,
            "seconds": 1.0,
            "images_per_s": 100.0,
        }
        append_epoch(store, logits, row)
    return path


def make_image_folder(root: Path, classes=("cat", "café"), train=12, val=4, seed=0) -> Path:
    """An ImageFolder tree ``root/train/<class>/``, ``root/val/<class>/`` of PNG files with
    random pixels, each image its own random size (9 to 40 pixels a side)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", train), ("val", val)):
        for name in classes:
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                h, w = int(rng.integers(9, 41)), int(rng.integers(9, 41))
                pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"img {i:02d}.png")
    return root


def train_folder_run(tmp_path: Path) -> tuple[Path, Path]:
    """A real run (1 epoch, width 8, 16x16 inputs) on a fresh image folder: (run, data)."""
    from tests.helpers import train_run

    data = make_image_folder(tmp_path / "data")
    run = train_run(tmp_path / "run", dataset="folder", data_dir=str(data), image_size=16, epochs=1)
    return run, data


def run_one(run: Path, name: str, **options) -> dict:
    (manifest,) = analyze(run, plugins=[name], device="cpu", collect_failures=True, **options)
    return manifest


def load(run: Path, name: str, file: str):
    path = run / "analyses" / name / file
    return json.loads(path.read_text()) if file.endswith(".json") else path


def check_png(path: Path) -> None:
    from PIL import Image

    with Image.open(path) as img:
        assert img.format == "PNG"
        assert min(img.size) >= 100
