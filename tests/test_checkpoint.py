import os

import pytest
import torch

from explainkit import load_model
from explainkit.errors import CheckpointError
from explainkit.models import build_model
from explainkit.train.checkpoint import load_checkpoint, resolve_checkpoint, save_checkpoint
from tests.conftest import run_cli


class Sentinel:
    """Unpickling this creates a file: proof that code ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_code_running_pickle_never_runs(tmp_path):
    sentinel = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"format": "explainkit-checkpoint", "payload": Sentinel(sentinel)}, path)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(path)
    assert not sentinel.exists()


def test_code_running_checkpoint_in_a_run_is_refused_by_the_cli(tiny_run, tmp_path):
    sentinel = tmp_path / "pwned"
    for path in (tiny_run / "checkpoints").glob("*.pt"):
        torch.save({"x": Sentinel(sentinel)}, path)
    result = run_cli("analyze", str(tiny_run), "--plugin", "gradcam")
    assert result.returncode == 1
    assert "refused" in result.stderr and "Traceback" not in result.stderr
    assert not sentinel.exists()


def test_plain_state_dicts_are_not_explainkit_checkpoints(tmp_path):
    path = tmp_path / "plain.pt"
    torch.save(build_model("resnet18", width=8).state_dict(), path)
    with pytest.raises(CheckpointError, match="not an explainkit checkpoint"):
        load_checkpoint(path)
    torch.save({"state_dict": {}, "epoch": 3, "arch": "resnet18"}, path)  # timm-like dict
    with pytest.raises(CheckpointError, match="not an explainkit checkpoint"):
        load_checkpoint(path)


def test_truncated_checkpoints_are_refused(tiny_run):
    path = tiny_run / "checkpoints" / "last.pt"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(path)


def test_atomic_save_leaves_no_temporary_files(tmp_path):
    save_checkpoint(tmp_path / "a.pt", {"model": {}, "state_dict": {}, "epoch": 1})
    assert [p.name for p in tmp_path.iterdir()] == ["a.pt"]
    assert load_checkpoint(tmp_path / "a.pt")["epoch"] == 1


def test_load_model_from_a_run_dir_and_an_epoch(tiny_run):
    model = load_model(tiny_run, epoch=1)
    assert not model.training
    assert sum(p.numel() for p in model.parameters()) > 0
    with pytest.raises(CheckpointError, match="saved epochs: 1, 2"):
        resolve_checkpoint(tiny_run, epoch=7)


def test_checkpoints_hold_only_tensors_and_plain_values(tiny_run):
    data = load_checkpoint(tiny_run / "checkpoints" / "last.pt")
    assert {"optimizer", "scheduler", "scaler", "rng", "config", "epoch"} <= set(data)
    assert not any(k.startswith("module.") for k in data["state_dict"])


def test_checkpoint_keys_say_what_they_hold(tiny_run):
    """v2: ``state_dict`` is the raw training weights, ``state_dict_ema`` their average, and
    the model that is loaded is the average, which is what was evaluated and stored."""
    from explainkit.train.checkpoint import FORMAT_VERSION, eval_state_dict

    data = load_checkpoint(tiny_run / "checkpoints" / "last.pt")
    assert data["format_version"] == FORMAT_VERSION == 2 and "train_state_dict" not in data
    raw, ema = data["state_dict"], data["state_dict_ema"]
    assert raw.keys() == ema.keys() and data["ema_updates"] > 0
    assert not torch.equal(raw["linear.weight"], ema["linear.weight"])
    assert eval_state_dict(data) is ema
    loaded = load_model(tiny_run / "checkpoints" / "last.pt").state_dict()
    assert all(torch.equal(loaded[k], ema[k]) for k in ema)


def _v1_layout(v2: dict, ema: bool) -> dict:
    """The same checkpoint as explainkit wrote it before format v2 (state_dict = evaluated)."""
    old = {k: v for k, v in v2.items() if k not in ("state_dict", "state_dict_ema", "ema_updates")}
    old["format_version"] = 1
    if ema:
        old.update(
            state_dict=v2["state_dict_ema"],
            train_state_dict=v2["state_dict"],
            ema_updates=v2["ema_updates"],
        )
    else:
        old.update(state_dict=v2["state_dict"], train_state_dict=None, ema_updates=0)
    return old


@pytest.mark.parametrize("ema", [True, False], ids=["ema", "no-ema"])
def test_v1_checkpoints_load_to_the_same_weights(tiny_run, tmp_path, ema):
    v2 = load_checkpoint(tiny_run / "checkpoints" / "last.pt")
    path = tmp_path / "v1.pt"
    torch.save(_v1_layout(v2, ema), path)
    data = load_checkpoint(path)
    assert data["format_version"] == 2 and "train_state_dict" not in data
    expected = dict(v2) if ema else {k: v for k, v in v2.items() if "ema" not in k}
    assert data.keys() == expected.keys()
    for key in ("state_dict", "state_dict_ema"):
        if key in expected:
            assert all(torch.equal(data[key][k], expected[key][k]) for k in expected[key]), key
    if ema:
        assert data["ema_updates"] == v2["ema_updates"]
    weights = v2["state_dict_ema"] if ema else v2["state_dict"]  # what v1 evaluated
    loaded = load_model(path).state_dict()
    assert all(torch.equal(loaded[k], weights[k]) for k in weights)
