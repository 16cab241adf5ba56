"""The training loop: data on the device, batched augmentation, per-epoch eval, safe outputs.

Everything an epoch produces (checkpoint, logits, history) is committed atomically after the
epoch, so a run killed at any moment can be inspected, analyzed and resumed.
"""

from __future__ import annotations

import copy
import json
import math
import platform
import random
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from explainkit import __version__
from explainkit.atomic import write_atomic
from explainkit.config import TrainConfig
from explainkit.device import resolve_device
from explainkit.errors import ExplainkitError, RunError
from explainkit.faults import fault_point
from explainkit.rundir import CONFIG_FORMAT, CONFIG_VERSION, RunDir
from explainkit.store import append_epoch, create_store, truncate_store
from explainkit.train import distributed as dist_utils
from explainkit.train.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint


class TrainingInterrupted(ExplainkitError):
    """SIGINT/SIGTERM stopped training at a safe point; completed epochs are kept."""


@dataclass
class _Split:
    images: torch.Tensor  # uint8 NCHW on the device
    targets: torch.Tensor  # int64 on the device


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


def one_cycle_factor(
    step: int, total: int, warmup: float = 0.25, start: float = 0.1, end: float = 0.005
) -> float:
    """LR multiplier: ``start`` -> 1 over ``warmup`` of the steps, then down to ``end``."""
    peak = max(1.0, warmup * total)
    if step < peak:
        return start + (1 - start) * step / peak
    return max(end, 1 - (1 - end) * (step - peak) / max(1.0, total - peak))


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state(data_gen: torch.Generator, aug_gen: torch.Generator) -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]),
        "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
        "numpy_pos": int(np.random.get_state()[2]),
        "data": data_gen.get_state(),
        "augment": aug_gen.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng_state(
    state: dict[str, Any], data_gen: torch.Generator, aug_gen: torch.Generator
) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    keys = state["numpy"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, int(state.get("numpy_pos", 624)), 0, 0.0))
    data_gen.set_state(state["data"])
    aug_gen.set_state(state["augment"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Trainer:
    """One training run. ``run()`` trains from the current epoch to ``config.epochs``."""

    def __init__(
        self,
        config: TrainConfig,
        run_dir: Path,
        quiet: bool = False,
        dist: dist_utils.DistContext | None = None,
    ) -> None:
        from explainkit.data import channel_stats, load_dataset
        from explainkit.data.augment import cutout, random_crop, random_flip
        from explainkit.models import build_model, default_target_layer

        self._crop, self._flip, self._cutout = random_crop, random_flip, cutout
        self.config = config
        self.run_dir = run_dir
        self.rundir = RunDir(run_dir)
        self.quiet = quiet
        self.dist = dist or dist_utils.init_from_env(config.device)
        self.device = self.dist.device if self.dist.enabled else resolve_device(config.device)
        self.is_main = self.dist.rank == 0
        _seed_everything(config.seed)

        train = load_dataset(
            config.dataset,
            "train",
            config.data_dir,
            config.image_size,
            config.seed,
            config.limit_train,
        )
        evals = load_dataset(
            config.dataset,
            "eval",
            config.data_dir,
            config.image_size,
            config.seed,
            config.limit_eval,
        )
        if len(train.images) < 2:
            raise ExplainkitError("the training split has fewer than 2 images")
        self.classes = list(train.classes)
        self.mean, self.std = channel_stats(train.images)
        self.eval_data = evals
        self.train_split = self._to_device(train.images, train.targets)
        self.eval_split = self._to_device(evals.images, evals.targets)
        self.num_train = len(train.images)
        self.num_eval = len(evals.images)

        cuda = self.device.type == "cuda"
        self.model = build_model(config.model, len(self.classes), config.width).to(self.device)
        self.model_spec = {
            "arch": config.model,
            "width": config.width,
            "num_classes": len(self.classes),
            "input_shape": [3, config.image_size, config.image_size],
            "default_layer": default_target_layer(self.model),
        }
        self.channels_last = cuda and config.channels_last
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if cuda:
            torch.backends.cudnn.benchmark = True
        self.amp_dtype: torch.dtype | None = None
        if cuda and config.amp:
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)

        if self.dist.enabled and cuda and config.sync_bn:
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        # The EMA copy (when asked for) is what gets evaluated, stored and checkpointed.
        self.ema_model: nn.Module | None = None
        if config.ema > 0:
            self.ema_model = copy.deepcopy(self.model).requires_grad_(False)
            # Weights and BatchNorm running statistics are averaged alike, so the averaged
            # weights are evaluated with matching statistics; the batch counter is copied.
            floats = [b.is_floating_point() for b in self.model.buffers()]
            self._ema_pairs = (
                list(self.ema_model.parameters())
                + [b for b, f in zip(self.ema_model.buffers(), floats, strict=True) if f],
                list(self.model.parameters())
                + [b for b, f in zip(self.model.buffers(), floats, strict=True) if f],
                [b for b, f in zip(self.ema_model.buffers(), floats, strict=True) if not f],
                [b for b, f in zip(self.model.buffers(), floats, strict=True) if not f],
            )
        self.ema_updates = 0
        self.net: nn.Module = self.model
        if self.dist.enabled:
            self.net = dist_utils.wrap_ddp(self.model, self.device)
        self.forward_net = torch.compile(self.net) if config.compile else self.net

        self.optimizer = torch.optim.SGD(
            self.model.parameters(),
            lr=config.lr,
            momentum=config.momentum,
            nesterov=config.nesterov and config.momentum > 0,
            weight_decay=config.weight_decay,
        )
        self.steps_per_epoch = self._steps_per_epoch()
        self.scheduler = self._make_scheduler()
        self.data_gen = torch.Generator().manual_seed(config.seed)
        self.aug_gen = torch.Generator(device=self.device).manual_seed(config.seed + 1)
        self.mean_t = torch.tensor(self.mean, device=self.device).view(1, 3, 1, 1)
        self.std_t = torch.tensor(self.std, device=self.device).view(1, 3, 1, 1)
        self.epoch = 0
        self.best_acc = -1.0
        self.best_epoch = 0
        self.last_lr = config.lr

    # -- setup helpers -------------------------------------------------------------------
    def _to_device(self, images: np.ndarray, targets: np.ndarray) -> _Split:
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()
        return _Split(x.to(self.device), torch.from_numpy(targets).long().to(self.device))

    def _local_batch(self) -> int:
        return self.config.batch_size

    def _steps_per_epoch(self) -> int:
        per_rank = math.ceil(self.num_train / self.dist.world_size)
        full, rest = divmod(per_rank, self._local_batch())
        return full + (1 if rest > 1 else 0)  # a 1-image batch cannot train BatchNorm

    def _make_scheduler(self) -> torch.optim.lr_scheduler.LRScheduler:
        """One-cycle (linear warm-up over the first quarter, then linear decay), as a plain
        LambdaLR so its state is a few numbers and any number of steps works."""
        if self.config.schedule == "constant":
            return torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: 1.0)
        total = max(1, self.config.epochs * self.steps_per_epoch)
        return torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: one_cycle_factor(step, total)
        )

    # -- checkpoints -----------------------------------------------------------------------
    def state(self, eval_acc: float) -> dict[str, Any]:
        return {
            "model": self.model_spec,
            "state_dict": self.eval_model.state_dict(),
            "train_state_dict": self.model.state_dict() if self.ema_model is not None else None,
            "ema_updates": self.ema_updates,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "eval_acc": eval_acc,
            "best_acc": self.best_acc,
            "best_epoch": self.best_epoch,
            "rng": _rng_state(self.data_gen, self.aug_gen),
            "config": self.config.to_dict(),
            "classes": self.classes,
            "mean": list(self.mean),
            "std": list(self.std),
        }

    def load_state(self, data: dict[str, Any]) -> None:
        if self.ema_model is not None:
            self.ema_model.load_state_dict(data["state_dict"])
            self.model.load_state_dict(data["train_state_dict"])
            self.ema_updates = int(data["ema_updates"])
        else:
            self.model.load_state_dict(data["state_dict"])
        self.optimizer.load_state_dict(data["optimizer"])
        self.scheduler.load_state_dict(data["scheduler"])
        self.scaler.load_state_dict(data["scaler"])
        self.epoch = int(data["epoch"])
        self.best_acc = float(data["best_acc"])
        self.best_epoch = int(data["best_epoch"])
        _restore_rng_state(data["rng"], self.data_gen, self.aug_gen)

    # -- one epoch -------------------------------------------------------------------------
    def _augment(self, xb: torch.Tensor) -> torch.Tensor:
        c = self.config
        x = xb.float().div_(255)
        if c.crop_padding:
            x = self._crop(x, c.crop_padding, self.aug_gen)
        if c.flip:
            x = self._flip(x, self.aug_gen)
        x = (x - self.mean_t) / self.std_t
        if c.cutout:
            x = self._cutout(x, c.cutout, self.aug_gen)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _normalize(self, xb: torch.Tensor) -> torch.Tensor:
        x = (xb.float().div_(255) - self.mean_t) / self.std_t
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _should_stop(self, stop: _StopFlag, step: int) -> bool:
        """Single process: at once. Under torchrun all ranks agree every 8 steps, so no rank
        is left waiting in an all-reduce for one that stopped."""
        if not self.dist.enabled:
            return stop.signal is not None
        if step % 8:
            return False
        return (
            self.dist.all_reduce_sum(
                torch.tensor(float(stop.signal is not None), device=self.device)
            ).item()
            > 0
        )

    def train_epoch(self, stop: _StopFlag) -> tuple[float, float, float]:
        self.net.train()
        perm = torch.randperm(self.num_train, generator=self.data_gen)
        perm = self.dist.shard(perm).to(self.device)
        bs = self._local_batch()
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        seen = 0
        bar = self._progress(self.steps_per_epoch, f"epoch {self.epoch + 1}")
        start = time.perf_counter()
        for step in range(self.steps_per_epoch):
            if self._should_stop(stop, step):
                raise TrainingInterrupted(
                    f"training stopped by a signal during epoch {self.epoch + 1}; "
                    f"epochs 1..{self.epoch} are saved; continue with: "
                    f"explainkit train --resume {self.run_dir}"
                )
            if step == self.steps_per_epoch // 2:
                fault_point(f"step:{self.epoch + 1}")
            idx = perm[step * bs : (step + 1) * bs]
            x = self._augment(self.train_split.images[idx])
            y = self.train_split.targets[idx]
            with torch.autocast(
                self.device.type,
                dtype=self.amp_dtype or torch.float32,
                enabled=self.amp_dtype is not None,
            ):
                out = self.forward_net(x)
                loss = F.cross_entropy(out, y, label_smoothing=self.config.label_smoothing)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.last_lr = self.optimizer.param_groups[0]["lr"]
            self.scheduler.step()
            if self.ema_model is not None:
                self._update_ema()
            n = len(y)
            seen += n
            loss_sum += loss.detach() * n
            correct += (out.detach().argmax(1) == y).sum()
            if bar is not None:
                bar.update(1)
                if step % 20 == 0 or step == self.steps_per_epoch - 1:
                    bar.set_postfix(
                        loss=f"{loss_sum.item() / seen:.3f}",
                        acc=f"{100 * correct.item() / seen:.1f}%",
                        img_s=f"{seen * self.dist.world_size / (time.perf_counter() - start):.0f}",
                    )
        if bar is not None:
            bar.close()
        totals = torch.stack([loss_sum, correct.to(loss_sum.dtype)])
        totals = self.dist.all_reduce_sum(totals)
        seen_all = self.dist.all_reduce_sum(torch.tensor(float(seen), device=self.device))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        total_seen = float(seen_all)
        return float(totals[0]) / total_seen, float(totals[1]) / total_seen, total_seen / seconds

    @torch.no_grad()
    def _update_ema(self) -> None:
        """ema = decay * ema + (1 - decay) * weights, with a warm-up so early EMA is not stale."""
        self.ema_updates += 1
        decay = min(self.config.ema, (1 + self.ema_updates) / (10 + self.ema_updates))
        ema_p, p, ema_b, b = self._ema_pairs
        torch._foreach_lerp_(ema_p, p, 1 - decay)
        torch._foreach_copy_(ema_b, b)

    @property
    def eval_model(self) -> nn.Module:
        return self.ema_model if self.ema_model is not None else self.model

    @torch.inference_mode()
    def evaluate(self) -> tuple[np.ndarray, float, float]:
        """Logits of the whole eval split in order (gathered across ranks), loss and accuracy."""
        self.net.eval()
        model = self.eval_model.eval()
        self.dist.sync_buffers(model)
        indices = self.dist.eval_indices(self.num_eval)
        chunks = []
        bs = max(self._local_batch(), 256)
        for start in range(0, len(indices), bs):
            idx = indices[start : start + bs].to(self.device)
            x = self._normalize(self.eval_split.images[idx])
            with torch.autocast(
                self.device.type,
                dtype=self.amp_dtype or torch.float32,
                enabled=self.amp_dtype is not None,
            ):
                out = model(x).float()
                if self.config.tta:
                    out = (out + model(x.flip(3)).float()) / 2
                chunks.append(out)
        local = (
            torch.cat(chunks) if chunks else torch.zeros(0, len(self.classes), device=self.device)
        )
        logits = self.dist.gather_eval(local, self.num_eval)
        targets = self.eval_split.targets
        loss = F.cross_entropy(logits, targets).item()
        acc = (logits.argmax(1) == targets).float().mean().item()
        return logits.cpu().numpy(), loss, acc

    def _progress(self, total: int, desc: str) -> Any:
        if self.quiet or not self.is_main or not sys.stderr.isatty():
            return None
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)

    # -- the run ---------------------------------------------------------------------------
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
        self._prune_checkpoints()

    def _prune_checkpoints(self) -> None:
        keep = self.config.keep_checkpoints
        if keep is None:
            return
        saved = list_checkpoints(self.run_dir)
        recent = set(sorted(saved)[-keep:])
        for epoch, path in saved.items():
            if epoch != 1 and epoch != self.best_epoch and epoch not in recent:
                path.unlink(missing_ok=True)

    def run(self) -> None:
        with _StopFlag() as stop:
            while self.epoch < self.config.epochs:
                start = time.perf_counter()
                train_loss, train_acc, images_per_s = self.train_epoch(stop)
                lr = self.last_lr
                logits, eval_loss, eval_acc = self.evaluate()
                self.epoch += 1
                seconds = time.perf_counter() - start
                row = {
                    "epoch": self.epoch,
                    "train_loss": train_loss,
                    "train_acc": train_acc,
                    "eval_loss": eval_loss,
                    "eval_acc": eval_acc,
                    "lr": lr,
                    "seconds": seconds,
                    "images_per_s": images_per_s,
                }
                self.commit_epoch(logits, row, eval_acc)
                if self.is_main:
                    print(
                        f"epoch {self.epoch:>3}/{self.config.epochs}  "
                        f"train loss {train_loss:.4f} acc {100 * train_acc:5.2f}%  "
                        f"eval loss {eval_loss:.4f} acc {100 * eval_acc:5.2f}%  "
                        f"lr {lr:.4f}  {seconds:6.1f}s  {images_per_s:7.0f} img/s",
                        file=sys.stderr,
                        flush=True,
                    )
                self.dist.barrier()
                if self._should_stop(stop, 0) and self.epoch < self.config.epochs:
                    raise TrainingInterrupted(
                        f"training stopped by signal {stop.signal} after epoch {self.epoch}; "
                        f"continue with: explainkit train --resume {self.run_dir}"
                    )


def _environment(device: torch.device) -> dict[str, Any]:
    import torchvision

    env = {
        "explainkit": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
    return env


# Options that change what a run means; resume refuses to change them.
FIXED_ON_RESUME = (
    "dataset",
    "data_dir",
    "image_size",
    "model",
    "width",
    "batch_size",
    "lr",
    "momentum",
    "nesterov",
    "weight_decay",
    "schedule",
    "label_smoothing",
    "crop_padding",
    "flip",
    "cutout",
    "seed",
    "limit_train",
    "limit_eval",
)


def resume_config(run_dir: Path, overrides: dict[str, Any]) -> TrainConfig:
    """The run's own config, with only the options that may change (epochs, device...) changed."""
    saved = TrainConfig.from_dict(RunDir(run_dir).read_config()["config"], source=str(run_dir))
    changed = [k for k, v in overrides.items() if k in FIXED_ON_RESUME and getattr(saved, k) != v]
    if changed:
        flags = ", ".join("--" + k.replace("_", "-") for k in changed)
        raise RunError(
            f"{flags} would change the meaning of {run_dir}; resume keeps the run's own "
            "settings (only --epochs, --device, --compile, --keep-checkpoints may change)"
        )
    for key, value in overrides.items():
        setattr(saved, key, value)
    saved.validate()
    return saved


def _write_run_files(trainer: Trainer, config: TrainConfig, run_dir: Path) -> None:
    run = RunDir(run_dir)
    run.checkpoints.mkdir(exist_ok=True)
    config_json = {
        "format": CONFIG_FORMAT,
        "format_version": CONFIG_VERSION,
        "config": config.to_dict(),
        "model": trainer.model_spec,
        "data": {
            "dataset": config.dataset,
            "classes": trainer.classes,
            "num_train": trainer.num_train,
            "num_eval": trainer.num_eval,
            "mean": list(trainer.mean),
            "std": list(trainer.std),
        },
        "environment": _environment(trainer.device),
        "world_size": trainer.dist.world_size,
    }
    write_atomic(run.config_path, json.dumps(config_json, indent=2) + "\n", RunError)


def _resume_state(trainer: Trainer, run_dir: Path) -> None:
    """Load last.pt and trim the store to its epoch (later epochs were never checkpointed)."""
    run = RunDir(run_dir)
    last = run.checkpoint("last")
    if not last.is_file():
        raise RunError(
            f"{run_dir} has no checkpoints/last.pt to resume from (it stopped before its first "
            "epoch ended); start it again with --overwrite"
        )
    data = load_checkpoint(last)
    trainer.load_state(data)
    if trainer.is_main:
        truncate_store(run.store_path, trainer.epoch)
        stray = [e for e in list_checkpoints(run_dir) if e > trainer.epoch]
        for epoch in stray:
            run.checkpoint(epoch).unlink(missing_ok=True)
        for tmp in run.checkpoints.glob(".*.tmp-*"):  # from a write that was killed
            tmp.unlink(missing_ok=True)


def train(
    config: TrainConfig,
    out: str | Path | None = None,
    overwrite: bool = False,
    quiet: bool = False,
    resume: bool = False,
) -> Path:
    """Train a new run into ``out`` (default ``runs/<time>``), or continue it with ``resume``.

    Returns the run directory. Under torchrun every rank calls this; only rank 0 writes.
    """
    config.validate()
    if resume and out is None:
        raise RunError("resume needs the run directory")
    run = RunDir(out) if out else RunDir.new_default()
    run_dir = run.path
    dist = dist_utils.init_from_env(config.device)
    lock = run.lock()
    try:
        error = None
        if dist.rank == 0:
            try:
                if resume:
                    if not run.has_config:
                        raise RunError(f"{run_dir} is not a run directory; nothing to resume")
                else:
                    run.prepare(overwrite)
                lock.acquire()
            except RunError as e:
                error = e
        failed = dist.broadcast_flag(error is not None)
        if error is not None:
            raise error
        if failed:
            raise RunError(f"rank 0 could not prepare {run_dir}; see its message")
        trainer = Trainer(config, run_dir, quiet=quiet, dist=dist)
        if trainer.is_main:
            _write_run_files(trainer, config, run_dir)
            if not resume:
                ev = trainer.eval_data
                create_store(
                    run.store_path,
                    images=ev.images,
                    targets=ev.targets,
                    index=ev.index,
                    masks=ev.masks,
                    classes=trainer.classes,
                    dataset=config.dataset,
                    model=trainer.model_spec,
                    mean=trainer.mean,
                    std=trainer.std,
                    eval_weights="ema" if config.ema > 0 else "trained",
                    eval_tta=config.tta,
                )
        trainer.dist.barrier()
        if resume:
            _resume_state(trainer, run_dir)
            trainer.dist.barrier()
            if trainer.is_main:
                print(f"resuming {run_dir} after epoch {trainer.epoch}", file=sys.stderr)
        trainer.run()
    finally:
        lock.release()
        dist_utils.shutdown()
    return run_dir
