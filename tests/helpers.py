"""What tests share besides fixtures: paths, tiny runs, the CLI in a subprocess, models."""

from __future__ import annotations

import hashlib
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np

from explainkit import hookimpl
from explainkit.store import HISTORY_COLUMNS, append_epoch, create_store, epochs_folder

REPO = Path(__file__).resolve().parents[1]
# The built-in datasets, in the order default_datasets registers them.
BUILTIN_DATASETS = (
    "cifar10", "shapes", "scenes", "folder", "coco", "voc", "multilabel-csv", "clips",
)  # fmt: skip


def _find_cifar_mini() -> Path:
    """The real CIFAR-10 sample: $EXPLAINKIT_CIFAR_MINI, else a shared/ folder beside the repo."""
    candidates = [os.environ.get("EXPLAINKIT_CIFAR_MINI", "")]
    candidates += [str(p / "shared" / "data" / "cifar10-mini") for p in REPO.parents]
    candidates.append("/work/shared/data/cifar10-mini")
    for candidate in candidates:
        if candidate and (Path(candidate) / "cifar-10-batches-py").is_dir():
            return Path(candidate)
    return REPO.parent / "shared" / "data" / "cifar10-mini"


CIFAR_MINI = _find_cifar_mini()

# Keep a developer's installed third-party plugins out of the tests.
os.environ.setdefault("EXPLAINKIT_LOAD_PLUGINS", "")

TINY = dict(width=8, epochs=2, batch_size=64, limit_train=256, limit_eval=64, cutout=0)


# A run that has learned the shapes (about 90% eval accuracy), for properties of explanations.
TRAINED = dict(
    dataset="shapes",
    device="cpu",
    width=8,
    epochs=6,
    batch_size=64,
    limit_train=1500,
    limit_eval=128,
    cutout=0,
    lr=0.05,
)


def registries():
    """The built-in plugins' registries (tests load no installed third-party plugin)."""
    from explainkit.manager import load_registries

    return load_registries()


def build_model(arch: str = "resnet18-s8", num_classes: int = 10, **kwargs):
    """An untrained model of a registered name, built as a run builds it."""
    return registries().build_model(arch, num_classes, **kwargs)


def train_run(out: Path, overwrite: bool = False, **overrides) -> Path:
    from explainkit.config import TrainConfig
    from explainkit.train.trainer import train

    values = {"dataset": "shapes", "device": "cpu", **TINY, **overrides}
    return train(TrainConfig(**values), registries(), out=out, overwrite=overwrite, quiet=True)


def minimal_payload(num_classes: int = 3, width: int = 8) -> dict:
    """The least a checkpoint holds: a model spec and weights that fit it, and an epoch."""
    spec = {"arch": "resnet18-s8", "width": width, "num_classes": num_classes}
    model = build_model(spec["arch"], num_classes=num_classes, width=width)
    return {"model": spec, "state_dict": model.state_dict(), "epoch": 1}


def run_cli(*args: str, env: dict | None = None, cwd: Path | None = None, timeout: int = 600):
    """Run the real ``explainkit`` CLI in a subprocess."""
    full_env = {**os.environ, "EXPLAINKIT_LOAD_PLUGINS": "", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "explainkit", *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def run_installed_cli(args, *pythonpath: Path, plugins: str | None = None):
    """The CLI as a user with ``pythonpath`` installed runs it: entry points are loaded
    (unless ``plugins`` limits them, as ``EXPLAINKIT_LOAD_PLUGINS`` does)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, pythonpath))}
    env.pop("EXPLAINKIT_LOAD_PLUGINS", None)
    env.pop("EXPLAINKIT_PLUGINS_DIR", None)
    if plugins is not None:
        env["EXPLAINKIT_LOAD_PLUGINS"] = plugins
    return subprocess.run(
        [sys.executable, "-m", "explainkit", *args], capture_output=True, text=True, env=env
    )


def pip_install(source: Path, target: Path) -> None:
    """``pip install --target`` the distribution at ``source`` (offline, no dependencies)."""
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--no-index", "--target", str(target), str(source)],
        check=True,
        capture_output=True,
        text=True,
        cwd=source.parent,
    )  # fmt: skip


def install_example(example: Path, tmp_path_factory) -> Path:
    """pip-install the distribution at ``example`` into a fresh folder; returns the folder.

    Built from a copy: setuptools leaves build/ and *.egg-info next to the sources.
    """
    import shutil

    src = tmp_path_factory.mktemp("example-src") / example.name
    shutil.copytree(example, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "tests"))
    target = tmp_path_factory.mktemp("example-site")
    pip_install(src, target)
    return target


def valid_run_document() -> dict:
    """What write_config writes for a small shapes run."""
    from explainkit.config import TrainConfig

    return {
        "format": "explainkit-run",
        "format_version": 1,
        "config": {
            **TrainConfig(dataset="shapes", device="cpu", width=8, epochs=2).to_dict(),
            "limit_train": 256,
        },
        "model": {
            "arch": "resnet18-s8",
            "width": 8,
            "num_classes": 3,
            "input_shape": [3, 32, 32],
            "default_layer": "layer4",
        },
        "data": {
            "dataset": "shapes",
            "classes": ["circle", "square", "triangle"],
            "num_train": 256,
            "num_eval": 64,
            "mean": [0.47, 0.5, 0.51],
            "std": [0.28, 0.28, 0.29],
        },
        "environment": {"explainkit": "0.1.0", "device": "cpu"},
        "world_size": 1,
    }


# -- in-test plugins -----------------------------------------------------------------------------


def make_analyzer(name: str, **attrs):
    """A minimal Analyzer subclass called ``name``."""
    from explainkit.analyzer import Analyzer

    return type(f"A_{name}", (Analyzer,), {"name": name, "summary": f"{name} test.", **attrs})


class AnalyzersPlugin:
    """An in-test plugin registering the given analyzer classes."""

    def __init__(self, *classes):
        self.classes = classes

    @hookimpl
    def register_analyzers(self, register):
        for cls in self.classes:
            register(cls)


# -- run directories and the CLI ---------------------------------------------------------------


def checksums(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (relative path -> hex digest)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def assert_unchanged(before: dict[str, str], folder: Path) -> None:
    """Every file present before is still there with the same bytes (new files are allowed)."""
    after = checksums(folder)
    changed = [name for name, digest in before.items() if after.get(name) != digest]
    assert not changed, f"changed or removed: {changed}"


def assert_clean_failure(result: subprocess.CompletedProcess, codes=(1,), *fragments: str) -> None:
    """One ``Error:`` line, the expected exit code, no traceback, the expected words."""
    assert result.returncode in codes, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr)


def limited(max_bytes: int):
    """preexec_fn: a file-size limit (ulimit -f) whose writes fail with EFBIG, not SIGXFSZ."""

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))

    return apply


# -- prediction stores -------------------------------------------------------------------------

PATHS = [f"val/c{i % 3}/café {i}.png" for i in range(20)]  # relative, UTF-8, one per image


def history_row(epoch: int) -> dict[str, float]:
    """A plausible history row of ``epoch``: every column recorded, accuracies in [0, 1]."""
    return {name: float(epoch) / (10 if "acc" in name else 1) for name, _ in HISTORY_COLUMNS}


def make_store(path: Path, n=20, classes=3, epochs=2, sources=True) -> list[np.ndarray]:
    """A store with every dataset and ``epochs`` committed epochs; their logits.

    ``sources=False``: without paths and sizes (what a non-folder dataset may leave out)."""
    rng = np.random.default_rng(0)
    extra = {"paths": PATHS[:n], "sizes": np.arange(2 * n).reshape(n, 2) + 1} if sources else {}
    create_store(
        path,
        images=rng.integers(0, 255, (n, 8, 8, 3), dtype=np.uint8),
        targets=np.arange(n) % classes,
        index=np.arange(n) + 100,
        classes=[f"c{i}" for i in range(classes)],
        dataset="test",
        model={"arch": "resnet18-s8", "width": 8, "num_classes": classes},
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        masks=(rng.random((n, 8, 8)) > 0.5).astype(np.uint8),
        **extra,
    )
    logits = []
    for e in range(1, epochs + 1):
        lg = rng.standard_normal((n, classes)).astype(np.float32)
        logits.append(lg)
        append_epoch(path, lg, history_row(e))
    return logits


def store_bytes(path: Path) -> dict[str, bytes]:
    """The bytes of a store's head and of every file in its epochs folder."""
    files = [path, *sorted(epochs_folder(path).glob("*"))]
    return {p.name: p.read_bytes() for p in files if p.is_file()}


def run_cli_peak(*args: str, timeout: int = 600) -> tuple[subprocess.CompletedProcess, int]:
    """Run the real CLI as :func:`run_cli` does; also return the peak resident memory of that
    process alone, in bytes (``wait4``'s rusage: no other child and not the test counts)."""
    import tempfile
    import threading

    env = {**os.environ, "EXPLAINKIT_LOAD_PLUGINS": ""}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "explainkit", *args],
            stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env, text=True,
        )  # fmt: skip
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)  # reaps it: Popen must not wait again
        finally:
            timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        result = subprocess.CompletedProcess(proc.args, proc.returncode, out.read(), err.read())
    return result, usage.ru_maxrss * 1024  # kilobytes on Linux


# -- the explorer (explainkit serve) --------------------------------------------------------


def synthetic_explorer_run(
    path: Path, n: int, side: int = 32, classes: int = 10, maps: bool = True, seed: int = 0
) -> Path:
    """A run directory of ``n`` synthetic ``side``-px images, streamed to disk in batches (so
    50,000 224-px images never sit in memory): a store with one epoch of logits and, with
    ``maps``, an ``analyses/gradcam/attributions.h5`` laid out as the gradcam analyzer writes
    it. For the explorer's memory test and benchmarks/serve_load.py; no model, no config."""
    import h5py

    from explainkit.store import StoreBuilder

    rng = np.random.default_rng(seed)
    path.mkdir(parents=True, exist_ok=True)
    targets = rng.integers(0, classes, n)
    grid = 4 if side % 4 == 0 else 1  # blocky images and maps: they compress as real ones do
    batch = 256

    def blocks(values: np.ndarray) -> np.ndarray:
        up = np.repeat(np.repeat(values, side // grid, axis=1), side // grid, axis=2)
        return up if grid * (side // grid) == side else np.resize(up, (len(values), side, side))

    with StoreBuilder(
        path / "predictions.h5",
        targets=targets,
        index=np.arange(n),
        classes=[f"class{k}" for k in range(classes)],
        dataset="synthetic",
        model={"arch": "resnet18-s8", "width": 8, "num_classes": classes},
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        image_shape=(side, side, 3),
    ) as builder:
        for start in range(0, n, batch):
            b = min(batch, n - start)
            builder.add_images(blocks(rng.integers(0, 255, (b, grid, grid, 3), dtype=np.uint8)))
    logits = rng.standard_normal((n, classes)).astype(np.float32)
    logits[np.arange(n), targets] += 1.5  # mostly right, some confusions
    append_epoch(path / "predictions.h5", logits, history_row(1))
    if maps:
        out = path / "analyses" / "gradcam"
        out.mkdir(parents=True, exist_ok=True)
        with h5py.File(out / "attributions.h5", "w") as f:
            f.attrs.update({"method": "gradcam", "layer": "layer4", "epoch": 1})
            ds = f.create_dataset(
                "maps", (n, side, side), "float16", chunks=(min(64, n), side, side),
                compression="gzip", compression_opts=1, shuffle=True,
            )  # fmt: skip
            for start in range(0, n, batch):
                b = min(batch, n - start)
                ds[start : start + b] = blocks(rng.random((b, grid, grid)).astype(np.float16))
    return path


# -- task datasets on disk (issue 27): COCO, VOC and multi-label CSV folders made from scenes ---


def write_coco(folder: Path, ds, fmt: str = "png") -> Path:
    """``ds`` (a scenes split) as a COCO folder: images/ and instances.json with boxes and RLE
    instance masks, written with pycocotools' own encoder."""
    import json

    from PIL import Image
    from pycocotools import mask as mask_utils

    (folder / "images").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i, image in enumerate(ds.images):
        name = f"scene_{i:03d}.{fmt}"
        Image.fromarray(image).save(folder / "images" / name)
        h, w = image.shape[:2]
        images.append({"id": 100 + i, "file_name": name, "height": h, "width": w})
        det = ds.annotations.detections[i]
        for box, label, inst in zip(
            det.boxes, det.labels, ds.annotations.instances[i], strict=True
        ):
            rle = mask_utils.encode(np.asfortranarray(inst.astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            x0, y0, x1, y1 = (float(v) for v in box)
            annotations.append({
                "id": len(annotations) + 1, "image_id": 100 + i, "category_id": 10 + int(label),
                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": float(inst.sum()),
                "iscrowd": 0, "segmentation": rle,
            })  # fmt: skip
    categories = [{"id": 10 + c, "name": name} for c, name in enumerate(ds.classes)]
    doc = {"images": images, "annotations": annotations, "categories": categories}
    (folder / "instances.json").write_text(json.dumps(doc))
    return folder


def write_voc(folder: Path, ds, names: list[str] | None = None) -> Path:
    """``ds`` (a scenes split) as a VOC folder: JPEGImages/, SegmentationClass/ index PNGs,
    Annotations/ XML with 1-based inclusive corners, and classes.txt."""
    from PIL import Image

    for sub in ("JPEGImages", "SegmentationClass", "Annotations"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    (folder / "classes.txt").write_text("\n".join(ds.classes) + "\n")
    palette = [0] * 768
    for c in range(1, 256):
        palette[3 * c : 3 * c + 3] = [(37 * c) % 256, (91 * c) % 256, (53 * c) % 256]
    names = names or [f"{i:06d}" for i in range(len(ds))]
    for i, name in enumerate(names):
        Image.fromarray(ds.images[i]).save(folder / "JPEGImages" / f"{name}.jpg", quality=95)
        seg = Image.fromarray(ds.annotations.segmentation[i], mode="P")
        seg.putpalette(palette)
        seg.save(folder / "SegmentationClass" / f"{name}.png")
        det = ds.annotations.detections[i]
        objects = "".join(
            f"<object><name>{ds.classes[label]}</name><bndbox><xmin>{int(b[0]) + 1}</xmin>"
            f"<ymin>{int(b[1]) + 1}</ymin><xmax>{int(b[2])}</xmax><ymax>{int(b[3])}</ymax>"
            "</bndbox></object>"
            for b, label in zip(det.boxes, det.labels, strict=True)
        )
        xml = f"<annotation><filename>{name}.jpg</filename>{objects}</annotation>"
        (folder / "Annotations" / f"{name}.xml").write_text(xml)
    return folder
