"""Explain any model: a run directory for a model explainkit did not train.

The model is evaluated once on an evaluation set, and the run directory it writes is the one
``explainkit train`` writes for a one-epoch run (config.json, ``checkpoints/epoch_001.pt`` with
best.pt and last.pt, predictions.h5), so every analyzer and ``explainkit report`` read it as
they read a trained run::

    explainkit evaluate --model torchvision:resnet50 --weights r50.pt \\
        --dataset folder --data-dir photos --image-size 224 --out runs/r50

or from Python, for any ``nn.Module``::

    import explainkit

    explainkit.evaluate(model, (images, targets), out="runs/mine", classes=["cat", "dog"])

Nothing is trained, so the history's training columns hold 0 (``train_loss``, ``train_acc``,
``lr``, ``images_per_s``: the store refuses NaN there) and ``train_ce`` is not recorded.

The run records how to rebuild its model (``model.arch`` of config.json and the checkpoint):
a registered name (``--model``, or ``arch=`` from Python) with its build ``kwargs``, or
otherwise an import path ``package.module:factory``. Analyzers that reload the model from the
checkpoint (gradcam, model) need a registered name; an import path is recorded for the reader
and those analyzers refuse the run in one sentence.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from explainkit.config import ConfigError, TrainConfig
from explainkit.errors import ExplainkitError
from explainkit.rundir import RunDir

if TYPE_CHECKING:  # pragma: no cover - typing only
    import numpy as np
    from torch import nn

__all__ = ["ARRAYS", "evaluate", "evaluate_run"]

ARRAYS = "arrays"  # the dataset name a run records for images handed over as arrays


def evaluate_run(
    config: TrainConfig, out: str | Path | None = None, overwrite: bool = False
) -> Path:
    """Evaluate the registered ``config.model`` with ``config.weights`` on the eval split of
    ``config.dataset`` and write a run directory into ``out`` (default ``runs/<time>``).

    Only the fields an evaluation uses matter: model, weights, width, dataset, data_dir,
    image_size, device, batch_size, limit_eval, seed. The run's config records epochs 1 and
    no test-time augmentation, so the stored logits are the model's own outputs.

    Raises:
        ConfigError: No ``weights``, or weights that do not fit the model (a classifier head
            for another number of classes is refused too: nothing would train it).
    """
    from explainkit.data import channel_stats, load_dataset
    from explainkit.models.registry import accepted_kwargs, model_entry
    from explainkit.train.weights import apply_weights, read_weights

    config.epochs, config.tta, config.ema = 1, False, 0.0
    config.validate()
    if not config.weights:
        raise ConfigError(
            "--weights is needed: evaluate explains a model with its weights (a state_dict "
            "file, an explainkit checkpoint or a name such as IMAGENET1K_V1)"
        )
    entry = model_entry(config.model)
    weights = read_weights(config.weights, entry)  # before anything is written
    ds = load_dataset(
        config.dataset, "eval", config.data_dir, config.image_size, config.seed, config.limit_eval
    )
    kwargs = accepted_kwargs(entry.build, {"width": config.width, "image_size": config.image_size})
    model = entry.build(len(ds.classes), **kwargs)
    notes = apply_weights(model, weights, len(ds.classes), entry.name)
    if len(notes) > 1:  # the head was skipped: it would stay random
        raise ConfigError(
            f"--weights {weights.source} have a classifier head for another number of classes "
            f"than the {len(ds.classes)} of {config.dataset}; evaluate needs the head that "
            "was trained for these classes"
        )
    if weights.mean is not None and weights.std is not None:
        mean, std = weights.mean, weights.std
    else:
        mean, std = channel_stats(ds.images)
    return _write(
        model,
        ds,
        config,
        out,
        overwrite,
        arch=config.model,
        kwargs=kwargs,
        default_layer=entry.default_layer,
        reshape=entry.reshape,
        mean=mean,
        std=std,
        notes=notes,
    )


def evaluate(
    model: nn.Module,
    data: str | tuple[np.ndarray, Sequence[int] | np.ndarray],
    out: str | Path | None = None,
    *,
    classes: Sequence[str] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    arch: str | None = None,
    kwargs: dict[str, Any] | None = None,
    default_layer: str | None = None,
    data_dir: str | Path | None = None,
    image_size: int | None = None,
    limit_eval: int | None = None,
    device: str = "auto",
    batch_size: int = 256,
    overwrite: bool = False,
) -> Path:
    """Evaluate ``model`` once on ``data`` and write a run directory every analyzer reads.

    Args:
        model: Any classifier returning (N, classes) logits for normalized (N, 3, H, W) images.
        data: A registered dataset name (its eval split: ``"folder"`` with ``data_dir``), or
            ``(images, targets)``: uint8 images (N, H, W, 3) and their class indices.
        out: The run directory (default ``runs/<time>``).
        classes: Class names (default: the dataset's; needed with arrays).
        mean, std: The normalization the model expects, in [0, 1] units (default: the
            evaluation images' own statistics).
        arch: How to rebuild the model: a registered name (``torchvision:resnet18``), or an
            import path ``package.module:factory`` called as ``factory(num_classes,
            **kwargs)``. Default: the model's class as an import path.
        kwargs: The build arguments ``arch`` takes besides ``num_classes``.
        default_layer: The layer explained by default (default: the registered model's, or
            the last spatial layer the logits depend on).
        data_dir, image_size, limit_eval: For a dataset name, as ``explainkit train`` takes
            them (image_size default: the model's, else 224).
        device, batch_size: Where and how many images at a time the model runs.
        overwrite: Replace an existing run.

    Returns:
        The run directory.
    """
    import numpy as np

    from explainkit.data import Dataset, channel_stats, load_dataset

    kwargs = dict(kwargs or {})
    entry = _registered(arch)
    if isinstance(data, str):
        size = image_size or (entry.input_size if entry and entry.input_size else 224)
        ds = load_dataset(data, "eval", data_dir, size, 0, limit_eval)
        dataset = data
        if classes is not None:
            if len(classes) != len(ds.classes):
                raise ConfigError(
                    f"classes names {len(classes)} classes but {data} has {len(ds.classes)}"
                )
            ds.classes = [str(c) for c in classes]
    elif isinstance(data, tuple) and len(data) == 2:
        images = np.asarray(data[0])
        targets = np.asarray(data[1]).astype(np.int64)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ConfigError(
                f"images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}"
            )
        if images.shape[1] != images.shape[2]:
            raise ConfigError(f"images must be square, got {images.shape[1]}x{images.shape[2]}")
        if targets.shape != (len(images),):
            raise ConfigError(f"targets must hold one class per image ({len(images)})")
        if classes is None:
            raise ConfigError("classes= is needed with (images, targets): one name per class")
        if len(targets) and (targets.min() < 0 or targets.max() >= len(classes)):
            raise ConfigError(f"targets must be class indices from 0 to {len(classes) - 1}")
        if limit_eval is not None:
            images, targets = images[:limit_eval], targets[:limit_eval]
        ds = Dataset(images, targets, [str(c) for c in classes], np.arange(len(targets)))
        dataset, size = ARRAYS, int(images.shape[1])
    else:
        raise ConfigError("data must be a registered dataset name or a tuple (images, targets)")
    if arch is None:
        arch = _import_path(model)
    if (mean is None) != (std is None):
        raise ConfigError("give both mean and std, or neither")
    if mean is None:
        mean, std = channel_stats(ds.images)
    config = TrainConfig(
        model=arch,
        dataset=dataset,
        data_dir=None if data_dir is None else str(data_dir),
        image_size=size,
        epochs=1,
        tta=False,
        device=device,
        batch_size=batch_size,
        limit_eval=limit_eval,
    )
    config.validate(check_memory=False, check_names=False)
    return _write(
        model,
        ds,
        config,
        out,
        overwrite,
        arch=arch,
        kwargs=kwargs,
        default_layer=default_layer or (entry.default_layer if entry else None),
        reshape=entry.reshape if entry else None,
        mean=tuple(float(v) for v in mean),
        std=tuple(float(v) for v in std),  # type: ignore[union-attr]
        notes=[],
    )


def _registered(arch: str | None) -> Any:
    """The ModelEntry of a registered ``arch``, or None (an import path, or nothing)."""
    if arch is None:
        return None
    from explainkit.models.registry import model_entry

    try:
        return model_entry(arch)
    except ConfigError:
        if ":" in arch and "." in arch.partition(":")[0]:
            return None  # package.module:factory
        raise


def _import_path(model: nn.Module) -> str:
    """``package.module:Class`` of the model's class (what rebuilds it, when importable)."""
    cls = type(model)
    return f"{cls.__module__}:{cls.__qualname__}"


def _write(
    model: nn.Module,
    ds: Any,
    config: TrainConfig,
    out: str | Path | None,
    overwrite: bool,
    *,
    arch: str,
    kwargs: dict[str, Any],
    default_layer: str | None,
    reshape: str | None,
    mean: Sequence[float],
    std: Sequence[float],
    notes: list[str],
) -> Path:
    """Evaluate, then write config.json, the store and the checkpoints under the run's lock."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from explainkit.device import resolve_device
    from explainkit.store import append_epoch
    from explainkit.train.checkpoint import save_checkpoint
    from explainkit.train.run_files import RunFacts, create_empty_store, write_config

    if len(ds.images) == 0:
        raise ExplainkitError("the evaluation set holds no images")
    device = resolve_device(config.device)
    mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    model = model.to(device).eval()
    size = int(ds.images.shape[1])
    if default_layer is None:
        default_layer, reshape = _locate_layer(model, size, device)
    spec = {
        "arch": arch,
        **({"width": kwargs["width"]} if "width" in kwargs else {}),
        "kwargs": kwargs,
        "num_classes": len(ds.classes),
        "input_shape": [3, size, size],
        "default_layer": default_layer,
        "reshape": reshape or "auto",
    }
    start = time.perf_counter()
    logits = _logits(model, ds.images, mean, std, device, config.batch_size)
    seconds = time.perf_counter() - start
    if not np.isfinite(logits).all():
        raise ExplainkitError("the model's outputs hold NaN or infinity; nothing was written")
    if logits.shape != (len(ds.images), len(ds.classes)):
        raise ExplainkitError(
            f"the model returned outputs of shape {list(logits.shape)} for {len(ds.images)} "
            f"images; a classifier of {len(ds.classes)} classes returns "
            f"[{len(ds.images)}, {len(ds.classes)}]"
        )
    targets = torch.from_numpy(np.asarray(ds.targets, dtype=np.int64))
    eval_loss = float(F.cross_entropy(torch.from_numpy(logits), targets))
    eval_acc = float((logits.argmax(1) == ds.targets).mean())

    run = RunDir(out) if out else RunDir.new_default()
    lock = run.create(overwrite)
    try:
        facts = RunFacts(
            model_spec=spec,
            classes=list(ds.classes),
            eval_data=ds,
            num_train=0,
            mean=mean,
            std=std,
            device=device,
        )
        write_config(facts, config, run)
        create_empty_store(facts, config, run)  # config.ema 0, tta off: "trained", no TTA
        row = {  # nothing was trained: the training columns hold 0, train_ce is not recorded
            "epoch": 1,
            "train_loss": 0.0,
            "train_acc": 0.0,
            "eval_loss": eval_loss,
            "eval_acc": eval_acc,
            "lr": 0.0,
            "seconds": seconds,
            "images_per_s": 0.0,
        }
        append_epoch(run.store_path, logits, row)
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        payload = {
            "model": spec,
            "state_dict": state,
            "epoch": 1,
            "eval_acc": eval_acc,
            "best_acc": eval_acc,
            "best_epoch": 1,
            "config": config.to_dict(),
            "classes": list(ds.classes),
            "mean": list(mean),
            "std": list(std),
        }
        save_checkpoint(
            [run.checkpoint(1), run.checkpoint("best"), run.checkpoint("last")], payload
        )
        from explainkit.train.trainer import append_log

        for line in [*notes, f"evaluated: eval loss {eval_loss:.4f} acc {100 * eval_acc:5.2f}%"]:
            append_log(run, line)
    finally:
        lock.release()
    return run.path


def _logits(
    model: nn.Module,
    images: np.ndarray,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    device: Any,
    batch_size: int,
) -> np.ndarray:
    """The model's logits for uint8 (N, H, W, 3) images, normalized as a run evaluates them."""
    import numpy as np
    import torch

    m = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=device).view(1, 3, 1, 1)
    chunks = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size]))
            x = batch.to(device).permute(0, 3, 1, 2).float().div_(255)
            chunks.append(model((x - m) / s).float().cpu())
    return torch.cat(chunks).numpy()


def _locate_layer(model: nn.Module, size: int, device: Any) -> tuple[str, str]:
    """As the trainer does for a model whose entry names no layer."""
    import torch

    from explainkit.explain.layers import locate_layer

    found = locate_layer(model, torch.zeros(1, 3, size, size, device=device))
    if found:
        return found, "nchw"
    children = [name for name, _ in model.named_children()]
    return (children[-1] if children else "layer4"), "auto"
