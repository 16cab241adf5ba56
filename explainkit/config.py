"""TrainConfig and EvalConfig: the one source of truth for the options of a run.

The CLI options of ``explainkit train`` (TrainConfig) and ``explainkit evaluate`` (EvalConfig),
config files (JSON or YAML), the ``config`` section of ``RUN/config.json`` and the config
stored in checkpoints are all derived from these dataclasses' fields and metadata.

Every value is checked the same way wherever it comes from (the command line, a config file,
a run's config.json, Python): its type, then its stated range (``min``/``max`` in the field's
metadata, shown in ``explainkit train --help``); floats must be finite. A bad value is one
:class:`ConfigError` sentence naming the option, and the CLI exits 2 for it (a usage error).
Values shown in messages go through :func:`brief`, so a hostile value cannot flood a terminal.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from explainkit.config_files import read_config_file
from explainkit.errors import (
    ConfigError,
    brief,
    describe,
    size_text,
    unknown_options_message,
)

if TYPE_CHECKING:  # pragma: no cover - typing only
    from explainkit.registries import Registries

DEVICE_PATTERN = r"auto|cpu|mps|cuda(:\d{1,4})?"  # what `explainkit analyze --device` accepts

MAX_TEXT = 4096  # longest string option (a path)


# Named bundles of options, applied under the config file and the command line.
# "default" is the best recipe measured (docs/training.md); "seed" is the seed project's plain
# one exactly: RandomCrop 32 with padding 4 and Cutout 16 only (no horizontal flip), plain
# cross-entropy, the trained weights evaluated on the image alone. docs/training.md tabulates
# both (checked by tests/test_train.py).
PRESETS: dict[str, dict[str, Any]] = {
    "default": {},  # the field defaults below
    "seed": {"flip": False, "label_smoothing": 0.0, "ema": 0.0, "tta": False},
}


# What ``explainkit train --resume`` may change: options that say how or where the run
# computes, never what it computes. Every other option differing from the run's config.json is
# refused, because the checkpoints, the stored logits and the history were made with it; among
# them --preset (a name for recipe values), --ema (whether the average exists, is checkpointed
# and produced the stored logits), --tta (what the stored logits are), --sync-bn (the BatchNorm
# statistics training uses under torchrun, like --batch-size) and --data-dir (which images).
RESUMABLE = (
    "epochs",  # how long to train; the one-cycle schedule is re-sized from the current step on
    "device",  # where it runs; the same recipe, though the bits differ from device to device
    "compile",  # torch.compile: the same model, compiled
    "amp",  # CUDA mixed precision: the numeric precision of the same model
    "channels_last",  # CUDA memory layout: the same model
    "keep_checkpoints",  # how many epoch files are kept on disk; nothing trained changes
)


def _opt(default: Any, help: str, **extra: Any) -> Any:
    """A field with its help and checks: ``choices``, ``min``/``max`` (inclusive unless
    ``min_open``/``max_open``)."""
    return field(default=default, metadata={"help": help, **extra})


LIMIT_HELP = "Use a seeded class-balanced subset of N %s images (the same for the same --seed)."
RESIZE_HELP = (
    "With --fit crop: the shorter side before the centre --image-size crop; default: the "
    "model's policy (torchvision's 256 or 232 for 224), else --image-size."
)
FIT_HELP = (
    "How a non-square image becomes the model's square: crop (the centre), pad (the whole "
    "image, padded) or stretch (the whole image, distorted)."
)

# Ranges shared with the run-config checks below.
WIDTH_MAX = 4096
IMAGE_SIZE_MAX = 8192
SEED_MAX = 2**32 - 1  # numpy's legacy seeds; torch and the data generators accept them all


class Options:
    """What TrainConfig and EvalConfig share: each value checked the same way wherever it comes
    from, unknown keys refused, and a plain dict for config.json."""

    COMMAND: ClassVar[str] = ""  # the command whose long flags the fields are

    @classmethod
    def fields_by_name(cls) -> dict[str, dataclasses.Field]:
        return {f.name: f for f in fields(cls)}  # type: ignore[arg-type]

    def check_values(self, labels: Mapping[str, str] | None = None) -> Callable[[str], str]:
        """Check (and normalize: ints of float fields become floats) every field; returns
        how fields are named in messages."""
        label = _labeller(labels)
        known = self.fields_by_name()
        for name in known:
            value = check_value(name, getattr(self, name), label(name), known)
            setattr(self, name, value)
        if getattr(self, "dataset", None) == "folder" and not getattr(self, "data_dir", None):
            raise ConfigError(
                f"{label('dataset')} folder needs {label('data_dir')} pointing at an "
                "ImageFolder tree"
            )
        return label

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(
        cls,
        data: Mapping[str, Any],
        source: str = "config",
        labels: Mapping[str, str] | None = None,
    ) -> Any:
        """Build a config from a mapping, refusing unknown keys (typos must not pass silently)
        and values of the wrong type or out of range; missing keys take their defaults.

        Messages name a field ``f"{source}: {name}"`` unless ``labels`` names it.
        """
        if not isinstance(data, Mapping):
            raise ConfigError(
                f"{source} must be a mapping of option names to values, got {describe(data)}"
            )
        known = cls.fields_by_name()
        unknown = [k for k in data if k not in known]
        if unknown:
            message = unknown_options_message(unknown, set(known), cls.COMMAND)
            raise ConfigError(f"{source}: {message}")
        label = _labeller(labels, lambda name: f"{source}: {name}")
        values = {name: check_value(name, data[name], label(name), known) for name in data}
        return cls(**values)


@dataclass
class TrainConfig(Options):
    """Everything that defines a training run; written to ``RUN/config.json``."""

    COMMAND: ClassVar[str] = "explainkit train"

    preset: str = _opt(
        "default",
        "Recipe preset: default (best measured) or seed (the seed's plain recipe).",
        choices=tuple(PRESETS),
    )
    task: str = _opt(
        "classification",
        "What the model learns: classification, multilabel, segmentation or detection (the "
        "last three need a dataset with their annotations: scenes, coco, voc; docs/tasks.md).",
        choices=("classification", "multilabel", "segmentation", "detection"),
    )
    dataset: str = _opt(
        "cifar10",
        "Dataset to train on: cifar10, shapes, folder, or one a plugin registers "
        "(explainkit plugins --all lists them).",
        registered="dataset",
    )
    data_dir: str | None = _opt(
        None, "Folder with the dataset (cifar10: contains cifar-10-batches-py; folder: class dirs)."
    )
    image_size: int = _opt(
        32,
        "Image side in pixels (images of other sizes are resized to it).",
        min=8,
        max=IMAGE_SIZE_MAX,
    )
    model: str = _opt(
        "resnet18-s8",
        "Model: resnet18-s8, resnet18, torchvision:NAME (any torchvision classifier), "
        "timm:NAME, hf:FOLDER (a transformers save_pretrained folder), or one a plugin "
        "registers (explainkit plugins --all lists them).",
        registered="model",
    )
    width: int = _opt(
        64,
        "Channels of the first stage of explainkit's ResNets (64 = full ResNet18; tests use 8 "
        "or 16); other models ignore it.",
        min=1,
        max=WIDTH_MAX,
    )
    weights: str | None = _opt(
        None,
        "Start from these weights: torchvision's (IMAGENET1K_V1 or "
        "ResNet50_Weights.IMAGENET1K_V1, downloaded), a state_dict file, or an explainkit "
        "checkpoint (its evaluated weights). A classifier head of another class count is "
        "trained afresh.",
    )
    epochs: int = _opt(20, "Number of epochs.", min=1, max=100_000)
    batch_size: int = _opt(
        128, "Images per optimizer step (per process under torchrun).", min=1, max=65536
    )
    lr: float = _opt(
        0.1, "Peak learning rate of the one-cycle schedule.", min=0.0, min_open=True, max=100.0
    )
    momentum: float = _opt(0.9, "SGD momentum.", min=0.0, max=1.0, max_open=True)
    nesterov: bool = _opt(True, "Use Nesterov momentum.")
    weight_decay: float = _opt(5e-4, "SGD weight decay.", min=0.0, max=1.0)
    schedule: str = _opt("onecycle", "Learning-rate schedule.", choices=("onecycle", "constant"))
    label_smoothing: float = _opt(
        0.1, "Label smoothing of the cross-entropy loss.", min=0.0, max=1.0, max_open=True
    )
    crop_padding: int = _opt(
        4,
        "RandomCrop padding in pixels (0 disables); unset, --image-size / 8.",
        min=0,
        max=1024,
    )
    flip: bool = _opt(True, "Random horizontal flips.")
    cutout: int = _opt(
        16,
        "Cutout square side in pixels (0 disables); unset, --image-size / 2.",
        min=0,
        max=2 * IMAGE_SIZE_MAX,
    )
    seed: int = _opt(
        0,
        "Random seed; a CPU run with the same seed is bit-for-bit repeatable.",
        min=0,
        max=SEED_MAX,
    )
    device: str = _opt("auto", "auto, cpu, cuda or cuda:N.", pattern=DEVICE_PATTERN)
    amp: bool = _opt(True, "Mixed precision on CUDA (bf16 where supported).")
    channels_last: bool = _opt(True, "channels_last memory format on CUDA.")
    compile: bool = _opt(False, "torch.compile the model.")
    limit_train: int | None = _opt(None, LIMIT_HELP % "training", min=1, max=1_000_000_000)
    limit_eval: int | None = _opt(None, LIMIT_HELP % "evaluation", min=1, max=1_000_000_000)
    ema: float = _opt(
        0.999,
        "Decay of an exponential moving average of the weights, which is then what is "
        "evaluated and checkpointed (0 disables; e.g. 0.999).",
        min=0.0,
        max=1.0,
        max_open=True,
    )
    tta: bool = _opt(True, "Evaluate on each image and its mirror image, averaging the logits.")
    sync_bn: bool = _opt(False, "Synchronize BatchNorm statistics across GPUs under torchrun.")
    keep_checkpoints: int | None = _opt(
        None,
        "Keep only the last K epoch checkpoints (plus epoch 1 and best); default all.",
        min=1,
        max=100_000,
    )

    def validate(
        self,
        labels: Mapping[str, str] | None = None,
        check_memory: bool = True,
        registries: Registries | None = None,
    ) -> None:
        """Raise ConfigError for values that cannot work, naming the option.

        Args:
            labels: How to name a field in messages (``c.yaml: epochs``); default its flag.
            check_memory: Also refuse a model and data that cannot fit in this machine's
                memory (see :func:`memory_needed`); off for configs of finished runs.
            registries: Also refuse a ``dataset`` or ``model`` that no plugin registered
                (:meth:`Registries.check_names`) and count the model's parameters for the
                memory check. None for configs of finished runs, which stay readable
                without the plugin that trained them.
        """
        label = self.check_values(labels)
        parameters = 0
        if registries is not None:
            registries.check_names(self.dataset, self.model, label)
            if check_memory:
                parameters = registries.count_parameters(self.model, self.width, self.image_size)
        if check_memory:
            _check_memory(self, parameters)


FIELDS = {f.name: f for f in fields(TrainConfig)}


def _like(name: str, **changes: Any) -> Any:
    """A field as TrainConfig's ``name`` is (default, help, checks), with ``changes``."""
    original = FIELDS[name]
    default = changes.pop("default", original.default)
    return field(default=default, metadata={**original.metadata, **changes})


@dataclass
class EvalConfig(Options):
    """What ``explainkit evaluate`` uses to evaluate a model it did not train; written to
    ``RUN/config.json`` of such a run (with ``"command": "evaluate"``). Nothing about
    training: an evaluated run's report lists only these."""

    COMMAND: ClassVar[str] = "explainkit evaluate"

    model: str = _like("model")
    task: str | None = _like(
        "task",
        default=None,
        help="What the model's outputs answer: classification, multilabel, segmentation, "
        "detection or video (class scores of clips); default: the model's own (a "
        "torchvision_detection: model detects). multilabel, segmentation and detection need a "
        "dataset with their annotations (scenes, coco, voc), video the clips dataset "
        "(docs/tasks.md).",
        choices=("classification", "multilabel", "segmentation", "detection", "video"),
    )
    weights: str | None = _like(
        "weights",
        help="The model's weights: a state_dict file, an explainkit checkpoint, or "
        "torchvision's named weights (IMAGENET1K_V1, downloaded); required except for an "
        "hf:FOLDER model (its own). The classifier head must be for the dataset's classes.",
    )
    width: int = _like("width")
    dataset: str = _like(
        "dataset",
        help="Dataset whose eval split the model is evaluated on: cifar10, shapes, folder, or "
        "one a plugin registers.",
    )
    data_dir: str | None = _like("data_dir")
    image_size: int | None = _like(
        "image_size",
        default=None,
        help="Image side in pixels; default: the model's expected input (its registry entry or "
        "pretrained weights' metadata, 224 for torchvision's ImageNet models).",
    )
    resize_size: int | None = _opt(None, RESIZE_HELP, min=8, max=IMAGE_SIZE_MAX)
    fit: str = _opt("crop", FIT_HELP, choices=("crop", "pad", "stretch"))
    device: str = _like("device")
    batch_size: int = _like("batch_size", default=256, help="Images evaluated at a time.")
    limit_eval: int | None = _like("limit_eval", help=LIMIT_HELP % "evaluation")
    seed: int = _like("seed", help="Random seed of datasets that draw and of --limit-eval.")

    def validate(
        self, labels: Mapping[str, str] | None = None, registries: Registries | None = None
    ) -> None:
        """Raise ConfigError for values that cannot work (as :meth:`TrainConfig.validate`)."""
        label = self.check_values(labels)
        if registries is not None:
            registries.check_names(self.dataset, self.model, label)


EVAL_FIELDS = {f.name: f for f in fields(EvalConfig)}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _labeller(
    labels: Mapping[str, str] | None, default: Callable[[str], str] = _flag
) -> Callable[[str], str]:
    return lambda name: (labels or {}).get(name) or default(name)


def field_kind(name: str, known: Mapping[str, dataclasses.Field] = FIELDS) -> str:
    """``int``, ``float``, ``bool`` or ``str``: what a config field holds (None aside)."""
    return str(known[name].type).split()[0]


def check_value(
    name: str,
    value: Any,
    label: str | None = None,
    known: Mapping[str, dataclasses.Field] = FIELDS,
) -> Any:
    """``value`` for config field ``name`` (of ``known``: TrainConfig's by default) if its type
    and range are right (ints become floats for float fields); ConfigError naming ``label``
    (default the flag) otherwise."""
    label = label or _flag(name)
    meta = known[name].metadata
    kind = field_kind(name, known)
    if value is None:
        if "None" in str(known[name].type):
            return None
        raise ConfigError(f"{label} must be {kind}, got None")
    if kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{label} must be true or false, got {describe(value)}")
        return value
    if kind == "str":
        return _check_text(label, value, meta)
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{label} must be int, got {describe(value)}")
    else:  # float: ints are welcome (lr: 1), bools are not
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{label} must be float, got {describe(value)}")
        try:
            value = float(value)
        except OverflowError:
            value = math.inf
        if not math.isfinite(value):
            raise ConfigError(f"{label} must be a finite number, got {brief(value)}")
    _check_range(label, value, meta)
    return value


def _check_text(label: str, value: Any, meta: Mapping[str, Any]) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{label} must be str, got {describe(value)}")
    choices = meta.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{label} must be one of {', '.join(choices)}; got {brief(value)}")
    registered = meta.get("registered")
    if registered and not re.fullmatch(r"[^\s\x00]{1,200}", value):
        # No registered name looks like this: say so without asking the registries (a
        # run's config.json is checked here too, plugins or not).
        raise ConfigError(
            f"{label} {brief(value)} is not a {registered} name (explainkit plugins --all "
            "lists them)"
        )
    pattern = meta.get("pattern")
    if pattern and not re.fullmatch(pattern, value):
        raise ConfigError(f"{label} must be auto, cpu, cuda, cuda:N or mps; got {brief(value)}")
    if "\x00" in value or len(value) > MAX_TEXT:
        raise ConfigError(
            f"{label} must be text without NUL characters, at most {MAX_TEXT} characters, "
            f"got {brief(value)}"
        )
    return value


def _check_range(label: str, value: float, meta: Mapping[str, Any]) -> None:
    low, high = meta.get("min"), meta.get("max")
    if low is not None:
        if meta.get("min_open") and value <= low:
            raise ConfigError(f"{label} must be greater than {low}, got {brief(value)}")
        if value < low:
            raise ConfigError(f"{label} must be at least {low}, got {brief(value)}")
    if high is not None:
        if meta.get("max_open") and value >= high:
            raise ConfigError(f"{label} must be less than {high}, got {brief(value)}")
        if value > high:
            raise ConfigError(f"{label} must be at most {high}, got {brief(value)}")


# -- memory: refuse a model and data that cannot fit before allocating them ---------------------

# Images per split when no --limit-* is given; a folder tree's size is unknown until it is read.
_SPLIT_SIZES = {"cifar10": (50_000, 10_000), "shapes": (5_000, 1_000), "folder": (1, 1)}


def memory_needed(config: TrainConfig, parameters: int = 0) -> dict[str, int]:
    """A lower bound of the bytes training ``config`` allocates, by part.

    ``model``: the float32 weights, gradients, SGD momentum and moving average (each when
    used) of a model of ``parameters`` parameters (counted by the caller, on the meta device:
    :meth:`explainkit.registries.Registries.count_parameters`); ``data``: both splits as
    uint8 images (what sits on the device); ``batch``: the padded input batch and the first
    stage's activations of one step. The true need is higher (every layer's activations,
    host copies), so a config over the machine's memory can never work.
    """
    train_images, eval_images = _SPLIT_SIZES.get(config.dataset, (1, 1))
    if config.dataset != "folder":  # a folder's size is unknown: its limits are no lower bound
        train_images = min(train_images, config.limit_train or train_images)
        eval_images = min(eval_images, config.limit_eval or eval_images)
    side = config.image_size
    copies = 2 + (config.momentum > 0) + (config.ema > 0)
    batch = min(config.batch_size, train_images)
    padded = side + 2 * config.crop_padding
    return {
        "model": 4 * copies * parameters,
        "data": 3 * side * side * (train_images + eval_images),
        "batch": 4 * batch * (3 * padded * padded + config.width * side * side),
    }


def physical_memory() -> int | None:
    """This machine's physical memory in bytes, or None where the OS does not say."""
    try:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None
    return pages * page_size if pages > 0 and page_size > 0 else None


def _check_memory(config: TrainConfig, parameters: int) -> None:
    have = physical_memory()
    if have is None:
        return
    parts = memory_needed(config, parameters)
    need = sum(parts.values())
    if need > have:
        raise ConfigError(
            f"--width {config.width}, --image-size {config.image_size} and --batch-size "
            f"{config.batch_size} need at least {size_text(need)} of memory (model "
            f"{size_text(parts['model'])}, data {size_text(parts['data'])}, one batch "
            f"{size_text(parts['batch'])}) but this machine has {size_text(have)}; lower --width, "
            "--image-size, --batch-size or --limit-train"
        )


def resolve_config(
    cli_values: dict[str, Any],
    explicit: set[str],
    config_file: str | Path | None = None,
    registries: Registries | None = None,
) -> TrainConfig:
    """Defaults < preset < config file < options given on the command line.

    Messages name a value by where it came from: ``c.yaml: epochs`` or ``--epochs``; the
    model and dataset names are checked against ``registries`` when given.
    """
    from_file: dict[str, Any] = read_config_file(config_file) if config_file is not None else {}
    source = str(config_file) if config_file is not None else "options"
    labels = {k: f"{source}: {k}" for k in from_file if isinstance(k, str)}
    labels.update({k: _flag(k) for k in explicit})
    chosen = {**from_file, **{k: v for k, v in cli_values.items() if k in explicit}}
    preset = chosen.get("preset", cli_values.get("preset", "default"))
    if not isinstance(preset, str) or preset not in PRESETS:
        where = labels.get("preset", "--preset")
        raise ConfigError(f"{where} must be one of {', '.join(PRESETS)}; got {brief(preset)}")
    merged = {**cli_values, **PRESETS[preset], **chosen, "preset": preset}
    set_by_user = set(chosen) | set(PRESETS[preset])
    config = TrainConfig.from_dict(merged, source=source, labels=labels)
    scale_augmentation(config, set_by_user)
    config.validate(labels, registries=registries)
    return config


def scale_augmentation(config: TrainConfig, given: set[str] | frozenset[str] = frozenset()) -> None:
    """Scale the augmentation the user did not set (not in ``given``) to ``image_size``:
    RandomCrop padding ``image_size / 8`` and Cutout ``image_size / 2``, as 4 and 16 are for
    32-pixel CIFAR images (the defaults; 32-pixel runs are unchanged)."""
    if not isinstance(config.image_size, int) or isinstance(config.image_size, bool):
        return  # validate() names the bad value
    if "crop_padding" not in given:
        config.crop_padding = config.image_size // 8
    if "cutout" not in given:
        config.cutout = config.image_size // 2


def refused_on_resume(saved: TrainConfig, values: dict[str, Any]) -> list[str]:
    """The options in ``values`` that differ from the ``saved`` run and are not in RESUMABLE."""
    return [k for k, v in values.items() if k not in RESUMABLE and getattr(saved, k) != v]
