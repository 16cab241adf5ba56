"""``explainkit inspect``: what a run directory holds and whether it is complete."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from explainkit.errors import RunError


def _read_config(run: Path) -> dict[str, Any]:
    path = run / "config.json"
    if not path.is_file():
        raise RunError(f"{run} has no config.json; is it an explainkit run directory?")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunError(f"{path} is not valid JSON; the run directory is damaged") from e
    if not isinstance(data, dict) or data.get("format") != "explainkit-run":
        raise RunError(f"{path} is not an explainkit run config")
    version = data.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise RunError(f"{path} has an invalid format_version; the run directory is damaged")
    if version > 1:
        raise RunError(f"{path} is from a newer explainkit; upgrade explainkit to read it")
    if not isinstance(data.get("config"), dict) or not isinstance(data.get("model"), dict):
        raise RunError(f"{path} lacks its config or model section; the run directory is damaged")
    return data


def read_run_config(run: str | Path) -> dict[str, Any]:
    """The run's config.json, validated; RunError with one sentence otherwise."""
    run = Path(run)
    if not run.exists():
        raise RunError(f"run directory {run} does not exist")
    if not run.is_dir():
        raise RunError(f"{run} is not a directory; give the run directory written by train")
    return _read_config(run)


def summarize_run(run: Path) -> dict[str, Any]:
    """Everything ``inspect`` prints, as plain data (also used by the report)."""
    from explainkit.store import open_store
    from explainkit.train.checkpoint import checkpoint_dir, list_checkpoints
    from explainkit.train.rundir import pid_alive, read_lock_owner

    data = read_run_config(run)
    config = data["config"]
    with open_store(run) as store:
        store.verify()
        history = store.history
        epochs = store.epochs
        best = store.best_epoch
        summary_store = {
            "path": str(store.path),
            "schema_version": store.attrs["schema_version"],
            "size_bytes": store.path.stat().st_size,
            "eval_images": store.num_images,
            "has_masks": store.has_masks,
        }
    ckpts = list_checkpoints(run)
    named = sorted(p.name for p in checkpoint_dir(run).glob("*.pt"))
    owner = read_lock_owner(run)
    if owner is not None and pid_alive(owner):
        state = "training"
    elif len(epochs) >= config["epochs"]:
        state = "complete"
    elif ckpts:
        state = "interrupted (resumable with explainkit train --resume)"
    else:
        state = "interrupted before the first epoch"
    analyses = []
    adir = run / "analyses"
    if adir.is_dir():
        for manifest in sorted(adir.glob("*/manifest.json")):
            try:
                m = json.loads(manifest.read_text())
                analyses.append({"name": manifest.parent.name, "status": m.get("status", "?")})
            except (OSError, json.JSONDecodeError):
                analyses.append({"name": manifest.parent.name, "status": "unreadable"})
    best_acc = None
    if best is not None:
        best_acc = float(history["eval_acc"][best - 1])
    return {
        "run": str(run),
        "state": state,
        "dataset": config["dataset"],
        "model": data["model"],
        "config": config,
        "device": data.get("environment", {}).get("device"),
        "epochs_done": len(epochs),
        "epochs_planned": config["epochs"],
        "best_epoch": best,
        "best_eval_acc": best_acc,
        "seconds": float(history["seconds"].sum()) if epochs else 0.0,
        "checkpoints": named,
        "store": summary_store,
        "analyses": analyses,
        "history": {k: v.tolist() for k, v in history.items()},
    }


def format_summary(s: dict[str, Any]) -> str:
    m = s["model"]
    lines = [
        f"run          {s['run']}",
        f"state        {s['state']}",
        f"model        {m['arch']} width {m['width']}, {m['num_classes']} classes",
        f"dataset      {s['dataset']} ({s['store']['eval_images']} eval images"
        f"{', with masks' if s['store']['has_masks'] else ''})",
        f"device       {s['device']}",
        f"epochs       {s['epochs_done']}/{s['epochs_planned']} ({s['seconds']:.1f}s)",
    ]
    if s["best_epoch"] is not None:
        lines.append(
            f"best         epoch {s['best_epoch']}: {100 * s['best_eval_acc']:.2f}% eval acc"
        )
    lines.append(f"checkpoints  {', '.join(s['checkpoints']) or 'none'}")
    st = s["store"]
    lines.append(f"store        schema v{st['schema_version']}, {st['size_bytes'] / 1e6:.2f} MB")
    if s["analyses"]:
        text = ", ".join(f"{a['name']} ({a['status']})" for a in s["analyses"])
        lines.append(f"analyses     {text}")
    else:
        lines.append("analyses     none (run explainkit analyze RUN)")
    return "\n".join(lines)
