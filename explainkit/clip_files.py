"""A video run's clips, and model inputs from uint8 pixels of images or clips.

A video run's store holds each clip's middle frame as its image (what galleries, reports and
the explorer show) and its logits; the clips themselves, (N, T, H, W, 3) uint8, are in
``RUN/clips.h5`` (dataset ``clips``, one chunk per clip, written whole before the first epoch
commits), which analyzers that run the model read through :func:`read_clips`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from explainkit.errors import AnalyzerError, ExplainkitError

CLIPS_FILE = "clips.h5"


def write_clips(run: str | Path, clips: np.ndarray) -> Path:
    """``clips`` into ``run``/clips.h5, streamed clip by clip; the file appears complete."""
    from explainkit.h5files import open_h5_for_writing

    path = Path(run) / CLIPS_FILE
    with open_h5_for_writing(path, ExplainkitError) as f:
        ds = f.create_dataset(
            "clips", shape=clips.shape, dtype="uint8", chunks=(1, *clips.shape[1:])
        )
        for i in range(len(clips)):
            ds[i] = clips[i]
    return path


def read_clips(run: str | Path, indices: Sequence[int] | np.ndarray, n: int) -> np.ndarray:
    """Clips ``indices`` (N, T, H, W, 3) uint8 of a video run of ``n`` eval clips.

    Raises:
        AnalyzerError: clips.h5 is missing, unreadable, or not this run's (one sentence).
    """
    import h5py

    path = Path(run) / CLIPS_FILE
    try:
        with h5py.File(path, "r") as f:
            ds = f["clips"]
            if ds.dtype != np.uint8 or ds.ndim != 5 or len(ds) != n or ds.shape[-1] != 3:
                raise AnalyzerError(
                    f"{path} holds {ds.dtype} {tuple(ds.shape)}, not the (N={n}, T, H, W, 3) "
                    "uint8 clips of this run"
                )
            rows = [int(i) for i in np.asarray(indices).reshape(-1)]
            if not rows:
                return np.zeros((0, *ds.shape[1:]), np.uint8)
            return np.stack([ds[i] for i in rows])  # a chunk per clip: one read each
    except (OSError, KeyError) as e:
        raise AnalyzerError(
            f"the clips of video run {Path(run)} cannot be read from {path} ({e}); evaluate "
            "the model again to write them"
        ) from None


def model_input(pixels: Any, mean: Sequence[float], std: Sequence[float], device: Any) -> Any:
    """uint8 images (N, H, W, 3) or clips (N, T, H, W, 3), array or tensor -> the normalized
    float input a model takes: (N, 3, H, W) or (N, 3, T, H, W), on ``device``."""
    import torch

    x = pixels if isinstance(pixels, torch.Tensor) else torch.from_numpy(np.asarray(pixels))
    x = x.to(device, non_blocking=True)
    order = (0, 3, 1, 2) if x.dim() == 4 else (0, 4, 1, 2, 3)
    x = x.permute(*order).float().div_(255)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    m = torch.tensor(mean, device=device, dtype=x.dtype).view(shape)
    s = torch.tensor(std, device=device, dtype=x.dtype).view(shape)
    return (x - m) / s
