"""What a run directory holds and whether it is complete: ``explainkit inspect`` and the report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from explainkit.registries import Registries
from explainkit.rundir import RunDir

# What the history's eval_acc is, by the run's task (docs/tasks.md).
EVAL_METRICS = {
    "classification": "eval accuracy",
    "multilabel": "eval label accuracy",
    "segmentation": "eval mean IoU",
    "detection": "eval mAP@0.5",
}


def summarize_run(run: str | Path | RunDir, registries: Registries) -> dict[str, Any]:
    """Everything ``inspect`` prints, as plain data (also used by the report); last.pt is
    checked against the model ``registries`` build."""
    from explainkit.store import open_store

    run = run if isinstance(run, RunDir) else RunDir(run)
    data = run.read_config()
    config = data["config"]
    with open_store(run.store_path) as store:
        store.verify()
        history = store.history
        epochs = store.epochs
        best = store.best_epoch
        summary_store = {
            "path": str(store.path),
            "schema_version": store.attrs["schema_version"],
            "size_bytes": store.size_bytes,  # the head and the committed epoch files
            "eval_images": store.num_images,
            "has_masks": store.has_masks,
        }
    named = sorted(p.name for p in run.checkpoints.glob("*.pt"))
    trained = data["command"] == "train"
    planned = config["epochs"] if trained else len(epochs)  # evaluated: what it holds
    resume_point = _resume_point(run, registries) if trained else len(epochs)
    state = _state(run, resume_point, len(epochs), planned)
    analyses = []
    if run.analyses.is_dir():
        for manifest in run.manifests():
            try:
                m = json.loads(manifest.read_text())
                analyses.append({"name": manifest.parent.name, "status": m.get("status", "?")})
            except (OSError, json.JSONDecodeError):
                analyses.append({"name": manifest.parent.name, "status": "unreadable"})
    best_acc = None
    if best is not None:
        best_acc = float(history["eval_acc"][best - 1])
    return {
        "run": str(run.path),
        "command": data["command"],
        "state": state,
        "dataset": config["dataset"],
        "model": data["model"],
        "config": config,
        "device": data.get("environment", {}).get("device"),
        "epochs_done": len(epochs),
        "resume_point": resume_point,
        "epochs_planned": planned,
        "best_epoch": best,
        "best_eval_acc": best_acc,
        "eval_metric": EVAL_METRICS.get(config.get("task", ""), "eval accuracy"),
        "seconds": float(history["seconds"].sum()) if epochs else 0.0,
        "checkpoints": named,
        "store": summary_store,
        "analyses": analyses,
        "history": {k: v.tolist() for k, v in history.items()},
    }


def _resume_point(run: RunDir, registries: Registries) -> int:
    """The epoch last.pt holds: where ``train --resume`` continues (0: from the start)."""
    from explainkit.errors import CheckpointError, UntrustedImport
    from explainkit.train.checkpoint import load_checkpoint, read_epoch

    last = run.checkpoint("last")
    if not last.is_file():
        return 0
    try:
        try:
            return int(load_checkpoint(last, registries)["epoch"])
        except UntrustedImport:  # its model is not built without consent; the epoch is read
            return read_epoch(last)
    except CheckpointError:
        return 0  # a damaged last.pt is reported by resume itself, in its own words


def _state(run: RunDir, resume_point: int, stored: int, planned: int) -> str:
    """What the run is, judged by what resume would do, not by what the store holds."""
    if run.is_locked():
        return "training"
    if resume_point >= planned and stored >= planned:
        return "complete"
    resume = f"resumable with explainkit train --resume {run.path}"
    if resume_point == 0:
        return f"interrupted before its first checkpoint ({resume}, from the start)"
    ahead = stored - resume_point
    note = f"; the store's {ahead} later epoch(s) will be redone" if ahead > 0 else ""
    return f"interrupted after epoch {resume_point} ({resume}){note}"


def format_summary(s: dict[str, Any]) -> str:
    m = s["model"]
    lines = [
        f"run          {s['run']}",
        f"state        {s['state']}",
        f"model        {m['arch']}{f' width {w}' if (w := m.get('width')) else ''}, "
        f"{m['num_classes']} classes",
        f"dataset      {s['dataset']} ({s['store']['eval_images']} eval images"
        f"{', with masks' if s['store']['has_masks'] else ''})",
        f"device       {s['device']}",
        f"epochs       {s['epochs_done']}/{s['epochs_planned']} ({s['seconds']:.1f}s)",
    ]
    if s["command"] == "evaluate":  # no training to speak of: say what wrote it instead
        lines[-1] = f"epochs       {s['epochs_done']} evaluated ({s['seconds']:.1f}s)"
        lines.insert(2, "written by   explainkit evaluate or RunWriter (not trained by explainkit)")
    if s["best_epoch"] is not None:
        lines.append(
            f"best         epoch {s['best_epoch']}: {100 * s['best_eval_acc']:.2f}% "
            f"{s.get('eval_metric', 'eval accuracy').replace('eval accuracy', 'eval acc')}"
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
