"""``explainkit demo`` end to end through the real CLI, shrunk with --epochs 1 --limit 64."""

from __future__ import annotations

import html
import json
import shutil

from explainkit.config import TrainConfig
from explainkit.demo import CPU, DEMO, GPU, demo_config
from explainkit.manager import get_analyzers, get_plugin_manager
from tests.helpers import REPO, run_cli

EXAMPLE = REPO / "examples" / "explainkit-example-analyzer" / "explainkit_example_analyzer"


def test_demo_config_is_the_documented_dicts():
    cpu = demo_config(device="cpu")
    assert isinstance(cpu, TrainConfig)
    assert cpu.dataset == "shapes" and cpu.cutout == 0
    assert cpu.width == CPU["width"] and cpu.epochs == DEMO["epochs"]
    assert cpu.limit_train == CPU["limit_train"]
    gpu = demo_config(device="cpu", gpu=True)
    assert gpu.width == GPU["width"] == 64 and gpu.limit_train is None
    small = demo_config(device="cpu", epochs=1, limit=128)
    assert (small.epochs, small.limit_train, small.limit_eval) == (1, 128, 32)
    cifar = demo_config("cifar10", data_dir="/data", device="cpu")
    assert cifar.dataset == "cifar10" and cifar.data_dir == "/data"


def test_demo_trains_analyzes_and_reports(tmp_path):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    # The example third-party analyzer, loaded from a plugins folder: it must show up too.
    shutil.copy(EXAMPLE / "__init__.py", plugins / "confidence.py")
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--epochs", "1", "--limit", "64", "--device", "cpu"]
    result = run_cli(*args, "--plugins-dir", str(plugins), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = out / "report.html"
    assert result.stdout.strip().splitlines()[-1] == str(report)
    assert "report written to" in result.stderr
    text = report.read_text()

    manifests = {
        p.parent.name: json.loads(p.read_text()) for p in out.glob("analyses/*/manifest.json")
    }
    builtin = get_analyzers(get_plugin_manager(entrypoints=False, quiet=True))
    skipped = {n for n in builtin if f"skipped {n}:" in result.stderr}
    assert set(builtin) - skipped <= set(manifests)
    assert "confidence" in manifests
    for name, manifest in manifests.items():
        assert manifest["status"] == "ok", (name, manifest["error"])
        assert f'id="a-{name}"' in text
        for artifact in manifest["artifacts"]:
            assert html.escape(artifact["title"]) in text

    # A second demo into the same folder is refused and leaves the first one intact.
    again = run_cli(*args, timeout=120)
    assert again.returncode == 1
    assert "already exists" in again.stderr and "--overwrite" in again.stderr
    assert report.read_text() == text
