"""Test of the example plugin on a tiny real run (trained here, a few seconds on a CPU)."""

from __future__ import annotations

import csv
import json

import pytest

import explainkit
from explainkit.manager import build_registries, get_analyzers, get_plugin_manager


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from explainkit.config import TrainConfig
    from explainkit.train.trainer import train

    config = TrainConfig(
        dataset="shapes", width=8, epochs=1, limit_train=128, limit_eval=64, batch_size=64
    )
    return train(config, out=tmp_path_factory.mktemp("runs") / "tiny", quiet=True)


@pytest.fixture
def pm():
    import explainkit_example_analyzer

    pm = get_plugin_manager(entrypoints=False, defaults=False, quiet=True)
    pm.register(explainkit_example_analyzer, name="confidence")
    return pm


def test_analyzer_confidence_registers(pm):
    entry = get_analyzers(pm)["confidence"]
    assert entry.cls.summary
    assert [o.name for o in entry.cls.options] == ["bins", "by"]


@pytest.mark.parametrize("by", ["target", "predicted"])
def test_analyzer_confidence_writes_png_and_csv(pm, run_dir, by):
    (manifest,) = explainkit.analyze(
        run_dir,
        plugins=["confidence"],
        registries=build_registries(pm),
        confidence_bins=4,
        confidence_by=by,
    )
    assert manifest["status"] == "ok", manifest["error"]
    out = run_dir / "analyses" / "confidence"
    assert json.loads((out / "manifest.json").read_text())["options"] == {"bins": 4, "by": by}
    assert (out / "confidence.png").read_bytes()[:4] == b"\x89PNG"
    with open(out / "confidence.csv") as f:
        rows = list(csv.DictReader(f))
    classes = json.loads((run_dir / "config.json").read_text())["data"]["classes"]
    assert len(rows) == 4 * len(classes)
    total = sum(int(r["correct"]) + int(r["wrong"]) for r in rows)
    assert total == 64  # every evaluation image counted once
