"""Video: a folder of clips (frame folders and a GIF) and torchvision's R3D-18 through
evaluate, analyze and report; Grad-CAM gives one map per frame."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

import explainkit
from explainkit import open_store
from explainkit.clip_files import model_input
from tests.helpers import assert_clean_failure, run_cli

KINETICS = dict(mean=(0.43216, 0.394666, 0.37645), std=(0.22803, 0.22145, 0.216989))


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Two classes of clips, 40 x 48 px: a square moving right or down (10 frames each), and
    one GIF of 5 frames; random R3D-18 weights for their 2 classes."""
    from explainkit.plugins.task_models import build_task_model

    root = tmp_path_factory.mktemp("video")
    rng = np.random.default_rng(0)
    for c, name in enumerate(["down", "right"]):
        for k in range(3):
            folder = root / "clips" / name / f"clip{k}"
            folder.mkdir(parents=True)
            for t in range(10):
                frame = (rng.random((40, 48, 3)) * 60).astype(np.uint8)
                y, x = (4 + 3 * t, 20) if c == 0 else (16, 4 + 3 * t)
                frame[y : y + 8, x : x + 8] = 255
                Image.fromarray(frame).save(folder / f"frame_{t:03d}.png")
    gif = [Image.fromarray(np.full((40, 48, 3), 40 * t, np.uint8)) for t in range(5)]
    gif[0].save(root / "clips" / "down" / "fading.gif", save_all=True, append_images=gif[1:])
    torch.manual_seed(0)
    model = build_task_model("video", "r3d_18", 2)
    torch.save(model.state_dict(), root / "r3d.pt")
    return {"root": root, "data": root / "clips", "weights": root / "r3d.pt", "model": model}


def test_r3d_goes_through_evaluate_analyze_and_report_with_a_map_per_frame(clips):
    run = clips["root"] / "run"
    result = run_cli(
        "evaluate", "--model", "torchvision_video:r3d_18", "--weights", str(clips["weights"]),
        "--dataset", "clips", "--data-dir", str(clips["data"]), "--image-size", "32",
        "--out", str(run),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "read 7 images of 2 classes" in result.stderr  # 6 frame folders and the GIF
    with h5py.File(run / "clips.h5") as f:
        stored_clips = f["clips"][:]
    assert stored_clips.shape == (7, 16, 32, 32, 3)
    with open_store(run) as store:
        assert store.task == "video"
        assert np.array_equal(store.images(np.arange(7)), stored_clips[:, 8])  # middle frames
        logits = store.logits(1)
        assert store.sources(np.arange(7))[0].endswith("clip0")
    model = clips["model"].eval()
    with torch.no_grad():
        expected = model(model_input(stored_clips, KINETICS["mean"], KINETICS["std"], "cpu"))
    np.testing.assert_allclose(logits, expected.numpy(), atol=1e-4)

    analyzed = run_cli("analyze", str(run), "--gradcam-count", "3")
    assert analyzed.returncode == 0, analyzed.stderr
    for skipped in ("quality", "captum", "evolution"):
        assert f"skipped {skipped}: needs" in analyzed.stderr  # one line each, not a failure
    with h5py.File(run / "analyses" / "gradcam" / "attributions.h5") as f:
        frame_maps, maps = f["frame_maps"][:].astype(np.float32), f["maps"][:].astype(np.float32)
    assert frame_maps.shape == (7, 16, 32, 32) and maps.shape == (7, 32, 32)
    np.testing.assert_array_equal(maps, frame_maps[:, 8])  # what overlays the stored image
    from explainkit.explain.gradcam import compute_cam

    x = model_input(stored_clips[:2], KINETICS["mean"], KINETICS["std"], "cpu")
    direct = compute_cam(model, x, layer="layer4", target=torch.from_numpy(logits[:2].argmax(1)))
    np.testing.assert_allclose(frame_maps[:2], direct.maps.numpy(), atol=2e-3)  # float16 file
    assert (run / "analyses" / "gradcam" / "gradcam_frames.png").stat().st_size > 5000
    assert (run / "analyses" / "gallery").is_dir() and (run / "analyses" / "losses").is_dir()
    reported = run_cli("report", str(run))
    assert reported.returncode == 0, reported.stderr
    assert "Maps of a clip, frame by frame" in (run / "report.html").read_text()


def test_a_video_model_evaluates_from_python_and_refuses_images(clips, tmp_path):
    run = explainkit.evaluate(
        clips["model"], "clips", tmp_path / "py", data_dir=clips["data"], image_size=32,
        task="video", arch="torchvision_video:r3d_18", **KINETICS,
    )  # fmt: skip
    with open_store(run) as store:
        assert store.task == "video" and store.logits(1).shape == (7, 2)
    with pytest.raises(explainkit.ExplainkitError, match="a video model needs clips"):
        explainkit.evaluate(
            clips["model"], "shapes", tmp_path / "images", image_size=32, task="video",
            arch="torchvision_video:r3d_18",
        )  # fmt: skip
    assert not (tmp_path / "images").exists()


def test_a_clip_without_frames_is_one_sentence(tmp_path, clips):
    (tmp_path / "clips" / "a" / "empty").mkdir(parents=True)
    result = run_cli(
        "evaluate", "--model", "torchvision_video:r3d_18", "--weights", str(clips["weights"]),
        "--dataset", "clips", "--data-dir", str(tmp_path / "clips"), "--out", str(tmp_path / "r"),
    )  # fmt: skip
    assert_clean_failure(result, (1,), "holds no frames")
    assert not (tmp_path / "r").exists()
