"""explainkit for PyTorch Lightning: a callback that writes a run directory while a
``Trainer`` fits, so every analyzer and the report read your Lightning run::

    from explainkit.lightning import ExplainkitCallback

    callback = ExplainkitCallback("runs/lit", (images, targets), classes=names, model="net")
    lightning.Trainer(max_epochs=10, callbacks=[callback]).fit(module, loaders)

After each training epoch the callback evaluates the classifier on the eval data and commits
the epoch through :class:`explainkit.RunWriter` (logits, history, a checkpoint).
Only the global rank 0 writes. Needs Lightning: ``pip install explainkit[lightning]``
(``lightning`` or the older ``pytorch_lightning`` package).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

try:
    import lightning.pytorch as pl
except ImportError:  # pragma: no cover - depends on what is installed
    try:
        import pytorch_lightning as pl
    except ImportError:
        raise ImportError(
            "explainkit.lightning needs PyTorch Lightning: pip install explainkit[lightning]"
        ) from None

from explainkit.api import RunWriter

__all__ = ["ExplainkitCallback"]

# What a LightningModule usually logs for the epoch, in the order looked for.
LOSS_KEYS = ("train_loss_epoch", "train_loss", "loss")
ACCURACY_KEYS = ("train_acc_epoch", "train_acc")


class ExplainkitCallback(pl.Callback):
    """Write an explainkit run directory, one evaluated epoch per training epoch.

    Args:
        out: The run directory.
        data: The eval data, as :func:`explainkit.evaluate` takes it (a dataset name, an
            ``explainkit.data.Dataset`` or ``(images, targets)``).
        model: The attribute of the LightningModule holding the classifier to explain (for
            example ``"net"``), recorded by its import path so analyzers can rebuild it;
            None explains the LightningModule itself.
        **options: The other arguments of ``RunWriter`` (``classes``, ``mean``, ``std``,
            ``arch``, ``kwargs``, ``batch_size``, ``overwrite``...). The training loss and
            accuracy come from what the module logs as ``train_loss`` and ``train_acc``.
    """

    def __init__(
        self, out: str | Path, data: Any, *, model: str | None = None, **options: Any
    ) -> None:
        super().__init__()
        self.out = out
        self.data = data
        self.model_attribute = model
        self.options = options
        self.writer: RunWriter | None = None

    def _classifier(self, pl_module: Any) -> Any:
        if self.model_attribute is None:
            return pl_module
        return getattr(pl_module, self.model_attribute)

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if trainer.is_global_zero and self.writer is None:
            options = {"device": str(pl_module.device), **self.options}
            self.writer = RunWriter(self.out, self._classifier(pl_module), self.data, **options)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if self.writer is None:
            return
        metrics = trainer.callback_metrics
        optimizers = trainer.optimizers
        lr = optimizers[0].param_groups[0]["lr"] if optimizers else None
        self.writer.log_epoch(
            self._classifier(pl_module),
            train_loss=_first(metrics, LOSS_KEYS),
            train_acc=_first(metrics, ACCURACY_KEYS),
            lr=lr,
        )

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self._close()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._close()

    def _close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _first(metrics: Any, keys: tuple[str, ...]) -> float | None:
    """The first of ``keys`` the module logged, as a float; None when it logged none."""
    for key in keys:
        if key in metrics:
            return float(metrics[key])
    return None
