"""The prediction store's layout: every name, type, shape and setting, in one place.

docs/store-format.md describes these tables and tests/store/test_schema.py checks that it
names exactly what is written here. The writer writes what these tables say, and the
validator checks a store against them.

What a store holds depends on its task (the ``task`` root attribute; a store without it is a
``classification`` store): the ground truth of its evaluation split and what each epoch
records. :data:`TASKS` maps a task to those datasets, so that another task (detection's boxes,
segmentation's masks, multi-label logits) is a new entry here, checked by the same code.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FORMAT_NAME = "explainkit-predictions"
EPOCH_FORMAT_NAME = "explainkit-epoch"
SCHEMA_VERSION = 2  # 1 was a pre-release's one-file schema: refused, see validate.py
DEFAULT_TASK = "classification"  # the task of a store that records none

# -- root attributes ---------------------------------------------------------------------------

ROOT_ATTRIBUTES = (
    "format",
    "schema_version",
    "explainkit_version",
    "task",
    "dataset",
    "classes",
    "model",
    "mean",
    "std",
    "input_shape",
    "default_layer",
    "eval_weights",
    "eval_tta",
    "store_id",
)
# What a reader cannot do without (the rest is optional or has a default).
REQUIRED_ATTRIBUTES = (
    "schema_version",
    "classes",
    "model",
    "mean",
    "std",
    "input_shape",
    "store_id",
)
EVAL_WEIGHTS = ("trained", "ema")

# -- datasets ----------------------------------------------------------------------------------

# The dimensions a message spells out ("for 20 images and 3 classes"). G and D are ragged:
# the sum of a counts dataset (Task.counts), the boxes of the ground truth and of an epoch.
COUNTED = {"N": "images", "K": "classes", "G": "ground-truth boxes", "D": "detections"}
MAX_SEGMENTATION_CLASSES = 255  # a class id is uint8; the truth's 255 means "not scored"
IGNORE = 255


@dataclass(frozen=True)
class Field:
    """One dataset: what the writer stores and what a reader accepts.

    ``shape`` is written in N images of H x W x C pixels, K classes and the ragged G and D
    (a number is a fixed size); ``kinds`` are the numpy dtype kinds a reader accepts
    (default: that of ``dtype``); ``what`` names the values in messages; ``check`` names a
    check of the values: ``class`` 0..K-1, ``position`` >= 0, ``size`` >= 1, ``count`` >= 0
    at open; ``binary`` 0 or 1, ``finite``, ``text`` UTF-8, ``pixel`` a class id 0..K-1,
    ``truthpixel`` one or 255, ``unit`` a finite value in [0, 1], ``box`` finite corners
    x0 <= x1, y0 <= y1 when read (validate.py, store/tasks.py).
    """

    name: str
    dtype: str
    shape: tuple[str | int, ...]
    what: str
    kinds: str = ""
    check: str | None = None
    optional: bool = False

    @property
    def accepted_kinds(self) -> str:
        return self.kinds or np.dtype(self.dtype).kind


@dataclass(frozen=True)
class Task:
    """What a task adds to the store: its ground truth in the head, its per-epoch results.

    ``counts`` names, for a ragged dimension (G, D), the (N,) dataset of per-image counts
    whose sum it is; ``history`` the history columns this task may leave unrecorded.
    """

    truth: tuple[Field, ...]  # eval/*: written once, with the images
    epoch: tuple[Field, ...]  # one set per epoch file, besides its history row
    counts: tuple[tuple[str, str], ...] = ()
    optional_history: tuple[str, ...] = ()
    scores: str = "logits"  # the epoch dataset of per-class scores (N, K), if any


IMAGES = Field("eval/images", "u1", ("N", "H", "W", "C"), "uint8 images")
# The evaluation split of every task: where each image came from and how it looked.
SPLIT = (
    IMAGES,
    Field("eval/index", "i8", ("N",), "integers", kinds="iu", check="position"),
    Field(
        "eval/masks",
        "u1",
        ("N", "H", "W"),
        "uint8 masks",
        kinds="ub",
        check="binary",
        optional=True,
    ),
    Field("eval/paths", "S", ("N",), "UTF-8 strings", check="text", optional=True),
    Field("eval/sizes", "i4", ("N", 2), "integers", kinds="iu", check="size", optional=True),
)
TARGETS = Field("eval/targets", "i8", ("N",), "integers", kinds="iu", check="class")
LOGITS = Field("logits", "f4", ("N", "K"), "floats", check="finite")
TASKS = {
    "classification": Task(truth=(TARGETS,), epoch=(LOGITS,)),
    # Multi-label: each class scored on its own (a sigmoid), against multi-hot labels.
    "multilabel": Task(
        truth=(TARGETS, Field("eval/labels", "u1", ("N", "K"), "uint8 0/1", check="binary")),
        epoch=(LOGITS,),
    ),
    # Segmentation: a class id per pixel (class 0 is the background), and per image the
    # share of its pixels' probability each class holds.
    "segmentation": Task(
        truth=(
            TARGETS,
            Field(
                "eval/segmentation", "u1", ("N", "H", "W"), "uint8 class ids", check="truthpixel"
            ),
        ),
        epoch=(
            Field("masks", "u1", ("N", "H", "W"), "uint8 class ids", check="pixel"),
            Field("scores", "f4", ("N", "K"), "floats", check="unit"),
        ),
        scores="scores",
    ),
    # Video classification: class scores of clips; the images are their middle frames and
    # the clips themselves are in RUN/clips.h5 (explainkit.clip_files).
    "video": Task(truth=(TARGETS,), epoch=(LOGITS,)),
    # Detection: ragged boxes, all images' in one (G, 4) or (D, 4) table in image order; the
    # counts say how many are each image's. A detector has no training accuracy.
    "detection": Task(
        truth=(
            TARGETS,
            Field("eval/box_counts", "i8", ("N",), "integers", kinds="iu", check="count"),
            Field("eval/boxes", "f4", ("G", 4), "floats", kinds="f", check="box"),
            Field("eval/box_labels", "i8", ("G",), "integers", kinds="iu", check="class"),
        ),
        epoch=(
            Field("box_counts", "i8", ("N",), "integers", kinds="iu", check="count"),
            Field("boxes", "f4", ("D", 4), "floats", kinds="f", check="box"),
            Field("box_scores", "f4", ("D",), "floats", kinds="f", check="unit"),
            Field("box_labels", "i8", ("D",), "integers", kinds="iu", check="class"),
        ),
        counts=(("G", "eval/box_counts"), ("D", "box_counts")),
        optional_history=("train_acc",),
        scores="",
    ),
}


def head_fields(task: str = DEFAULT_TASK) -> tuple[Field, ...]:
    """The datasets of a ``task`` store's head: the images, the truth, then the rest."""
    return (IMAGES, *TASKS[task].truth, *SPLIT[1:])


def epoch_fields(task: str = DEFAULT_TASK) -> tuple[Field, ...]:
    return TASKS[task].epoch


def optional_history(task: str = DEFAULT_TASK) -> tuple[str, ...]:
    """The history columns a ``task`` store may leave unrecorded (NaN)."""
    return (*OPTIONAL_HISTORY_COLUMNS, *TASKS[task].optional_history)


def shape_text(shape: tuple[str | int, ...]) -> str:
    """A shape as docs/store-format.md writes it: ``(N,)``, ``(N, classes)``."""
    names = [COUNTED["K"] if d == "K" else str(d) for d in shape]
    return f"({names[0]},)" if len(names) == 1 else f"({', '.join(names)})"


DATASETS = tuple(f.name for f in head_fields())  # in the head, predictions.h5
OPTIONAL_DATASETS = tuple(f.name for f in head_fields() if f.optional)
REQUIRED_DATASETS = tuple(name for name in DATASETS if name not in OPTIONAL_DATASETS)
EPOCH_ATTRIBUTES = ("format", "schema_version", "store_id", "epoch")
EPOCH_DATASETS = (*(f.name for f in epoch_fields()), "history")

# -- the training history: one row per epoch, in its epoch file ---------------------------------

HISTORY_COLUMNS: tuple[tuple[str, str], ...] = (
    ("epoch", "i8"),
    ("train_loss", "f8"),  # the training objective (label smoothing included)
    ("train_ce", "f8"),  # plain cross-entropy of the same training logits
    ("train_acc", "f8"),
    ("eval_loss", "f8"),
    ("eval_acc", "f8"),
    ("lr", "f8"),
    ("seconds", "f8"),
    ("images_per_s", "f8"),
)
HISTORY_DTYPE = np.dtype(list(HISTORY_COLUMNS))
# Columns a row may leave out: stored as not recorded (NaN). A column is recorded for every
# epoch or for none; a history table without the column still opens.
OPTIONAL_HISTORY_COLUMNS = ("train_ce",)


def blank_row() -> np.ndarray:
    """One history row (shape (1,)) with every number not recorded (NaN) and epoch 0."""
    row = np.zeros(1, HISTORY_DTYPE)
    for name, _ in HISTORY_COLUMNS[1:]:
        row[name] = np.nan
    return row


# -- files, chunks and compression -------------------------------------------------------------

COMPRESSION = {"compression": "gzip", "compression_opts": 1, "fletcher32": True}  # the head
CHUNK_BYTES = 1 << 20  # about 1 MiB per chunk: cheap random reads, few chunks per epoch
# HDF5 >= 1.10 object headers carry checksums: damaged metadata is refused, not a crash.
FILE_OPTIONS = {"libver": ("v110", "latest")}
EPOCH_NAME = re.compile(r"epoch_(\d+)\.h5")
EPOCH_TMP = re.compile(r"\.epoch_\d+\.h5\.tmp-(\d+)")  # a writer's, named by its process id


def rows_per_chunk(n: int, row_bytes: int) -> int:
    """Rows of ``row_bytes`` bytes that make a chunk of about CHUNK_BYTES (1..n)."""
    return max(1, min(n, CHUNK_BYTES // max(1, row_bytes)))


def epochs_folder(path: str | Path) -> Path:
    """The folder of a store's epoch files: ``predictions.h5`` -> ``predictions.epochs``.

    Derived from the store's name, so two stores in one folder never share epochs; in a run
    directory it is ``RunDir.store_epochs``.
    """
    path = Path(path)
    return path.with_name(path.name.removesuffix(".h5") + ".epochs")


def epoch_name(epoch: int) -> str:
    return f"epoch_{epoch:04d}.h5"


def epoch_file(path: str | Path, epoch: int) -> Path:
    """Where epoch ``epoch`` of the store ``path`` is committed."""
    return epochs_folder(path) / epoch_name(epoch)
