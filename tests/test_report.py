"""The HTML report: built from manifests only, escaped, self-contained, and checked in Chromium."""

from __future__ import annotations

import csv
import html
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from explainkit.manager import build_registries
from explainkit.report import build_report, load_manifests, render_report
from tests.helpers import REPO, run_cli

EVIL = "<script>alert(1)</script>"
EXAMPLE_PLUGIN = REPO / "examples" / "explainkit-example-analyzer"


def with_analyzers(available):
    """The built-in models (to check a run's last checkpoint) and analyzers of these names
    (a list) or report orders (a dict), as the report is handed them."""
    from dataclasses import replace

    from explainkit.registries import AnalyzerEntry
    from tests.helpers import registries

    orders = available if isinstance(available, dict) else dict.fromkeys(available, 50)
    analyzers = {
        name: AnalyzerEntry(type("A", (), {"order": order}), "test", "registered")
        for name, order in orders.items()
    }
    return replace(registries(), analyzers=analyzers)


def png_bytes(width: int = 40, height: int = 24) -> bytes:
    """A real RGB PNG (a colour gradient), written with zlib so no imaging library is needed."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    rows = b"".join(
        b"\x00" + b"".join(bytes((x * 6 % 256, y * 10 % 256, 160)) for x in range(width))
        for y in range(height)
    )
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def write_manifest(run: Path, name: str, **fields) -> Path:
    folder = run / "analyses" / name
    folder.mkdir(parents=True, exist_ok=True)
    manifest = {
        "analyzer": name,
        "title": name,
        "summary": "",
        "epoch": 2,
        "status": "ok",
        "error": None,
        "seconds": 0.5,
        "artifacts": [],
        **fields,
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def run_example_plugin(run: Path) -> dict:
    """Run the example third-party analyzer for real, registered like an installed plugin."""
    import explainkit
    from explainkit.manager import get_plugin_manager

    sys.path.insert(0, str(EXAMPLE_PLUGIN))
    try:
        import explainkit_example_analyzer
    finally:
        sys.path.remove(str(EXAMPLE_PLUGIN))
    pm = get_plugin_manager(entrypoints=False, defaults=False, quiet=True)
    pm.register(explainkit_example_analyzer, name="confidence")
    (manifest,) = explainkit.analyze(
        run, plugins=["confidence"], registries=build_registries(pm), confidence_bins=5
    )
    assert manifest["status"] == "ok", manifest["error"]
    return manifest


@pytest.fixture
def report_run(tiny_run: Path) -> Path:
    """A tiny real run with one real third-party analysis and hand-written manifests."""
    run_example_plugin(tiny_run)

    config_path = tiny_run / "config.json"
    config = json.loads(config_path.read_text())
    config["data"]["classes"][0] = EVIL  # a hostile class name from a dataset
    config_path.write_text(json.dumps(config))

    folder = write_manifest(
        tiny_run,
        "handmade",
        title=f"Hand-made {EVIL}",
        summary=f"Summary with {EVIL} and & ampersand.",
        order=10,
        options={"count": 3, "label": EVIL},
        artifacts=[
            {"title": "A picture", "kind": "image", "path": "pic.png", "caption": f"cap {EVIL}"},
            {"title": "Long table", "kind": "table", "path": "long.csv", "caption": ""},
            {"title": "Some numbers", "kind": "json", "path": "numbers.json", "caption": ""},
            {"title": "Raw maps", "kind": "h5", "path": "maps.h5", "caption": "big file"},
            {"title": "Gone", "kind": "image", "path": "gone.png", "caption": ""},
            {"title": "Sneaky", "kind": "json", "path": "../../config.json", "caption": ""},
        ],
    )
    (folder / "pic.png").write_bytes(png_bytes())
    with open(folder / "long.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["class", "score", "note"])
        writer.writerow([EVIL, "0.123456789", "x"])
        for i in range(119):
            writer.writerow([f"class{i}", i / 7, "ok"])
    (folder / "numbers.json").write_text(json.dumps({"label": EVIL, "values": list(range(5000))}))
    (folder / "maps.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(100))

    write_manifest(
        tiny_run,
        "broken",
        title="Broken analyzer",
        status="failed",
        error=f"ValueError: bad {EVIL}",
        traceback="Traceback (most recent call last):\n  ...\nValueError: bad",
    )
    bad = tiny_run / "analyses" / "garbled"
    bad.mkdir()
    (bad / "manifest.json").write_text("{not json")
    write_manifest(tiny_run, ".writing.tmp-1", title="half-written")  # must be ignored
    return tiny_run


def test_report_lists_run_and_every_analysis_in_order(report_run):
    path = build_report(report_run, with_analyzers(["confidence", "handmade", "gradcam"]))
    assert path == report_run / "report.html"
    text = path.read_text()
    assert text.startswith("<!DOCTYPE html>")
    # The run: model, device, accuracy table with one row per epoch.
    assert "resnet18-s8, width 8, 10 classes" in text
    assert "Accuracy per epoch" in text and "<svg" in text
    assert "cpu" in text
    # Analyses in manifest order (handmade 10, confidence 80), then by name (others: 50).
    names = ["handmade", "broken", "garbled", "confidence"]
    positions = [text.index(f'id="a-{n}"') for n in names]
    assert positions == sorted(positions)
    assert [m["_name"] for m in load_manifests(report_run)] == names
    assert "half-written" not in text
    # The real third-party analyzer shows with its title, caption, image and table.
    assert "Confidence per class" in text and "Confidence histogram counts" in text
    assert "Top softmax probability per target class" in text
    # Failed and unreadable analyses are listed with their reason; not-run ones are named.
    assert "This analysis failed:" in text and "manifest.json cannot be read" in text
    assert "Installed analyzers without results in this run: gradcam." in text


def test_report_renders_each_artifact_kind(report_run):
    text = render_report(report_run, with_analyzers([]))
    images = re.findall(r'<img src="([^"]*)"', text)
    assert len(images) == 2  # the hand-made PNG and the confidence plot
    assert all(src.startswith("data:image/png;base64,") for src in images)
    assert "first 50 of 120 rows shown" in text
    assert "0.1235" in text  # long floats shortened for reading
    assert "first 4000 characters shown" in text
    assert "HDF5 file" in text and "maps.h5" in text
    assert "Missing file:" in text and "gone.png" in text
    assert "outside the analysis folder" in text
    assert '"format": "explainkit-run"' not in text  # the sneaky path was not read


def test_report_escapes_every_string_from_the_run_and_plugins(report_run):
    text = render_report(report_run, with_analyzers([]))
    assert EVIL not in text
    assert "<script" not in text.lower()
    escaped = html.escape(EVIL)
    # class name, title, summary, option, caption, CSV cell, JSON value, error message
    assert text.count(escaped) >= 8


def test_report_is_self_contained(report_run):
    text = render_report(report_run, with_analyzers([]))
    assert not re.search(r"<(link|script|iframe|object|embed)\b", text, re.I)
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", text, re.I)
    assert "@import" not in text and "url(" not in text


def test_report_is_written_atomically_and_out_is_honoured(report_run, tmp_path):
    (report_run / "report.html").write_text("old")
    path = build_report(report_run, with_analyzers([]))
    assert path.read_text().startswith("<!DOCTYPE html>")
    assert not list(report_run.glob(".report.html.tmp-*"))
    other = build_report(report_run, with_analyzers([]), out=tmp_path / "sub" / "r.html")
    assert other == tmp_path / "sub" / "r.html" and other.is_file()


def test_report_without_analyses_says_how_to_add_them(tiny_run):
    text = render_report(tiny_run, with_analyzers([]))
    assert "No analyses yet" in text


def test_cli_report_writes_the_file_and_prints_its_path(report_run, tmp_path):
    result = run_cli("report", str(report_run))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(report_run / "report.html")
    out = tmp_path / "x.html"
    result = run_cli("report", str(report_run), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert out.is_file()


def test_cli_report_on_a_missing_run_is_one_clear_line(tmp_path):
    result = run_cli("report", str(tmp_path / "nope"))
    assert result.returncode == 1
    assert "does not exist" in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# -- in a real browser -----------------------------------------------------------------------

_CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
]

_HEAD_PROBE = """<script>window.__errors=[];
window.addEventListener('error',function(e){window.__errors.push(String(e.message||
(e.target&&(e.target.src||'').slice(0,40))||'error'))},true);
(function(){var c=console.error;console.error=function(){window.__errors.push(
Array.prototype.join.call(arguments,' '));c.apply(console,arguments)}})();</script>"""

_BODY_PROBE = """<script>window.addEventListener('load',function(){
var imgs=Array.prototype.map.call(document.images,function(i){return [i.complete,i.naturalWidth]});
var r={images:imgs,errors:window.__errors,scripts:document.scripts.length,
scrollWidth:document.documentElement.scrollWidth,innerWidth:window.innerWidth,
text:document.body.innerText.indexOf('<script>alert(1)<\\/script>')>=0};
var p=document.createElement('pre');p.id='check';p.textContent=JSON.stringify(r);
document.body.appendChild(p);});</script>"""


def find_chromium() -> str | None:
    for name in ("/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def chromium(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [binary, *_CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True,
        text=True,
        timeout=180,
        stdin=subprocess.DEVNULL,
    )


def test_report_in_headless_chromium(report_run, tmp_path):
    binary = find_chromium()
    if binary is None:
        pytest.skip(
            "Chromium is not installed (apt-get install -y chromium); the browser check of "
            "the report is skipped"
        )
    report = build_report(report_run, with_analyzers([]))
    text = report.read_text()
    probe = tmp_path / "probe.html"
    probe.write_text(
        text.replace("<head>", "<head>" + _HEAD_PROBE, 1).replace(
            "</body>", _BODY_PROBE + "</body>", 1
        )
    )
    result = chromium(
        binary,
        tmp_path / "profile1",
        "--window-size=1280,900",
        "--virtual-time-budget=5000",
        "--dump-dom",
        probe.as_uri(),
    )
    match = re.search(r'<pre id="check">(.*?)</pre>', result.stdout, re.S)
    assert match, f"no check result from Chromium (rc {result.returncode}): {result.stderr[-2000:]}"
    check = json.loads(html.unescape(match.group(1)))
    assert check["errors"] == []
    assert check["scripts"] == 2  # only the two probes: the report itself runs nothing
    assert len(check["images"]) == 2
    assert all(complete and width > 0 for complete, width in check["images"]), check["images"]
    assert check["scrollWidth"] <= check["innerWidth"], "the page scrolls sideways on a laptop"
    assert check["text"], "the hostile class name must show as text"

    shots = Path(os.environ.get("EXPLAINKIT_SCREENSHOT_DIR", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    shot = shots / "report.png"
    result = chromium(
        binary,
        tmp_path / "profile2",
        "--window-size=1280,2400",
        f"--screenshot={shot}",
        report.as_uri(),
    )
    assert shot.is_file(), result.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert shot.stat().st_size > 20_000  # a rendered page, not a blank one


def test_report_of_a_run_without_store_still_shows_config_and_analyses(report_run):
    (report_run / "predictions.h5").unlink()
    text = render_report(report_run, with_analyzers([]))
    assert "The run could not be read completely" in text
    assert "Confidence per class" in text


def test_report_refuses_a_folder_that_is_not_a_run(tmp_path):
    from explainkit.errors import RunError

    with pytest.raises(RunError, match="not an explainkit run"):
        render_report(tmp_path, with_analyzers([]))


def test_manifests_without_order_take_the_installed_analyzers_order(report_run):
    # A manifest's own order wins (handmade 10, confidence 80); the ones without take the
    # installed analyzer's order (broken 5), else 50.
    names = [m["_name"] for m in load_manifests(report_run, {"confidence": 5, "broken": 5})]
    assert names == ["broken", "handmade", "garbled", "confidence"]
    text = render_report(report_run, with_analyzers({"confidence": 5, "broken": 5, "gradcam": 40}))
    assert text.index('id="a-broken"') < text.index('id="a-handmade"')
    assert "without results in this run: gradcam." in text


# -- the template and hostile or damaged input, on a run folder with only config.json --------


@pytest.fixture
def bare_run(tmp_path: Path) -> Path:
    """A run whose store is missing: enough for the report, no training needed."""
    run = tmp_path / "bare"
    run.mkdir()
    config = {"config": {"dataset": "shapes", "model": "resnet18"}, "data": {"classes": [EVIL]}}
    (run / "config.json").write_text(json.dumps(config))
    return run


def test_report_template_is_a_package_file_rendered_with_autoescape(bare_run):
    from explainkit import report

    folder = Path(report.__file__).parent / "templates"
    assert (folder / "report.html").is_file()
    env = report.environment()
    assert env is report.environment()  # built once per process
    assert env.autoescape is True
    write_manifest(bare_run, "evil", title=EVIL, summary=EVIL, options={EVIL: EVIL})
    (bare_run / "analyses" / "evil" / "x.json").write_text("{}")
    manifest = json.loads((bare_run / "analyses" / "evil" / "manifest.json").read_text())
    manifest["artifacts"] = [{"title": EVIL, "kind": "json", "path": "x.json", "caption": EVIL}]
    (bare_run / "analyses" / "evil" / "manifest.json").write_text(json.dumps(manifest))
    text = render_report(bare_run, with_analyzers([EVIL]))
    assert "<script" not in text.lower()
    escaped = html.escape(EVIL)
    # class name, nav, heading, summary, option key and value, artifact title, caption, not run
    assert text.count(escaped) >= 9
    assert f"<figcaption>{escaped}</figcaption>" in text
    assert f"<h3>{escaped}</h3>" in text
    assert "The run could not be read completely" in text


def test_report_survives_text_that_is_not_utf8(bare_run):
    folder = write_manifest(
        bare_run,
        "bytes",
        title="lone \udc80 surrogate",
        artifacts=[
            {"title": "Latin-1 table", "kind": "table", "path": "t.csv"},
            {"title": "Latin-1 JSON", "kind": "json", "path": "j.json"},
        ],
    )
    (folder / "t.csv").write_bytes(b"name,score\ncaf\xe9 <b>,1\n")
    (folder / "j.json").write_bytes(b'{"label": "caf\xe9"}')
    latin = bare_run / "analyses" / "latin"
    latin.mkdir()
    (latin / "manifest.json").write_bytes(b'{"title": "caf\xe9", "status": "ok"}')
    path = build_report(bare_run, with_analyzers([]))
    text = path.read_text(encoding="utf-8")  # written as valid UTF-8
    assert "lone ? surrogate" in text
    assert "caf\ufffd &lt;b&gt;" in text  # the undecodable byte shows, the tag is text
    assert '"label": "caf\ufffd"' in html.unescape(text)
    assert 'id="a-latin"' in text and "manifest.json cannot be read" in text


def test_report_says_what_is_wrong_with_each_damaged_artifact(bare_run, monkeypatch):
    from explainkit import artifacts

    folder = write_manifest(
        bare_run,
        "damaged",
        artifacts=[
            "just a string",
            {"title": "Fake", "kind": "image", "path": "fake.png"},
            {"title": "Huge", "kind": "image", "path": "huge.png"},
            {"title": "Tiny", "kind": "image", "path": "tiny.png"},
            {"title": "Empty", "kind": "table", "path": "empty.csv"},
            {"title": "Wide", "kind": "table", "path": "wide.csv"},
            {"title": "Nul", "kind": "json", "path": "a\0b"},
            {"title": "Other", "kind": "weights", "path": "w.bin", "caption": "cap"},
        ],
    )
    (folder / "fake.png").write_bytes(b"<script>alert(1)</script>")
    (folder / "huge.png").write_bytes(png_bytes() + bytes(2000))
    (folder / "tiny.png").write_bytes(png_bytes(16, 8))
    (folder / "empty.csv").write_bytes(b"")
    wide = [",".join(f"c{i}" for i in range(45)), ",".join("1" * 45)]
    (folder / "wide.csv").write_text("\n".join(wide) + "\n")
    (folder / "w.bin").write_bytes(bytes(10))
    monkeypatch.setattr(artifacts, "MAX_IMAGE_BYTES", len(png_bytes()) + 1000)
    text = render_report(bare_run, with_analyzers([]))
    assert "An artifact entry is not an object: just a string" in text
    assert "is not a PNG, JPEG, GIF, WebP or SVG image" in text
    assert "is too large to embed; open the file" in text
    assert 'class="small" width="128" height="64"' in text  # 16 px wide: scaled up, at most 8x
    assert "empty.csv</span>" in text and "is empty." in text
    assert "first 40 of 45 columns shown" in text and "<th>c39</th>" in text
    assert "<th>c40</th>" not in text
    assert text.count("outside the analysis folder") == 1  # the NUL path
    assert "file of kind &#39;weights&#39;" in text and "<figcaption>cap</figcaption>" in text


# -- the training log ---------------------------------------------------------------------------


def test_report_shows_the_end_of_the_training_log_as_text(tiny_run):
    log = tiny_run / "train.log"
    lines = log.read_text().splitlines()
    assert [line[:12] for line in lines] == ["epoch   1/2 ", "epoch   2/2 "]
    text = render_report(tiny_run, with_analyzers([]))
    assert "<h3>Training log</h3>" in text and f"{html.escape(lines[-1])}</pre>" in text
    assert "train.log</span>: 2 lines" in text
    assert text.index("Training log") < text.index("No analyses yet")  # under the run

    with open(log, "a") as f:
        f.write(f"{EVIL}\x1b[31m\n")
        f.writelines(f"epoch {i}\n" for i in range(300))
    text = render_report(tiny_run, with_analyzers([]))
    assert "<script" not in text.lower() and "\x1b" not in text
    pre = text.split('<pre class="log">', 1)[1].split("</pre>", 1)[0].splitlines()
    assert len(pre) == 200 and pre[0] == "epoch 100" and pre[-1] == "epoch 299"
    assert "the last 200 of 303 lines" in text


def test_report_reads_only_the_end_of_a_long_log(tiny_run, monkeypatch):
    from explainkit import report

    (tiny_run / "train.log").write_bytes(b"x" * 5000 + b"\ncaf\xe9 <b>\nlast line\n")
    monkeypatch.setattr(report, "MAX_LOG_BYTES", 100)
    text = render_report(tiny_run, with_analyzers([]))
    pre = text.split('<pre class="log">', 1)[1].split("</pre>", 1)[0]
    assert pre == "caf\ufffd &lt;b&gt;\nlast line"  # the cut first line is dropped
    assert "the last 2 lines of 5.0 KB" in text


def test_report_of_a_run_without_a_training_log_says_so(bare_run):
    text = render_report(bare_run, with_analyzers([]))
    assert 'This run has no <span class="file">train.log</span>' in text
    (bare_run / "train.log").mkdir()
    assert "train.log is not a regular file" in render_report(bare_run, with_analyzers([]))


def test_report_says_which_subset_a_limit_kept(tmp_path):
    from tests.helpers import train_run
    from tests.plugins.helpers import make_image_folder

    data_dir = make_image_folder(tmp_path / "data", train=12, val=4)
    run = train_run(tmp_path / "run", dataset="folder", data_dir=str(data_dir), image_size=16,
                    epochs=1, limit_train=8, limit_eval=6)  # fmt: skip
    data = json.loads((run / "config.json").read_text())["data"]
    assert data["train_subset"].startswith("a seeded class-balanced subset: 8 of ")
    assert data["eval_subset"].startswith("a seeded class-balanced subset: 6 of 8 images")
    text = render_report(run, with_analyzers([]))
    assert html.escape(data["train_subset"]) in text and html.escape(data["eval_subset"]) in text
