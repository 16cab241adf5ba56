"""TrainConfig: the one source of truth for training options.

The CLI options of ``explainkit train``, config files (JSON or YAML), ``RUN/config.json`` and
the config stored in checkpoints are all derived from this dataclass's fields and metadata.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from explainkit.errors import ExplainkitError

DATASET_CHOICES = ("cifar10", "shapes", "folder")
MODEL_CHOICES = ("resnet18-s8", "resnet18")


# Named bundles of options, applied under the config file and the command line.
# "default" is the best recipe measured (docs/training.md); "seed" is the seed project's plain one.
PRESETS: dict[str, dict[str, Any]] = {
    "default": {},  # the field defaults below
    "seed": {"label_smoothing": 0.0, "ema": 0.0, "tta": False},
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
    """A config file or option value is invalid."""


def _opt(default: Any, help: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class TrainConfig:
    """Everything that defines a training run; written to ``RUN/config.json``."""

    preset: str = _opt(
        "default",
        "Recipe preset: default (best measured) or seed (the seed's plain recipe).",
        choices=tuple(PRESETS),
    )
    dataset: str = _opt("cifar10", "Dataset to train on.", choices=DATASET_CHOICES)
    data_dir: str | None = _opt(
        None, "Folder with the dataset (cifar10: contains cifar-10-batches-py; folder: class dirs)."
    )
    image_size: int = _opt(32, "Image side in pixels (folder datasets are resized to it).")
    model: str = _opt("resnet18-s8", "Model architecture.", choices=MODEL_CHOICES)
    width: int = _opt(64, "Channels of the first stage (64 = full ResNet18; tests use 8 or 16).")
    epochs: int = _opt(20, "Number of epochs.")
    batch_size: int = _opt(128, "Images per optimizer step (per process under torchrun).")
    lr: float = _opt(0.1, "Peak learning rate of the one-cycle schedule.")
    momentum: float = _opt(0.9, "SGD momentum.")
    nesterov: bool = _opt(True, "Use Nesterov momentum.")
    weight_decay: float = _opt(5e-4, "SGD weight decay.")
    schedule: str = _opt("onecycle", "Learning-rate schedule.", choices=("onecycle", "constant"))
    label_smoothing: float = _opt(0.1, "Label smoothing of the cross-entropy loss.")
    crop_padding: int = _opt(4, "RandomCrop padding in pixels (0 disables).")
    flip: bool = _opt(True, "Random horizontal flips.")
    cutout: int = _opt(16, "Cutout square side in pixels (0 disables).")
    seed: int = _opt(0, "Random seed; a CPU run with the same seed is bit-for-bit repeatable.")
    device: str = _opt("auto", "auto, cpu, cuda or cuda:N.")
    amp: bool = _opt(True, "Mixed precision on CUDA (bf16 where supported).")
    channels_last: bool = _opt(True, "channels_last memory format on CUDA.")
    compile: bool = _opt(False, "torch.compile the model.")
    limit_train: int | None = _opt(None, "Use only the first N training images.")
    limit_eval: int | None = _opt(None, "Use only the first N evaluation images.")
    ema: float = _opt(
        0.999,
        "Decay of an exponential moving average of the weights, which is then what is "
        "evaluated and checkpointed (0 disables; e.g. 0.999).",
    )
    tta: bool = _opt(True, "Evaluate on each image and its mirror image, averaging the logits.")
    sync_bn: bool = _opt(False, "Synchronize BatchNorm statistics across GPUs under torchrun.")
    keep_checkpoints: int | None = _opt(
        None, "Keep only the last K epoch checkpoints (plus epoch 1 and best); default all."
    )

    def validate(self) -> None:
        """Raise ConfigError for values that cannot work, naming the option."""
        positive = ("epochs", "batch_size", "width", "image_size")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
        for name in ("limit_train", "limit_eval", "keep_checkpoints"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
        if self.lr <= 0:
            raise ConfigError("--lr must be positive")
        if not 0 <= self.ema < 1:
            raise ConfigError("--ema must be in [0, 1)")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError("--label-smoothing must be in [0, 1)")
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ConfigError(
                    f"--{f.name.replace('_', '-')} must be one of {', '.join(choices)}; "
                    f"got {getattr(self, f.name)!r}"
                )
        if self.dataset == "folder" and not self.data_dir:
            raise ConfigError("--dataset folder needs --data-dir pointing at an ImageFolder tree")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> TrainConfig:
        """Build a config from a mapping, refusing unknown keys (typos must not pass silently)."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"{source}: unknown option(s) {', '.join(unknown)}")
        config = cls(**data)
        _check_types(config, source)
        return config


def _check_types(config: TrainConfig, source: str) -> None:
    for f in fields(config):
        value = getattr(config, f.name)
        default = f.default
        if value is None:
            continue
        expected = type(default) if default is not None else (int if "limit" in f.name else str)
        if f.name in ("keep_checkpoints",):
            expected = int
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            setattr(config, f.name, float(value))
            continue
        if expected is int and isinstance(value, bool):
            raise ConfigError(f"{source}: {f.name} must be an integer, got {value!r}")
        if not isinstance(value, expected):
            raise ConfigError(
                f"{source}: {f.name} must be {expected.__name__}, got {type(value).__name__}"
            )


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a JSON or YAML config file into a dict; YAML needs PyYAML."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not UTF-8 text; write the config as JSON or YAML") from e
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ConfigError("YAML config files need PyYAML: pip install pyyaml") from e
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from e
        except (ValueError, TypeError, RecursionError) as e:  # e.g. a date like 2001-13-01
            raise ConfigError(f"{path} has a YAML value that cannot be read: {e}") from e
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e.msg} at line {e.lineno}") from e
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of option names to values")
    # Accept the option spelling of the CLI too (batch-size as well as batch_size).
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    data.pop("config", None)
    return data


def resolve_config(
    cli_values: dict[str, Any], explicit: set[str], config_file: str | Path | None = None
) -> TrainConfig:
    """Defaults < config file < options given on the command line."""
    from_file: dict[str, Any] = read_config_file(config_file) if config_file is not None else {}
    chosen = {**from_file, **{k: v for k, v in cli_values.items() if k in explicit}}
    preset = chosen.get("preset", cli_values.get("preset", "default"))
    if not isinstance(preset, str) or preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    merged = {**cli_values, **PRESETS[preset], **chosen, "preset": preset}
    config = TrainConfig.from_dict(merged, source=str(config_file or "options"))
    config.validate()
    return config


def refused_on_resume(saved: TrainConfig, values: dict[str, Any]) -> list[str]:
    """The options in ``values`` that differ from the ``saved`` run and are not in RESUMABLE."""
    return [k for k, v in values.items() if k not in RESUMABLE and getattr(saved, k) != v]
