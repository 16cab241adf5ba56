"""Any ImageFolder tree (one subfolder per class), read with PIL and fitted to a square.

Layouts: ROOT/train/<class>/... with an optional ROOT/val or ROOT/test for evaluation; a tree
with only ROOT/val (or ROOT/test), read as that split; or a plain ROOT/<class>/... tree. For
training without an evaluation folder, a seeded 10% of the tree is held out for evaluation and
the rest is the training split, so the two never overlap; ``evaluate`` (``holdout=False``)
reads every image of such a tree instead.

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
    """A file name as text every format can hold: undecodable bytes read as Latin-1.

    On a UTF-8 system a name in another encoding comes back with surrogates, which JSON,
    HDF5 attributes and fonts refuse. Latin-1 maps each byte to one character.
    """
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        return os.fsencode(name).decode("latin-1")


LATIN1_MARK = " (Latin-1)"


def class_name(name: str) -> str:
    """A class folder's name as text, distinct for distinct folders whatever their encoding.

    A name that is not UTF-8 is read as Latin-1 and marked (``café (Latin-1)``), so
    ``caf\\xe9`` never becomes the same class as a UTF-8 ``café`` beside it, in any split.
    """
    text = readable(name)
    return text if text == name else text + LATIN1_MARK


def scan(root: Path, classes: list[str] | None = None) -> tuple[list[Path], list[int], list[str]]:
    """Sorted image files and class ids; files without an image extension are skipped.

    Class names are the folder names (made :func:`class_name`); ``classes`` fixes their order
    (the training split's, for the evaluation split).

    Raises:
        DataError: No such folder, no images, a folder the training split lacks, or two
            folders whose names read as the same text (never merged into one class).
    """
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist; point --data-dir at an ImageFolder")
    folders: dict[str, Path] = {}
    for p in sorted(root.iterdir()):
        if not p.is_dir() or p.name.startswith("."):
            continue
        name = class_name(p.name)
        if name in folders:
            raise DataError(
                f"class folders {os.fsencode(folders[name].name)!r} and {os.fsencode(p.name)!r} "
                f"of {root} both read as {name!r}; rename one so that they stay two classes"
            )
        folders[name] = p
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


def read_image(
    path: Path, image_size: int, fit: str = "crop", resize: int | None = None
) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode one image as RGB (a grayscale file's one channel repeated), made an
    ``image_size`` square by ``fit`` (default: the shorter side resized, then the centre
    cropped, as torchvision's Resize + CenterCrop); returns it and its original (H, W)."""
    from PIL import Image

    from explainkit.data.fit import fit_image

    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            size = (img.height, img.width)
            img = fit_image(img, image_size, fit, resize)
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

    def __init__(
        self, files: list[Path], image_size: int, fit: str = "crop", resize: int | None = None
    ) -> None:
        super().__init__(len(files), image_size, image_size)
        self.files = np.asarray([os.fsencode(f) for f in files], dtype=np.bytes_)
        self.image_size, self.fit, self.resize = image_size, fit, resize

    def read(self, rows: np.ndarray) -> np.ndarray:
        out = np.empty((len(rows), *self.shape[1:]), dtype=np.uint8)
        for row, i in enumerate(rows):
            path = Path(os.fsdecode(self.files[i]))
            out[row] = read_image(path, self.image_size, self.fit, self.resize)[0]
        return out


def load_folder(
    split: str,
    data_dir: str | Path,
    image_size: int = 32,
    seed: int = 0,
    limit: int | None = None,
    holdout: bool = True,
    fit: str = "crop",
    resize: int | None = None,
) -> Dataset:
    """Load a split; `index` is the position of each file in its (sorted) source tree.

    ``paths`` name each image's file relative to ``data_dir`` (``/``-separated, made
    :func:`readable`) and ``sizes`` its original (H, W), for the store and the reports;
    ``note`` says what was read. ``limit`` keeps a seeded class-balanced subset (chosen
    before anything is decoded). A split too large for the memory budget gets
    :class:`FolderImages` (its sizes read from the file headers); a smaller one is decoded
    here.
    """
    from explainkit.data.fit import balanced_subset, subset_note

    root = Path(data_dir).expanduser()
    index, files, targets, classes, note = _split_files(root, split, seed, holdout)
    total = len(index)
    subset = ""
    if limit is not None and limit < total:
        picked = balanced_subset(np.asarray(targets, dtype=np.int64)[index], limit, seed)
        index = index[picked]
        subset = subset_note(len(index), total, seed, len(set(np.asarray(targets)[index])))
    images: np.ndarray | FolderImages
    sizes = np.empty((len(index), 2), dtype=np.int64)
    if fits_in_memory(len(index), image_size):
        images = np.empty((len(index), image_size, image_size, 3), dtype=np.uint8)
        for row, i in enumerate(index):
            images[row], sizes[row] = read_image(files[i], image_size, fit, resize)
    else:
        images = FolderImages([files[i] for i in index], image_size, fit, resize)
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
        note=note,
        subset=subset,
    )


SPLIT_FOLDERS = ("train", "val", "test")


def _split_files(
    root: Path, split: str, seed: int, holdout: bool
) -> tuple[np.ndarray, list[Path], list[int], list[str], str]:
    """(positions of the split's files, every file, their class ids, classes, what was read
    in words) of one split of the tree at ``root``."""
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist; point --data-dir at an ImageFolder")
    has = {d: (root / d).is_dir() for d in SPLIT_FOLDERS}
    eval_dir = next((d for d in ("val", "test") if has[d]), None)
    if has["train"]:
        files, targets, classes = scan(root / "train")
        if eval_dir is None:  # train/ alone: as a flat tree
            if split == "eval" and not holdout:
                note = f"every image of {root / 'train'} (no val/ or test/ folder)"
                return np.arange(len(files)), files, targets, classes, note
            return _held_out(root / "train", files, targets, classes, seed, split)
        if split == "train":
            return np.arange(len(files)), files, targets, classes, f"{root / 'train'}"
        files, targets, _ = scan(root / eval_dir, classes)
        return np.arange(len(files)), files, targets, classes, f"{root / eval_dir}"
    if eval_dir is not None and _only_split_folders(root):
        if split == "train":
            raise DataError(
                f"{root} holds only {eval_dir}/ (no train/ folder); it can be evaluated "
                "(explainkit evaluate) but not trained on"
            )
        files, targets, classes = scan(root / eval_dir)
        return np.arange(len(files)), files, targets, classes, f"{root / eval_dir}"
    files, targets, classes = scan(root)
    if not holdout:
        note = f"every image of {root} (no train/ or val/ folder, so nothing is held out)"
        return np.arange(len(files)), files, targets, classes, note
    return _held_out(root, files, targets, classes, seed, split)


def _only_split_folders(root: Path) -> bool:
    """Whether every visible subfolder of ``root`` is a split folder (val/, test/)."""
    return all(
        p.name in SPLIT_FOLDERS for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
    )


def _held_out(
    root: Path, files: list[Path], targets: list[int], classes: list[str], seed: int, split: str
) -> tuple[np.ndarray, list[Path], list[int], list[str], str]:
    """A seeded 10% hold-out: the same files go to eval for a given seed, the rest to train."""
    order = np.random.default_rng(seed).permutation(len(files))
    held = np.zeros(len(files), dtype=bool)
    held[order[: max(1, round(HOLDOUT * len(files)))]] = True
    index = np.flatnonzero(held if split == "eval" else ~held)
    if split == "train" and len(index) == 0:
        raise DataError(f"{root} has too few images to hold 10% out for evaluation")
    part = "the held-out 10%" if split == "eval" else "the 90% not held out"
    return index, files, targets, classes, f"{part} of {root} (seed {seed})"


def relative_name(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` as ``/``-separated UTF-8 text (each part :func:`readable`)."""
    return "/".join(readable(part) for part in path.relative_to(root).parts)
