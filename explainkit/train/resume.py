"""Continuing a run: which options may change (config.RESUMABLE), and its last checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from explainkit.config import RESUMABLE, TrainConfig, refused_on_resume
from explainkit.errors import RunError
from explainkit.rundir import RunDir
from explainkit.store import truncate_store
from explainkit.train.checkpoint import list_checkpoints, load_checkpoint

if TYPE_CHECKING:
    from explainkit.train.trainer import Trainer


def _saved_config(run: RunDir) -> TrainConfig:
    return TrainConfig.from_dict(run.read_config()["config"], source=str(run.path))


def _refuse(run: RunDir, options: list[str]) -> None:
    if options:
        flags = ", ".join("--" + k.replace("_", "-") for k in options)
        allowed = ", ".join("--" + k.replace("_", "-") for k in RESUMABLE)
        raise RunError(
            f"{flags} would change the meaning of {run.path}; resume keeps the run's own "
            f"settings (only {allowed} may change)"
        )


def resume_config(run_dir: Path, overrides: dict[str, Any]) -> TrainConfig:
    """The run's own config, with only the options that may change (epochs, device...) changed."""
    run = RunDir(run_dir)
    saved = _saved_config(run)
    _refuse(run, refused_on_resume(saved, overrides))
    for key, value in overrides.items():
        setattr(saved, key, value)
    saved.validate()
    return saved


def check_resume_config(run_dir: Path, config: TrainConfig) -> None:
    """Refuse to continue ``run_dir`` with a config that changes what the run means."""
    run = RunDir(run_dir)
    _refuse(run, refused_on_resume(_saved_config(run), config.to_dict()))


def restore_last_checkpoint(trainer: Trainer, run_dir: Path) -> None:
    """Load last.pt and trim the store to its epoch (later epochs were never checkpointed)."""
    run = RunDir(run_dir)
    last = run.checkpoint("last")
    if not last.is_file():
        raise RunError(
            f"{run_dir} has no checkpoints/last.pt to resume from (it stopped before its first "
            "epoch ended); start it again with --overwrite"
        )
    trainer.load_state(load_checkpoint(last))
    if trainer.is_main:
        truncate_store(run.store_path, trainer.epoch)
        stray = [e for e in list_checkpoints(run_dir) if e > trainer.epoch]
        for epoch in stray:
            run.checkpoint(epoch).unlink(missing_ok=True)
        for tmp in run.checkpoints.glob(".*.tmp-*"):  # from a write that was killed
            tmp.unlink(missing_ok=True)
