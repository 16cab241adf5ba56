"""The weights a run starts from (``--weights``), matched to its model key by key.

Three sources, told apart by what ``--weights`` names:

* a file: a plain state_dict (``torch.save(model.state_dict(), path)``; a ``{"state_dict":
  ...}`` or ``{"model": ...}`` wrapper is opened), or an explainkit checkpoint, whose
  evaluated weights (the moving average when the run had one) are used;
* a name such as ``IMAGENET1K_V1`` or ``ResNet50_Weights.IMAGENET1K_V1``: the model's named
  pretrained weights (torchvision's), which are downloaded on first use.

Files are read with ``torch.load(..., weights_only=True)``: nothing is unpickled. Keys must
match the model's exactly (a ``module.`` prefix left by DataParallel, or ``_orig_mod.`` by
torch.compile, is stripped first). The one exception is the classifier head: when the
weights were trained for another number of classes, their head is skipped (with a note) and
the model's freshly initialized head is trained instead, which is fine-tuning.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from explainkit.errors import CheckpointError, ConfigError, ExplainkitError, brief, first_line
from explainkit.hookspecs import ModelEntry
from explainkit.registries import Registries

__all__ = ["WEIGHTS_NAME", "InitialWeights", "apply_weights", "read_weights"]

# IMAGENET1K_V1, DEFAULT, ResNet50_Weights.IMAGENET1K_V1: torchvision's weights names.
WEIGHTS_NAME = re.compile(r"^([A-Za-z][A-Za-z0-9_]*_Weights\.)?[A-Z][A-Z0-9_]*$")
PREFIXES = ("module.", "_orig_mod.")  # DataParallel / DDP, torch.compile


@dataclass
class InitialWeights:
    """Weights to start a run from.

    Attributes:
        state_dict: Name -> tensor, on the CPU.
        source: How messages name them (``file w.pt``, ``torchvision:resnet18 weights
            IMAGENET1K_V1``).
        mean, std: The normalization they were trained with, when known (the model's
            pretrained normalization, an explainkit run's statistics); None: the dataset's.
    """

    state_dict: dict[str, torch.Tensor]
    source: str
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    image_size: int | None = None  # the side an explainkit checkpoint's run used, when known


def read_weights(value: str, entry: ModelEntry, registries: Registries) -> InitialWeights:
    """The weights ``--weights value`` names for the model ``entry`` (an explainkit checkpoint
    is checked against the model it records, looked up in ``registries``).

    Raises:
        ConfigError: No such file and no such weights name for this model.
        CheckpointError: The file is not a state_dict or cannot be read safely.
        ExplainkitError: Named weights could not be downloaded (one sentence suggesting a
            local file).
    """
    path = Path(value).expanduser()
    if path.is_file():
        return _read_file(path, entry, registries)
    if path.exists():
        raise ConfigError(f"--weights {path} is not a regular file; give a state_dict file")
    if not WEIGHTS_NAME.match(value):
        raise ConfigError(
            f"--weights {brief(value)} is neither a file nor a weights name such as "
            "IMAGENET1K_V1; check the path"
        )
    if entry.weights is None:
        raise ConfigError(
            f"--weights {value} names pretrained weights, but model {entry.name} has no named "
            "weights; pass a state_dict file or an explainkit checkpoint"
        )
    try:
        state = entry.weights(value)
    except ExplainkitError:
        raise
    except KeyError:
        raise ConfigError(f"model {entry.name} has no weights named {value!r}") from None
    except OSError as e:  # urllib's URLError, a full disk for torch hub's cache
        reason = getattr(e, "reason", None) or e.strerror or first_line(e, limit=80) or "no reason"
        raise ExplainkitError(
            f"cannot download the {value} weights of {entry.name} ({reason}); without a "
            "network, download them where there is one and pass the saved file: --weights PATH"
        ) from e
    source = f"{entry.name} weights {value}"
    return InitialWeights(_tensors(state, source), source, _stats(entry.mean), _stats(entry.std))


def _stats(values: Any) -> tuple[float, ...] | None:
    return tuple(float(v) for v in values) if values is not None else None


def _read_file(path: Path, entry: ModelEntry, registries: Registries) -> InitialWeights:
    from explainkit.train.checkpoint import FORMAT_NAME, eval_state_dict, load_checkpoint

    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"--weights {path} was refused: it holds objects other than tensors and plain "
            "values, and explainkit never unpickles those; save model.state_dict() instead"
        ) from e
    except PermissionError as e:
        raise CheckpointError(f"cannot read --weights {path}: {e.strerror}") from e
    except Exception as e:  # whatever the reader meets in a damaged file
        raise CheckpointError(
            f"--weights {path} cannot be read ({first_line(e, limit=120) or type(e).__name__}); "
            "give a file saved with torch.save(model.state_dict(), path)"
        ) from e
    if isinstance(data, dict) and data.get("format") == FORMAT_NAME:
        checkpoint = load_checkpoint(path, registries)  # validated
        shape = checkpoint["model"].get("input_shape")
        return InitialWeights(
            dict(eval_state_dict(checkpoint)),
            f"checkpoint {path}",
            _stats(checkpoint.get("mean")),
            _stats(checkpoint.get("std")),
            int(shape[-1]) if isinstance(shape, list | tuple) and shape else None,
        )
    if isinstance(data, dict):
        for key in ("state_dict", "model"):
            inner = data.get(key)
            if (
                isinstance(inner, dict)
                and inner
                and all(isinstance(v, torch.Tensor) for v in inner.values())
            ):
                data = inner
                break
    source = f"file {path}"
    return InitialWeights(_tensors(data, source), source, _stats(entry.mean), _stats(entry.std))


def _tensors(data: Any, source: str) -> dict[str, torch.Tensor]:
    """``data`` as a state_dict (str -> tensor) with a common wrapper prefix removed."""
    if isinstance(data, Mapping):
        data = dict(data)
    if (
        not isinstance(data, dict)
        or not data
        or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items())
    ):
        raise CheckpointError(
            f"--weights {source} is not a state_dict (a dict of names to tensors); save "
            "model.state_dict()"
        )
    for key, t in data.items():
        kind = _odd_kind(t)
        if kind:
            raise CheckpointError(
                f"--weights {source} holds {brief(key, 40)} as {kind}, not a plain tensor of "
                "numbers; save model.state_dict() of a model on the CPU or a GPU"
            )
    for prefix in PREFIXES:
        if all(k.startswith(prefix) for k in data):
            data = {k[len(prefix) :]: v for k, v in data.items()}
    return data


def _odd_kind(t: torch.Tensor) -> str | None:
    """What keeps ``t`` from being copied into a model's weights, in words (None: nothing):
    a sparse or other non-strided layout, a meta tensor (no values), a quantized one."""
    if t.layout != torch.strided:
        return f"a {str(t.layout).removeprefix('torch.')} tensor"
    if t.is_meta:
        return "a meta tensor (shapes without values)"
    if t.is_quantized:
        return "a quantized tensor"
    if t.is_nested:
        return "a nested tensor"
    return None


def _kind_mismatch(theirs: torch.Tensor, mine: torch.Tensor) -> bool:
    """Whether a weight's dtype cannot stand for the model's: numbers of another kind (an
    integer or bool tensor for a float weight, a float for a count), or complex."""
    if theirs.is_complex() or theirs.is_floating_point() != mine.is_floating_point():
        return True
    return theirs.dtype == torch.bool and mine.dtype != torch.bool


def apply_weights(
    model: nn.Module, weights: InitialWeights, num_classes: int, name: str
) -> list[str]:
    """Copy ``weights`` into ``model`` (named ``name`` in messages); the notes to show.

    Every key must match, with the same shape, except a classifier head trained for another
    number of classes (its first dimension): that one is skipped and stays as initialized.

    Raises:
        ConfigError: A key is missing or extra, or a tensor other than the head has another
            shape (the weights are of another architecture).
    """
    from explainkit.train.checkpoint import key_mismatch

    own = model.state_dict()
    given = weights.state_dict
    mismatch = key_mismatch(own, given)
    if mismatch:
        raise ConfigError(
            f"--weights {weights.source} do not fit model {name}: the weights {mismatch}; "
            "give weights of the same architecture"
        )
    head = []
    for key, mine in own.items():
        theirs = given[key]
        if _kind_mismatch(theirs, mine):
            raise ConfigError(
                f"--weights {weights.source} do not fit model {name}: {key!r} is "
                f"{str(theirs.dtype).removeprefix('torch.')} there but "
                f"{str(mine.dtype).removeprefix('torch.')} here; give the model's own weights"
            )
        if theirs.shape == mine.shape:
            continue
        if (
            mine.dim() >= 1
            and theirs.dim() == mine.dim()
            and mine.shape[0] == num_classes
            and theirs.shape[1:] == mine.shape[1:]
        ):
            head.append(key)
            continue
        raise ConfigError(
            f"--weights {weights.source} do not fit model {name}: {key!r} has shape "
            f"{list(theirs.shape)} there but {list(mine.shape)} here; give weights of the same "
            "architecture"
        )
    counts = {int(given[k].shape[0]) for k in head}
    if len(counts) > 1:
        raise ConfigError(
            f"--weights {weights.source} do not fit model {name}: {', '.join(head)} differ in "
            "shape from the model's in more than the class count"
        )
    try:
        result = model.load_state_dict(
            {k: v for k, v in given.items() if k not in head}, strict=False
        )
    except (RuntimeError, ValueError, TypeError) as e:  # whatever the checks above missed
        raise ConfigError(
            f"--weights {weights.source} cannot be copied into model {name} "
            f"({first_line(e, limit=120) or type(e).__name__}); give the model's own weights"
        ) from e
    assert not result.unexpected_keys and sorted(result.missing_keys) == sorted(head)
    notes = [f"weights: {weights.source} ({len(given) - len(head)} tensors)"]
    if head:
        notes.append(
            f"weights: the classifier head ({', '.join(head)}) was trained for "
            f"{counts.pop()} classes and this run has {num_classes}; it is skipped and "
            "trained from a fresh initialization"
        )
    return notes
