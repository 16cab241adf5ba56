"""TrainConfig: the one source of truth for training options.

The CLI options of ``explainkit train``, config files (JSON or YAML), ``RUN/config.json`` and
the config stored in checkpoints are all derived from this dataclass's fields and metadata.

Every value is checked the same way wherever it comes from (the command line, a config file,
a run's config.json, Python): its type, then its stated range (``min``/``max`` in the field's
metadata, shown in ``explainkit train --help``); floats must be finite. A bad value is one
:class:`ConfigError` sentence naming the option, and the CLI exits 2 for it (a usage error).
Values shown in messages go through :func:`brief`, so a hostile value cannot flood a terminal.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from explainkit.errors import ExplainkitError, RunError, did_you_mean

# The built-in names. --dataset and --model take any registered name (plugins register more
# through the register_datasets / register_models hooks): validate() asks the registries.
DATASET_CHOICES = ("cifar10", "shapes", "folder")
MODEL_CHOICES = ("resnet18-s8", "resnet18")
DEVICE_PATTERN = r"auto|cpu|mps|cuda(:\d{1,4})?"  # what `explainkit analyze --device` accepts

MAX_CONFIG_BYTES = 1 << 20  # a config file holds a few dozen values; more is not a config
MAX_TEXT = 4096  # longest string option (a path)
BRIEF = 60  # characters of a value shown in an error message


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


class ConfigError(ExplainkitError):
    """A config file or option value is invalid (a usage error: the CLI exits 2)."""

    exit_code = 2


def _opt(default: Any, help: str, **extra: Any) -> Any:
    """A field with its help and checks: ``choices``, ``min``/``max`` (inclusive unless
    ``min_open``/``max_open``)."""
    return field(default=default, metadata={"help": help, **extra})


# Ranges shared with the run-config checks below.
WIDTH_MAX = 4096
IMAGE_SIZE_MAX = 8192
SEED_MAX = 2**32 - 1  # numpy's legacy seeds; torch and the data generators accept them all


@dataclass
class TrainConfig:
    """Everything that defines a training run; written to ``RUN/config.json``."""

    preset: str = _opt(
        "default",
        "Recipe preset: default (best measured) or seed (the seed's plain recipe).",
        choices=tuple(PRESETS),
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
        "timm:NAME, or one a plugin registers (explainkit plugins --all lists them).",
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
    limit_train: int | None = _opt(
        None, "Use only the first N training images.", min=1, max=1_000_000_000
    )
    limit_eval: int | None = _opt(
        None, "Use only the first N evaluation images.", min=1, max=1_000_000_000
    )
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
        check_names: bool = True,
    ) -> None:
        """Raise ConfigError for values that cannot work, naming the option.

        Args:
            labels: How to name a field in messages (``c.yaml: epochs``); default its flag.
            check_memory: Also refuse a model and data that cannot fit in this machine's
                memory (see :func:`memory_needed`); off for configs of finished runs.
            check_names: Also refuse a ``dataset`` or ``model`` that no plugin registered
                (:func:`check_registered`); off for configs of finished runs, which stay
                readable without the plugin that trained them.
        """
        label = _labeller(labels)
        for f in fields(self):
            setattr(self, f.name, check_value(f.name, getattr(self, f.name), label(f.name)))
        if self.dataset == "folder" and not self.data_dir:
            raise ConfigError(
                f"{label('dataset')} folder needs {label('data_dir')} pointing at an "
                "ImageFolder tree"
            )
        if check_names:
            check_registered(self, label)
        if check_memory:
            _check_memory(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(
        cls,
        data: Mapping[str, Any],
        source: str = "config",
        labels: Mapping[str, str] | None = None,
    ) -> TrainConfig:
        """Build a config from a mapping, refusing unknown keys (typos must not pass silently)
        and values of the wrong type or out of range; missing keys take their defaults.

        Messages name a field ``f"{source}: {name}"`` unless ``labels`` names it.
        """
        if not isinstance(data, Mapping):
            raise ConfigError(
                f"{source} must be a mapping of option names to values, got {describe(data)}"
            )
        names = {f.name for f in fields(cls)}
        unknown = [k for k in data if k not in names]
        if unknown:
            raise ConfigError(f"{source}: {_unknown_options(unknown, names)}")
        label = _labeller(labels, lambda name: f"{source}: {name}")
        values = {name: check_value(name, data[name], label(name)) for name in data}
        return cls(**values)


FIELDS = {f.name: f for f in fields(TrainConfig)}


def check_registered(config: TrainConfig, label: Callable[[str], str] | None = None) -> None:
    """ConfigError (with a did-you-mean) when no plugin registered ``config.dataset`` or
    ``config.model``.

    Cheap: the plugins are loaded (no torch), their registries collected, and a family name
    (``torchvision:NAME``) is checked for its prefix only; the name after the colon is
    checked when the model is built (``explainkit.models.registry.model_entry``), before a
    run writes anything. Only a mistyped name asks the families for their names (for the
    suggestion), which may import their library.
    """
    from explainkit.manager import current_plugins, get_datasets, get_models, unknown_model_message

    label = label or _flag
    pm = current_plugins()
    datasets = get_datasets(pm)
    if config.dataset not in datasets:
        raise ConfigError(_unknown_dataset(label("dataset"), config.dataset, list(datasets)))
    models = get_models(pm)
    name = config.model
    prefix, colon, rest = name.partition(":")
    if name.endswith(":") or not (name in models or (colon and rest and f"{prefix}:" in models)):
        raise ConfigError(f"{label('model')}: {unknown_model_message(name, models)}")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _labeller(
    labels: Mapping[str, str] | None, default: Callable[[str], str] = _flag
) -> Callable[[str], str]:
    return lambda name: (labels or {}).get(name) or default(name)


def field_kind(name: str) -> str:
    """``int``, ``float``, ``bool`` or ``str``: what a TrainConfig field holds (None aside)."""
    return str(FIELDS[name].type).split()[0]


def _optional(name: str) -> bool:
    return "None" in str(FIELDS[name].type)


def check_value(name: str, value: Any, label: str | None = None) -> Any:
    """``value`` for TrainConfig field ``name`` if its type and range are right (ints become
    floats for float fields); ConfigError naming ``label`` (default the flag) otherwise."""
    label = label or _flag(name)
    meta = FIELDS[name].metadata
    kind = field_kind(name)
    if value is None:
        if _optional(name):
            return None
        raise ConfigError(f"{label} must be {kind}, got None")
    if kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{label} must be true or false, got {describe(value)}")
        return value
    if kind == "str":
        if not isinstance(value, str):
            raise ConfigError(f"{label} must be str, got {describe(value)}")
        choices = meta.get("choices")
        if choices and value not in choices:
            raise ConfigError(f"{label} must be one of {', '.join(choices)}; got {brief(value)}")
        registered = meta.get("registered")
        if registered and not re.fullmatch(r"[^\s\x00]{1,200}", value):
            # No registered name looks like this: say what the names are, without asking
            # the registries (a run's config.json is checked here too, plugins or not).
            raise ConfigError(_not_a_name(label, registered, value))
        pattern = meta.get("pattern")
        if pattern and not re.fullmatch(pattern, value):
            raise ConfigError(f"{label} must be auto, cpu, cuda, cuda:N or mps; got {brief(value)}")
        if "\x00" in value or len(value) > MAX_TEXT:
            raise ConfigError(
                f"{label} must be text without NUL characters, at most {MAX_TEXT} characters, "
                f"got {brief(value)}"
            )
        return value
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


def _not_a_name(label: str, kind: str, value: str) -> str:
    if kind == "dataset":
        return _unknown_dataset(label, value, list(DATASET_CHOICES))
    return (
        f"{label} {brief(value)} is not a model name: {', '.join(MODEL_CHOICES)}, "
        "torchvision:NAME, timm:NAME or a plugin's (explainkit plugins --all lists them)"
    )


def _unknown_dataset(label: str, value: str, known: list[str]) -> str:
    from explainkit.data import unknown_dataset_message

    return (
        f"{label} must be one of the registered datasets: {unknown_dataset_message(value, known)}"
    )


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


# -- showing values in messages ------------------------------------------------------------------


def brief(value: Any, limit: int = BRIEF) -> str:
    """``repr(value)`` cut to about ``limit`` characters, safe on any value: a huge integer
    (whose repr would raise), a deep list (whose repr would recurse) or a megabyte string."""
    text = _short_repr(value, 3, limit + 1)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def describe(value: Any, limit: int = BRIEF) -> str:
    """The value's type and a short repr: ``str 'many'``, ``list [1, 2]``."""
    if value is None:
        return "None"
    return f"{type(value).__name__} {brief(value, limit)}"


def _short_repr(value: Any, depth: int, budget: int) -> str:
    if isinstance(value, bool) or value is None or isinstance(value, float):
        return repr(value)
    if isinstance(value, int):
        if value.bit_length() > 256:  # repr of a 5,000-digit int raises ValueError
            digits = int(value.bit_length() * math.log10(2)) + 1
            return f"<an integer of about {digits} digits>"
        return repr(value)
    if isinstance(value, str):
        return repr(value[:budget])
    if isinstance(value, (list, tuple, dict)):
        if not value:
            return repr(type(value)())
        if depth == 0:
            return "[…]" if not isinstance(value, dict) else "{…}"
        items = value.items() if isinstance(value, dict) else value
        parts: list[str] = []
        used = 2
        for item in items:
            if used >= budget:
                parts.append("…")
                break
            if isinstance(value, dict):
                k, v = item
                text = _short_repr(k, depth - 1, budget - used)
                text += ": " + _short_repr(v, depth - 1, budget - used - len(text))
            else:
                text = _short_repr(item, depth - 1, budget - used)
            parts.append(text)
            used += len(text) + 2
        inner = ", ".join(parts)
        return "{" + inner + "}" if isinstance(value, dict) else "[" + inner + "]"
    return f"<{type(value).__name__}>"


def _cut(text: str, limit: int = 80) -> str:
    """A foreign message (PyYAML's) on one line, cut at a word boundary."""
    text = " ".join(str(text).split())
    if len(text) > limit:
        text = text[:limit].rsplit(" ", 1)[0].rstrip(",;:(") + " …"
    return text


def _unknown_options(unknown: list[Any], names: set[str]) -> str:
    shown = ", ".join(brief(k, 30) for k in unknown[:3])
    more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
    text = f"unknown option{'s' if len(unknown) > 1 else ''} {shown}{more}"
    first = unknown[0]
    close = did_you_mean(first, sorted(names)) if isinstance(first, str) and len(first) < 50 else []
    if close:
        return f"{text}; did you mean {close[0]!r}?"
    return f"{text}; the options are the long flags of `explainkit train --help`"


# -- memory: refuse a model and data that cannot fit before allocating them ---------------------

# Images per split when no --limit-* is given; a folder tree's size is unknown until it is read.
_SPLIT_SIZES = {"cifar10": (50_000, 10_000), "shapes": (5_000, 1_000), "folder": (1, 1)}


def resnet18_parameters(width: int, num_classes: int = 10, arch: str = "resnet18-s8") -> int:
    """The exact parameter count of explainkit's ResNet18 at ``width`` (without torch)."""
    count = 27 * width + 2 * width  # 3x3 stem and its BatchNorm
    in_planes = width
    last_stride = 1 if arch == "resnet18-s8" else 2
    for planes, stride in zip(
        (width, 2 * width, 4 * width, 8 * width), (1, 2, 2, last_stride), strict=True
    ):
        for s in (stride, 1):
            count += 9 * in_planes * planes + 9 * planes * planes + 4 * planes
            if s != 1 or in_planes != planes:
                count += in_planes * planes + 2 * planes
            in_planes = planes
    pool = 2 if arch == "resnet18-s8" else 1
    return count + (8 * width * pool * pool + 1) * num_classes


def memory_needed(config: TrainConfig) -> dict[str, int]:
    """A lower bound of the bytes training ``config`` allocates, by part.

    ``model``: the float32 weights, gradients, SGD momentum and moving average (each when
    used) of explainkit's ResNet at ``--width`` (0 for other models: unknown until built);
    ``data``: both splits as uint8 images (what sits on the device); ``batch``: the padded
    input batch and the first stage's activations of one step. The true need is higher
    (every layer's activations, host copies), so a config over the machine's memory can
    never work.
    """
    train_images, eval_images = _SPLIT_SIZES.get(config.dataset, (1, 1))
    if config.dataset != "folder":  # a folder's size is unknown: its limits are no lower bound
        train_images = min(train_images, config.limit_train or train_images)
        eval_images = min(eval_images, config.limit_eval or eval_images)
    side = config.image_size
    copies = 2 + (config.momentum > 0) + (config.ema > 0)
    classes = 1 if config.dataset == "folder" else 10
    # explainkit's ResNets are counted exactly; another model's size is unknown until built.
    params = 0
    if config.model in MODEL_CHOICES:
        params = resnet18_parameters(config.width, classes, config.model)
    batch = min(config.batch_size, train_images)
    padded = side + 2 * config.crop_padding
    return {
        "model": 4 * copies * params,
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


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError  # pragma: no cover


def _check_memory(config: TrainConfig) -> None:
    have = physical_memory()
    if have is None:
        return
    parts = memory_needed(config)
    need = sum(parts.values())
    if need > have:
        raise ConfigError(
            f"--width {config.width}, --image-size {config.image_size} and --batch-size "
            f"{config.batch_size} need at least {_size(need)} of memory (model "
            f"{_size(parts['model'])}, data {_size(parts['data'])}, one batch "
            f"{_size(parts['batch'])}) but this machine has {_size(have)}; lower --width, "
            "--image-size, --batch-size or --limit-train"
        )


# -- config files ------------------------------------------------------------------------------


def _file_kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a named pipe"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def read_regular_file(
    path: str | os.PathLike[str],
    what: str = "config file",
    error: type[ExplainkitError] = ConfigError,
    limit: int = MAX_CONFIG_BYTES,
) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes; ``error`` with one sentence for
    anything else. A FIFO, a device (/dev/zero) or a directory is refused before it is opened
    (and again after, on the open file), so reading never blocks nor eats memory."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist; check the path") from None
    except (OSError, ValueError) as e:
        reason = getattr(e, "strerror", None) or "not a valid path"
        raise error(f"cannot read {what} {path}: {reason}") from None
    if not stat.S_ISREG(mode):
        raise error(f"{what} {path} is {_file_kind(mode)}; give a regular JSON or YAML file")
    flags = os.O_RDONLY
    for name in ("O_NONBLOCK", "O_NOCTTY", "O_CLOEXEC"):
        flags |= getattr(os, name, 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise error(f"cannot read {what} {path}: {e.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):  # swapped for something else since the check above
            raise error(f"{what} {path} is {_file_kind(mode)}; give a regular JSON or YAML file")
        chunks: list[bytes] = []
        size = 0
        while size <= limit:
            chunk = os.read(fd, limit + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as e:
        raise error(f"cannot read {what} {path}: {e.strerror}") from None
    finally:
        os.close(fd)
    if size > limit:
        raise error(
            f"{what} {path} is larger than {_size(limit)}; a config file holds a few option values"
        )
    return b"".join(chunks)


def _load_yaml(text: str, path: Path) -> Any:
    try:
        import yaml
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ConfigError("YAML config files need PyYAML: pip install pyyaml") from e

    class NoAliasLoader(yaml.SafeLoader):
        """Refuses anchors and aliases: ten nested aliases make a billion values."""

        def compose_node(self, parent: Any, index: Any) -> Any:
            event = self.peek_event()
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
                line = event.start_mark.line + 1 if event.start_mark else "?"
                raise ConfigError(
                    f"{path} uses a YAML anchor or alias (& or *) at line {line}; "
                    "write each value out"
                )
            return super().compose_node(parent, index)

    try:
        return yaml.load(text, Loader=NoAliasLoader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or type(e).__name__
        raise ConfigError(f"{path} is not valid YAML: {_cut(problem)}{where}") from e
    except RecursionError as e:
        raise ConfigError(f"{path} nests too deeply; a config file is a flat mapping") from e
    except (ValueError, TypeError, OverflowError) as e:  # a date like 2001-13-01, 5000 digits
        raise ConfigError(
            f"{path} has a YAML value that cannot be read ({_cut(str(e))}); fix or quote it"
        ) from e


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a JSON or YAML config file into a dict; YAML needs PyYAML."""
    path = Path(path)
    raw = read_regular_file(path)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not UTF-8 text; write the config as JSON or YAML") from e
    if path.suffix.lower() in (".yaml", ".yml"):
        data = _load_yaml(text, path)
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e.msg} at line {e.lineno}") from e
        except RecursionError as e:
            raise ConfigError(f"{path} nests too deeply; a config file is a flat mapping") from e
        except ValueError as e:  # an integer of more than 4300 digits
            raise ConfigError(f"{path} has a number too long to read; fix the value") from e
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path} must hold a mapping of option names to values, got {type(data).__name__}"
        )
    # Accept the option spelling of the CLI too (batch-size as well as batch_size).
    options: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_") if isinstance(key, str) else key
        if name in options:
            raise ConfigError(f"{path} gives {brief(name, 30)} twice; keep one")
        options[name] = value
    options.pop("config", None)
    return options


def resolve_config(
    cli_values: dict[str, Any], explicit: set[str], config_file: str | Path | None = None
) -> TrainConfig:
    """Defaults < preset < config file < options given on the command line.

    Messages name a value by where it came from: ``c.yaml: epochs`` or ``--epochs``.
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
    config.validate(labels)
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


# -- RUN/config.json ---------------------------------------------------------------------------


def check_run_config(data: Any, path: str | os.PathLike[str]) -> dict[str, Any]:
    """Validate a whole ``RUN/config.json`` document; RunError with one sentence otherwise.

    The ``config`` section goes through TrainConfig's rules (types, ranges, choices; keys it
    lacks take their defaults, without the memory check: a run trained elsewhere is readable
    here; names are not checked against the registries, so a run stays readable without the
    plugin that trained it). ``model`` needs arch, num_classes, input_shape (3 positive ints)
    and default_layer, and may hold width, kwargs (the model's build arguments) and reshape;
    ``data`` needs classes (one name per class) and mean/std (finite, std > 0).
    Returns the document with its ``config`` section complete (every TrainConfig field).
    """
    where = str(path)

    def fail(problem: str) -> RunError:
        return RunError(f"{where}: {problem}; the run directory is damaged")

    if not isinstance(data, dict):
        raise fail(f"the document must be a JSON object, got {type(data).__name__}")
    sections = {}
    for name in ("config", "model", "data"):
        section = data.get(name)
        if not isinstance(section, dict) or not section:
            got = "nothing" if section is None else describe(section)
            raise fail(f"the {name} section must be a non-empty object, got {got}")
        sections[name] = section
    version = data.get("format_version", 0)
    if isinstance(version, bool) or not isinstance(version, int):
        raise fail(f"format_version must be int, got {describe(version)}")

    try:
        labels = {name: f"config.{name}" for name in FIELDS}
        config = TrainConfig.from_dict(sections["config"], source="config", labels=labels)
        config.validate(labels, check_memory=False, check_names=False)
    except ConfigError as e:
        raise fail(str(e)) from None

    model = sections["model"]
    _run_text(fail, model, "model.arch")
    if "width" in model:  # explainkit's ResNets; other models have none
        _run_int(fail, model, "model.width", 1, WIDTH_MAX)
    kwargs = model.get("kwargs", {})
    if not isinstance(kwargs, dict) or not all(
        isinstance(k, str) and (v is None or isinstance(v, (str, bool, int, float)))
        for k, v in kwargs.items()
    ):
        raise fail(f"model.kwargs must map names to plain values, got {describe(kwargs)}")
    if "reshape" in model:
        _run_text(fail, model, "model.reshape")
    num_classes = _run_int(fail, model, "model.num_classes", 1, 1_000_000)
    shape = model.get("input_shape")
    if (
        not isinstance(shape, list)
        or len(shape) != 3
        or not all(_is_int(v) and 1 <= v <= IMAGE_SIZE_MAX for v in shape)
    ):
        raise fail(
            f"model.input_shape must be a list of 3 ints from 1 to {IMAGE_SIZE_MAX}, "
            f"got {describe(shape)}"
        )
    _run_text(fail, model, "model.default_layer")

    info = sections["data"]
    classes = info.get("classes")
    if not isinstance(classes, list) or not classes:
        raise fail(f"data.classes must be a non-empty list of names, got {describe(classes)}")
    if not all(isinstance(c, str) for c in classes):
        bad = next(c for c in classes if not isinstance(c, str))
        raise fail(f"data.classes must hold names (str), got {describe(bad)}")
    if len(classes) != num_classes:
        raise fail(
            f"data.classes names {len(classes)} classes but model.num_classes is {num_classes}"
        )
    for key in ("mean", "std"):
        values = info.get(key)
        if (
            not isinstance(values, list)
            or len(values) != shape[0]
            or not all(_is_number(v) and math.isfinite(v) for v in values)
        ):
            raise fail(
                f"data.{key} must be a list of {shape[0]} finite numbers, got {describe(values)}"
            )
    if not all(v > 0 for v in info["std"]):
        raise fail(f"data.std must be positive, got {brief(info['std'])}")
    if "dataset" in info:
        _run_text(fail, info, "data.dataset")
    for key in ("num_train", "num_eval"):
        if key in info:
            _run_int(fail, info, f"data.{key}", 0, 10**12)
    if "environment" in data and not isinstance(data["environment"], dict):
        raise fail(f"environment must be an object, got {describe(data['environment'])}")
    if "world_size" in data:
        _run_int(fail, data, "world_size", 1, 1_000_000)
    return {**data, "config": config.to_dict()}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _run_int(
    fail: Callable[[str], RunError], section: dict[str, Any], key: str, low: int, high: int
) -> int:
    value = section.get(key.rsplit(".", 1)[-1])
    if not _is_int(value) or not low <= value <= high:
        raise fail(f"{key} must be an int from {low} to {high}, got {describe(value)}")
    return value


def _run_text(fail: Callable[[str], RunError], section: dict[str, Any], key: str) -> str:
    value = section.get(key.rsplit(".", 1)[-1])
    if not isinstance(value, str) or not value or len(value) > 200:
        raise fail(f"{key} must be a name (non-empty str), got {describe(value)}")
    return value
