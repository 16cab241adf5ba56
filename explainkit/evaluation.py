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

A training loop of your own writes the same run one epoch at a time with :class:`RunWriter`
(``explainkit.lightning.ExplainkitCallback`` does it for a PyTorch Lightning ``Trainer``).

The run records how to rebuild its model (``model.arch`` of config.json and the checkpoint):
a registered name (``--model``, or ``arch=`` from Python) with its build ``kwargs``, or
otherwise an import path ``import:package.module:factory``, built as ``factory(num_classes=N,
**kwargs)``. Analyzers that rebuild the model from the checkpoint (gradcam, model, captum,
quality, evolution) refuse in one sentence a run whose model cannot be built here.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from explainkit.config import EvalConfig
from explainkit.errors import ConfigError, ExplainkitError
from explainkit.eval_data import ARRAYS, eval_data, model_input, read_line, rounded, three_values
from explainkit.registries import Registries, accepted_kwargs
from explainkit.rundir import RunDir
from explainkit.task_eval import METRICS, coco_detector, task_results, task_split

if TYPE_CHECKING:  # pragma: no cover - typing only
    import numpy as np
    from torch import nn

    from explainkit.data import Dataset

__all__ = ["ARRAYS", "RunWriter", "evaluate_run"]


def evaluate_run(
    config: EvalConfig,
    registries: Registries,
    out: str | Path | None = None,
    overwrite: bool = False,
    say: Callable[[str], None] | None = None,
) -> Path:
    """Evaluate the registered ``config.model`` with ``config.weights`` on the eval split of
    ``config.dataset`` and write a run directory into ``out`` (default ``runs/<time>``).

    Images are fitted to the model's expected input (:func:`model_input`) and every image of
    a folder without a train/val split is read (nothing is held out); ``say`` receives what
    was read and what input was used, in two lines (train.log records them too).

    Raises:
        ConfigError: No ``weights``, or weights that do not fit the model (a classifier head
            for another number of classes is refused too: nothing would train it).
    """
    from explainkit.data import load_dataset
    from explainkit.data.fit import describe_fit
    from explainkit.train.weights import apply_weights, read_weights
    from explainkit.trust import imported_module, trusted_imports

    config.validate(registries=registries)
    entry = registries.model_entry(config.model)
    if not config.weights and entry.own_weights is None:
        raise ConfigError(
            "--weights is needed: evaluate explains a model with its weights (a state_dict "
            "file, an explainkit checkpoint or a name such as IMAGENET1K_V1)"
        )
    weights_name = config.weights or str(entry.own_weights)
    config.task = config.task or entry.task
    config.model = entry.name  # canonical: an hf: folder as an absolute path
    with trusted_imports(imported_module(config.model)):  # the user named that module
        weights = read_weights(weights_name, entry, registries)  # before anything is written
    if not config.image_size and weights.image_size:  # an explainkit run's own size
        size, resize, where = weights.image_size, None, f"what {weights.source} was run at"
    else:
        size, resize, where = model_input(entry, config.image_size, config.resize_size)
    ds = load_dataset(
        config.dataset, "eval", config.data_dir, size, config.seed, config.limit_eval,
        registries=registries, holdout=False, fit=config.fit, resize=resize,
    )  # fmt: skip
    config.image_size = size  # the run records what was used
    config.resize_size = resize if config.fit == "crop" else None
    ds = task_split(ds, config.task, config.dataset)
    kwargs = accepted_kwargs(entry.build, {"width": config.width, "image_size": size})
    model = entry.build(len(ds.classes), **kwargs)
    coco = coco_detector(entry, model, weights, list(ds.classes), kwargs)
    if coco is not None:  # COCO weights on the dataset's classes, relabelled by name
        model, kwargs, line = coco
        (say or (lambda text: None))(line)
    notes = apply_weights(model, weights, len(ds.classes), entry.name)
    if len(notes) > 1:  # the head was skipped: it would stay random
        raise ConfigError(
            f"--weights {weights.source} have a classifier head for another number of classes "
            f"than the {len(ds.classes)} of {config.dataset}; evaluate needs the head that "
            "was trained for these classes"
        )
    mean, std = (weights.mean, weights.std) if weights.mean is not None else (None, None)
    norm = (
        f"mean {rounded(mean)} and std {rounded(std)} (what the weights expect)"
        if mean is not None
        else "the evaluated images' own mean and std (the weights declare none)"
    )
    lines = [
        read_line(ds, config.dataset, config.limit_eval),
        f"input: {size} x {size} px ({where}): {describe_fit(size, config.fit, resize)}; "
        f"normalized with {norm}",
    ]
    for line in lines:
        (say or (lambda text: None))(line)
    with RunWriter(
        out, model, ds, registries=registries, mean=mean, std=std, arch=config.model,
        kwargs=kwargs, overwrite=overwrite, task=config.task, _config=config,
        _notes=[*notes, *lines, *([coco[2]] if coco else [])],
    ) as writer:  # fmt: skip
        writer.log_epoch()
    return writer.path


class RunWriter:
    """A run directory written by your own training loop, one evaluated epoch at a time.

    Every analyzer and the report read what it writes as they read a run ``explainkit
    train`` wrote: config.json, the prediction store (the eval images once, then each epoch's
    logits and history row) and a checkpoint per epoch (with best.pt and last.pt), so
    ``evolution`` follows the explanations across your epochs::

        from explainkit import RunWriter

        with RunWriter("runs/mine", model, (images, targets), classes=names) as writer:
            for epoch in range(10):
                loss = train_one_epoch(model)        # your loop
                writer.log_epoch(train_loss=loss, lr=optimizer.param_groups[0]["lr"])

    ``log_epoch`` evaluates the model on the eval data (eval mode, no gradients; the model's
    train/eval mode is restored after) and commits the epoch atomically: a process killed at
    any moment leaves the epochs committed before it. The run directory is locked from the
    start until ``close`` (``with`` closes it), so a second writer or ``explainkit train``
    cannot write into it. Under ``torchrun`` every process evaluates its block of the eval
    images (on ``cuda:LOCAL_RANK`` when CUDA is asked for) and rank 0 writes the run, so
    ``torchrun --nproc-per-node 4 -m explainkit evaluate ...`` writes the files one process
    writes. Arguments are those of :func:`evaluate`.
    """

    def __init__(
        self,
        out: str | Path | None,
        model: nn.Module,
        data: str | Dataset | tuple[np.ndarray, Sequence[int] | np.ndarray],
        *,
        registries: Registries,
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
        _config: EvalConfig | None = None,
        _notes: Sequence[str] = (),
    ) -> None:
        from explainkit.data import channel_stats
        from explainkit.device import resolve_device
        from explainkit.explain.inputs import accept_rgb, input_channels

        kwargs = dict(kwargs or {})
        arch = _import_path(model) if arch is None else _canonical(arch)
        entry = _registered(arch, registries)
        ds, dataset, size, resize = eval_data(
            data, classes, data_dir, image_size, limit_eval, entry, registries, fit, seed
        )
        if _config is None:  # evaluate_run gives the split its task's classes already
            ds = task_split(ds, task, dataset)
        # -- issue 26.3: ImageNet-1k ids (folders n01440764/, 0/..999/) become names --------
        if classes is None and task == "classification":
            from dataclasses import replace

            from explainkit.classnames import readable_classes

            ds = replace(ds, classes=readable_classes(ds.classes))
        # ------------------------------------------------------------------------------------
        if (mean is None) != (std is None):
            raise ConfigError("give both mean and std, or neither")
        if mean is None:
            mean, std = channel_stats(ds.images)
        mean, std = three_values("mean", mean), three_values("std", std)
        config = _config or EvalConfig(
            model=arch,
            dataset=dataset,
            data_dir=None if data_dir is None else str(data_dir),
            image_size=size,
            resize_size=resize if fit == "crop" else None,
            fit=fit,
            device=device,
            batch_size=batch_size,
            limit_eval=limit_eval,
            seed=seed,
            task=task,
        )
        config.validate()
        self.task = task
        self.gray = input_channels(model) == 1  # fed the RGB images' one gray channel
        self.model = accept_rgb(model)
        self.eval_data = ds
        requested = resolve_device(config.device)  # an unusable device is one sentence
        self._dist = _join_torchrun(requested)
        self.device = self._dist.device if requested.type == "cuda" else requested
        self.is_main = self._dist.rank == 0  # under torchrun rank 0 writes, all evaluate
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)  # type: ignore[union-attr]
        self.batch_size = config.batch_size
        self.epoch = 0
        self.best_acc, self.best_epoch = -1.0, 0
        self._config = config
        self._spec = self._model_spec(arch, kwargs, default_layer, entry, size)
        self._notes = list(_notes)
        if _config is None:  # from Python: train.log says what was read, as the CLI prints
            from explainkit.data.fit import describe_fit

            self._notes.append(read_line(ds, dataset, limit_eval))
            if isinstance(data, str):
                policy = describe_fit(size, fit, resize)
                self._notes.append(f"input: {size} x {size} px: {policy}")
        self._run = RunDir(out) if out else RunDir.new_default()
        self._lock: Any = None
        self._closed = False
        self._open(overwrite)

    @property
    def path(self) -> Path:
        """The run directory."""
        return self._run.path

    def _model_spec(
        self, arch: str, kwargs: dict[str, Any], layer: str | None, entry: Any, size: int
    ) -> dict[str, Any]:
        import torch

        from explainkit.explain.layers import run_default_layer

        reshape = None
        if layer is None or (entry is not None and layer == entry.default_layer):
            clips = self.eval_data.clips
            frames = () if clips is None else (clips.shape[1],)  # a clip: (1, 3, T, H, W)
            example = torch.zeros(1, 3, *frames, size, size, device=self.device)
            layer, reshape = run_default_layer(self.model.to(self.device), entry, example)
        return {
            "arch": arch,
            **({"width": kwargs["width"]} if "width" in kwargs else {}),
            "kwargs": kwargs,
            "num_classes": len(self.eval_data.classes),
            "input_shape": [3, size, size],  # RGB batches; a gray model averages them
            **({"input_channels": 1} if self.gray else {}),
            "default_layer": layer,
            "reshape": reshape or "auto",
        }

    def _open(self, overwrite: bool) -> None:
        """Lock the run directory now (a taken --out fails before any training); its files
        are written with the first epoch, so a model that fails at once leaves nothing."""
        from explainkit.train.run_files import RunFacts

        if len(self.eval_data) == 0:
            raise ExplainkitError("the evaluation set holds no images")
        self._facts = RunFacts(
            model_spec=self._spec,
            classes=list(self.eval_data.classes),
            eval_data=self.eval_data,
            num_train=0,
            mean=self.mean,
            std=self.std,
            device=self.device,
            dataset=self._config.dataset,
            command="evaluate",
            task=self.task,
        )
        self._created = not self._run.path.exists()
        failure = None
        if self.is_main:
            try:
                self._lock = self._run.create(overwrite)
            except ExplainkitError as e:
                failure = e
        self._agree(failure)

    def _write_setup(self) -> None:
        """config.json and the store of the eval images, before the first epoch's commit."""
        from explainkit.train.run_files import create_empty_store, write_config

        write_config(self._facts, self._config, self._run)
        if self.task == "video":  # before the store: a run with a store has its clips
            from explainkit.clip_files import write_clips

            write_clips(self._run.path, self.eval_data.clips)
        create_empty_store(self._facts, self._run)  # "trained", no TTA

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
        """Evaluate ``model`` (default: the one given at the start) and commit one epoch.

        The training numbers are yours to give (they fill the history table and the loss
        curves); one not given is stored as 0. ``seconds`` defaults to the time since the
        previous epoch (or since the start). Returns the committed history row.

        Raises:
            ExplainkitError: The model's outputs are not finite or not (N, classes); nothing
                of this epoch is written.
        """
        import numpy as np
        import torch
        import torch.nn.functional as F

        from explainkit.sharding import block
        from explainkit.store import append_epoch

        if self._closed:
            raise ExplainkitError(f"the writer of {self.path} is closed; open a new RunWriter")
        model = self.model if model is None else model
        started = time.perf_counter()
        n = len(self.eval_data)
        start, stop = block(self._dist.rank, self._dist.world_size, n)
        if self.task not in ("classification", "video"):
            if self._dist.world_size > 1:
                raise ExplainkitError(
                    f"a {self.task} model is evaluated in one process; run it without torchrun"
                )
            results, eval_loss, eval_acc = self._task_results(model)
            logits: Any = results
        else:
            pixels = self.eval_data.clips if self.task == "video" else self.eval_data.images
            images = _rows(pixels, start, stop)  # this process's share
            classes = len(self.eval_data.classes)
            part = np.zeros((0, classes), np.float32)  # more ranks than images
            if stop > start:
                part = _logits(model, images, self.mean, self.std, self.device, self.batch_size)
            logits = _checked_logits(np.concatenate(self._dist.gather_objects(part)), n, classes)
            targets = np.asarray(self.eval_data.targets, dtype=np.int64)
            eval_loss = float(F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(targets)))
            eval_acc = float((logits.argmax(1) == targets).mean())
        self.epoch += 1
        row = {
            "epoch": self.epoch,
            "train_loss": float(train_loss or 0.0),
            "train_acc": float(train_acc or 0.0),
            "eval_loss": eval_loss,
            "eval_acc": eval_acc,
            "lr": float(lr or 0.0),
            "seconds": float(seconds if seconds is not None else time.perf_counter() - started),
            "images_per_s": float(images_per_s or 0.0),
        }
        if self.task == "detection" and train_acc is None:
            del row["train_acc"]  # a detector has none
        failure = None
        if self.is_main:
            try:
                if self.epoch == 1:
                    self._write_setup()
                append_epoch(self._run.store_path, logits, row)
                self._save_checkpoints(model, eval_acc)
                metric = METRICS.get(self.task, "acc")
                self._log(f"epoch {self.epoch}: eval loss {eval_loss:.4f} {metric} {eval_acc:.2%}")
            except ExplainkitError as e:
                failure = e
        try:
            self._agree(failure)
        except BaseException:
            self.epoch -= 1
            raise
        return row

    def _task_results(self, model: nn.Module) -> tuple[Any, float, float]:
        """A task model's results on the eval images (:mod:`explainkit.task_eval`)."""
        return task_results(
            model, self.eval_data, self.task, self.mean, self.std, self.device, self.batch_size
        )

    def _agree(self, failure: ExplainkitError | None) -> None:
        """Raise ``failure`` of rank 0 on every torchrun rank (its sentence), so that no
        rank waits for one that stopped; in one process, just raise it."""
        said = self._dist.broadcast_object(None if failure is None else str(failure))
        if failure is not None:
            raise failure
        if said is not None:
            raise ExplainkitError(said)

    def _save_checkpoints(self, model: nn.Module, eval_acc: float) -> None:
        """epoch_NNN.pt, best.pt when this epoch is the best so far, then last.pt."""
        from explainkit.train.checkpoint import save_checkpoint

        is_best = eval_acc > self.best_acc
        if is_best:
            self.best_acc, self.best_epoch = eval_acc, self.epoch
        payload = {
            "model": self._spec,
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "epoch": self.epoch,
            "eval_acc": eval_acc,
            "best_acc": self.best_acc,
            "best_epoch": self.best_epoch,
            "config": self._config.to_dict(),
            "classes": list(self.eval_data.classes),
            "mean": list(self.mean),
            "std": list(self.std),
        }
        names = [self.epoch] + (["best"] if is_best else []) + ["last"]
        save_checkpoint([self._run.checkpoint(name) for name in names], payload)

    def _log(self, line: str) -> None:
        from explainkit.train.run_files import append_log

        for note in self._notes:
            append_log(self._run, note)
        self._notes = []
        append_log(self._run, line)

    def close(self) -> None:
        """Release the run's lock (a run of no epoch that this writer made is removed)."""
        if self._closed:
            return
        self._closed = True
        if self._lock is None:  # another torchrun rank: rank 0 holds the run
            _leave_torchrun(self._dist)
            return
        if not self.epoch:
            self._run.end_setup()  # a folder it was given is left as it was, empty
        self._lock.release()
        self._lock = None
        if self._created and not self.epoch:
            shutil.rmtree(self._run.path, ignore_errors=True)  # nothing of ours in it
        _leave_torchrun(self._dist)

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _rows(images: Any, start: int, stop: int) -> Any:
    """Images ``start .. stop - 1``, still undecoded when they are lazy."""
    from explainkit.data.lazy import is_lazy

    return images.select(slice(start, stop)) if is_lazy(images) else images[start:stop]


def _join_torchrun(device: Any) -> Any:
    """The process group when torchrun started this process (each rank then evaluates its
    block of the images on ``cuda:LOCAL_RANK`` or the CPU), else a one-process context."""
    from datetime import timedelta

    from explainkit.train.distributed import DistContext, init_from_env, launched_by_torchrun

    if not launched_by_torchrun():
        return DistContext()
    # gloo: only logits and sentences travel; rank 0 may decode the whole eval set meanwhile.
    return init_from_env(device.type, "gloo", timedelta(hours=12))


def _leave_torchrun(dist: Any) -> None:
    from explainkit.train.distributed import shutdown

    if dist.enabled:
        shutdown()


def _canonical(arch: str) -> str:
    """``import:package.module:factory`` for a bare import path; other names as they are."""
    prefix, colon, _ = arch.partition(":")
    return f"import:{arch}" if colon and "." in prefix else arch


def _registered(arch: str, registries: Registries) -> Any:
    """The ModelEntry of ``arch``, or None for an import path that cannot be built here (the
    run still records it; analyzers that rebuild the model then say why they cannot)."""
    try:
        return registries.model_entry(arch)
    except ConfigError:
        if arch.startswith("import:"):
            return None
        raise


def _import_path(model: nn.Module) -> str:
    """``import:package.module:Class`` of the model's class (what rebuilds it, if importable
    and its ``__init__`` takes ``num_classes``)."""
    cls = type(model)
    return f"import:{cls.__module__}:{cls.__qualname__}"


def _checked_logits(logits: np.ndarray, n: int, classes: int) -> np.ndarray:
    import numpy as np

    if logits.shape != (n, classes):
        raise ExplainkitError(
            f"the model returned outputs of shape {list(logits.shape)} for {n} images; a "
            f"classifier of {classes} classes returns [{n}, {classes}]"
        )
    if not np.isfinite(logits).all():
        raise ExplainkitError(
            "the model's outputs hold NaN or infinity; this epoch was not written"
        )
    return logits


def _logits(
    model: nn.Module,
    images: Any,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    device: Any,
    batch_size: int,
) -> np.ndarray:
    """The model's logits for the eval images (or clips), normalized as a run evaluates them,
    batch by batch (a streamed dataset is never whole in memory); the model's mode is
    restored."""
    import torch

    from explainkit.clip_files import model_input
    from explainkit.data import iter_batches
    from explainkit.explain.outputs import scores_of

    was_training = model.training
    model.to(device).eval()
    chunks = []
    try:
        with torch.inference_mode():
            for _, batch in iter_batches(images, batch_size, pin_memory=device.type == "cuda"):
                chunks.append(scores_of(model(model_input(batch, mean, std, device))).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(chunks).numpy()
