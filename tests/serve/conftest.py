"""The explorer's fixtures: one tiny real run with gradcam and quality analyzed (per-epoch
checkpoints kept), a second run on the same eval set, and clients over them."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.helpers import registries, train_run


@pytest.fixture(scope="session")
def explorer_run(tiny_run_master, tmp_path_factory) -> Path:
    """A trained shapes run (2 epochs, 64 eval images) with the gradcam analyzer's
    attributions.h5 and the quality analyzer's per_image.csv. Read-only: copy to damage."""
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
