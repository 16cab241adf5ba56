"""An analyzer's artifacts as a page shows them: images, tables and JSON, bounded and safe.

A manifest names files; a page (the report, a notebook cell, the explorer) shows them. Every
reader here is bounded (rows, columns, characters, bytes) and says what is wrong with a file
instead of failing: one bad artifact must not cost the reader the rest of the page.
"""

from __future__ import annotations

import base64
import csv
import json
import math
import re
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["MAX_JSON_CHARS", "page_warnings", "show_artifact", "size_label", "table"]

MAX_TABLE_ROWS = 50
MAX_TABLE_COLUMNS = 40
MAX_JSON_CHARS = 4000
MAX_IMAGE_BYTES = 5_000_000  # a figure within figures.MAX_SIDE_PX is far smaller
MIN_IMAGE_WIDTH = 240

_IMAGE_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
)


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


def table(
    header: list[Any], rows: Iterable[list[Any]], tall: bool = False, numeric: bool = False
) -> dict[str, Any]:
    """A table for the template: cells shortened for reading, numbers flagged to align right.

    ``numeric`` right-aligns every cell (the history table, whose cells carry units).
    """
    body = []
    for row in rows:
        cells = []
        for cell in row:
            text, is_number = _fmt_number(str(cell)) if cell is not None else ("", False)
            cells.append({"text": text, "n": is_number or numeric})
        body.append(cells)
    return {"header": header, "rows": body, "tall": tall}


def size_label(nbytes: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1000 or unit == "GB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000  # type: ignore[assignment]
    return f"{nbytes} B"  # pragma: no cover


def show_artifact(folder: Path, artifact: Any) -> dict[str, Any]:
    """What the page shows for one manifest artifact; ``show`` picks the template's branch.

    A missing, damaged, huge or misplaced file becomes a sentence saying so, never an error:
    one bad artifact must not cost the reader the rest of the report.
    """
    if not isinstance(artifact, dict):
        return {"show": "not_object", "value": artifact}
    rel = str(artifact.get("path", ""))
    item = {
        "title": artifact.get("title") or artifact.get("path") or "untitled",
        "caption": artifact.get("caption") or "",
        "rel": rel,
    }
    kind = str(artifact.get("kind", ""))
    # A NUL byte would make resolve() raise; such a path is no file of the analysis either.
    path = None if not rel or "\0" in rel else (folder / rel).resolve()
    if path is None or not path.is_relative_to(folder.resolve()):
        return {**item, "show": "outside"}
    if not path.is_file():
        return {**item, "show": "missing"}
    size = path.stat().st_size
    item["size"] = size_label(size)
    try:
        if kind == "image":
            item.update(_image(path, size))
        elif kind == "table":
            item.update(_csv(path))
        elif kind == "json":
            item.update(_json(path))
        else:
            what = "HDF5 file" if kind == "h5" else f"file of kind {kind!r}"
            item.update(show="other", what=what)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        item.update(show="unreadable", error=str(e))
    return item


def _image(path: Path, size: int) -> dict[str, Any]:
    """A data URL for the image, if its first bytes say it is one a browser shows safely."""
    if size > MAX_IMAGE_BYTES:
        return {"show": "too_large"}
    data = path.read_bytes()
    mime = next((m for magic, m in _IMAGE_MAGIC if data.startswith(magic)), None)
    if mime is None and data[:12].startswith(b"RIFF") and data[8:12] == b"WEBP":
        mime = "image/webp"
    if mime is None and path.suffix.lower() == ".svg":
        mime = "image/svg+xml"  # an <img> never runs an SVG's scripts
    if mime is None:
        return {"show": "not_image"}
    image = {"show": "image", "src": f"data:{mime};base64,{base64.b64encode(data).decode()}"}
    if mime == "image/png" and len(data) >= 24 and data[12:16] == b"IHDR":
        width, height = struct.unpack(">II", data[16:24])
        if 0 < width < MIN_IMAGE_WIDTH and height > 0:
            # Tiny images (thumbnails, attribution maps) are scaled up by a whole factor.
            scale = min(8, -(-MIN_IMAGE_WIDTH // width))
            image.update(width=width * scale, height=height * scale)
    return image


def _csv(path: Path) -> dict[str, Any]:
    """The first rows and columns of a CSV file; bytes that are not UTF-8 show as U+FFFD."""
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            return {"show": "empty"}
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
    return {
        "show": "table",
        "table": table(header[:MAX_TABLE_COLUMNS], rows, tall=len(rows) > 15),
        "prefix": f"{', '.join(notes)} shown; " if notes else "",
    }


def _json(path: Path) -> dict[str, Any]:
    """A JSON file as readable text, cut at MAX_JSON_CHARS; invalid JSON shows as it is."""
    text = path.read_text(encoding="utf-8", errors="replace")
    shown = {"show": "json", "prefix": "", "suffix": ""}
    try:
        text = _compact_json(json.loads(text))
    except ValueError:
        shown["suffix"] = " (not valid JSON; shown as text)"
    if len(text) > MAX_JSON_CHARS:
        text = text[:MAX_JSON_CHARS] + "\n…"
        shown["prefix"] = f"first {MAX_JSON_CHARS} characters shown; "
    return {**shown, "text": text}


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


def page_warnings(
    m: dict[str, Any], artifacts: list, shown: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], list[str]]:
    """The analyzer's recorded warnings (runner: ``explainkit.said``), each attached to the
    shown artifact it concerns (``where``), else left for the section; and the notes (its
    log lines, which inform rather than warn). A malformed entry is shown as text."""
    recorded = m.get("warnings") if isinstance(m.get("warnings"), list) else []
    paths = [a.get("path") if isinstance(a, dict) else None for a in artifacts]
    warned, notes = [], []
    for w in recorded:
        if not isinstance(w, dict):
            w = {"message": str(w)}
        text = str(w.get("message", ""))
        count = w.get("count")
        if isinstance(count, int) and count > 1:
            text += f" (raised {count} times)"
        if w.get("category") == "log":
            notes.append(text)
            continue
        where = paths.index(w["artifact"]) if w.get("artifact") in paths else None
        item = {"text": text, "category": str(w.get("category") or "warning"), "where": where}
        warned.append(item)
        if where is not None:
            shown[where].setdefault("warnings", []).append(item)
    omitted = m.get("warnings_omitted")
    if isinstance(omitted, int) and omitted > 0:
        warned.append(
            {"text": f"{omitted} more warning(s) not kept", "category": "", "where": None}
        )
    return warned, notes
