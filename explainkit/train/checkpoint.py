"""Checkpoints: plain tensors and values, written atomically, read with ``weights_only=True``.

Never fall back to full unpickling: a checkpoint that ``weights_only`` refuses is refused.

Layout (``format_version`` 2); each key says what it holds, as in timm:

    model           the model spec: arch (its registered name), kwargs (its build arguments,
                    e.g. width), num_classes, input_shape, default_layer, reshape; runs
                    before the registry recorded width instead of kwargs, which still loads
    state_dict      the raw training weights, always
    state_dict_ema  the moving average of the weights; only in runs with ``--ema``, where it
                    is what was evaluated and stored (see :func:`eval_state_dict`)
    ema_updates     the moving average's update count; only with ``state_dict_ema``
    optimizer, scheduler, scaler    their state_dicts, for resuming
    epoch, eval_acc, best_acc, best_epoch
    rng             every random state (explainkit.train.state)
    config, classes, mean, std

Version 1 was a pre-release's layout; :func:`load_checkpoint` refuses it.
"""

from __future__ import annotations

import io
import math
import pickle
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from explainkit import __version__
from explainkit.arguments import plain_kwargs
from explainkit.atomic import write_atomic
from explainkit.errors import CheckpointError, ConfigError, RunError, first_line
from explainkit.registries import Registries, spec_kwargs
from explainkit.rundir import RunDir
from explainkit.trust import check_trusted

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


def load_checkpoint(path: str | Path, registries: Registries) -> dict[str, Any]:
    """Load and validate an explainkit checkpoint on the CPU, refusing anything else.

    Validated here, so that a bad file is one CheckpointError now and not a traceback later:
    the format and its version, the epoch, the model spec (arch, num_classes, width, ...),
    that ``state_dict`` (and ``state_dict_ema``) are finite tensors of exactly the shapes
    the described model has (built on the meta device: no memory, a few milliseconds), and
    the types of the other fields a resume reads. The model is looked up in ``registries``.
    """
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
    except PermissionError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror}; check its permissions") from e
    except Exception as e:  # whatever the parser meets in a damaged file (OSError(22) too)
        raise _unreadable(path, e) from e
    fmt = data.get("format") if isinstance(data, dict) else None
    if not isinstance(fmt, str) or fmt != FORMAT_NAME:
        raise CheckpointError(
            f"{path} is not an explainkit checkpoint (a plain state_dict or another "
            "library's file); train with `explainkit train` to get one"
        )
    version = data.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise _damaged(path, f"its format_version is {_describe(version)}, not a version number")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format v{version}, newer than this explainkit "
            f"(v{FORMAT_VERSION}); upgrade explainkit"
        )
    if version < FORMAT_VERSION:
        raise CheckpointError(
            f"{path} was written by a pre-release of explainkit (checkpoint format v{version}); "
            "train the run again with this version"
        )
    missing = [key for key in ("model", "state_dict", "epoch") if key not in data]
    if missing:
        raise _damaged(path, f"it lacks {', '.join(map(repr, missing))}")
    try:
        _validate(data, registries, str(path))
    except _Unavailable as e:
        raise CheckpointError(f"{path} cannot be rebuilt here: {e}") from None
    except _Damage as e:
        raise _damaged(path, str(e)) from None
    except _CHECK_ERRORS as e:  # a value too odd for the checks themselves is damage too
        raise _damaged(path, first_line(e, limit=120) or type(e).__name__) from e
    return data


def read_epoch(path: str | Path) -> int:
    """The epoch a checkpoint file records, read without building its model (``inspect`` of
    a run whose model needs consent to import); CheckpointError when there is none."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # damaged, unreadable, not ours
        raise _unreadable(Path(path), e) from e
    epoch = data.get("epoch") if isinstance(data, dict) else None
    if not _is_int(epoch) or epoch < 1:
        raise _damaged(Path(path), f"its epoch is {_describe(epoch)}")
    return epoch


_REMEDY = "use another epoch's checkpoint or train the run again"
_CHECK_ERRORS = (TypeError, ValueError, OverflowError, RuntimeError, KeyError, IndexError)


class _Damage(Exception):
    """What is wrong with a checkpoint that is ours, as a phrase; becomes a CheckpointError."""


class _Unavailable(Exception):
    """A sound checkpoint whose model cannot be built here (its plugin or module is missing)."""


def _damaged(path: Path, detail: str) -> CheckpointError:
    return CheckpointError(f"{path} is damaged: {detail}; {_REMEDY}")


def _unreadable(path: Path, e: BaseException) -> CheckpointError:
    return CheckpointError(
        f"{path} cannot be read as a checkpoint (truncated or damaged: "
        f"{first_line(e, limit=160) or type(e).__name__}); {_REMEDY}"
    )


def _describe(value: Any) -> str:
    """A value in a few words, for a message."""
    if isinstance(value, torch.Tensor):
        return f"a {str(value.dtype).removeprefix('torch.')} tensor of shape {list(value.shape)}"
    text = repr(value)
    return text if len(text) <= 40 else f"a {type(value).__name__} ({text[:30]}...)"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def _validate(data: dict[str, Any], registries: Registries, where: str = "the checkpoint") -> None:
    """Check every field a reader or a resume uses (raises ``_Damage``; UntrustedImport for
    a model whose module the user did not consent to import)."""
    epoch = data["epoch"]
    if not _is_int(epoch) or epoch < 1:
        raise _Damage(f"its epoch is {_describe(epoch)}, not a whole number of 1 or more")
    spec = _model_spec(data["model"], registries, where)
    if not isinstance(data["state_dict"], dict):
        raise _Damage(f"its state_dict is {_describe(data['state_dict'])}, not a dict of tensors")
    expected = _expected_weights(spec, registries)
    _check_weights(data["state_dict"], "state_dict", expected, spec)
    ema = data.get("state_dict_ema")
    if ema is not None:
        if not isinstance(ema, dict):
            raise _Damage(f"its state_dict_ema is {_describe(ema)}, not a dict of tensors")
        _check_weights(ema, "state_dict_ema", expected, spec)
        if "ema_updates" not in data:
            raise _Damage("it has state_dict_ema but no ema_updates")
    if "ema_updates" in data and (not _is_int(data["ema_updates"]) or data["ema_updates"] < 0):
        raise _Damage(f"its ema_updates is {_describe(data['ema_updates'])}, not a count")
    best = data.get("best_epoch")
    if best is not None and (not _is_int(best) or not 0 <= best <= epoch):
        raise _Damage(f"its best_epoch is {_describe(best)}, not an epoch in 0..{epoch}")
    for key in ("eval_acc", "best_acc"):
        if data.get(key) is not None and not _is_real(data[key]):
            raise _Damage(f"its {key} is {_describe(data[key])}, not a finite number")
    for key in ("optimizer", "scheduler", "scaler", "rng", "config"):
        if key in data and not isinstance(data[key], dict):
            raise _Damage(f"its {key} is {_describe(data[key])}, not a dict")
    classes = data.get("classes")
    if classes is not None and (
        not isinstance(classes, list | tuple)
        or len(classes) != spec["num_classes"]
        or not all(isinstance(c, str) for c in classes)
    ):
        raise _Damage(
            f"its classes are {_describe(classes)}, not {spec['num_classes']} class names"
        )
    for key in ("mean", "std"):
        values = data.get(key)
        if values is not None and (
            not isinstance(values, list | tuple)
            or not values
            or not all(_is_real(v) for v in values)
            or (key == "std" and min(values) <= 0)
        ):
            raise _Damage(f"its {key} is {_describe(values)}, not a list of finite numbers")


def _model_spec(spec: Any, registries: Registries, where: str) -> dict[str, Any]:
    """The model spec, checked: arch a registered name (an import path only with consent),
    num_classes (and width, where there is one) positive integers, kwargs a mapping of names
    to plain values."""
    if not isinstance(spec, dict):
        raise _Damage(f"its model spec is {_describe(spec)}, not a dict")
    arch = spec.get("arch")
    if not isinstance(arch, str):
        raise _Damage(f"its model arch is {_describe(arch)}, not a model name")
    check_trusted(arch, where)  # before the lookup: that would import the module
    try:
        registries.model_entry(arch)
    except ConfigError as e:
        # Not damage: the plugin or module that provides the model may just be missing here.
        prefix = f"unknown model {arch!r}"
        if not str(e).startswith(prefix):
            raise _Unavailable(str(e)) from None
        raise _Unavailable(
            f"its model arch {arch!r} is unknown{str(e).removeprefix(prefix)} (a plugin's "
            "model needs that plugin: --plugins-dir, EXPLAINKIT_PLUGINS_DIR or an installed "
            "package)"
        ) from None
    keys = ("num_classes", "width") if "width" in spec or "kwargs" not in spec else ("num_classes",)
    for key in keys:
        if not _is_int(spec.get(key)) or spec[key] < 1:
            raise _Damage(f"its model {key} is {_describe(spec.get(key))}, not 1 or more")
    kwargs = spec.get("kwargs", {})
    if not isinstance(kwargs, dict) or not plain_kwargs(kwargs):
        raise _Damage(f"its model kwargs are {_describe(kwargs)}, not names and plain values")
    if "width" in spec and spec_kwargs(spec).get("width", spec["width"]) != spec["width"]:
        raise _Damage(f"its model width {spec['width']} differs from its kwargs {kwargs}")
    shape = spec.get("input_shape")
    if shape is not None and (
        not isinstance(shape, list | tuple)
        or len(shape) != 3
        or not all(_is_int(v) and v >= 1 for v in shape)
    ):
        raise _Damage(f"its model input_shape is {_describe(shape)}, not [C, H, W]")
    if spec.get("default_layer") is not None and not isinstance(spec["default_layer"], str):
        raise _Damage(f"its default_layer is {_describe(spec['default_layer'])}, not a name")
    return spec


def describe_model(spec: dict[str, Any]) -> str:
    """``resnet18-s8 (width 8, 3 classes)``: a model spec in a few words, for messages."""
    parts = [f"{k} {v}" for k, v in spec_kwargs(spec).items()]
    parts.append(f"{spec['num_classes']} classes")
    return f"{spec['arch']} ({', '.join(parts)})"


def build_from_spec(spec: dict[str, Any], registries: Registries) -> nn.Module:
    """An untrained model as a spec describes it, built through the model registry."""
    return registries.build_model(spec["arch"], spec["num_classes"], **spec_kwargs(spec))


def _expected_weights(spec: dict[str, Any], registries: Registries) -> dict[str, torch.Tensor]:
    """The state_dict the described model has, built on the meta device (no memory), or on
    the CPU for the few architectures that compute their shapes from data."""
    try:
        try:
            with torch.device("meta"):
                model = build_from_spec(spec, registries)
        except NotImplementedError:  # "Cannot copy out of meta tensor" (torchvision RegNet)
            model = build_from_spec(spec, registries)
    except (RuntimeError, ValueError, TypeError, OverflowError, MemoryError, ConfigError) as e:
        raise _Damage(f"its model spec does not build ({first_line(e, limit=120)})") from e
    return model.state_dict()


def key_mismatch(expected: Iterable[Any], given: Iterable[Any]) -> str | None:
    """How a state_dict's keys differ from a model's, in words (None when they match):
    ``lacks 'fc.weight' (and 3 more differences)``."""
    expected, given = list(expected), list(given)
    missing = [k for k in expected if k not in set(given)]
    extra = [k for k in given if k not in set(expected)]
    if not missing and not extra:
        return None
    what = f"lacks {missing[0]!r}" if missing else f"has the unknown key {extra[0]!r}"
    count = len(missing) + len(extra)
    return what + (f" (and {count - 1} more differences)" if count > 1 else "")


def _check_weights(
    weights: dict[Any, Any], name: str, expected: dict[str, torch.Tensor], spec: dict[str, Any]
) -> None:
    """Exactly the model's keys; finite, plain CPU tensors of its shapes and kinds."""
    model = describe_model(spec)
    mismatch = key_mismatch(expected, weights)
    if mismatch:
        raise _Damage(f"its {name} does not fit model {model}: it {mismatch}")
    for key, want in expected.items():
        t = weights[key]
        if not isinstance(t, torch.Tensor):
            raise _Damage(f"its {name}[{key!r}] is {_describe(t)}, not a tensor")
        if t.layout != torch.strided or t.is_meta or t.is_quantized or t.device.type != "cpu":
            raise _Damage(f"its {name}[{key!r}] is not a plain CPU tensor")
        if t.shape != want.shape:
            raise _Damage(
                f"its {name}[{key!r}] has shape {list(t.shape)}, but model {model} needs "
                f"{list(want.shape)}"
            )
        if want.is_floating_point() != t.is_floating_point() or t.is_complex():
            raise _Damage(
                f"its {name}[{key!r}] is {str(t.dtype).removeprefix('torch.')}, "
                f"not {str(want.dtype).removeprefix('torch.')}"
            )
        if t.dtype == torch.bool and want.dtype != torch.bool:
            raise _Damage(f"its {name}[{key!r}] is bool, not a number")
        if t.is_floating_point() and not _all_finite(t):
            raise _Damage(f"its {name}[{key!r}] holds NaN or infinity")


def _all_finite(t: torch.Tensor) -> bool:
    """True when every value is finite: a finite sum proves it (fast); else look closer."""
    if t.numel() == 0 or bool(torch.isfinite(t.sum())):
        return True
    return bool(torch.isfinite(t).all())


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


def resolve_checkpoint(
    path_or_run: str | Path, registries: Registries, epoch: int | None = None
) -> Path:
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
        if candidate.is_file() and load_checkpoint(candidate, registries)["epoch"] == epoch:
            return candidate
    listed = ", ".join(str(e) for e in available) or "none"
    raise CheckpointError(f"no checkpoint for epoch {epoch} in {folder}; saved epochs: {listed}")


def model_from_checkpoint(
    data: dict[str, Any], registries: Registries, device: str | torch.device = "cpu"
) -> nn.Module:
    """Build the model a checkpoint describes with the weights it evaluated, in eval mode.

    ``data`` comes from :func:`load_checkpoint`, which has checked that the weights fit; a
    dict from anywhere else is checked here, and refused with a CheckpointError. The model is
    built through ``registries`` from the spec's ``arch`` and
    ``kwargs``, so a plugin's model needs its plugin loaded.
    """
    try:
        _validate(data, registries)
    except _Unavailable as e:
        raise CheckpointError(f"the checkpoint's model cannot be rebuilt here: {e}") from None
    except _Damage as e:
        raise CheckpointError(f"the checkpoint is damaged: {e}; {_REMEDY}") from None
    except _CHECK_ERRORS as e:
        raise CheckpointError(
            f"the checkpoint is not what load_checkpoint returns (missing or odd: "
            f"{first_line(e, limit=80) or type(e).__name__}); load it with load_checkpoint"
        ) from e
    spec = data["model"]
    model = build_from_spec(spec, registries)
    try:
        model.load_state_dict(eval_state_dict(data))
    except RuntimeError as e:
        raise CheckpointError(
            f"checkpoint weights do not fit model {describe_model(spec)}: "
            f"{first_line(e, limit=160)}; {_REMEDY}"
        ) from e
    layer = spec.get("default_layer")
    if layer and not hasattr(model, "default_target_layer"):
        # explainkit.explain.layers.target_layer(model) then answers for any architecture.
        model.default_target_layer = layer
    from explainkit.explain.inputs import accept_rgb

    return accept_rgb(model).to(device).eval()  # a grayscale model takes the RGB images


def live_model_at(
    module: nn.Module, path_or_run: str | Path, registries: Registries, epoch: int | None = None
) -> nn.Module:
    """A copy of ``module`` holding the weights a run's checkpoint of ``epoch`` evaluated, in
    eval mode: a run written from a live module (``explainkit.evaluate(model, ...)``) whose
    class cannot be rebuilt from its recorded architecture. ``module`` is not changed.

    Raises:
        CheckpointError: The file is not an explainkit checkpoint, or its weights do not fit
            ``module`` (one sentence).
    """
    import copy

    from explainkit.explain.inputs import accept_rgb

    path = resolve_checkpoint(path_or_run, registries, epoch)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged or foreign file: what load_checkpoint would say
        raise _unreadable(path, e) from e
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME or "state_dict" not in data:
        raise CheckpointError(f"{path} is not an explainkit checkpoint")
    model = copy.deepcopy(module)
    try:
        model.load_state_dict(eval_state_dict(data))
    except (RuntimeError, TypeError, AttributeError) as e:
        raise CheckpointError(
            f"the {type(module).__name__} given as model= does not fit the weights of {path} "
            f"({first_line(e, limit=120)}); pass the module the run was written from"
        ) from None
    spec = data.get("model") if isinstance(data.get("model"), dict) else {}
    layer = spec.get("default_layer")
    if isinstance(layer, str) and layer and not hasattr(model, "default_target_layer"):
        model.default_target_layer = layer
    return accept_rgb(model).eval()


def load_model(
    path_or_run: str | Path,
    registries: Registries,
    epoch: int | None = None,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """Load a model from a checkpoint file or a run directory (default: best epoch)."""
    path = resolve_checkpoint(path_or_run, registries, epoch)
    return model_from_checkpoint(load_checkpoint(path, registries), registries, device)
