"""The training loop: steps, per-epoch eval, and one safe commit of what each epoch made.

Everything an epoch produces (checkpoint, logits, history) is committed atomically after the
epoch, so a run killed at any moment can be inspected, analyzed and resumed. The line printed
for each epoch is appended to ``RUN/train.log`` as well, once the epoch is committed.

The parts the Trainer is made of live beside this file, one place each:

    device_data.py  the splits as uint8 tensors on the device; augmentation and normalization
    streamed_data.py  a split too large for memory, decoded batch by batch by DataLoader workers
    optim.py        SGD and the one-cycle learning-rate schedule
    ema.py          the moving average of the weights (``--ema``)
    state.py        seeding, and saving and restoring every random state
    checkpoint.py   the checkpoint file: layout, loading, loading a model, pruning
    weights.py      the weights a run starts from (``--weights``)
    resume.py       what may change on ``--resume``, and continuing from last.pt
    run_files.py    config.json and the empty prediction store, written before epoch 1
"""

from __future__ import annotations

import math
import signal
import sys
import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from explainkit.config import FIELDS, TrainConfig
from explainkit.device import resolve_device
from explainkit.errors import RunError, TrainingDiverged, TrainingInterrupted
from explainkit.explain.layers import run_default_layer
from explainkit.faults import fault_point
from explainkit.registries import Registries, accepted_kwargs
from explainkit.rundir import RunDir
from explainkit.store import append_epoch
from explainkit.train import distributed as dist_utils
from explainkit.train.checkpoint import prune_checkpoints, save_checkpoint
from explainkit.train.device_data import DeviceData
from explainkit.train.ema import EMA
from explainkit.train.optim import make_optimizer, make_scheduler, one_cycle_factor, steps_per_epoch
from explainkit.train.resume import resume_config, resume_point, trim_to_checkpoint
from explainkit.train.run_files import (
    RunFacts,
    append_log,
    claim_run,
    create_empty_store,
    write_config,
)
from explainkit.train.state import restore_rng_state, rng_state, seed_everything
from explainkit.train.weights import InitialWeights, apply_weights, read_weights
from explainkit.trust import imported_module, trusted_imports

__all__ = ["Trainer", "TrainingInterrupted", "one_cycle_factor", "resume_config", "train"]


class _StopFlag:
    """Turns SIGINT/SIGTERM into a flag checked between steps (a safe point)."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


class Trainer:
    """One training run. ``run()`` trains from the current epoch to ``config.epochs``."""

    def __init__(
        self,
        config: TrainConfig,
        run_dir: Path,
        registries: Registries,
        quiet: bool = False,
        dist: dist_utils.DistContext | None = None,
        weights: InitialWeights | None = None,
        load_weights: bool = True,
    ) -> None:
        """Set the run up: device, data, model (from its initial weights), optimizer.

        Args:
            config: The run's config.
            run_dir: Its directory (already claimed: see :func:`train`).
            registries: Where its model and dataset are looked up.
            quiet: No progress bars.
            dist: The torchrun context (default: read from the environment).
            weights: ``config.weights`` already read (:func:`train` reads them before it
                writes anything); None reads them here.
            load_weights: False when a checkpoint will replace them anyway (a resume).
        """
        self.config = config
        self.registries = registries
        self.run_dir = run_dir
        self.rundir = RunDir(run_dir)
        self.quiet = quiet
        self._choose_device(dist)
        seed_everything(config.seed)  # before the first random draw (the data, the init)
        self.data = DeviceData(config, registries, self.device, self.channels_last)
        self._build_model(weights, load_weights)
        self.ema = EMA(self.model, config.ema) if config.ema > 0 else None
        self._wrap_model()
        self._build_optimizer()
        self.epoch = 0
        self.best_acc = -1.0
        self.best_epoch = 0
        self.last_lr = config.lr

    # -- setup, in the order __init__ calls it ---------------------------------------------
    def _choose_device(self, dist: dist_utils.DistContext | None) -> None:
        """This process's device (its own GPU under torchrun) and its rank."""
        self.dist = dist or dist_utils.init_from_env(self.config.device)
        self.device = self.dist.device if self.dist.enabled else resolve_device(self.config.device)
        self.is_main = self.dist.rank == 0
        # Batches and the model share one memory format, so both need to know it.
        self.channels_last = self.device.type == "cuda" and self.config.channels_last

    def _build_model(self, weights: InitialWeights | None, load_weights: bool) -> None:
        """The bare model on the device (what is checkpointed), its spec, and mixed precision.

        The model is built through the registry (``config.model``), given the arguments its
        ``build`` takes (``width``, ``image_size``), started from ``config.weights`` when set,
        and described by :attr:`model_spec`: what a checkpoint needs to build it again.
        """
        config, cuda = self.config, self.device.type == "cuda"
        num_classes = len(self.data.classes)
        entry = self.registries.model_entry(config.model)
        offered = {"width": config.width, "image_size": config.image_size}
        kwargs = accepted_kwargs(entry.build, offered)
        self.model = entry.build(num_classes, **kwargs)
        if "width" not in kwargs and config.width != FIELDS["width"].default:
            self.log(f"note: {config.model} takes no --width; --width {config.width} is ignored")
        if config.weights and load_weights:
            weights = weights or read_weights(config.weights, entry, self.registries)
            self._start_from(weights, entry, num_classes)
        self.model = self.model.to(self.device)
        example = torch.zeros(1, 3, config.image_size, config.image_size, device=self.device)
        layer, reshape = run_default_layer(self.model, entry, example)
        self.model_spec = {
            "arch": config.model,
            **({"width": kwargs["width"]} if "width" in kwargs else {}),
            "kwargs": kwargs,
            "num_classes": num_classes,
            "input_shape": [3, config.image_size, config.image_size],
            "default_layer": layer,
            "reshape": reshape,
        }
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if cuda:
            torch.backends.cudnn.benchmark = True
        self.amp_dtype: torch.dtype | None = None
        if cuda and config.amp:
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if self.dist.enabled and cuda and config.sync_bn:
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)

    def _start_from(self, weights: InitialWeights, entry: Any, num_classes: int) -> None:
        """Copy the initial weights in, and normalize as they were trained when known."""
        for note in apply_weights(self.model, weights, num_classes, entry.name):
            self.log(note)
        if weights.mean is not None and weights.std is not None:
            self.data.use_normalization(weights.mean, weights.std)
        size = self.config.image_size
        if entry.input_size and entry.input_size != size:
            self.log(
                f"note: {entry.name} expects {entry.input_size}-pixel images and this run "
                f"trains at --image-size {size}"
            )

    def _wrap_model(self) -> None:
        """What a training step calls: DDP under torchrun (which averages the gradients),
        compiled when asked. ``self.model`` stays the bare module the checkpoint holds."""
        self.net: nn.Module = self.model
        if self.dist.enabled:
            self.net = dist_utils.wrap_ddp(self.model, self.device)
        self.forward_net = torch.compile(self.net) if self.config.compile else self.net

    def _build_optimizer(self) -> None:
        """SGD, its one-cycle schedule sized in steps, and the scaler that fp16 autocast needs."""
        config = self.config
        self.steps_per_epoch = steps_per_epoch(
            self.data.num_train, self.dist.world_size, config.batch_size
        )
        self.optimizer = make_optimizer(self.model, config)
        self.scheduler = make_scheduler(self.optimizer, config, self.steps_per_epoch)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)

    # -- what the run is made of -----------------------------------------------------------
    @property
    def run_facts(self) -> RunFacts:
        """What this run's config.json and empty store record."""
        return RunFacts(
            model_spec=self.model_spec,
            classes=self.classes,
            eval_data=self.data.eval_data,
            num_train=self.data.num_train,
            mean=self.mean,
            std=self.std,
            device=self.device,
            dataset=self.config.dataset,
            world_size=self.dist.world_size,
            eval_weights="ema" if self.config.ema > 0 else "trained",
            eval_tta=self.config.tta,
            train_subset=self.data.train_subset,
        )

    @property
    def classes(self) -> list[str]:
        return self.data.classes

    @property
    def mean(self) -> tuple[float, ...]:
        return self.data.mean

    @property
    def std(self) -> tuple[float, ...]:
        return self.data.std

    @property
    def eval_model(self) -> nn.Module:
        """The weights that are evaluated and stored: the moving average when there is one."""
        return self.ema.module if self.ema is not None else self.model

    def _autocast(self) -> AbstractContextManager[Any]:
        return torch.autocast(
            self.device.type,
            dtype=self.amp_dtype or torch.float32,
            enabled=self.amp_dtype is not None,
        )

    # -- checkpoints (the layout is described in explainkit.train.checkpoint) -------------
    def state(self, eval_acc: float) -> dict[str, Any]:
        """Everything a checkpoint holds: the weights, and all a resume needs to continue."""
        average = {}
        if self.ema is not None:
            average = {"state_dict_ema": self.ema.state_dict(), "ema_updates": self.ema.updates}
        return {
            "model": self.model_spec,
            "state_dict": self.model.state_dict(),
            **average,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "eval_acc": eval_acc,
            "best_acc": self.best_acc,
            "best_epoch": self.best_epoch,
            "rng": rng_state(self.data.order_gen, self.data.aug_gen),
            "config": self.config.to_dict(),
            "classes": self.classes,
            "mean": list(self.mean),
            "std": list(self.std),
        }

    def load_state(self, data: dict[str, Any]) -> None:
        """Continue from a checkpoint that :meth:`state` wrote (the same config)."""
        ema = data.get("state_dict_ema")
        if (ema is not None) != (self.ema is not None):
            raise RunError(
                f"the checkpoint was trained {'with' if ema is not None else 'without'} --ema "
                f"but this config has --ema {self.config.ema}; resume with the run's own --ema"
            )
        self.model.load_state_dict(data["state_dict"])
        if data.get("mean") is not None and data.get("std") is not None:
            # The run's own normalization: its data's statistics, or its initial weights'.
            self.data.use_normalization(data["mean"], data["std"])
        if self.ema is not None:
            self.ema.load_state_dict(ema, data["ema_updates"])
        self.optimizer.load_state_dict(data["optimizer"])
        self.scheduler.load_state_dict(data["scheduler"])
        if data["scaler"]:  # empty when saved unscaled (CPU, bf16): an fp16 scaler starts fresh
            self.scaler.load_state_dict(data["scaler"])
        self.epoch = int(data["epoch"])
        self.best_acc = float(data["best_acc"])
        self.best_epoch = int(data["best_epoch"])
        restore_rng_state(data["rng"], self.data.order_gen, self.data.aug_gen)

    def commit_epoch(self, logits: np.ndarray, row: dict[str, float], eval_acc: float) -> None:
        """Store first, then checkpoints: resume trusts the checkpoint, the store is trimmed."""
        if not self.is_main:
            return
        append_epoch(self.rundir.store_path, logits, row)
        fault_point(f"store:{self.epoch}")
        is_best = eval_acc > self.best_acc
        if is_best:
            self.best_acc = eval_acc
            self.best_epoch = self.epoch
        # last.pt is the resume point, so it is written after everything it vouches for.
        names = [self.epoch] + (["best"] if is_best else []) + ["last"]
        save_checkpoint([self.rundir.checkpoint(name) for name in names], self.state(eval_acc))
        prune_checkpoints(self.run_dir, self.config.keep_checkpoints, self.best_epoch)

    # -- one epoch -------------------------------------------------------------------------
    def _stop_if_asked(self, stop: _StopFlag, step: int) -> None:
        """Raise TrainingInterrupted (what was saved, how to resume) if a signal asked."""
        if self._should_stop(stop, step):
            resume = f"continue with: explainkit train --resume {self.run_dir}"
            where = f"during epoch {self.epoch + 1}; {self._saved_epochs()}"
            raise TrainingInterrupted(f"training stopped by a signal {where}; {resume}")

    def _should_stop(self, stop: _StopFlag, step: int) -> bool:
        """At once in one process; under torchrun every 8 steps, all ranks agreeing."""
        if not self.dist.enabled:
            return stop.signal is not None
        if step % 8:
            return False
        flag = torch.tensor(float(stop.signal is not None), device=self.device)
        return self.dist.all_reduce_sum(flag).item() > 0

    def _step(
        self, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Forward, then :meth:`_update`. Returns the logits, the objective (label smoothing
        included) and the plain cross-entropy of the same logits (what eval loss measures)."""
        with self._autocast():
            out = self.forward_net(x)
            loss = F.cross_entropy(out, y, label_smoothing=self.config.label_smoothing)
        if self.config.label_smoothing:
            with torch.no_grad():
                ce = F.cross_entropy(out.detach().float(), y)
        else:
            ce = loss.detach()
        self._update(loss)
        return out, loss, ce

    def _update(self, loss: torch.Tensor) -> None:
        """Backward and the optimizer's step; then the schedule and the moving average."""
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.last_lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update()

    def train_epoch_stats(self, stop: _StopFlag) -> dict[str, float]:
        """One pass over this rank's share of the data, as history columns (all ranks):
        ``train_loss`` (the mean objective, label smoothing included), ``train_ce`` (the
        mean plain cross-entropy of the same logits), ``train_acc`` and ``images_per_s``.

        The sums stay on the device until the epoch ends, so no step waits for a number.
        """
        self.net.train()
        order = self.dist.shard(self.data.epoch_order())
        perm = order.to(self.device)
        bs = self.config.batch_size
        batches = self.data.train.batches(order, bs, self.steps_per_epoch)
        loss_sum = torch.zeros((), device=self.device)
        ce_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        seen = 0
        bar = self._progress(self.steps_per_epoch, f"epoch {self.epoch + 1}")
        start = time.perf_counter()
        for step in range(self.steps_per_epoch):
            self._stop_if_asked(stop, step)
            if step == self.steps_per_epoch // 2:
                fault_point(f"step:{self.epoch + 1}")
            idx = perm[step * bs : (step + 1) * bs]
            x = self.data.augment(next(batches))
            y = self.data.train.targets[idx]
            out, loss, ce = self._step(x, y)
            n = len(y)
            seen += n
            loss_sum += loss.detach() * n
            ce_sum += ce * n
            correct += (out.detach().argmax(1) == y).sum()
            if bar is not None:
                self._show_progress(bar, step, loss_sum, correct, seen, start)
        if bar is not None:
            bar.close()
        sums = torch.stack([loss_sum, ce_sum, correct.to(loss_sum.dtype)])
        totals = self.dist.all_reduce_sum(sums)
        seen_all = self.dist.all_reduce_sum(torch.tensor(float(seen), device=self.device))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        total_seen = float(seen_all)
        loss_mean, ce_mean, acc = (float(v) / total_seen for v in totals.cpu())
        return {
            "train_loss": loss_mean,
            "train_ce": ce_mean,
            "train_acc": acc,
            "images_per_s": total_seen / seconds,
        }

    @torch.inference_mode()
    def evaluate(self) -> tuple[np.ndarray, float, float]:
        """Logits of the whole eval split in order (gathered across ranks), loss and accuracy;
        images come a batch at a time (streamed when lazy), only the logits are held whole."""
        self.net.eval()
        model = self.eval_model.eval()
        self.dist.sync_buffers(model)
        indices = self.dist.eval_indices(self.data.num_eval)
        chunks = []
        bs = max(self.config.batch_size, 256)
        for xb in self.data.eval.batches(indices, bs):
            chunks.append(self._eval_batch(model, xb))
        local = (
            torch.cat(chunks) if chunks else torch.zeros(0, len(self.classes), device=self.device)
        )
        logits = self.dist.gather_eval(local, self.data.num_eval)
        targets = self.data.eval.targets
        loss = F.cross_entropy(logits, targets).item()
        acc = (logits.argmax(1) == targets).float().mean().item()
        return logits.cpu().numpy(), loss, acc

    def _eval_batch(self, model: nn.Module, xb: torch.Tensor) -> torch.Tensor:
        """One uint8 batch's logits; its float copies are freed on return, so the next batch
        is never normalized beside them."""
        x = self.data.normalize(xb)
        with self._autocast():
            out = model(x).float()
            if self.config.tta:  # the mirror image too, averaged
                out = (out + model(x.flip(3)).float()) / 2
        return out

    # -- progress and log lines ------------------------------------------------------------
    def _progress(self, total: int, desc: str) -> Any:
        from explainkit.progress import progress, showing_progress

        if self.quiet or not self.is_main or not showing_progress():
            return None
        return progress(total=total, desc=desc, unit="step")

    def _show_progress(
        self,
        bar: Any,
        step: int,
        loss_sum: torch.Tensor,
        correct: torch.Tensor,
        seen: int,
        start: float,
    ) -> None:
        bar.update(1)
        if step % 20 == 0 or step == self.steps_per_epoch - 1:
            bar.set_postfix(
                loss=f"{loss_sum.item() / seen:.3f}",
                acc=f"{100 * correct.item() / seen:.1f}%",
                img_s=f"{seen * self.dist.world_size / (time.perf_counter() - start):.0f}",
            )

    def _log_epoch(self, row: dict[str, float]) -> None:
        self.log(
            f"epoch {self.epoch:>3}/{self.config.epochs}  "
            f"train loss {row['train_loss']:.4f} acc {100 * row['train_acc']:5.2f}%  "
            f"eval loss {row['eval_loss']:.4f} acc {100 * row['eval_acc']:5.2f}%  "
            f"lr {row['lr']:.4f}  {row['seconds']:6.1f}s  {row['images_per_s']:7.0f} img/s"
        )

    def log(self, line: str) -> None:
        """Print ``line`` to stderr and append it to the run's training log (rank 0 only)."""
        if self.is_main:
            print(line, file=sys.stderr, flush=True)
            append_log(self.rundir, line)

    def _saved_epochs(self) -> str:
        if self.epoch == 0:
            return "no epoch was finished yet"
        return f"epochs 1..{self.epoch} are saved"

    def _refuse_non_finite(
        self, train: dict[str, float], eval_loss: float, logits: np.ndarray
    ) -> None:
        """Stop before committing an epoch whose numbers are NaN or infinite: the run stays
        at its last good epoch instead of storing nonsense (checked once per epoch, on the
        epoch's sums, so the loop never waits on the device for it)."""
        train_ok = math.isfinite(train["train_loss"]) and math.isfinite(train["train_ce"])
        if train_ok and math.isfinite(eval_loss) and np.isfinite(logits).all():
            return
        what = "training loss" if not train_ok else "evaluation"
        raise TrainingDiverged(
            f"epoch {self.epoch + 1} produced a non-finite {what} (NaN or infinity) and was "
            f"not saved; {self._saved_epochs()}; train again with a lower --lr"
        )

    # -- the run ---------------------------------------------------------------------------
    def run(self, stop: _StopFlag | None = None) -> None:
        """Train to ``config.epochs``; ``stop``: a flag already catching signals (setup's)."""
        with nullcontext(stop) if stop is not None else _StopFlag() as stop:
            while self.epoch < self.config.epochs:
                start = time.perf_counter()
                train = self.train_epoch_stats(stop)
                lr = self.last_lr
                logits, eval_loss, eval_acc = self.evaluate()
                self._refuse_non_finite(train, eval_loss, logits)
                self.epoch += 1
                row = {
                    "epoch": self.epoch,
                    **train,
                    "eval_loss": eval_loss,  # plain cross-entropy of the stored logits
                    "eval_acc": eval_acc,
                    "lr": lr,
                    "seconds": time.perf_counter() - start,
                }
                self.commit_epoch(logits, row, eval_acc)
                self._log_epoch(row)
                self.dist.barrier()
                if self._should_stop(stop, 0) and self.epoch < self.config.epochs:
                    raise TrainingInterrupted(
                        f"training stopped by signal {stop.signal} after epoch {self.epoch}; "
                        f"continue with: explainkit train --resume {self.run_dir}"
                    )


def _start(
    trainer: Trainer, config: TrainConfig, run: RunDir, point: dict[str, Any] | None
) -> None:
    """Continue from the resume point (if any), then write what the run needs before its
    first step; everything that can refuse was checked before (``resume_point``)."""
    if point is not None:
        trainer.load_state(point)
    resumed = point is not None
    if trainer.is_main:
        facts = trainer.run_facts
        write_config(facts, config, run)
        fault_point("setup:config")
        if resumed:
            trim_to_checkpoint(run, trainer.epoch)
        else:
            create_empty_store(facts, run)
    trainer.dist.barrier()
    if resumed:
        trainer.log(f"resuming {run.path} after epoch {trainer.epoch}")


def train(
    config: TrainConfig,
    registries: Registries,
    out: str | Path | None = None,
    overwrite: bool = False,
    quiet: bool = False,
    resume: bool = False,
    trainer_class: type[Trainer] = Trainer,
) -> Path:
    """Train a new run into ``out`` (default ``runs/<time>``), or continue it with ``resume``.

    ``registries`` (``explainkit.load_registries()``) is where the model and dataset are
    looked up. Returns the run directory. Under torchrun every rank calls this; only rank 0
    writes. ``trainer_class``: another task's trainer (explainkit.train.tasks.train).
    """
    config.validate(registries=registries)
    if resume and out is None:
        raise RunError("resume needs the run directory")
    # Everything the user named must exist before anything is written: the model (a family's
    # name after the colon is checked here) and the weights (read, or downloaded, now).
    entry = registries.model_entry(config.model)
    run = RunDir(out) if out else RunDir.new_default()
    continuing = resume and run.checkpoint("last").is_file()  # its weights replace these
    reading = config.weights and not continuing
    with trusted_imports(None if resume else imported_module(config.model)):  # named by the user
        weights = read_weights(config.weights, entry, registries) if reading else None
    dist = dist_utils.init_from_env(config.device)
    lock = None
    stop = _StopFlag().__enter__()  # a signal during setup stops at the first safe point
    try:
        lock = claim_run(run, config, dist, overwrite, resume)
        fault_point("setup:locked")
        point = resume_point(run, registries) if resume else None
        trainer = trainer_class(
            config,
            run.path,
            registries,
            quiet=quiet,
            dist=dist,
            weights=weights,
            load_weights=not continuing,
        )
        _start(trainer, config, run, point)
        trainer.run(stop)
    finally:
        stop.__exit__()
        if lock is not None:
            lock.release()
        dist_utils.shutdown()
    return run.path
