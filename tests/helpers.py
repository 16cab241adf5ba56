"""Helpers shared by several test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import hashlib
import resource
import signal
import subprocess
from pathlib import Path

import numpy as np

from explainkit.store import HISTORY_COLUMNS, append_epoch, create_store, epochs_folder

# -- run directories and the CLI ---------------------------------------------------------------


def checksums(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (relative path -> hex digest)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def assert_unchanged(before: dict[str, str], folder: Path) -> None:
    """Every file present before is still there with the same bytes (new files are allowed)."""
    after = checksums(folder)
    changed = [name for name, digest in before.items() if after.get(name) != digest]
    assert not changed, f"changed or removed: {changed}"


def assert_clean_failure(result: subprocess.CompletedProcess, codes=(1,), *fragments: str) -> None:
    """One ``Error:`` line, the expected exit code, no traceback, the expected words."""
    assert result.returncode in codes, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr)


def limited(max_bytes: int):
    """preexec_fn: a file-size limit (ulimit -f) whose writes fail with EFBIG, not SIGXFSZ."""

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))

    return apply


# -- prediction stores -------------------------------------------------------------------------

PATHS = [f"val/c{i % 3}/café {i}.png" for i in range(20)]  # relative, UTF-8, one per image


def history_row(epoch: int) -> dict[str, float]:
    """A plausible history row of ``epoch``: every column recorded, accuracies in [0, 1]."""
    return {name: float(epoch) / (10 if "acc" in name else 1) for name, _ in HISTORY_COLUMNS}


def make_store(path: Path, n=20, classes=3, epochs=2, sources=True) -> list[np.ndarray]:
    """A store with every dataset and ``epochs`` committed epochs; their logits.

    ``sources=False``: without paths and sizes (what a non-folder dataset may leave out)."""
    rng = np.random.default_rng(0)
    extra = {"paths": PATHS[:n], "sizes": np.arange(2 * n).reshape(n, 2) + 1} if sources else {}
    create_store(
        path,
        images=rng.integers(0, 255, (n, 8, 8, 3), dtype=np.uint8),
        targets=np.arange(n) % classes,
        index=np.arange(n) + 100,
        classes=[f"c{i}" for i in range(classes)],
        dataset="test",
        model={"arch": "resnet18-s8", "width": 8, "num_classes": classes},
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        masks=(rng.random((n, 8, 8)) > 0.5).astype(np.uint8),
        **extra,
    )
    logits = []
    for e in range(1, epochs + 1):
        lg = rng.standard_normal((n, classes)).astype(np.float32)
        logits.append(lg)
        append_epoch(path, lg, history_row(e))
    return logits


def store_bytes(path: Path) -> dict[str, bytes]:
    """The bytes of a store's head and of every file in its epochs folder."""
    files = [path, *sorted(epochs_folder(path).glob("*"))]
    return {p.name: p.read_bytes() for p in files if p.is_file()}
