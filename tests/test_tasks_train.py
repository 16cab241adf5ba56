"""explainkit train --task multilabel|segmentation|detection on scenes, then analyze and
report: through the real CLI (detection, segmentation) and the Python API (multi-label)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from explainkit import open_store
from explainkit.config import TrainConfig
from explainkit.store.schema import TASKS
from explainkit.train.checkpoint import load_model
from tests.helpers import assert_clean_failure, registries, run_cli

TASK_RUN = dict(
    dataset="scenes",
    image_size=32,
    width=8,
    epochs=1,
    batch_size=16,
    limit_train=32,
    limit_eval=12,
    device="cpu",
    lr=0.02,
)


def _flags(**options) -> list[str]:
    out = []
    for name, value in options.items():
        out += [f"--{name.replace('_', '-')}", str(value)]
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One tiny run per task: detection and segmentation by the CLI, multi-label by Python."""
    from explainkit.train.tasks import train

    root = tmp_path_factory.mktemp("task_runs")
    made = {}
    for task in ("detection", "segmentation"):
        out = root / task
        result = run_cli("train", "--task", task, *_flags(**TASK_RUN), "--quiet", "--out", str(out))
        assert result.returncode == 0, result.stderr
        made[task] = out
    config = TrainConfig(task="multilabel", **TASK_RUN)
    made["multilabel"] = train(config, registries(), out=root / "multilabel", quiet=True)
    return made


@pytest.mark.parametrize("task", ["detection", "segmentation", "multilabel"])
def test_a_task_run_trains_its_default_model_and_stores_its_results(runs, task):
    run = runs[task]
    config = json.loads((run / "config.json").read_text())
    expected = {"detection": "fcos-s8", "segmentation": "fcn-s8", "multilabel": "resnet18-s8"}
    assert config["config"]["task"] == task and config["model"]["arch"] == expected[task]
    with open_store(run) as store:
        assert store.task == task and store.committed == 1 and store.num_images == 12
        store.verify()
        names = {f.name for f in TASKS[task].epoch}
        for name in names:
            store.epoch_data(name)
        history = store.history
        assert np.isfinite(history["eval_loss"]).all() and 0 <= history["eval_acc"][0] <= 1
        assert ("train_acc" in history) == (task != "detection")
        classes = store.classes
    assert classes[0] == "background" if task == "segmentation" else classes[0] == "circle"
    model = load_model(run, registries(), 1, "cpu")  # the checkpoint rebuilds the task's model
    x = torch.zeros(2, 3, 32, 32)
    with torch.no_grad():
        out = model.eval()(x if task != "detection" else list(x))
    if task == "segmentation":
        assert out.shape == (2, len(classes), 32, 32)
    elif task == "multilabel":
        assert out.shape == (2, len(classes))
    else:
        assert len(out) == 2 and set(out[0]) == {"boxes", "scores", "labels"}


@pytest.mark.parametrize("task", ["detection", "segmentation", "multilabel"])
def test_a_task_run_goes_through_analyze_and_report(runs, task):
    run = runs[task]
    quick = ["--quality-count", "4", "--quality-steps", "4"]  # every analyzer, small samples
    result = run_cli("analyze", str(run), "--device", "cpu", *quick)
    assert result.returncode == 0, result.stderr
    assert f"needs a classification run, and this run's task is {task}" in result.stderr
    metrics = list(csv.DictReader(open(run / "analyses" / "task_metrics" / "metrics.csv")))
    headline = {"detection": "map_50", "segmentation": "mean_iou", "multilabel": "macro_f1"}
    assert len(metrics) == 1 and 0 <= float(metrics[0][headline[task]]) <= 1
    with open_store(run) as store:  # the trainer's eval_acc is the analyzer's headline score
        acc = float(store.history["eval_acc"][0])
    if task != "multilabel":
        assert float(metrics[0][headline[task]]) == pytest.approx(acc, abs=1e-6)
    assert (run / "analyses" / "task_mistakes" / "mistakes.png").stat().st_size > 1000
    rows = list(csv.DictReader(open(run / "analyses" / "task_mistakes" / "mistakes.csv")))
    assert 1 <= len(rows) <= 12
    report = run_cli("report", str(run))
    assert report.returncode == 0, report.stderr
    html = (run / "report.html").read_text()
    assert "Task metrics" in html and "Mistakes per task" in html


def test_a_dataset_without_the_task_annotations_is_one_sentence(tmp_path):
    result = run_cli(
        "train", "--task", "detection", *_flags(**{**TASK_RUN, "dataset": "shapes"}),
        "--out", str(tmp_path / "run"),
    )  # fmt: skip
    assert_clean_failure(result, (1, 2), "has no detection annotations")


def test_a_task_run_resumes_where_it_stopped(tmp_path):
    """A killed or finished task run continues with --resume: its store keeps its epochs."""
    from explainkit.train.tasks import train

    out = tmp_path / "seg"
    small = {**TASK_RUN, "limit_train": 16, "limit_eval": 4}
    train(TrainConfig(task="segmentation", **small), registries(), out=out, quiet=True)
    result = run_cli("train", "--resume", str(out), "--epochs", "2", "--quiet")
    assert result.returncode == 0, result.stderr
    assert "resuming" in result.stderr and "mIoU" in result.stderr
    with open_store(out) as store:
        assert store.task == "segmentation" and store.committed == 2
        assert store.history["epoch"].tolist() == [1, 2]
        assert store.epoch_data("masks", 2).shape == (4, 32, 32)
