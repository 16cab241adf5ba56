"""``explainkit report``: one self-contained HTML page from a run and its analyzer manifests.

The page is built from ``config.json``, the prediction store's history (via
``explainkit.run_summary.summarize_run``), the end of ``train.log`` and
``analyses/*/manifest.json`` only, so an analyzer
from a third-party plugin appears without any change here. Everything is embedded (images as
base64 data URLs, CSS inline, charts as inline SVG) and nothing executable is written, so the
file can be mailed, archived or opened offline.

The markup lives in ``templates/report.html`` (and ``report.css``), rendered by Jinja2 with
autoescaping on: this module only reads files and prepares plain data, so every string from a
run or a plugin reaches the page as text, never as markup. The one exception is the accuracy
chart, an SVG drawn here from numbers alone.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from explainkit import __version__
from explainkit.artifacts import MAX_JSON_CHARS, page_warnings, show_artifact, size_label, table
from explainkit.atomic import write_atomic
from explainkit.errors import ExplainkitError, RunError
from explainkit.registries import Registries
from explainkit.rundir import RunDir

__all__ = ["build_report", "render_report", "load_manifests", "analyzer_orders", "REPORT_NAME"]

REPORT_NAME = "report.html"
TEMPLATE = "report.html"
MAX_HISTORY_ROWS = 60
MAX_LOG_LINES = 200  # the end of train.log shown under the run
MAX_LOG_BYTES = 200_000  # read from the end of the file: 200 lines are about 25 KB
MAX_LOG_LINE = 500  # characters of one line
# A task run's row in the report's facts: what its explanations are of (docs/tasks.md).
TASK_TEXT = {
    "multilabel": "multi-label: Grad-CAM and quality explain each predicted label",
    "segmentation": "segmentation: Grad-CAM and quality explain each predicted class region",
    "detection": "detection: Grad-CAM and quality explain each detection's box",
}
MAX_EMBEDDED = 10_000_000  # characters of embedded images per page; later images are linked


@functools.cache
def environment() -> Any:
    """The Jinja2 environment of the report, built once per process.

    Autoescaping is on for every template, so nothing passed in needs escaping by hand.
    ``finalize`` prints None as nothing, the way a missing value should look on the page.
    jinja2 is imported here, not at the top, so only building a report pays for it.
    """
    import jinja2

    return jinja2.Environment(
        loader=jinja2.PackageLoader("explainkit", "templates"),
        autoescape=True,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        finalize=lambda value: "" if value is None else value,
    )


# -- reading ---------------------------------------------------------------------------------


def load_manifests(
    run_dir: Path, orders: Mapping[str, float] | None = None
) -> list[dict[str, Any]]:
    """Every ``analyses/*/manifest.json`` in report order, then by name.

    The order is the manifest's ``order`` field; for a manifest without one, the installed
    analyzer's ``order`` from ``orders`` (name -> order); else 50.

    An unreadable manifest becomes an entry with status ``unreadable`` and the reason, so the
    report says so instead of failing. A ``failed.json`` next to a good manifest (a later rerun
    failed, the earlier result was kept) is attached as ``rerun_failed``.
    """
    folder = run_dir / "analyses"
    entries: list[dict[str, Any]] = []
    if not folder.is_dir():
        return entries
    for path in folder.glob("*/manifest.json"):
        name = path.parent.name
        if name.startswith("."):
            continue  # an analyzer still writing (.<name>.tmp-PID)
        try:
            manifest = json.loads(path.read_text())
            if not isinstance(manifest, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as e:
            manifest = {"status": "unreadable", "error": f"manifest.json cannot be read ({e})"}
        manifest.setdefault("analyzer", name)
        manifest["_dir"] = path.parent
        manifest["_name"] = name
        failed = path.parent / "failed.json"
        if failed.is_file():
            try:
                manifest["rerun_failed"] = json.loads(failed.read_text())
            except (OSError, ValueError):
                pass
        entries.append(manifest)
    orders = orders or {}
    entries.sort(key=lambda m: (_order(m.get("order", orders.get(m["_name"]))), m["_name"]))
    return entries


def _order(value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return 50.0
    return number if math.isfinite(number) else 50.0


def _run_summary(
    run_dir: Path, registries: Registries
) -> tuple[dict[str, Any] | None, dict[str, Any], str | None]:
    """(summarize_run data or None, raw config.json, why the summary is missing)."""
    raw: dict[str, Any] = {}
    try:
        loaded = json.loads((run_dir / "config.json").read_text())
        if isinstance(loaded, dict):
            raw = loaded
    except (OSError, ValueError):
        pass
    try:
        from explainkit.run_summary import summarize_run

        return summarize_run(run_dir, registries), raw, None
    except (ExplainkitError, OSError, KeyError, ValueError) as e:
        return None, raw, str(e)


def analyzer_orders(registries: Registries) -> dict[str, float]:
    """The registered analyzers and their report order."""
    return {name: _order(getattr(e.cls, "order", 50)) for name, e in registries.analyzers.items()}


# -- plain data for the template --------------------------------------------------------------


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, sec = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {sec} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


def _pct(value: Any) -> str:
    try:
        return f"{100 * float(value):.2f}%"
    except (TypeError, ValueError):
        return ""


def _accuracy_chart(history: dict[str, list[float]]) -> Any:
    """Inline SVG of train and eval accuracy per epoch (no script, no external file).

    The only markup made in Python: every value in it goes through ``float`` first, so no
    string from the run can reach it, and it is handed to the template as ``Markup``.
    """
    from markupsafe import Markup

    epochs = [float(e) for e in history.get("epoch") or []]
    if len(epochs) < 2:
        return Markup("")
    w, h, left, right, top, bottom = 380, 170, 40, 12, 12, 30
    pw, ph = w - left - right, h - top - bottom
    first, last = epochs[0], epochs[-1]

    def xy(epoch: float, acc: Any) -> str:
        x = left + pw * (epoch - first) / max(1, last - first)
        y = top + ph * (1 - max(0.0, min(1.0, float(acc))))
        return f"{x:.1f},{y:.1f}"

    parts = [
        f'<svg width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img" '
        'aria-label="Accuracy per epoch">'
    ]
    for frac in (0, 0.25, 0.5, 0.75, 1):
        y = top + ph * (1 - frac)
        parts.append(
            f'<line x1="{left}" x2="{w - right}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e3e7ec"/>'
            f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{int(frac * 100)}%</text>'
        )
    parts.append(
        f'<text x="{left}" y="{h - 8}">epoch {first:g}</text>'
        f'<text x="{w - right}" y="{h - 8}" text-anchor="end">epoch {last:g}</text>'
    )
    for key, color, label, lx in (
        ("train_acc", "#8c959f", "train", left + pw / 2 - 50),
        ("eval_acc", "#0b5cad", "eval", left + pw / 2 + 10),
    ):
        values = history.get(key) or []
        if len(values) != len(epochs):
            continue
        points = " ".join(xy(e, a) for e, a in zip(epochs, values, strict=True))
        parts.append(
            f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{points}"/>'
            f'<line x1="{lx:.0f}" x2="{lx + 14:.0f}" y1="{h - 12}" y2="{h - 12}" '
            f'stroke="{color}" stroke-width="2"/>'
            f'<text x="{lx + 18:.0f}" y="{h - 8}">{label}</text>'
        )
    parts.append("</svg>")
    return Markup("".join(parts))


_CONFIG_KEYS = (
    "dataset",
    "model",
    "width",
    "epochs",
    "batch_size",
    "lr",
    "schedule",
    "weight_decay",
    "label_smoothing",
    "crop_padding",
    "flip",
    "cutout",
    "limit_train",
    "limit_eval",
    "seed",
    "amp",
)


_EVAL_CONFIG_KEYS = (
    "model", "weights", "dataset", "data_dir", "image_size", "limit_eval", "batch_size", "seed",
)  # fmt: skip
# History columns evaluate fills with 0 (nothing trained): shown only when a value is not 0
# (RunWriter's own training loop may record them).
_TRAINING_COLUMNS = ("train_loss", "train_acc", "lr", "images_per_s")
MAX_CLASS_NAMES = 50  # class names listed in the run's facts; config.json holds them all


def _run_section(summary: dict | None, raw: dict, why: str | None) -> dict[str, Any]:
    """The facts, configuration and history of the run, whatever parts of it could be read.

    Only facts that apply: a run ``explainkit evaluate`` (or ``RunWriter``) wrote shows no
    training options, training set or training columns it never had.
    """
    config = (summary or {}).get("config") or raw.get("config") or {}
    data = raw.get("data") or {}
    evaluated = (summary or raw).get("command", "train") == "evaluate"
    pairs = [("model", _model_text((summary or {}).get("model") or raw.get("model") or {}))]
    if config.get("task") in TASK_TEXT:
        pairs.append(("task", TASK_TEXT[config["task"]]))
    if summary:
        pairs += _evaluated_facts(summary) if evaluated else _trained_facts(summary, data)
    elif config:
        pairs.append(("dataset", config.get("dataset")))
    for key, label in (("train_subset", "training images"), ("eval_subset", "evaluation images")):
        if (
            data.get(key)
            and isinstance(data[key], str)
            and not (evaluated and key == "train_subset")
        ):
            pairs.append((label, data[key]))  # what --limit-train / --limit-eval kept
    pairs += [("device", _device(summary, raw))]
    classes = data.get("classes")
    if classes and isinstance(classes, list):
        listed = ", ".join(map(str, classes[:MAX_CLASS_NAMES]))
        if len(classes) > MAX_CLASS_NAMES:
            listed += f", … ({len(classes)} classes; config.json lists them all)"
        pairs.append(("classes", listed))
    env = raw.get("environment") or {}
    if env:
        versions = ", ".join(
            f"{k} {env[k]}" for k in ("explainkit", "torch", "python") if env.get(k)
        )
        pairs.append(("software", versions))
    keys = _EVAL_CONFIG_KEYS if evaluated else _CONFIG_KEYS
    if evaluated and config.get("dataset") == "arrays":
        keys = tuple(k for k in keys if k not in ("seed", "data_dir", "image_size"))
    shown = [[k, config[k]] for k in keys if k in config and config[k] is not None]
    every = [[k, v] for k, v in config.items() if v is not None]
    history = (summary or {}).get("history") or {}
    if evaluated:
        history = {k: v for k, v in history.items() if k not in _TRAINING_COLUMNS or any(v or [])}
    return {
        "why": why,
        "evaluated": evaluated,
        "facts": [(k, v) for k, v in pairs if v not in (None, "")],
        "config": config,
        "config_table": table(["option", "value"], shown),
        "all_options": None if evaluated else table(["option", "value"], every),
        "history": _history(history) if len(history.get("epoch") or []) > evaluated else None,
    }


def _model_text(model: dict) -> str:
    if not model:
        return ""
    width = f", width {model['width']}" if model.get("width") else ""
    return f"{model.get('arch', '?')}{width}, {model.get('num_classes', '?')} classes"


def _device(summary: dict | None, raw: dict) -> Any:
    env = raw.get("environment") or {}
    device = (summary or {}).get("device") or env.get("device")
    if env.get("device_name"):
        device = f"{device} ({env['device_name']})"
    if env.get("threads") and str(device).startswith("cpu"):
        device = f"{device}, {env['threads']} threads"
    world = raw.get("world_size")
    if world and world > 1:
        device = f"{device} x {world} processes"
    return device


def _trained_facts(summary: dict, data: dict) -> list[tuple[str, Any]]:
    st = summary["store"]
    masks = ", with object masks" if st["has_masks"] else ""
    return [
        (
            "dataset",
            f"{summary['dataset']}: {data.get('num_train', '?')} training images, "
            f"{st['eval_images']} evaluation images{masks}",
        ),
        ("state", summary["state"]),
        ("epochs", f"{summary['epochs_done']} of {summary['epochs_planned']}"),
        (
            "best",
            f"epoch {summary['best_epoch']}: {_pct(summary['best_eval_acc'])} "
            f"{summary.get('eval_metric', 'eval accuracy')}"
            if summary["best_epoch"] is not None
            else None,
        ),
        ("training time", _duration(summary["seconds"])),
    ]


def _evaluated_facts(summary: dict) -> list[tuple[str, Any]]:
    """A run explainkit did not train: what was evaluated on what, and how it scored."""
    st = summary["store"]
    masks = ", with object masks" if st["has_masks"] else ""
    done = summary["epochs_done"]
    history = summary.get("history") or {}
    trained = any(any(history.get(k) or []) for k in _TRAINING_COLUMNS)
    pairs: list[tuple[str, Any]] = [
        (
            "written by",
            "RunWriter: a training loop of your own, evaluated by explainkit after each epoch"
            if trained
            else "explainkit evaluate: the model was evaluated, not trained",
        ),
        ("dataset", f"{summary['dataset']}: {st['eval_images']} evaluation images{masks}"),
    ]
    if summary["best_epoch"] is not None:
        score = _pct(summary["best_eval_acc"])
        pairs.append(
            ("eval accuracy", score if done == 1 else f"{score} (best of {done} epochs, "
             f"epoch {summary['best_epoch']})")
        )  # fmt: skip
    pairs.append(("evaluation time", _duration(summary["seconds"])))
    return pairs


def _history(history: dict[str, list[float]]) -> dict[str, Any]:
    """Chart and table of the epochs; a long run shows every k-th epoch and the last."""
    n = len(history["epoch"])
    idx = list(range(n))
    note = ""
    if n > MAX_HISTORY_ROWS:
        step = math.ceil(n / MAX_HISTORY_ROWS)
        idx = sorted(set(range(0, n, step)) | {n - 1})
        note = f"Every {step}th of {n} epochs shown."
    cols = [
        ("epoch", "epoch", str),
        ("train_acc", "train acc", _pct),
        ("eval_acc", "eval acc", _pct),
        ("train_loss", "train loss", lambda v: f"{v:.4f}"),
        ("eval_loss", "eval loss", lambda v: f"{v:.4f}"),
        ("lr", "lr", lambda v: f"{v:.4g}"),
        ("seconds", "time", lambda v: f"{v:.1f} s"),
    ]
    cols = [c for c in cols if len(history.get(c[0]) or []) == n]
    rows = [[fmt(history[key][i]) for key, _, fmt in cols] for i in idx]
    shown = table([label for _, label, _ in cols], rows, numeric=True)
    return {"chart": _accuracy_chart(history), "table": shown, "note": note}


def _training_log(run_dir: Path) -> dict[str, Any]:
    """The last MAX_LOG_LINES lines of ``RUN/train.log`` (the lines train printed per epoch).

    Only the end of the file is read, so a long log costs no more than a short one. Bytes that
    are not UTF-8 show as U+FFFD, control characters as U+FFFD too; autoescaping does the rest.
    ``missing`` when the run has no log (trained before explainkit wrote one), ``error`` when
    it cannot be read.
    """
    path = RunDir(run_dir).log_path
    shown = {"file": path.name}
    try:
        if not path.exists():
            return {**shown, "missing": True}
        if not path.is_file():
            return {**shown, "error": f"{path.name} is not a regular file; it is not read"}
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            f.seek(max(0, size - MAX_LOG_BYTES))
            data = f.read(MAX_LOG_BYTES)
    except OSError as e:
        return {**shown, "error": f"{path.name} cannot be read ({e.strerror or e})"}
    lines = data.decode("utf-8", "replace").splitlines()
    if size > MAX_LOG_BYTES and lines:
        lines = lines[1:]  # the first line read is cut
    total = len(lines) if size <= MAX_LOG_BYTES else None
    lines = [
        _CONTROL.sub("\ufffd", line[:MAX_LOG_LINE] + ("…" if len(line) > MAX_LOG_LINE else ""))
        for line in lines[-MAX_LOG_LINES:]
    ]
    if total is not None and total <= MAX_LOG_LINES:
        note = f"{total} line{'' if total == 1 else 's'}"
    elif total is not None:
        note = f"the last {MAX_LOG_LINES} of {total} lines"
    else:
        note = f"the last {len(lines)} lines of {size_label(size)}"
    return {**shown, "text": "\n".join(lines), "note": note}


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def _anchor(name: str) -> str:
    return "a-" + re.sub(r"[^A-Za-z0-9_-]", "-", name)


def _analysis(m: dict[str, Any]) -> dict[str, Any]:
    """One analysis section: its heading, facts line, failure if any, and artifacts."""
    name = m["_name"]
    status = str(m.get("status", "?"))
    meta = [f"analyzer {name}"]
    if m.get("epoch") is not None:
        meta.append(f"epoch {m['epoch']}")
    if isinstance(m.get("seconds"), int | float):
        meta.append(_duration(float(m["seconds"])))
    options = m.get("options")
    if isinstance(options, dict) and options:
        meta.append("options " + ", ".join(f"{k}={v}" for k, v in options.items()))
    artifacts = m.get("artifacts") or []
    if not isinstance(artifacts, list):
        artifacts = [artifacts]
    rerun = m.get("rerun_failed")
    shown = [show_artifact(m["_dir"], a) for a in artifacts]
    warned, notes = page_warnings(m, artifacts, shown)
    badge = status
    if status == "ok" and warned:
        badge = f"ok, {len(warned)} warning{'s' if len(warned) > 1 else ''}"
    return {
        "anchor": _anchor(name),
        "title": m.get("title") or name,
        "status": badge,
        "ok": status == "ok",
        "warned": bool(warned),
        "warnings": [w for w in warned if w["where"] is None],
        "notes": notes,
        "meta": meta,
        "summary": m.get("summary"),
        "what": "cannot be shown" if status == "unreadable" else "failed",
        "error": m.get("error") or "no error message",
        "traceback": str(m["traceback"])[-MAX_JSON_CHARS:] if m.get("traceback") else "",
        "rerun_failed": isinstance(rerun, dict),
        "rerun_error": rerun.get("error") if isinstance(rerun, dict) else None,
        "artifacts": shown,
    }


def _within_budget(sections: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Embed images in page order until MAX_EMBEDDED characters; link the rest, so the page
    stays small enough to mail and open however many analyses the run has."""
    used = 0
    for section in sections:
        for a in section["artifacts"]:
            if a.get("show") == "image":
                used += len(a["src"])
                if used > MAX_EMBEDDED:
                    a.update(show="over_budget", budget=size_label(MAX_EMBEDDED))
                    del a["src"]
    return sections


def render_report(run: str | os.PathLike[str], registries: Registries) -> str:
    """The report of ``run`` as an HTML string.

    Args:
        run: The run directory.
        registries: What the plugins registered: the installed analyzers order manifests
            that carry no ``order`` and are listed when they have no results, and the run's
            last checkpoint is checked against its model.
    """
    run_dir = Path(run)
    if not run_dir.is_dir():
        raise RunError(f"run directory {str(run_dir)!r} does not exist; pass a trained run")
    summary, raw, why = _run_summary(run_dir, registries)
    if summary is None and not raw:
        raise RunError(
            f"{run_dir} is not an explainkit run ({why}); create one with `explainkit train`"
        )
    orders = analyzer_orders(registries)
    manifests = load_manifests(run_dir, orders)
    config = (summary or {}).get("config") or raw.get("config") or {}
    subtitle = config.get("dataset", "")
    if summary and summary["best_eval_acc"] is not None:
        best = "" if summary["command"] == "evaluate" and summary["epochs_done"] == 1 else "best "
        metric = summary.get("eval_metric", "eval accuracy")
        subtitle += f" · {best}{metric} {_pct(summary['best_eval_acc'])}"
    return (
        environment()
        .get_template(TEMPLATE)
        .render(
            title=f"explainkit report: {run_dir.resolve().name}",
            subtitle=subtitle,
            run_path=run_dir.resolve(),
            run_arg=run_dir,
            run=_run_section(summary, raw, why),
            training_log=_training_log(run_dir),
            analyses=_within_budget([_analysis(m) for m in manifests]),
            not_run=sorted(set(orders) - {m["_name"] for m in manifests}),
            version=__version__,
            stamp=time.strftime("%Y-%m-%d %H:%M:%S"),
        )
    )


def build_report(
    run: str | os.PathLike[str],
    registries: Registries,
    out: str | os.PathLike[str] | None = None,
) -> Path:
    """Write the report of ``run`` to ``out`` (default ``RUN/report.html``) atomically.

    A character that UTF-8 cannot encode (a lone surrogate from a manifest's ``\\udc80``
    escape, or a file name in another encoding) is written as ``?`` rather than failing the
    whole report.

    Returns:
        The path of the written file.
    """
    run_dir = Path(run)
    text = render_report(run_dir, registries)
    target = Path(out) if out is not None else run_dir / REPORT_NAME
    target.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(target, text.encode("utf-8", "replace"), RunError)
    return target


def render_analyses(run_dir: str | os.PathLike[str], manifests: Iterable[dict]) -> str:
    """HTML of some analyses with their images embedded: what a notebook cell shows for the
    result of :func:`explainkit.analyze` (the same sections as the report, without the page)."""
    run = RunDir(run_dir)
    sections = [
        _analysis({**m, "_name": m["analyzer"], "_dir": run.analysis(m["analyzer"])})
        for m in manifests
    ]
    return environment().get_template("analyses.html").render(analyses=sections)
