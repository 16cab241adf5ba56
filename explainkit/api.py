"""The Python API's calls that look a model or dataset up, as ``import explainkit`` offers them.

Each is a host entry point like a CLI command: it is handed the registries (what the plugins
registered, :func:`load_registries`) or builds them itself from the built-ins and the installed
plugins, and passes them down explicitly. To use a plugins folder from Python::

    registries = explainkit.load_registries("my_plugins/")
    model = explainkit.load_model("runs/r18", registries=registries)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from explainkit import arguments
from explainkit.errors import ConfigError, ExplainkitError, describe, first_line
from explainkit.evaluation import RunWriter as _RunWriter
from explainkit.manager import load_registries
from explainkit.registries import Registries
from explainkit.trust import trusted_imports

if TYPE_CHECKING:  # pragma: no cover - typing only
    import numpy as np
    import torch
    from torch import nn

    from explainkit.data import Dataset
    from explainkit.runner import Results

__all__ = ["RunWriter", "analyze", "evaluate", "load_model", "load_registries", "write_report"]

_REGISTRIES: arguments.Check = (
    lambda v: v is None or isinstance(v, Registries),
    "an explainkit.Registries (explainkit.load_registries()) or None",
)


def _model_check() -> arguments.Check:
    from torch import nn

    return (lambda v: isinstance(v, nn.Module), "a torch.nn.Module")


def _data_check() -> arguments.Check:
    from explainkit.data import Dataset

    def test(value: Any) -> bool:
        return isinstance(value, (str, Dataset)) or (isinstance(value, tuple) and len(value) == 2)

    return test, "a dataset name (str), an explainkit.Dataset or a tuple (images, targets)"


def _model_failed(e: Exception) -> ExplainkitError:
    """A model's own exception (or one its outputs caused) as one sentence."""
    return ExplainkitError(
        f"the model failed on the evaluation images ({type(e).__name__}: "
        f"{first_line(e, limit=160)}); it must take normalized (N, 3, H, W) float images"
    )


_MODEL_ERRORS = (RuntimeError, ValueError, TypeError, AttributeError, IndexError, KeyError)


def load_model(
    run: str | os.PathLike[str],
    epoch: int | None = None,
    device: str | torch.device = "cpu",
    *,
    registries: Registries | None = None,
    trust_imports: bool | str | Sequence[str] = False,
) -> nn.Module:
    """The model of a run directory (or a checkpoint file) at ``epoch`` (default: the best),
    in eval mode on ``device``; a plugin's model needs ``registries`` that hold it.

    A run whose model is an import path (``import:package.module:Class``) has that module
    imported only when it already is, or with ``trust_imports`` (True, or module names):
    importing runs its code, and a run from someone else is untrusted (explainkit.trust).
    """
    from explainkit.train.checkpoint import load_model as load

    arguments.check(
        "load_model",
        {"run": run, "epoch": epoch, "device": device, "registries": registries,
         "trust_imports": trust_imports},
        {"registries": _REGISTRIES},
    )  # fmt: skip
    from explainkit.device import resolve_device

    target = resolve_device(str(device))  # an unusable device is one sentence, before loading
    with trusted_imports(trust_imports):
        return load(run, registries or load_registries(), epoch, target)


class RunWriter(_RunWriter):
    __doc__ = _RunWriter.__doc__

    def __init__(
        self,
        out: str | os.PathLike[str] | None,
        model: nn.Module,
        data: Any,
        *,
        registries: Registries | None = None,
        **options: Any,
    ) -> None:
        known = {"classes", "mean", "std", "arch", "kwargs", "default_layer", "data_dir",
                 "image_size", "limit_eval", "device", "batch_size", "overwrite", "fit",
                 "seed", "task"}  # fmt: skip
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(
                f"unknown argument {unknown[0]!r} of RunWriter; it takes out, model, data, "
                f"registries and {', '.join(sorted(known))}"
            )
        arguments.check(
            "RunWriter",
            {"out": out, "model": model, "data": data, "registries": registries, **options},
            {"model": _model_check(), "data": _data_check(), "registries": _REGISTRIES},
        )
        layer = options.get("default_layer")
        if layer is not None and layer not in dict(model.named_modules()):
            raise ConfigError(
                f"default_layer {layer!r} of RunWriter is not a layer of the model; give the name "
                "of one of model.named_modules()"
            )
        try:
            super().__init__(
                out, model, data, registries=registries or load_registries(), **options
            )
        except ExplainkitError:
            raise
        except _MODEL_ERRORS as e:  # the model, run once to find its layer
            raise _model_failed(e) from e

    def log_epoch(
        self,
        model: nn.Module | None = None,
        *,
        train_loss: float | None = None,
        train_acc: float | None = None,
        lr: float | None = None,
        images_per_s: float | None = None,
        seconds: float | None = None,
    ) -> dict[str, float]:
        if model is not None and not _model_check()[0](model):
            raise ConfigError(
                f"the model of RunWriter.log_epoch must be a torch.nn.Module or None, got "
                f"{describe(model)}"
            )
        numbers = {
            name: arguments.checked_number("RunWriter.log_epoch", name, value)
            for name, value in (
                ("train_loss", train_loss), ("train_acc", train_acc), ("lr", lr),
                ("images_per_s", images_per_s), ("seconds", seconds),
            )
        }  # fmt: skip
        try:
            return super().log_epoch(model, **numbers)
        except ExplainkitError:
            raise
        except _MODEL_ERRORS as e:
            raise _model_failed(e) from e

    log_epoch.__doc__ = _RunWriter.log_epoch.__doc__


def evaluate(
    model: nn.Module,
    data: str | Dataset | tuple[np.ndarray, Sequence[int] | np.ndarray],
    out: str | os.PathLike[str] | None = None,
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
    fit: str = "crop",
    seed: int = 0,
    task: str = "classification",
    registries: Registries | None = None,
) -> Path:
    """Evaluate ``model`` once on ``data`` and write a run directory every analyzer reads.

    Args:
        model: Any classifier returning (N, classes) scores (a tensor, a HuggingFace output's
            ``logits``, a dict or a tuple) for normalized (N, 3, H, W) images; a model whose
            first convolution takes one channel gets the images' gray channel.
        data: A registered dataset name (its eval split: ``"folder"`` with ``data_dir``, every
            image of a folder without train/ and val/), an ``explainkit.Dataset``, or
            ``(images, targets)``: uint8 images (N, H, W, 3), grayscale (N, H, W, 1) or
            (N, H, W), and their class indices.
        out: The run directory (default ``runs/<time>``).
        classes: Class names (default: the dataset's; needed with arrays).
        mean, std: The normalization the model expects, in [0, 1] units, 3 values (or 1 for
            a grayscale model) (default: the evaluation images' own statistics).
        arch: How to rebuild the model: a registered name (``torchvision:resnet18``), or an
            import path ``import:package.module:factory`` called as ``factory(num_classes=N,
            **kwargs)``. Default: the model's class as an import path.
        kwargs: The build arguments ``arch`` takes besides ``num_classes``.
        default_layer: The layer explained by default (default: the registered model's, or
            the last spatial layer the logits depend on).
        data_dir, image_size, limit_eval: As ``explainkit evaluate`` takes them (image_size
            default: the model's, else 224; arrays keep their size). ``limit_eval`` keeps a
            class-balanced subset drawn with ``seed``.
        fit: How non-square images become squares: ``crop`` (the centre), ``pad`` (the
            whole image) or ``stretch``.
        device, batch_size: Where and how many images at a time the model runs.
        overwrite: Replace an existing run.
        task: What the model's outputs answer (docs/tasks.md): ``classification``,
            ``multilabel`` ((N, classes) logits), ``segmentation`` ((N, 1 + classes, H, W)
            logits, the background first) or ``detection`` (torchvision's list of ``{boxes,
            labels, scores}`` with label 0 the background, or a transformers detector's
            ``logits`` and ``pred_boxes``); the last three need ``data`` with annotations
            (``"scenes"``, ``"coco"``, ``"voc"``, a Dataset that has them).
        registries: Where names are looked up (default: built-ins and installed plugins).

    Returns:
        The run directory.
    """
    arguments.check(
        "evaluate",
        {"model": model, "data": data, "out": out, "classes": classes, "mean": mean, "std": std,
         "arch": arch, "kwargs": kwargs, "default_layer": default_layer, "data_dir": data_dir,
         "image_size": image_size, "limit_eval": limit_eval, "device": device,
         "batch_size": batch_size, "overwrite": overwrite, "fit": fit, "seed": seed,
         "task": task, "registries": registries},
        {"model": _model_check(), "data": _data_check(), "registries": _REGISTRIES},
    )  # fmt: skip
    with RunWriter(
        out, model, data, classes=classes, mean=mean, std=std, arch=arch, kwargs=kwargs,
        default_layer=default_layer, data_dir=data_dir, image_size=image_size,
        limit_eval=limit_eval, device=device, batch_size=batch_size, overwrite=overwrite,
        fit=fit, seed=seed, task=task, registries=registries,
    ) as writer:  # fmt: skip
        writer.log_epoch()
    return writer.path


def analyze(
    run: str | os.PathLike[str],
    plugins: Iterable[str] | None = None,
    epoch: int | None = None,
    device: str = "auto",
    batch_size: int = 64,
    seed: int = 0,
    *,
    registries: Registries | None = None,
    plugins_dir: str | os.PathLike[str] | None = None,
    echo: Callable[[str], None] | None = None,
    collect_failures: bool = False,
    trust_imports: bool | str | Sequence[str] = False,
    model: nn.Module | None = None,
    **options: Any,
) -> Results:
    from explainkit.runner import analyze as run_analyzers

    arguments.check(
        "analyze",
        {"run": run, "plugins": plugins, "epoch": epoch, "device": device,
         "batch_size": batch_size, "seed": seed, "registries": registries,
         "plugins_dir": plugins_dir, "echo": echo, "collect_failures": collect_failures,
         "trust_imports": trust_imports},
        {"registries": _REGISTRIES},
    )  # fmt: skip
    with trusted_imports(trust_imports):
        return run_analyzers(
            run, plugins, epoch, device, batch_size, seed, registries=registries,
            plugins_dir=plugins_dir, echo=echo, collect_failures=collect_failures, model=model,
            **options,
        )  # fmt: skip


def _analyze_doc() -> str:
    from explainkit.runner import analyze as run_analyzers

    doc = run_analyzers.__doc__ or ""
    consent = (
        "        trust_imports: Consent to import the module a run names for its model\n"
        "            (``import:package.module:Class``; True, or module names): importing\n"
        "            runs its code, so only for runs you trust (explainkit.trust).\n"
    )
    marker = "        **options:"
    return doc.replace(marker, consent + marker, 1) if marker in doc else doc


analyze.__doc__ = _analyze_doc()


def write_report(
    run: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    *,
    plugins: Sequence[str] | None = None,
    model: nn.Module | None = None,
    device: str = "auto",
    registries: Registries | None = None,
) -> Path:
    """Write the HTML report of ``run`` (default ``RUN/report.html``) and return its path.

    With ``plugins`` (analyzer names), those analyzers run first; ``model`` is the live module
    a run written by ``explainkit.evaluate(model, ...)`` needs when its class cannot be
    rebuilt (see :func:`explainkit.analyze`). A failed analyzer is shown on the page with
    its reason, as ``explainkit report`` shows it.
    """
    from explainkit.report import build_report

    registries = registries or load_registries()
    if plugins:
        analyze(
            run, plugins=list(plugins), device=device, model=model, registries=registries,
            collect_failures=True,
        )  # fmt: skip
    return build_report(run, registries, out=out)
