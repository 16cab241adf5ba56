"""Short video clips for video classifiers (torchvision's R3D-18, MC3-18, R(2+1)D-18, S3D).

Layout (``--dataset clips --data-dir ROOT``): one folder per class, one folder of frames per
clip, the frames in name order (any image format PIL reads)::

    ROOT/[val/]<class>/<clip>/frame_0001.jpg ...

or an animated GIF per clip (``ROOT/<class>/<clip>.gif``). ``ROOT/train/`` and ``ROOT/val/``
(or ``eval/``) split it; a tree without them is held out 20% for evaluation when training
and read whole by ``evaluate``. Each clip becomes :data:`CLIP_FRAMES` frames taken evenly
over its length (a shorter clip repeats frames), each fitted to ``image_size`` as a folder's
images are (``--fit``). The split's ``clips`` are (N, T, H, W, 3) uint8 and its ``images``
each clip's middle frame, what galleries and reports show.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from explainkit.data import Dataset
from explainkit.data.folder import IMAGE_EXTENSIONS, class_name, read_image, relative_name
from explainkit.data.tasks import holdout
from explainkit.errors import DataError

CLIP_FRAMES = 16  # what torchvision's video classifiers were trained on
EVAL_FOLDERS = ("val", "eval")


def load_clips(
    split: str,
    data_dir: str | Path,
    image_size: int,
    seed: int = 0,
    limit: int | None = None,
    every_clip: bool = False,
    fit: str = "crop",
    frames: int = CLIP_FRAMES,
) -> Dataset:
    """One split of a clips folder (the module docstring); ``every_clip``: a tree without
    its own splits is evaluated whole."""
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"the clips dataset's --data-dir {root} does not exist")
    folder, whole = _split_folder(root, split)
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    found = [
        (clip, c)
        for c, name in enumerate(classes)
        for clip in sorted((folder / name).iterdir())
        if clip.is_dir() or clip.suffix.lower() == ".gif"
    ]
    if not found:
        raise DataError(
            f"{folder} holds no clips: expected <class>/<clip>/ folders of frames or "
            "<class>/<clip>.gif files"
        )
    if whole:
        kept = set(holdout([str(p) for p, _ in found], split, seed, every_clip))
        found = [(p, c) for p, c in found if str(p) in kept]
    found = found[:limit] if limit else found
    clips = np.stack([_read_clip(p, image_size, fit, frames) for p, _ in found])
    return Dataset(
        images=np.ascontiguousarray(clips[:, frames // 2]),
        targets=np.array([c for _, c in found], np.int64),
        classes=[class_name(c) for c in classes],
        index=np.arange(len(found)),
        name="clips",
        paths=[relative_name(p, root) for p, _ in found],
        note=f"{len(found):,} clips of {folder}",
        clips=clips,
    )


def _split_folder(root: Path, split: str) -> tuple[Path, bool]:
    names = ("train",) if split == "train" else EVAL_FOLDERS
    for name in names:
        if (root / name).is_dir():
            return root / name, False
    return root, True


def _read_clip(path: Path, image_size: int, fit: str, frames: int) -> np.ndarray:
    """(frames, size, size, 3) uint8: ``frames`` frames evenly over the clip."""
    if path.is_dir():
        files = sorted(f for f in path.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise DataError(f"clip {path} holds no frames (image files)")
        picked = np.linspace(0, len(files) - 1, frames).round().astype(int)
        return np.stack([read_image(files[i], image_size, fit)[0] for i in picked])
    return _read_gif(path, image_size, fit, frames)


def _read_gif(path: Path, image_size: int, fit: str, frames: int) -> np.ndarray:
    from PIL import Image, ImageSequence

    from explainkit.data.fit import fit_image

    try:
        with Image.open(path) as img:
            decoded = [
                fit_image(f.convert("RGB"), image_size, fit) for f in ImageSequence.all_frames(img)
            ]
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"cannot decode clip {path} ({e}); remove or replace the file") from e
    picked = np.linspace(0, len(decoded) - 1, frames).round().astype(int)
    return np.stack([np.asarray(decoded[i], np.uint8) for i in picked])
