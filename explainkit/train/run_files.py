"""What a run writes before its first epoch: config.json, and (new runs) the empty store."""

from __future__ import annotations

import json
import platform
from typing import TYPE_CHECKING, Any

import torch

from explainkit import __version__
from explainkit.atomic import write_atomic
from explainkit.config import TrainConfig
from explainkit.errors import RunError
from explainkit.rundir import CONFIG_FORMAT, CONFIG_VERSION, RunDir
from explainkit.store import create_store

if TYPE_CHECKING:
    from explainkit.train.trainer import Trainer


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


def write_config(trainer: Trainer, config: TrainConfig, run: RunDir) -> None:
    """config.json (the resolved config, model spec, data facts, environment); checkpoints/."""
    run.checkpoints.mkdir(exist_ok=True)
    config_json = {
        "format": CONFIG_FORMAT,
        "format_version": CONFIG_VERSION,
        "config": config.to_dict(),
        "model": trainer.model_spec,
        "data": {
            "dataset": config.dataset,
            "classes": trainer.classes,
            "num_train": trainer.data.num_train,
            "num_eval": trainer.data.num_eval,
            "mean": list(trainer.mean),
            "std": list(trainer.std),
        },
        "environment": _environment(trainer.device),
        "world_size": trainer.dist.world_size,
    }
    write_atomic(run.config_path, json.dumps(config_json, indent=2) + "\n", RunError)


def create_empty_store(trainer: Trainer, config: TrainConfig, run: RunDir) -> None:
    """A new run's empty prediction store: the eval images, and what their logits will be.

    The images' source paths (folder datasets) and original sizes go in too, so reports name
    the user's files and their sizes without the data folder.
    """
    ev = trainer.data.eval_data
    create_store(
        run.store_path,
        images=ev.images,
        targets=ev.targets,
        index=ev.index,
        masks=ev.masks,
        paths=ev.paths,
        sizes=ev.sizes,
        classes=trainer.classes,
        dataset=config.dataset,
        model=trainer.model_spec,
        mean=trainer.mean,
        std=trainer.std,
        eval_weights="ema" if config.ema > 0 else "trained",
        eval_tta=config.tta,
    )
