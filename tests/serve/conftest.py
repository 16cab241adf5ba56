"""The explorer's fixtures: one tiny real run with gradcam, quality and captum analyzed
(per-epoch checkpoints kept), a second run on the same eval set, a tiny run of each task
(detection, segmentation, multi-label), and clients over them."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.helpers import registries, train_run


@pytest.fixture(scope="session")
def explorer_run(tiny_run_master, tmp_path_factory) -> Path:
    """A trained shapes run (2 epochs, 64 eval images) with the gradcam analyzer's
    attributions.h5, the quality analyzer's per_image.csv and the captum analyzer's
    attributions-saliency.h5 (its first 8 images and 2 shown). Read-only: copy to damage."""
    import torch

    from explainkit.runner import analyze

    run = Path(shutil.copytree(tiny_run_master, tmp_path_factory.mktemp("explorer") / "run"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, options in (
            ("gradcam", {}),
            ("quality", {"quality_count": 16, "quality_steps": 4, "quality_sanity": False,
                         "quality_methods": "gradcam"}),
            ("captum", {"captum_limit": 4, "captum_count": 2, "captum_methods": "saliency",
                        "captum_map_images": 8}),
        ):  # fmt: skip
            (manifest,) = analyze(
                run, plugins=[name], device="cpu", batch_size=32, collect_failures=True, **options
            )
            assert manifest["status"] == "ok", manifest
    finally:
        torch.set_num_threads(threads)
    return run


@pytest.fixture(scope="session")
def other_run(tmp_path_factory) -> Path:
    """Another run on the same shapes eval set (the same data seed, one epoch, wider): it
    gets other images right and wrong."""
    return train_run(tmp_path_factory.mktemp("explorer") / "other", epochs=1, width=16)


@pytest.fixture(scope="session")
def client(explorer_run, other_run):
    from starlette.testclient import TestClient

    from explainkit.serve import build_app

    app = build_app([explorer_run, other_run], registries(), "cpu")
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


TASK_RUN = dict(dataset="scenes", image_size=32, width=8, epochs=1, batch_size=16,
                limit_train=32, limit_eval=16, device="cpu", lr=0.02)  # fmt: skip


@pytest.fixture(scope="session")
def task_runs(tmp_path_factory) -> dict[str, Path]:
    """One tiny trained run per task on the scenes dataset (16 eval images of 32 px)."""
    from explainkit.config import TrainConfig
    from explainkit.train.tasks import train

    root = tmp_path_factory.mktemp("explorer-tasks")
    return {
        task: train(TrainConfig(task=task, **TASK_RUN), registries(), out=root / task, quiet=True)
        for task in ("detection", "segmentation", "multilabel")
    }


@pytest.fixture(scope="session")
def task_client(task_runs):
    from starlette.testclient import TestClient

    from explainkit.serve import build_app

    runs = [task_runs[t] for t in ("detection", "segmentation", "multilabel")]
    with TestClient(build_app(runs, registries(), "cpu"), raise_server_exceptions=False) as c:
        yield c


@pytest.fixture(scope="session")
def analyzed_task_runs(task_runs, tmp_path_factory) -> dict[str, Path]:
    """Copies of the task runs with the gradcam analyzer's per-item attributions.h5 (one row
    per detection, class region or label), stored as float32. Analyzed one item per pass on
    one thread, as the explorer computes an item on demand: a barely trained detector's
    Grad-CAM matches the explained box among near-tied candidates, so another batch
    changes which one it explains (and the map), not the explorer's arithmetic."""
    import torch

    from explainkit.runner import analyze

    root = tmp_path_factory.mktemp("explorer-items")
    runs = {t: Path(shutil.copytree(p, root / t)) for t, p in task_runs.items()}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for run in runs.values():
            (manifest,) = analyze(run, plugins=["gradcam"], device="cpu", batch_size=1,
                                  collect_failures=True, gradcam_dtype="float32")  # fmt: skip
            assert manifest["status"] == "ok", manifest
    finally:
        torch.set_num_threads(threads)
    return runs


@pytest.fixture(scope="session")
def item_client(analyzed_task_runs):
    """Runs 0, 1, 2: the analyzed detection, segmentation and multi-label runs."""
    from starlette.testclient import TestClient

    from explainkit.serve import build_app

    runs = [analyzed_task_runs[t] for t in ("detection", "segmentation", "multilabel")]
    with TestClient(build_app(runs, registries(), "cpu"), raise_server_exceptions=False) as c:
        yield c
