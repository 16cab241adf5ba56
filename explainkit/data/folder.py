"""Any ImageFolder tree (one subfolder per class), read with PIL and resized to a square.

Layouts: ROOT/train/<class>/... with an optional ROOT/val or ROOT/test for evaluation, or a plain
ROOT/<class>/... tree. Without an evaluation folder, a seeded 10% of the tree is held out for
evaluation and the rest is the training split, so the two never overlap.

A split whose decoded images would exceed the memory budget (explainkit.data.lazy) is not
decoded at load: its images are :class:`FolderImages`, decoded when a batch is read.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

from explainkit.data import Dataset
from explainkit.data.lazy import LazyImages, fits_in_memory
from explainkit.errors import DataError

IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
)
HOLDOUT = 0.1


def readable(name: str) -> str:
    """A folder name as text every format can hold: undecodable bytes read as Latin-1.

    On a UTF-8 system a folder named in another encoding comes back with surrogates, which
    JSON, HDF5 attributes and fonts refuse. Latin-1 maps each byte to one character, so two
    distinct folders keep two distinct class names.
    """
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        return os.fsencode(name).decode("latin-1")


def scan(root: Path, classes: list[str] | None = None) -> tuple[list[Path], list[int], list[str]]:
    """Sorted image files and class ids; files without an image extension are skipped.

    Class names are the folder names (made :func:`readable`); ``classes`` fixes their order
    (the training split's, for the evaluation split).
    """
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist; point --data-dir at an ImageFolder")
    folders = {
        readable(p.name): p
        for p in sorted(root.iterdir())
        if p.is_dir() and not p.name.startswith(".")
    }
    found = sorted(folders)
    if classes is None:
        classes = found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise DataError(
            f"{root} has class folders {unknown} that the training folder lacks; "
            "use the same class folders in every split"
        )
    files, targets = [], []
    for target, name in enumerate(classes):
        folder = folders.get(name)
        if folder is None:
            continue
        for path in sorted(folder.rglob("*")):
            if not path.is_file() or path.name.startswith("."):
                continue
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                warnings.warn(f"Skipping {path}: not an image file extension.", stacklevel=2)
                continue
            files.append(path)
            targets.append(target)
    if not files:
        raise DataError(f"no images found under {root}; expected one subfolder per class")
    return files, targets, classes


def read_image(path: Path, image_size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode one image as RGB, its shorter side resized to image_size and the centre cropped
    square (nothing stretched, as torchvision's Resize + CenterCrop); returns it and its
    original (H, W)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            size = (img.height, img.width)
            scale = image_size / min(size)
            w, h = (
                max(image_size, round(img.width * scale)),
                max(image_size, round(img.height * scale)),
            )
            img = img.resize((w, h), Image.BILINEAR)
            left, top = (w - image_size) // 2, (h - image_size) // 2
            img = img.crop((left, top, left + image_size, top + image_size))
            return np.asarray(img, dtype=np.uint8), size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot decode image {path} ({e}); remove or replace the file") from e


def read_size(path: Path) -> tuple[int, int]:
    """An image's (H, W) from its header alone (PIL decodes no pixels for it)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.height, img.width
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot decode image {path} ({e}); remove or replace the file") from e


class FolderImages(LazyImages):
    """Image files decoded by :func:`read_image` when indexed: a folder split too large to
    decode at load. The file names are one numpy bytes array, so DataLoader workers forked
    from the loading process share them without copying (no per-name reference counts)."""

    def __init__(self, files: list[Path], image_size: int) -> None:
        super().__init__(len(files), image_size, image_size)
        self.files = np.asarray([os.fsencode(f) for f in files], dtype=np.bytes_)
        self.image_size = image_size

    def read(self, rows: np.ndarray) -> np.ndarray:
        out = np.empty((len(rows), *self.shape[1:]), dtype=np.uint8)
        for row, i in enumerate(rows):
            out[row] = read_image(Path(os.fsdecode(self.files[i])), self.image_size)[0]
        return out


def load_folder(
    split: str,
    data_dir: str | Path,
    image_size: int = 32,
    seed: int = 0,
    limit: int | None = None,
) -> Dataset:
    """Load a split; `index` is the position of each file in its (sorted) source tree.

    ``paths`` name each image's file relative to ``data_dir`` (``/``-separated, made
    :func:`readable`) and ``sizes`` its original (H, W), for the store and the reports.
    A split too large for the memory budget gets :class:`FolderImages` (its sizes read from
    the file headers); a smaller one is decoded here.
    """
    root = Path(data_dir).expanduser()
    train_root = root / "train" if (root / "train").is_dir() else root
    files, targets, classes = scan(train_root)
    eval_root = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
    if train_root == root or eval_root is None:
        # Seeded hold-out: the same files go to eval for a given seed, the rest to train.
        order = np.random.default_rng(seed).permutation(len(files))
        held = np.zeros(len(files), dtype=bool)
        held[order[: max(1, round(HOLDOUT * len(files)))]] = True
        index = np.flatnonzero(held if split == "eval" else ~held)
        if split == "train" and len(index) == 0:
            raise DataError(f"{root} has too few images to hold 10% out for evaluation")
    elif split == "eval":
        files, targets, _ = scan(eval_root, classes)
        index = np.arange(len(files))
    else:
        index = np.arange(len(files))
    if limit is not None:
        index = index[:limit]
    images: np.ndarray | FolderImages
    sizes = np.empty((len(index), 2), dtype=np.int64)
    if fits_in_memory(len(index), image_size):
        images = np.empty((len(index), image_size, image_size, 3), dtype=np.uint8)
        for row, i in enumerate(index):
            images[row], sizes[row] = read_image(files[i], image_size)
    else:
        images = FolderImages([files[i] for i in index], image_size)
        for row, i in enumerate(index):
            sizes[row] = read_size(files[i])
    return Dataset(
        images=images,
        targets=np.asarray(targets, dtype=np.int64)[index],
        classes=classes,
        index=index.astype(np.int64),
        sizes=sizes,
        name="folder",
        paths=[relative_name(files[i], root) for i in index],
    )


def relative_name(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` as ``/``-separated UTF-8 text (each part :func:`readable`)."""
    return "/".join(readable(part) for part in path.relative_to(root).parts)
