"""Every random state training uses: seeded once, saved in each checkpoint, restored on resume.

A resumed run must draw the same random numbers as one that was never stopped, so the
checkpoint carries the global generators (torch CPU and CUDA, numpy, Python) and the run's
own two: the data-order generator and the augmentation generator.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed the global generators (model initialisation draws from torch's)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state(data_gen: torch.Generator, aug_gen: torch.Generator) -> dict[str, Any]:
    """All random states as tensors and plain values (what ``weights_only`` loading accepts)."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]),
        "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
        "numpy_pos": int(np.random.get_state()[2]),
        "data": data_gen.get_state(),
        "augment": aug_gen.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(
    state: dict[str, Any], data_gen: torch.Generator, aug_gen: torch.Generator
) -> None:
    """Put back what :func:`rng_state` saved."""
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    keys = state["numpy"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, int(state.get("numpy_pos", 624)), 0, 0.0))
    data_gen.set_state(state["data"])
    aug_gen.set_state(state["augment"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
