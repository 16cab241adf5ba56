"""``explainkit report``: one self-contained HTML page from a run and its analyzer manifests.

The page is built from ``config.json``, the prediction store's history (via
``explainkit.inspect.summarize_run``) and ``analyses/*/manifest.json`` only, so an analyzer
from a third-party plugin appears without any change here. Everything is embedded (images as
base64 data URLs, CSS inline, charts as inline SVG) and nothing executable is written, so the
file can be mailed, archived or opened offline. Every string that comes from a run or a plugin
goes through ``html.escape``: a class name or caption is text, never markup.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import math
import os
import re
import struct
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from explainkit import __version__
from explainkit.atomic import write_atomic
from explainkit.errors import ExplainkitError, RunError

__all__ = ["build_report", "render_report", "load_manifests", "installed_analyzers", "REPORT_NAME"]

REPORT_NAME = "report.html"
MAX_TABLE_ROWS = 50
MAX_TABLE_COLUMNS = 40
MAX_JSON_CHARS = 4000
MAX_IMAGE_BYTES = 20_000_000
MAX_HISTORY_ROWS = 60
MIN_IMAGE_WIDTH = 240

_IMAGE_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
)

_CSS = """
:root { --fg:#1d232b; --muted:#5b6570; --line:#dde2e8; --bg:#ffffff; --panel:#f6f8fa;
  --ok:#1a7f37; --bad:#c62828; --accent:#0b5cad; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--fg); line-height:1.45;
  font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif; }
main { max-width:1100px; margin:0 auto; padding:24px 28px 48px; }
h1 { font-size:1.6em; margin:0 0 4px; }
h2 { font-size:1.25em; margin:36px 0 6px; padding-top:12px; border-top:2px solid var(--line); }
h3 { font-size:1.02em; margin:22px 0 6px; }
a { color:var(--accent); }
.muted, .note { color:var(--muted); font-size:.9em; }
.facts { display:grid; grid-template-columns:max-content 1fr; gap:3px 18px; margin:14px 0; }
.facts dt { color:var(--muted); } .facts dd { margin:0; overflow-wrap:anywhere; }
.row { display:flex; flex-wrap:wrap; gap:24px; align-items:flex-start; }
.row > * { min-width:0; }
.scroll { max-width:100%; overflow:auto; }
.scroll.tall { max-height:460px; width:fit-content; border-bottom:1px solid var(--line); }
.scroll.tall th { position:sticky; top:0; }
table { border-collapse:collapse; font-size:.86em; margin:6px 0; }
th, td { border:1px solid var(--line); padding:3px 8px; text-align:left; vertical-align:top; }
th { background:var(--panel); font-weight:600; }
tbody tr:nth-child(even) td { background:#fbfcfd; }
td.n { text-align:right; font-variant-numeric:tabular-nums; white-space:nowrap; }
figure { margin:10px 0 18px; }
figure img { display:block; max-width:100%; height:auto; border:1px solid var(--line);
  background:#fff; }
figure img.small { image-rendering:pixelated; }
figcaption { color:var(--muted); font-size:.9em; margin-top:4px; max-width:900px; }
pre { background:var(--panel); border:1px solid var(--line); padding:8px 10px; font-size:.82em;
  max-height:360px; overflow:auto; white-space:pre-wrap; overflow-wrap:anywhere; }
nav ol { margin:6px 0; padding-left:22px; columns:2; column-gap:32px; }
.badge { display:inline-block; font-size:.75em; font-weight:600; padding:1px 7px;
  border-radius:9px; margin-left:6px; vertical-align:2px; color:#fff; background:var(--ok); }
.badge.failed { background:var(--bad); }
.error { border-left:4px solid var(--bad); background:#fdf1f1; padding:8px 12px; margin:8px 0;
  overflow-wrap:anywhere; }
.file { font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace; font-size:.9em; }
.missing { color:var(--bad); }
details summary { cursor:pointer; color:var(--accent); margin:6px 0; }
svg text { font-size:11px; fill:var(--muted); }
footer { margin-top:40px; color:var(--muted); font-size:.85em; }
"""


def esc(value: Any) -> str:
    """Escape any value for HTML text or attribute context (quotes included)."""
    return html.escape("" if value is None else str(value), quote=True)


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


def _run_summary(run_dir: Path) -> tuple[dict[str, Any] | None, dict[str, Any], str | None]:
    """(summarize_run data or None, raw config.json, why the summary is missing)."""
    raw: dict[str, Any] = {}
    try:
        loaded = json.loads((run_dir / "config.json").read_text())
        if isinstance(loaded, dict):
            raw = loaded
    except (OSError, ValueError):
        pass
    try:
        from explainkit.inspect import summarize_run

        return summarize_run(run_dir), raw, None
    except (ExplainkitError, OSError, KeyError, ValueError) as e:
        return None, raw, str(e)


def installed_analyzers(plugins_dir: str | os.PathLike[str] | None = None) -> dict[str, float]:
    """Installed analyzers and their report order ({} when the registry cannot be loaded)."""
    try:
        from explainkit.manager import get_analyzers, load_plugins

        entries = get_analyzers(load_plugins(plugins_dir))
        return {name: _order(getattr(e.cls, "order", 50)) for name, e in entries.items()}
    except Exception:  # the report must not fail because a plugin is broken
        return {}


# -- rendering helpers -----------------------------------------------------------------------


def _fmt_number(text: str) -> tuple[str, bool]:
    """Shorten long floats for display; (text, is_number)."""
    try:
        value = float(text)
    except ValueError:
        return text, False
    if not math.isfinite(value):
        return text, True
    if re.fullmatch(r"[+-]?\d+", text.strip()):
        return text.strip(), True
    if "." in text and len(text.split(".")[-1].rstrip("0")) > 4:
        return f"{value:.4g}" if abs(value) < 1e-3 or abs(value) >= 1e5 else f"{value:.4f}", True
    return text.strip(), True


def _table(header: list[str], rows: Iterable[list[Any]], tall: bool = False) -> str:
    out = [f'<div class="scroll{" tall" if tall else ""}"><table><thead><tr>']
    out += [f"<th>{esc(h)}</th>" for h in header]
    out.append("</tr></thead><tbody>")
    for row in rows:
        out.append("<tr>")
        for cell in row:
            text, numeric = _fmt_number(str(cell)) if cell is not None else ("", False)
            cls = ' class="n"' if numeric else ""
            out.append(f"<td{cls}>{esc(text)}</td>")
        out.append("</tr>")
    out.append("</tbody></table></div>")
    return "".join(out)


def _facts(pairs: list[tuple[str, Any]]) -> str:
    items = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in pairs if v not in (None, ""))
    return f'<dl class="facts">{items}</dl>'


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, sec = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {sec} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


def _size(nbytes: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1000 or unit == "GB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000  # type: ignore[assignment]
    return f"{nbytes} B"  # pragma: no cover


def _pct(value: Any) -> str:
    try:
        return f"{100 * float(value):.2f}%"
    except (TypeError, ValueError):
        return ""


def _accuracy_chart(history: dict[str, list[float]]) -> str:
    """Inline SVG of train and eval accuracy per epoch (no script, no external file)."""
    epochs = history.get("epoch") or []
    if len(epochs) < 2:
        return ""
    w, h, left, right, top, bottom = 380, 170, 40, 12, 12, 30
    pw, ph = w - left - right, h - top - bottom
    first, last = epochs[0], epochs[-1]

    def xy(epoch: float, acc: float) -> str:
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
        f'<text x="{left}" y="{h - 8}">epoch {first}</text>'
        f'<text x="{w - right}" y="{h - 8}" text-anchor="end">epoch {last}</text>'
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
    return "".join(parts)


# -- sections --------------------------------------------------------------------------------

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


def _run_section(run_dir: Path, summary: dict | None, raw: dict, why: str | None) -> str:
    config = (summary or {}).get("config") or raw.get("config") or {}
    model = (summary or {}).get("model") or raw.get("model") or {}
    data = raw.get("data") or {}
    env = raw.get("environment") or {}
    out = ['<section id="run"><h2>The run</h2>']
    if why:
        out.append(f'<div class="error">The run could not be read completely: {esc(why)}</div>')
    device = (summary or {}).get("device") or env.get("device")
    if env.get("device_name"):
        device = f"{device} ({env['device_name']})"
    if env.get("threads") and str(device).startswith("cpu"):
        device = f"{device}, {env['threads']} threads"
    world = raw.get("world_size")
    if world and world > 1:
        device = f"{device} x {world} processes"
    model_text = ""
    if model:
        model_text = (
            f"{model.get('arch', '?')}, width {model.get('width', '?')}, "
            f"{model.get('num_classes', '?')} classes"
        )
    pairs: list[tuple[str, Any]] = [("model", model_text)]
    if summary:
        st = summary["store"]
        masks = ", with object masks" if st["has_masks"] else ""
        pairs += [
            (
                "dataset",
                f"{summary['dataset']}: {data.get('num_train', '?')} training images, "
                f"{st['eval_images']} evaluation images{masks}",
            ),
            ("state", summary["state"]),
            ("epochs", f"{summary['epochs_done']} of {summary['epochs_planned']}"),
            (
                "best",
                f"epoch {summary['best_epoch']}: {_pct(summary['best_eval_acc'])} eval accuracy"
                if summary["best_epoch"] is not None
                else None,
            ),
            ("training time", _duration(summary["seconds"])),
        ]
    elif config:
        pairs.append(("dataset", config.get("dataset")))
    pairs += [("device", device)]
    if data.get("classes"):
        pairs.append(("classes", ", ".join(map(str, data["classes"]))))
    if env:
        versions = ", ".join(
            f"{k} {env[k]}" for k in ("explainkit", "torch", "python") if env.get(k)
        )
        pairs.append(("software", versions))
    out.append(_facts(pairs))

    out.append('<div class="row">')
    if config:
        shown = [(k, config[k]) for k in _CONFIG_KEYS if k in config and config[k] is not None]
        out.append("<div><h3>Configuration</h3>")
        out.append(_table(["option", "value"], [[k, v] for k, v in shown]))
        out.append("<details><summary>all options</summary>")
        out.append(f"<pre>{esc(json.dumps(config, indent=1))}</pre></details></div>")
    history = (summary or {}).get("history") or {}
    if history.get("epoch"):
        out.append("<div><h3>Accuracy per epoch</h3>")
        out.append(_accuracy_chart(history))
        out.append(_history_table(history))
        out.append("</div>")
    out.append("</div></section>")
    return "".join(out)


def _history_table(history: dict[str, list[float]]) -> str:
    n = len(history["epoch"])
    idx = list(range(n))
    note = ""
    if n > MAX_HISTORY_ROWS:
        step = math.ceil(n / MAX_HISTORY_ROWS)
        idx = sorted(set(range(0, n, step)) | {n - 1})
        note = f'<p class="note">Every {step}th of {n} epochs shown.</p>'
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
    table = _table([label for _, label, _ in cols], rows)
    return table.replace("<td>", '<td class="n">') + note


def _artifact_html(folder: Path, artifact: Any) -> str:
    if not isinstance(artifact, dict):
        return f'<p class="missing">An artifact entry is not an object: {esc(artifact)}</p>'
    title = artifact.get("title") or artifact.get("path") or "untitled"
    kind = str(artifact.get("kind", ""))
    rel = str(artifact.get("path", ""))
    caption = artifact.get("caption") or ""
    head = f"<h3>{esc(title)}</h3>"
    cap = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    path = (folder / rel).resolve()
    if not rel or not path.is_relative_to(folder.resolve()):
        return (
            head + f'<p class="missing">Artifact path {esc(rel)} is outside the analysis '
            "folder; it is not shown.</p>"
        )
    if not path.is_file():
        return (
            head + f'<p class="missing">Missing file: <span class="file">{esc(rel)}</span> '
            "(listed in the manifest but not found; rerun the analyzer).</p>"
        )
    size = path.stat().st_size
    file_note = f'<span class="file">{esc(rel)}</span> <span class="muted">({_size(size)})</span>'
    try:
        if kind == "image":
            return head + _image_html(path, title, size, file_note) + cap
        if kind == "table":
            return head + _csv_html(path, file_note) + cap
        if kind == "json":
            return head + _json_html(path, file_note) + cap
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        return head + f'<p class="missing">{file_note} cannot be read: {esc(e)}</p>' + cap
    what = "HDF5 file" if kind == "h5" else f"file of kind {kind!r}"
    return head + f"<p>{esc(what)}: {file_note}</p>" + cap


def _image_html(path: Path, title: str, size: int, file_note: str) -> str:
    if size > MAX_IMAGE_BYTES:
        return f'<p class="note">{file_note} is too large to embed; open the file.</p>'
    data = path.read_bytes()
    mime = next((m for magic, m in _IMAGE_MAGIC if data.startswith(magic)), None)
    if mime is None and data[:12].startswith(b"RIFF") and data[8:12] == b"WEBP":
        mime = "image/webp"
    if mime is None and path.suffix.lower() == ".svg":
        mime = "image/svg+xml"  # an <img> never runs an SVG's scripts
    if mime is None:
        return f'<p class="missing">{file_note} is not a PNG, JPEG, GIF, WebP or SVG image.</p>'
    b64 = base64.b64encode(data).decode("ascii")
    size_attrs = ""
    if mime == "image/png" and len(data) >= 24 and data[12:16] == b"IHDR":
        width, height = struct.unpack(">II", data[16:24])
        if 0 < width < MIN_IMAGE_WIDTH and height > 0:
            # Tiny images (thumbnails, attribution maps) are scaled up by a whole factor.
            scale = min(8, -(-MIN_IMAGE_WIDTH // width))
            size_attrs = f' class="small" width="{width * scale}" height="{height * scale}"'
    return f'<figure><img src="data:{mime};base64,{b64}" alt="{esc(title)}"{size_attrs}></figure>'


def _csv_html(path: Path, file_note: str) -> str:
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            return f'<p class="note">{file_note} is empty.</p>'
        rows = []
        total = 0
        for row in reader:
            total += 1
            if len(rows) < MAX_TABLE_ROWS:
                rows.append(row[:MAX_TABLE_COLUMNS])
    notes = []
    if total > MAX_TABLE_ROWS:
        notes.append(f"first {MAX_TABLE_ROWS} of {total} rows")
    if len(header) > MAX_TABLE_COLUMNS:
        notes.append(f"first {MAX_TABLE_COLUMNS} of {len(header)} columns")
    shown = f"{', '.join(notes)} shown; " if notes else ""
    table = _table(header[:MAX_TABLE_COLUMNS], rows, tall=len(rows) > 15)
    return table + f'<p class="note">{shown}{file_note}</p>'


def _json_html(path: Path, file_note: str) -> str:
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        text = _compact_json(json.loads(text))
    except ValueError:
        file_note += " (not valid JSON; shown as text)"
    if len(text) > MAX_JSON_CHARS:
        text = text[:MAX_JSON_CHARS] + "\n…"
        file_note = f"first {MAX_JSON_CHARS} characters shown; " + file_note
    return f'<pre>{esc(text)}</pre><p class="note">{file_note}</p>'


def _compact_json(value: Any, indent: str = "") -> str:
    """JSON with objects one key per line but lists of plain values on one line."""
    inner = indent + "  "
    if isinstance(value, dict) and value:
        items = [
            f"{inner}{json.dumps(str(k))}: {_compact_json(v, inner)}" for k, v in value.items()
        ]
        return "{\n" + ",\n".join(items) + "\n" + indent + "}"
    if isinstance(value, list) and any(isinstance(v, dict | list) for v in value):
        items = [inner + _compact_json(v, inner) for v in value]
        return "[\n" + ",\n".join(items) + "\n" + indent + "]"
    return json.dumps(value, ensure_ascii=False)


def _anchor(name: str) -> str:
    return "a-" + re.sub(r"[^A-Za-z0-9_-]", "-", name)


def _analysis_html(m: dict[str, Any]) -> str:
    name = m["_name"]
    status = str(m.get("status", "?"))
    ok = status == "ok"
    badge = f'<span class="badge{"" if ok else " failed"}">{esc(status)}</span>'
    out = [f'<section id="{_anchor(name)}"><h2>{esc(m.get("title") or name)}{badge}</h2>']
    meta = [f"analyzer {esc(name)}"]
    if m.get("epoch") is not None:
        meta.append(f"epoch {esc(m['epoch'])}")
    if isinstance(m.get("seconds"), int | float):
        meta.append(_duration(float(m["seconds"])))
    options = m.get("options")
    if isinstance(options, dict) and options:
        meta.append("options " + ", ".join(f"{esc(k)}={esc(v)}" for k, v in options.items()))
    out.append(f'<p class="muted">{" · ".join(meta)}</p>')
    if m.get("summary"):
        out.append(f"<p>{esc(m['summary'])}</p>")
    if not ok:
        error = m.get("error") or "no error message"
        what = "cannot be shown" if status == "unreadable" else "failed"
        out.append(f'<div class="error"><b>This analysis {what}:</b> {esc(error)}</div>')
        if m.get("traceback"):
            tb = str(m["traceback"])[-MAX_JSON_CHARS:]
            out.append(f"<details><summary>traceback</summary><pre>{esc(tb)}</pre></details>")
    rerun = m.get("rerun_failed")
    if isinstance(rerun, dict):
        out.append(
            '<div class="error">A later rerun failed and this earlier result was kept: '
            f"{esc(rerun.get('error'))}</div>"
        )
    artifacts = m.get("artifacts") or []
    if not isinstance(artifacts, list):
        artifacts = [artifacts]
    for artifact in artifacts:
        out.append(_artifact_html(m["_dir"], artifact))
    if ok and not artifacts:
        out.append('<p class="note">No files were written.</p>')
    out.append("</section>")
    return "".join(out)


def render_report(
    run: str | os.PathLike[str], available: Mapping[str, float] | Iterable[str] | None = None
) -> str:
    """The report of ``run`` as an HTML string.

    Args:
        run: The run directory.
        available: Installed analyzers, name -> order (or just names), to order manifests
            that carry no ``order`` and to list analyzers without results (default: the
            plugin registry).
    """
    run_dir = Path(run)
    if not run_dir.is_dir():
        raise RunError(f"run directory {str(run_dir)!r} does not exist; pass a trained run")
    summary, raw, why = _run_summary(run_dir)
    if summary is None and not raw:
        raise RunError(
            f"{run_dir} is not an explainkit run ({why}); create one with `explainkit train`"
        )
    if available is None:
        available = installed_analyzers()
    orders = dict(available) if isinstance(available, Mapping) else {}
    manifests = load_manifests(run_dir, orders)
    title = f"explainkit report: {run_dir.resolve().name}"
    config = (summary or {}).get("config") or raw.get("config") or {}
    subtitle = config.get("dataset", "")
    if summary and summary["best_eval_acc"] is not None:
        subtitle += f" · best eval accuracy {_pct(summary['best_eval_acc'])}"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(title)}</title><style>{_CSS}</style></head><body><main>",
        f"<h1>{esc(title)}</h1>",
        f'<p class="muted">{esc(subtitle)} · '
        f'<span class="file">{esc(run_dir.resolve())}</span></p>',
    ]
    nav = ['<a href="#run">The run</a>']
    for m in manifests:
        label = esc(m.get("title") or m["_name"])
        flag = (
            ""
            if m.get("status") == "ok"
            else f' <span class="missing">({esc(m.get("status"))})</span>'
        )
        nav.append(f'<a href="#{_anchor(m["_name"])}">{label}</a>{flag}')
    parts.append("<nav><ol>" + "".join(f"<li>{n}</li>" for n in nav) + "</ol></nav>")
    parts.append(_run_section(run_dir, summary, raw, why))
    for m in manifests:
        parts.append(_analysis_html(m))
    if not manifests:
        parts.append(
            '<section><h2>Analyses</h2><p class="note">No analyses yet: run '
            f'<span class="file">explainkit analyze {esc(run_dir)}</span>.</p></section>'
        )
    not_run = sorted(set(available) - {m["_name"] for m in manifests})
    if not_run:
        parts.append(
            '<section id="not-run"><h2>Not run</h2><p>Installed analyzers without results in '
            f"this run: {esc(', '.join(not_run))}. Add them with "
            f'<span class="file">explainkit analyze {esc(run_dir)} --plugin NAME</span>.</p>'
            "</section>"
        )
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    parts.append(
        f"<footer>Built by explainkit {esc(__version__)} on {esc(stamp)} from the run's "
        "config, prediction store and analysis manifests.</footer></main></body></html>\n"
    )
    return "\n".join(parts)


def build_report(
    run: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    available: Mapping[str, float] | Iterable[str] | None = None,
) -> Path:
    """Write the report of ``run`` to ``out`` (default ``RUN/report.html``) atomically.

    Returns:
        The path of the written file.
    """
    run_dir = Path(run)
    text = render_report(run_dir, available=available)
    target = Path(out) if out is not None else run_dir / REPORT_NAME
    target.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(target, text, RunError)
    return target
