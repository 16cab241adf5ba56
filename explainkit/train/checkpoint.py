"""Checkpoints: plain tensors and values, written atomically, read with ``weights_only=True``.

Never fall back to full unpickling: a checkpoint that ``weights_only`` refuses is refused.

Layout (``format_version`` 2); each key says what it holds, as in timm:

    model           the model spec: arch, width, num_classes, input_shape, default_layer
    state_dict      the raw training weights, always
    state_dict_ema  the moving average of the weights; only in runs with ``--ema``, where it
                    is what was evaluated and stored (see :func:`eval_state_dict`)
    ema_updates     the moving average's update count; only with ``state_dict_ema``
    optimizer, scheduler, scaler    their state_dicts, for resuming
    epoch, eval_acc, best_acc, best_epoch
    rng             every random state (explainkit.train.state)
    config, classes, mean, std

Version 1 kept the evaluated weights under ``state_dict`` (the average, with EMA) and the raw
ones under ``train_state_dict``; :func:`load_checkpoint` translates it to version 2.
"""

from __future__ import annotations

import io
import pickle
import re
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from explainkit import __version__
from explainkit.atomic import write_atomic
from explainkit.errors import CheckpointError, RunError
from explainkit.rundir import RunDir

FORMAT_NAME = "explainkit-checkpoint"
FORMAT_VERSION = 2
_EPOCH_FILE = re.compile(r"^epoch_(\d{3,})\.pt$")


def save_checkpoint(paths: str | Path | Sequence[str | Path], payload: dict[str, Any]) -> None:
    """Write ``payload`` atomically to each path in order (temp file, fsync, rename).

    The payload is serialized once however many files get it (epoch file, best.pt, last.pt).
    """
    paths = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
    payload = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **payload}
    payload.setdefault("explainkit_version", __version__)
    # Serialize in memory first: torch.save hides a failed write (disk full) behind a
    # RuntimeError, while a plain write raises an OSError that we can name.
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    for path in paths:
        fault = f"checkpoint-write:{payload.get('epoch')}:{path.name}"
        write_atomic(path, buffer.getbuffer(), CheckpointError, fault=fault)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load and validate an explainkit checkpoint on the CPU, refusing anything else."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            # The reason first: the CLI shows the first 200 characters of a message.
            f"{path} was refused: it holds objects other than tensors and plain values; "
            "explainkit never unpickles those (a pickle can run code); is it another tool's file?"
        ) from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(
            f"{path} cannot be read as a checkpoint (truncated or damaged): "
            f"{str(e).splitlines()[0][:160] if str(e) else type(e).__name__}"
        ) from e
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        raise CheckpointError(
            f"{path} is not an explainkit checkpoint (a plain state_dict or another "
            "library's file); train with `explainkit train` to get one"
        )
    version = data.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format v{version}, newer than this explainkit "
            f"(v{FORMAT_VERSION}); upgrade explainkit"
        )
    for key in ("model", "state_dict", "epoch"):
        if key not in data:
            raise CheckpointError(f"{path} lacks {key!r}; the checkpoint is damaged")
    if version < 2:
        _upgrade_v1(data)
    return data


def _upgrade_v1(data: dict[str, Any]) -> None:
    """Rename v1 keys in place: with EMA, v1 kept the average under ``state_dict`` and the raw
    weights under ``train_state_dict``; without EMA, ``state_dict`` was already the raw weights."""
    raw = data.pop("train_state_dict", None)
    if raw is not None:
        data["state_dict_ema"] = data["state_dict"]
        data["state_dict"] = raw
    else:
        data.pop("ema_updates", None)  # always 0 without EMA
    data["format_version"] = FORMAT_VERSION  # the dict now has the current layout


def eval_state_dict(data: dict[str, Any]) -> dict[str, Any]:
    """The weights that were evaluated and stored: the moving average when the run had one."""
    ema = data.get("state_dict_ema")
    return ema if ema is not None else data["state_dict"]


def list_checkpoints(run_dir: str | Path) -> dict[int, Path]:
    """Map epoch -> ``checkpoints/epoch_NNN.pt`` for every per-epoch checkpoint present."""
    found: dict[int, Path] = {}
    folder = RunDir(run_dir).checkpoints
    if folder.is_dir():
        for p in folder.iterdir():
            m = _EPOCH_FILE.match(p.name)
            if m:
                found[int(m.group(1))] = p
    return dict(sorted(found.items()))


def prune_checkpoints(run_dir: str | Path, keep: int | None, best_epoch: int) -> None:
    """Delete epoch checkpoints older than the last ``keep``, sparing epoch 1 and the best."""
    if keep is None:
        return
    saved = list_checkpoints(run_dir)
    recent = set(sorted(saved)[-keep:])
    for epoch, path in saved.items():
        if epoch != 1 and epoch != best_epoch and epoch not in recent:
            path.unlink(missing_ok=True)


def resolve_checkpoint(path_or_run: str | Path, epoch: int | None = None) -> Path:
    """A checkpoint file, or a run dir plus epoch (None: best.pt, else last.pt)."""
    path = Path(path_or_run)
    if path.is_file():
        return path
    if not path.exists():
        raise RunError(f"{path} does not exist")
    run = RunDir(path)
    folder = run.checkpoints
    if not folder.is_dir():
        raise RunError(f"{path} has no checkpoints/ folder; is it an explainkit run directory?")
    named = [run.checkpoint("best"), run.checkpoint("last")]
    if epoch is None:
        for candidate in named:
            if candidate.is_file():
                return candidate
        raise CheckpointError(f"{folder} holds no best.pt or last.pt")
    available = list_checkpoints(path)
    if epoch in available:
        return available[epoch]
    for candidate in named:
        if candidate.is_file() and load_checkpoint(candidate)["epoch"] == epoch:
            return candidate
    listed = ", ".join(str(e) for e in available) or "none"
    raise CheckpointError(f"no checkpoint for epoch {epoch} in {folder}; saved epochs: {listed}")


def model_from_checkpoint(data: dict[str, Any], device: str | torch.device = "cpu") -> nn.Module:
    """Build the model a checkpoint describes with the weights it evaluated, in eval mode."""
    from explainkit.models import build_model

    spec = data["model"]
    model = build_model(spec["arch"], num_classes=spec["num_classes"], width=spec["width"])
    try:
        model.load_state_dict(eval_state_dict(data))
    except RuntimeError as e:
        raise CheckpointError(
            f"checkpoint weights do not fit model {spec['arch']} (width {spec['width']}): "
            f"{str(e).splitlines()[0][:160]}"
        ) from e
    return model.to(device).eval()


def load_model(
    path_or_run: str | Path, epoch: int | None = None, device: str | torch.device = "cpu"
) -> nn.Module:
    """Load a model from a checkpoint file or a run directory (default: best epoch)."""
    return model_from_checkpoint(load_checkpoint(resolve_checkpoint(path_or_run, epoch)), device)
