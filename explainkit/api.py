"""The Python API's calls that look a model or dataset up, as ``import explainkit`` offers them.

Each is a host entry point like a CLI command: it is handed the registries (what the plugins
registered, :func:`load_registries`) or builds them itself from the built-ins and the installed
plugins, and passes them down explicitly. To use a plugins folder from Python::

    registries = explainkit.load_registries("my_plugins/")
    model = explainkit.load_model("runs/r18", registries=registries)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from explainkit.evaluation import RunWriter as _RunWriter
from explainkit.manager import load_registries
from explainkit.registries import Registries

if TYPE_CHECKING:  # pragma: no cover - typing only
    import numpy as np
    import torch
    from torch import nn

    from explainkit.data import Dataset

__all__ = ["RunWriter", "evaluate", "load_model", "load_registries", "report"]


def load_model(
    run: str | os.PathLike[str],
    epoch: int | None = None,
    device: str | torch.device = "cpu",
    *,
    registries: Registries | None = None,
) -> nn.Module:
    """The model of a run directory (or a checkpoint file) at ``epoch`` (default: the best),
    in eval mode on ``device``; a plugin's model needs ``registries`` that hold it."""
    from explainkit.train.checkpoint import load_model as load

    return load(run, registries or load_registries(), epoch, device)


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
        super().__init__(out, model, data, registries=registries or load_registries(), **options)


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
        registries: Where names are looked up (default: built-ins and installed plugins).

    Returns:
        The run directory.
    """
    with RunWriter(
        out, model, data, classes=classes, mean=mean, std=std, arch=arch, kwargs=kwargs,
        default_layer=default_layer, data_dir=data_dir, image_size=image_size,
        limit_eval=limit_eval, device=device, batch_size=batch_size, overwrite=overwrite,
        fit=fit, seed=seed, registries=registries,
    ) as writer:  # fmt: skip
        writer.log_epoch()
    return writer.path


def report(
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
    from explainkit.runner import analyze

    registries = registries or load_registries()
    if plugins:
        analyze(
            run, plugins=list(plugins), device=device, model=model, registries=registries,
            collect_failures=True,
        )  # fmt: skip
    return build_report(run, registries, out=out)
