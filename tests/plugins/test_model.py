"""The ``model`` analyzer and ``explainkit.models.summary``: real models, a real run."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from explainkit.manager import get_analyzers, get_plugin_manager
from explainkit.models.summary import ModelSummary, format_table, summarize_model
from explainkit.runner import analyze
from explainkit.store import open_store
from tests.helpers import build_model, run_cli

REPO = Path(__file__).resolve().parents[2]
MB = 1024**2


def pass_mb(values: int) -> float:
    """torchsummary's forward/backward estimate of ``values`` activations: x2, float32."""
    return 2 * values * 4 / MB


def check_totals(summary: ModelSummary, model: nn.Module) -> None:
    t = summary.totals
    assert t["total_params"] == sum(p.numel() for p in model.parameters())
    assert t["non_trainable_params"] == t["total_params"] - t["trainable_params"]
    assert t["input_size_mb"] == pytest.approx(math.prod(summary.input_shape) * 4 / MB)
    assert t["params_size_mb"] == pytest.approx(t["total_params"] * 4 / MB)
    activations = sum(math.prod(r["output_shape"]) for r in summary.rows)
    assert t["forward_backward_pass_size_mb"] == pytest.approx(pass_mb(activations))
    parts = ("input_size_mb", "forward_backward_pass_size_mb", "params_size_mb")
    assert t["estimated_total_size_mb"] == pytest.approx(sum(t[k] for k in parts))


# -- the library function ------------------------------------------------------------------


def test_summary_of_the_seed_resnet18_s8_has_11189322_parameters():
    model = build_model("resnet18-s8", 10, width=64)
    summary = summarize_model(model, (3, 32, 32))
    t = summary.totals
    assert t["total_params"] == 11_189_322
    assert t["trainable_params"] == 11_189_322 and t["non_trainable_params"] == 0
    check_totals(summary, model)
    rows = {r["layer"]: r for r in summary.rows}
    assert rows["conv1"] == {
        "layer": "conv1",
        "type": "Conv2d",
        "output_shape": [1, 64, 32, 32],
        "params": 1728,
        "trainable": 1728,
    }
    assert rows["layer4.1.conv2"]["output_shape"] == [1, 512, 8, 8]  # last stride 1
    assert rows["pool"]["output_shape"] == [1, 512, 2, 2]
    assert rows["flatten"]["output_shape"] == [1, 2048]
    assert rows["linear"]["output_shape"] == [1, 10] and rows["linear"]["params"] == 20_490
    assert summary.rows[-1]["layer"] == "linear"
    # Every module is a leaf here, called once: the rows add up to the total.
    assert sum(r["params"] for r in summary.rows) == 11_189_322
    assert t["input_size_mb"] == pytest.approx(3 * 32 * 32 * 4 / MB)
    assert t["params_size_mb"] == pytest.approx(42.6839, abs=1e-4)

    text = format_table(summary)
    assert "Total params: 11,189,322" in text
    assert "Trainable params: 11,189,322" in text and "Non-trainable params: 0" in text
    assert re.search(r"conv1 +Conv2d +\[1, 64, 32, 32\] +1,728\n", text)
    for label in ("Input size (MB): 0.01", "Params size (MB): 42.68"):
        assert label in text
    assert f"Estimated total size (MB): {t['estimated_total_size_mb']:.2f}" in text


def test_summary_leaves_the_model_as_it_was():
    model = build_model("resnet18-s8", 10, width=8).train()
    summarize_model(model, (3, 32, 32))
    assert all(m.training for m in model.modules())
    assert not any(m._forward_hooks for m in model.modules())
    model.eval()
    summarize_model(model, (3, 32, 32))
    assert not any(m.training for m in model.modules())
    with pytest.raises(RuntimeError):  # 1 channel into a 3-channel stem
        summarize_model(model.train(), (1, 32, 32))
    assert not any(m._forward_hooks for m in model.modules())
    assert all(m.training for m in model.modules())


def test_summary_of_torchvision_resnet18_at_224_px():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(weights=None)
    summary = summarize_model(model, (3, 224, 224))
    assert summary.totals["total_params"] == 11_689_512
    assert summary.totals["trainable_params"] == 11_689_512
    check_totals(summary, model)
    rows = summary.rows
    assert rows[0]["layer"] == "conv1" and rows[0]["output_shape"] == [1, 64, 112, 112]
    assert rows[-1]["layer"] == "fc" and rows[-1]["output_shape"] == [1, 1000]
    # torchvision's BasicBlock calls its one ReLU module twice: a row per call.
    assert [r["layer"] for r in rows].count("layer1.0.relu") == 2
    assert rows[[r["layer"] for r in rows].index("layer4.1.conv2")]["output_shape"] == [
        1, 512, 7, 7,
    ]  # fmt: skip
    assert summary.totals["input_size_mb"] == pytest.approx(0.57421875)


class TwoCalls(nn.Module):
    """A frozen stem, a block called twice, a tuple-returning layer and a parameter of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)  # 108 + 4
        self.stem.requires_grad_(False)
        self.block = nn.Conv2d(4, 4, 1)  # 16 + 4, called twice
        self.gru = nn.GRU(16, 5, batch_first=True)  # returns (output, hidden)
        self.scale = nn.Parameter(torch.ones(1))  # on the model itself: a row of its own

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block(self.block(self.stem(x)))  # (1, 4, 4, 4)
        out, _ = self.gru(x.flatten(2))  # (1, 4, 16) -> (1, 4, 5)
        return out[:, -1] * self.scale  # (1, 5)


def test_summary_counts_frozen_reused_and_tuple_outputs():
    model = TwoCalls()
    gru_params = sum(p.numel() for p in model.gru.parameters())
    summary = summarize_model(model, (3, 4, 4))
    assert [(r["layer"], r["type"], r["output_shape"]) for r in summary.rows] == [
        ("stem", "Conv2d", [1, 4, 4, 4]),
        ("block", "Conv2d", [1, 4, 4, 4]),
        ("block", "Conv2d", [1, 4, 4, 4]),
        ("gru", "GRU", [1, 4, 5]),  # the first tensor of (output, hidden)
        ("(model)", "TwoCalls", [1, 5]),
    ]
    assert [(r["params"], r["trainable"]) for r in summary.rows] == [
        (112, 0), (20, 20), (20, 20), (gru_params, gru_params), (1, 1),
    ]  # fmt: skip
    t = summary.totals
    assert t["total_params"] == 112 + 20 + gru_params + 1  # the reused block counts once
    assert t["trainable_params"] == 20 + gru_params + 1
    assert t["non_trainable_params"] == 112
    assert t["forward_backward_pass_size_mb"] == pytest.approx(pass_mb(3 * 64 + 20 + 5))
    check_totals(summary, model)
    text = format_table(summary)
    assert "Non-trainable params: 112" in text and text.count("\nblock ") == 2

    every = [n for n, _ in model.named_parameters()]
    assert summarize_model(model, (3, 4, 4), trainable=every).totals["non_trainable_params"] == 0


@pytest.mark.parametrize("shape", [(), (3, 0, 32), (3, 32.5, 32), ("3", 32, 32), None])
def test_summary_refuses_a_shape_that_is_not_one(shape):
    with pytest.raises(ValueError, match="not a shape"):
        summarize_model(nn.Linear(2, 2), shape)


# -- the analyzer on a real run ------------------------------------------------------------


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def expected_params(run: Path) -> tuple[int, dict]:
    with open_store(run) as store:
        spec, shape = store.attrs["model"], [int(v) for v in store.attrs["input_shape"]]
    model = build_model(spec["arch"], spec["num_classes"], width=spec["width"])
    return sum(p.numel() for p in model.parameters()), {"shape": shape, "spec": spec}


def check_outputs(run: Path, manifest: dict) -> dict:
    assert manifest["status"] == "ok", manifest.get("error")
    total, info = expected_params(run)
    folder = run / "analyses" / "model"
    rows = read_csv(folder / "model_summary.csv")
    assert list(rows[0]) == ["layer", "type", "output_shape", "params", "trainable"]
    assert rows[0]["layer"] == "conv1" and rows[0]["type"] == "Conv2d"
    width, (c, h, w) = info["spec"]["width"], info["shape"]
    assert rows[0]["output_shape"] == f"1x{width}x{h}x{w}"
    assert rows[-1]["output_shape"] == f"1x{info['spec']['num_classes']}"
    assert sum(int(r["params"]) for r in rows) == total
    assert all(r["params"] == r["trainable"] for r in rows)  # training optimizes every one
    data = json.loads((folder / "model_summary.json").read_text())
    assert data["totals"]["total_params"] == total
    assert data["totals"]["trainable_params"] == total  # though the host froze the model
    assert data["input_shape"] == [c, h, w] and len(data["rows"]) == len(rows)
    assert f"Total params: {total:,}" in (folder / "model_summary.txt").read_text()
    totals_artifact, csv_artifact, json_artifact = manifest["artifacts"]
    assert totals_artifact["path"] == "model_totals.csv" and totals_artifact["kind"] == "table"
    totals = {r["quantity"]: r["value"] for r in read_csv(folder / "model_totals.csv")}
    assert int(totals["total parameters"]) == total
    assert int(totals["trainable parameters"]) == total
    assert csv_artifact["path"] == "model_summary.csv" and csv_artifact["kind"] == "table"
    assert json_artifact["path"] == "model_summary.json" and json_artifact["kind"] == "json"
    assert f"{total:,} parameters" in csv_artifact["caption"]
    assert f"{total:,} parameters" in json_artifact["caption"]
    return data


def test_analyzer_model_through_the_python_api(tiny_run):
    (manifest,) = analyze(tiny_run, plugins=["model"], device="cpu")
    data = check_outputs(tiny_run, manifest)
    assert manifest["title"] == "Model summary" and manifest["order"] == 10
    assert data["epoch"] == manifest["epoch"]


def test_analyzer_model_through_the_cli(tiny_run):
    result = run_cli("analyze", str(tiny_run), "--plugin", "model", "--device", "cpu", "--json")
    assert result.returncode == 0, result.stderr
    (manifest,) = json.loads(result.stdout)
    check_outputs(tiny_run, manifest)


def test_analyzer_model_is_registered_as_described():
    cls = get_analyzers(get_plugin_manager(entrypoints=False, quiet=True))["model"].cls
    assert (cls.title, cls.order, cls.options) == ("Model summary", 10, ())
    assert set(cls.needs) == {"store", "checkpoint"}


def test_every_builtin_analyzer_is_documented_with_its_options():
    doc = (REPO / "docs" / "analyzers.md").read_text()
    for name, entry in get_analyzers(get_plugin_manager(entrypoints=False, quiet=True)).items():
        assert f"\n## {name}\n" in doc, f"docs/analyzers.md has no section for {name}"
        section = doc.split(f"\n## {name}\n", 1)[1].split("\n## ", 1)[0]
        for option in entry.cls.options:
            assert option.flag(name) in section, f"{option.flag(name)} is not documented"
