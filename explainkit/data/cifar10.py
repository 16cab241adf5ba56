"""Reader for the official `cifar-10-batches-py` format that never runs code from the files.

The official batches are Python pickles. A pickle can call any importable function while it
loads, so a file swapped into a data folder could run code. `SafeUnpickler` only admits the few
numpy callables needed to rebuild an array and refuses everything else.
"""

from __future__ import annotations

import os
import pickle
import shutil
import sys
from pathlib import Path

import numpy as np

from explainkit.data import Dataset
from explainkit.errors import DataError

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
MD5 = "c58f30108f718f92721af3b95e74349a"
FOLDER = "cifar-10-batches-py"
CLASSES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]


def _allowed() -> dict[tuple[str, str], object]:
    """The only globals a CIFAR batch needs: numpy array, dtype and scalar rebuilders."""
    try:  # numpy >= 2 moved numpy.core to numpy._core; accept pickles written by either
        from numpy._core import multiarray, numeric
    except ImportError:  # pragma: no cover - numpy < 2
        from numpy.core import multiarray, numeric
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for prefix in ("numpy.core", "numpy._core"):
        allowed[(f"{prefix}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{prefix}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{prefix}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


class SafeUnpickler(pickle.Unpickler):
    """Unpickler that resolves only numpy array-reconstruction globals."""

    _ALLOWED = _allowed()

    def find_class(self, module: str, name: str):
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refused global {module}.{name}") from None

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refused persistent id")


def safe_load(path: Path) -> object:
    """Unpickle a CIFAR file with the restricted unpickler; any failure is a DataError."""
    try:
        with open(path, "rb") as f:
            return SafeUnpickler(f, encoding="latin1").load()
    except OSError as e:
        raise DataError(f"cannot read CIFAR-10 file {path}: {e.strerror or e}") from e
    except Exception as e:  # truncated, corrupt, or a code-running pickle
        raise DataError(
            f"{path} is not a valid CIFAR-10 batch ({type(e).__name__}: {e}); "
            "replace it with the official cifar-10-batches-py files"
        ) from e


def read_batch(path: Path, num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Read one batch file into NHWC uint8 images and int64 labels after validating it."""
    batch = safe_load(path)
    if not isinstance(batch, dict):
        raise DataError(f"{path} is not a CIFAR-10 batch (no dict inside); use the official files")
    data = batch.get("data")
    labels = batch.get("labels", batch.get("fine_labels"))
    if (
        not isinstance(data, np.ndarray)
        or data.dtype != np.uint8
        or data.ndim != 2
        or data.shape[1] != 3072
    ):
        raise DataError(f"{path} has no uint8 (N,3072) 'data' array; use the official files")
    if not isinstance(labels, (list, np.ndarray)) or len(labels) != len(data):
        raise DataError(f"{path} has no list of {len(data)} labels; use the official files")
    try:
        targets = np.array(labels, dtype=np.int64)
    except (TypeError, ValueError, OverflowError):
        raise DataError(
            f"{path} has labels that are not integers; use the official files"
        ) from None
    if targets.ndim != 1 or (len(targets) and (targets.min() < 0 or targets.max() >= num_classes)):
        raise DataError(f"{path} has labels outside 0..{num_classes - 1}; use the official files")
    # Each row is 1024 red, 1024 green, 1024 blue values, each plane row-major.
    images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return images, targets


def read_classes(folder: Path) -> list[str]:
    """Class names from batches.meta, or the standard names when the file is absent."""
    path = folder / "batches.meta"
    if not path.exists():
        return list(CLASSES)
    meta = safe_load(path)
    names = meta.get("label_names") if isinstance(meta, dict) else None
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise DataError(f"{path} has no list of label_names; use the official CIFAR-10 files")
    return names


def default_data_dir() -> Path:
    """EXPLAINKIT_DATA_DIR, else ~/.cache/explainkit/cifar10."""
    env = os.environ.get("EXPLAINKIT_DATA_DIR")
    return Path(env) if env else Path.home() / ".cache" / "explainkit" / "cifar10"


def _split_files(folder: Path, split: str) -> list[Path]:
    if split == "train":
        return sorted(folder.glob("data_batch_*"), key=lambda p: (len(p.name), p.name))
    test = folder / "test_batch"
    return [test] if test.exists() else []


def download_archive(root: Path) -> None:
    """Fetch and unpack the official archive into root (torchvision checks the md5).

    A failed download (offline, interrupted) takes back what it made: the partial archive,
    a half-unpacked folder and the folders it created, so no empty data folder is left to
    look like a dataset later.
    """
    from torchvision.datasets.utils import download_and_extract_archive

    made = [p for p in (root / FOLDER, root, *root.parents) if not p.exists()]
    print(f"Downloading CIFAR-10 (163 MB) from {URL} into {root}", file=sys.stderr)
    try:
        download_and_extract_archive(URL, download_root=str(root), md5=MD5)
    except Exception as e:
        _take_back(root, made)
        raise DataError(
            f"could not download CIFAR-10 ({type(e).__name__}: {e}); point --data-dir at a "
            f"folder containing {FOLDER} (or at {FOLDER} itself)"
        ) from e


def _take_back(root: Path, made: list[Path]) -> None:
    """Remove the partial archive and every folder a failed download created."""
    (root / URL.rsplit("/", 1)[1]).unlink(missing_ok=True)
    for folder in made:  # deepest first
        if folder.name == FOLDER:
            shutil.rmtree(folder, ignore_errors=True)  # did not exist before: all ours
        else:
            try:
                folder.rmdir()
            except OSError:
                break  # not empty or not ours to remove: leave it and its parents


def load_cifar10(split: str, data_dir: str | Path | None = None, download: bool = True) -> Dataset:
    """Load the train split (every data_batch_* present) or the eval split (test_batch)."""
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    if root.name == FOLDER or (root / "batches.meta").exists():
        folder = root
        root = root.parent
    else:
        folder = root / FOLDER
    files = _split_files(folder, split)
    if not files:
        if not download:
            raise DataError(
                f"no CIFAR-10 {split} batches in {folder}; point --data-dir at a folder "
                f"containing {FOLDER} or allow downloading"
            )
        download_archive(root)
        files = _split_files(folder, split)
        if not files:
            raise DataError(f"the download did not produce {folder}; point --data-dir at {FOLDER}")
    classes = read_classes(folder)
    parts = [read_batch(path, len(classes)) for path in files]
    targets = np.concatenate([t for _, t in parts])
    return Dataset(
        images=np.concatenate([i for i, _ in parts]),
        targets=targets,
        classes=classes,
        index=np.arange(len(targets), dtype=np.int64),
        name="cifar10",
    )
