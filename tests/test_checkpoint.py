import os

import pytest
import torch

from explainkit import load_model
from explainkit.errors import CheckpointError
from explainkit.train.checkpoint import load_checkpoint, resolve_checkpoint, save_checkpoint
from tests.helpers import build_model, minimal_payload, registries, run_cli


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
        load_checkpoint(path, registries())
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
        load_checkpoint(path, registries())
    torch.save({"state_dict": {}, "epoch": 3, "arch": "resnet18"}, path)  # timm-like dict
    with pytest.raises(CheckpointError, match="not an explainkit checkpoint"):
        load_checkpoint(path, registries())


def test_truncated_checkpoints_are_refused(tiny_run):
    path = tiny_run / "checkpoints" / "last.pt"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(path, registries())


def test_atomic_save_leaves_no_temporary_files(tmp_path):
    save_checkpoint(tmp_path / "a.pt", minimal_payload())
    assert [p.name for p in tmp_path.iterdir()] == ["a.pt"]
    assert load_checkpoint(tmp_path / "a.pt", registries())["epoch"] == 1


def test_load_model_from_a_run_dir_and_an_epoch(tiny_run):
    model = load_model(tiny_run, epoch=1)
    assert not model.training
    assert sum(p.numel() for p in model.parameters()) > 0
    with pytest.raises(CheckpointError, match="saved epochs: 1, 2"):
        resolve_checkpoint(tiny_run, registries(), epoch=7)


def test_checkpoints_hold_only_tensors_and_plain_values(tiny_run):
    data = load_checkpoint(tiny_run / "checkpoints" / "last.pt", registries())
    assert {"optimizer", "scheduler", "scaler", "rng", "config", "epoch"} <= set(data)
    assert not any(k.startswith("module.") for k in data["state_dict"])


def test_checkpoint_keys_say_what_they_hold(tiny_run):
    """v2: ``state_dict`` is the raw training weights, ``state_dict_ema`` their average, and
    the model that is loaded is the average, which is what was evaluated and stored."""
    from explainkit.train.checkpoint import FORMAT_VERSION, eval_state_dict

    data = load_checkpoint(tiny_run / "checkpoints" / "last.pt", registries())
    assert data["format_version"] == FORMAT_VERSION == 2 and "train_state_dict" not in data
    raw, ema = data["state_dict"], data["state_dict_ema"]
    assert raw.keys() == ema.keys() and data["ema_updates"] > 0
    assert not torch.equal(raw["linear.weight"], ema["linear.weight"])
    assert eval_state_dict(data) is ema
    loaded = load_model(tiny_run / "checkpoints" / "last.pt").state_dict()
    assert all(torch.equal(loaded[k], ema[k]) for k in ema)


def test_a_pre_release_checkpoint_is_refused_with_one_sentence(tiny_run, tmp_path):
    """Format v1 (``train_state_dict`` beside ``state_dict``) was written only by a
    pre-release; no run of it exists to load."""
    data = load_checkpoint(tiny_run / "checkpoints" / "last.pt", registries())
    data.update(format_version=1, train_state_dict=data.pop("state_dict_ema"))
    path = tmp_path / "v1.pt"
    torch.save(data, path)
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(path, registries())
    assert str(caught.value) == (
        f"{path} was written by a pre-release of explainkit (checkpoint format v1); "
        "train the run again with this version"
    )


def _set(key, value):
    def mutate(data):
        data[key] = value

    return mutate


def _set_model(key, value):
    def mutate(data):
        data["model"] = {**data["model"], key: value}

    return mutate


def _set_weight(which, key, value):
    def mutate(data):
        data[which] = {**data[which], key: value}

    return mutate


def _drop(key, inside=None):
    def mutate(data):
        (data[inside] if inside else data).pop(key)

    return mutate


HOSTILE_CHECKPOINTS = {
    "version-as-text": (_set("format_version", "1"), "its format_version is '1', not a version"),
    "version-as-float": (_set("format_version", 1.0), "its format_version is 1.0"),
    "version-0": (_set("format_version", 0), "its format_version is 0"),
    "negative-epoch": (_set("epoch", -1), "its epoch is -1, not a whole number"),
    "fractional-epoch": (_set("epoch", 1.5), "its epoch is 1.5"),
    "epoch-as-bool": (_set("epoch", True), "its epoch is True"),
    "state-dict-list": (_set("state_dict", [1, 2]), "its state_dict is [1, 2], not a dict"),
    "wrong-shape": (
        _set_weight("state_dict", "linear.weight", torch.zeros(5, 5)),
        "its state_dict['linear.weight'] has shape [5, 5], but model resnet18-s8",
    ),
    "wrong-shape-ema": (
        _set_weight("state_dict_ema", "conv1.weight", torch.zeros(1)),
        "its state_dict_ema['conv1.weight'] has shape [1]",
    ),
    "nan-weight": (
        _set_weight("state_dict", "linear.bias", torch.full((10,), float("nan"))),
        "holds NaN or infinity",
    ),
    "not-a-tensor": (_set_weight("state_dict", "linear.bias", [0.0] * 10), "not a tensor"),
    "integer-weight": (
        _set_weight("state_dict", "linear.bias", torch.zeros(10, dtype=torch.int64)),
        "is int64, not float32",
    ),
    "extra-key": (_set_weight("state_dict", "extra", torch.zeros(1)), "the unknown key 'extra'"),
    "missing-key": (_drop("linear.bias", "state_dict"), "it lacks 'linear.bias'"),
    "missing-model": (_drop("model"), "it lacks 'model'"),
    "model-a-list": (_set("model", ["resnet18"]), "its model spec is ['resnet18'], not a dict"),
    "arch-not-text": (_set_model("arch", 18), "its model arch is 18, not a model name"),
    "width-0": (_set_model("width", 0), "its model width is 0"),
    "classes-as-text": (_set_model("num_classes", "10"), "its model num_classes is '10'"),
    "fewer-classes": (_set_model("num_classes", 3), "but model resnet18-s8 (width 8, 3 classes)"),
    "ema-without-count": (_drop("ema_updates"), "state_dict_ema but no ema_updates"),
    "best-after-last": (_set("best_epoch", 99), "its best_epoch is 99, not an epoch in 0..2"),
    "nan-accuracy": (_set("eval_acc", float("nan")), "its eval_acc is nan"),
    "optimizer-list": (_set("optimizer", []), "its optimizer is [], not a dict"),
    "class-names": (_set("classes", ["a"]), "its classes are ['a'], not 10 class names"),
    "zero-std": (_set("std", [0.2, 0.0, 0.2]), "its std is [0.2, 0.0, 0.2]"),
}


@pytest.mark.parametrize("name", HOSTILE_CHECKPOINTS)
def test_crafted_checkpoints_are_refused_at_load(tiny_run_master, tmp_path, name):
    """Each is an explainkit checkpoint with one field wrong: one sentence, at load."""
    mutate, message = HOSTILE_CHECKPOINTS[name]
    data = torch.load(tiny_run_master / "checkpoints" / "last.pt", weights_only=True)
    mutate(data)
    path = tmp_path / "crafted.pt"
    torch.save(data, path)
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(path, registries())
    text = str(caught.value)
    assert message in text and f"{path} is damaged: " in text, text
    assert "newer" not in text and "\n" not in text and not text.endswith(".")


@pytest.mark.parametrize(
    "arch, message",
    [
        ("vgg16", "its model arch 'vgg16' is unknown; did you mean 'torchvision:vgg16'?"),
        ("import:no_such_module_ek:Net", "module 'no_such_module_ek' is not importable"),
        ("import:os:system", "system of os is not a class or function taking num_classes"),
        ("json.decoder:JSONDecoder", "JSONDecoder of json.decoder is not a class or function"),
    ],
)
def test_a_model_that_cannot_be_built_here_is_not_called_damage(
    tiny_run_master, tmp_path, arch, message
):
    """A sound checkpoint of a model whose plugin or module is missing here says so: the
    file is fine, and nothing recorded in it makes an unrelated function run."""
    data = torch.load(tiny_run_master / "checkpoints" / "last.pt", weights_only=True)
    data["model"]["arch"] = arch
    torch.save(data, tmp_path / "other.pt")
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(tmp_path / "other.pt", registries())
    text = str(caught.value)
    assert text.startswith(f"{tmp_path / 'other.pt'} cannot be rebuilt here: "), text
    assert message in text and "damaged" not in text and "\n" not in text, text


def test_a_newer_format_still_says_upgrade(tiny_run_master, tmp_path):
    data = torch.load(tiny_run_master / "checkpoints" / "last.pt", weights_only=True)
    data["format_version"] = 3
    torch.save(data, tmp_path / "new.pt")
    with pytest.raises(CheckpointError, match="format v3, newer than this explainkit"):
        load_checkpoint(tmp_path / "new.pt", registries())


def test_model_from_checkpoint_checks_a_dict_it_did_not_load(tiny_run_master):
    from explainkit.train.checkpoint import model_from_checkpoint

    data = load_checkpoint(tiny_run_master / "checkpoints" / "last.pt", registries())
    assert not model_from_checkpoint(data, registries()).training
    bad = {**data, "state_dict_ema": {**data["state_dict_ema"], "linear.weight": torch.zeros(2)}}
    with pytest.raises(CheckpointError, match="the checkpoint is damaged: its state_dict_ema"):
        model_from_checkpoint(bad, registries())
    with pytest.raises(CheckpointError, match="not what load_checkpoint returns .missing or"):
        model_from_checkpoint({"epoch": 1}, registries())
