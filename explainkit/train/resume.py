"""Continuing a run: which options may change (config.RESUMABLE), and its last checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from explainkit.config import RESUMABLE, TrainConfig, refused_on_resume
from explainkit.errors import CheckpointError, RunError
from explainkit.rundir import RunDir
from explainkit.store import TASKS, open_store, truncate_store
from explainkit.train.checkpoint import list_checkpoints, load_checkpoint
from explainkit.trust import check_trusted

# What a checkpoint needs beyond its weights for training to continue exactly.
RESUME_STATE = ("optimizer", "scheduler", "scaler", "rng")

if TYPE_CHECKING:
    from explainkit.registries import Registries


def _saved_config(run: RunDir) -> TrainConfig:
    document = run.read_config()
    check_trusted(document["model"]["arch"], str(run.config_path))  # before any lookup
    if document["command"] != "train":
        raise RunError(
            f"{run.path} was written by explainkit {document['command']}, not trained; there "
            "is no training to resume"
        )
    return TrainConfig.from_dict(document["config"], source=str(run.path))


def _refuse(run: RunDir, options: list[str]) -> None:
    if options:
        flags = ", ".join("--" + k.replace("_", "-") for k in options)
        allowed = ", ".join("--" + k.replace("_", "-") for k in RESUMABLE)
        raise RunError(
            f"{flags} would change the meaning of {run.path}; resume keeps the run's own "
            f"settings (only {allowed} may change)"
        )


def resume_config(run_dir: Path, overrides: dict[str, Any], registries: Registries) -> TrainConfig:
    """The run's own config, with only the options that may change (epochs, device...) changed."""
    run = RunDir(run_dir)
    saved = _saved_config(run)
    _refuse(run, refused_on_resume(saved, overrides))
    for key, value in overrides.items():
        setattr(saved, key, value)
    saved.validate(registries=registries)
    return saved


def check_resume_config(run_dir: Path, config: TrainConfig) -> None:
    """Refuse to continue ``run_dir`` with a config that changes what the run means."""
    run = RunDir(run_dir)
    _refuse(run, refused_on_resume(_saved_config(run), config.to_dict()))


def read_resume_point(run: RunDir, registries: Registries) -> dict[str, Any] | None:
    """last.pt, checked to hold what a resume needs, writing nothing; None when the run has
    no checkpoint yet.

    A run stopped before its first epoch ended has no checkpoint: it starts again from the
    beginning, which (same config, same seed) gives the same bits as an unbroken run. A
    damaged or mismatched checkpoint is refused here, before any file of the run changes.
    """
    last = run.checkpoint("last")
    if not last.is_file():
        return None
    data = load_checkpoint(last, registries)
    missing = [key for key in RESUME_STATE if not isinstance(data.get(key), dict)]
    if missing:
        raise CheckpointError(
            f"{last} holds weights but not the {', '.join(missing)} state a resume continues "
            "from; analyze it, or start the run again with --overwrite"
        )
    return data


def check_resume_store(run: RunDir, last_epoch: int) -> None:
    """Refuse, writing nothing, a store that cannot be continued from the checkpoint of
    ``last_epoch``: damaged or missing, an epoch file deleted (fewer epochs than the
    checkpoint vouches for), or an epoch up to ``last_epoch`` whose data fail their
    checksum. Resume then only appends to epochs that read back."""
    remedy = "it cannot be continued; analyze it as it is, or train it again with --overwrite"
    with open_store(run.store_path) as store:  # StoreError: damaged, says which file
        stored = len(store.epochs)
        if stored < last_epoch:
            raise RunError(
                f"{run.store_path} holds {stored} epochs but {run.checkpoint('last').name} is "
                f"epoch {last_epoch} (an epoch file is missing); {remedy}"
            )
        for epoch in range(1, last_epoch + 1):  # every byte: a checksum error surfaces now
            for spec in TASKS[store.task].epoch:  # logits, or a task's masks, boxes...
                store.epoch_data(spec.name, epoch)


def resume_point(run: RunDir, registries: Registries) -> dict[str, Any] | None:
    """The checkpoint a resume continues from, with the store checked against it: every
    check a resume makes, before any file of the run (config.json, train.log) changes."""
    point = read_resume_point(run, registries)
    if point is not None:
        check_resume_store(run, int(point["epoch"]))
    return point


def trim_to_checkpoint(run: RunDir, last_epoch: int) -> None:
    """Drop what came after the loaded checkpoint (of ``last_epoch``): later store epochs and
    checkpoints, and temporary files of writes that were killed (rank 0 only)."""
    truncate_store(run.store_path, last_epoch)
    for epoch in list_checkpoints(run.path):
        if epoch > last_epoch:
            run.checkpoint(epoch).unlink(missing_ok=True)
    for tmp in run.checkpoints.glob(".*.tmp-*"):
        tmp.unlink(missing_ok=True)
