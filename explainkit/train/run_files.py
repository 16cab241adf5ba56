"""What a run writes besides its epochs: the claim on its folder, config.json, the empty store
(new runs) and train.log."""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from explainkit import __version__
from explainkit.atomic import write_atomic
from explainkit.config import Options, TrainConfig
from explainkit.errors import ExplainkitError, RunError, write_failed
from explainkit.rundir import CONFIG_FORMAT, CONFIG_VERSION, RunDir, RunLock
from explainkit.store import StoreBuilder
from explainkit.train.distributed import DistContext
from explainkit.train.resume import check_resume_config

if TYPE_CHECKING:
    from explainkit.data import Dataset


@dataclass
class RunFacts:
    """What a new run's config.json and empty store record: the trainer and
    ``explainkit evaluate`` each fill one in, and both write their run the same way.

    ``command`` is what wrote the run (``"train"`` or ``"evaluate"``, config.json's
    ``command``); ``eval_weights`` and ``eval_tta`` say what the stored logits are (the
    moving average or the trained weights, with or without flip TTA).
    """

    model_spec: dict[str, Any]
    classes: list[str]
    eval_data: Dataset
    num_train: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    device: torch.device
    dataset: str
    command: str = "train"
    world_size: int = 1
    eval_weights: str = "trained"
    eval_tta: bool = False
    task: str = "classification"
    train_subset: str = ""  # which training images a limit kept, in words ('' for all)


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


def write_config(facts: RunFacts, config: Options, run: RunDir) -> None:
    """config.json (what wrote it, the resolved config, model spec, data facts, environment);
    checkpoints/. The half-made marker goes once config.json is there."""
    run.checkpoints.mkdir(exist_ok=True)
    config_json = {
        "format": CONFIG_FORMAT,
        "format_version": CONFIG_VERSION,
        "command": facts.command,
        "config": config.to_dict(),
        "model": facts.model_spec,
        "data": {
            "dataset": facts.dataset,
            "classes": facts.classes,
            "num_train": facts.num_train,
            "num_eval": len(facts.eval_data),
            "mean": list(facts.mean),
            "std": list(facts.std),
            # What was read and which images a limit kept (--limit-train/--limit-eval).
            "eval_source": facts.eval_data.note,
            "eval_subset": facts.eval_data.subset,
            "train_subset": facts.train_subset,
        },
        "environment": _environment(facts.device),
        "world_size": facts.world_size,
    }
    write_atomic(run.config_path, json.dumps(config_json, indent=2) + "\n", RunError)
    run.end_setup()  # the config says what the folder is now: no longer half-made


STORE_BATCH = 256  # images decoded and written at a time: 38 MB at 224 px


def create_empty_store(facts: RunFacts, run: RunDir) -> None:
    """A new run's empty prediction store: the eval images, and what their logits will be.

    The images are streamed in batches (decoded by workers when the split is lazy), so the
    store is written in bounded memory. The images' source paths (folder datasets) and
    original sizes go in too, so reports name the user's files and their sizes without the
    data folder.
    """
    from explainkit.data import iter_batches
    from explainkit.data.tasks import store_truth

    ev = facts.eval_data
    targets, truth = store_truth(facts.task, ev)  # a task's ground truth (data/tasks.py)
    pixels = [name for name, values in truth.items() if np.ndim(values) == 3]
    with StoreBuilder(
        run.store_path,
        targets=targets,
        index=ev.index,
        classes=facts.classes,
        dataset=facts.dataset,
        model=facts.model_spec,
        mean=facts.mean,
        std=facts.std,
        image_shape=tuple(ev.images.shape[1:]),
        has_masks=ev.masks is not None,
        paths=ev.paths,
        sizes=ev.sizes,
        eval_weights=facts.eval_weights,
        eval_tta=facts.eval_tta,
        task=facts.task,
        truth={name: values for name, values in truth.items() if name not in pixels},
    ) as builder:
        for start, images in iter_batches(ev, STORE_BATCH):
            part = slice(start, start + len(images))
            masks = None if ev.masks is None else ev.masks[part]
            builder.add_images(images.numpy(), masks, {name: truth[name][part] for name in pixels})


def append_log(run: RunDir, line: str) -> None:
    """Append one line to ``RUN/train.log`` and flush it: the file grows by whole lines, a
    resumed run continues it, and ``--overwrite`` removes it with the run's other files."""
    try:
        with open(run.log_path, "a", encoding="utf-8", errors="replace") as f:
            f.write(line + "\n")
            f.flush()
    except OSError as e:
        raise RunError(
            f"{write_failed(run.log_path, e)}, then resume with: explainkit train --resume "
            f"{run.path}"
        ) from e


def claim_run(
    run: RunDir, config: TrainConfig, dist: DistContext, overwrite: bool, resume: bool
) -> RunLock | None:
    """Rank 0 locks the run, then checks it (resume) or clears it (new); every rank learns
    whether that worked, so none trains on a run that was refused. Nothing is written
    before the lock is held."""
    error, lock = None, None
    if dist.rank == 0:
        try:
            lock = run.open_existing() if resume else run.create(overwrite)
            if resume:
                check_resume_config(run.path, config)
        except ExplainkitError as e:
            error = e
            if lock is not None:
                lock.release()
                lock = None
    failed = dist.broadcast_flag(error is not None)
    if error is not None:
        raise error
    if failed:
        raise RunError(f"rank 0 could not prepare {run.path}; see its message")
    return lock
