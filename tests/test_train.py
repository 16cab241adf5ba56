import json
import re

import numpy as np
import pytest
import torch

from explainkit.config import TrainConfig, resolve_config
from explainkit.errors import ConfigError, RunError
from explainkit.store import open_store
from explainkit.train.checkpoint import load_checkpoint
from tests.helpers import CIFAR_MINI, minimal_payload, registries, run_cli, train_run


def test_train_writes_a_complete_run_dir(tiny_run):
    config = json.loads((tiny_run / "config.json").read_text())
    assert config["config"]["width"] == 8
    assert config["environment"]["torch"] == torch.__version__
    assert config["model"]["default_layer"] == "layer4"
    names = {p.name for p in (tiny_run / "checkpoints").iterdir()}
    assert {"epoch_001.pt", "epoch_002.pt", "last.pt", "best.pt"} <= names
    with open_store(tiny_run) as store:
        assert store.epochs == [1, 2]
        assert store.logits(2).shape == (64, 10)
        assert store.images().shape == (64, 32, 32, 3)
        assert store.has_masks
        acc = (store.predictions(2) == store.targets).mean()
        assert store.history["eval_acc"][1] == pytest.approx(acc)
    last = load_checkpoint(tiny_run / "checkpoints" / "last.pt", registries())
    assert last["epoch"] == 2 and last["model"]["arch"] == "resnet18-s8"


def test_stored_logits_are_the_checkpoints_logits(tiny_run):
    """The store's eval logits are what the saved weights compute on the stored images."""
    from explainkit import load_model

    model = load_model(tiny_run / "checkpoints" / "epoch_002.pt")
    with open_store(tiny_run) as store:
        x = torch.from_numpy(store.images()).permute(0, 3, 1, 2).float() / 255
        mean = torch.tensor(store.mean).view(1, 3, 1, 1)
        std = torch.tensor(store.std).view(1, 3, 1, 1)
        assert store.attrs["eval_tta"] and store.attrs["eval_weights"] == "ema"
        with torch.no_grad():
            x = (x - mean) / std
            logits = ((model(x) + model(x.flip(3))) / 2).numpy()
        np.testing.assert_allclose(logits, store.logits(2), rtol=1e-4, atol=1e-4)


def test_same_seed_gives_bit_identical_runs(tmp_path):
    a = train_run(tmp_path / "a", epochs=2, limit_train=128, limit_eval=32, cutout=8)
    b = train_run(tmp_path / "b", epochs=2, limit_train=128, limit_eval=32, cutout=8)
    ca = load_checkpoint(a / "checkpoints" / "last.pt", registries())
    cb = load_checkpoint(b / "checkpoints" / "last.pt", registries())
    for key in ("state_dict", "state_dict_ema"):  # the raw weights and their moving average
        sa, sb = ca[key], cb[key]
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), key
    with open_store(a) as ra, open_store(b) as rb:
        assert np.array_equal(ra.logits(2), rb.logits(2))


def test_cifar_sample_trains_end_to_end(cifar_run):
    with open_store(cifar_run) as store:
        assert store.classes[0] == "airplane" and len(store.classes) == 10
        assert store.num_images == 128 and not store.has_masks
        assert store.epochs == [1, 2]


def test_existing_run_dir_is_refused_and_kept(tiny_run):
    before = (tiny_run / "predictions.h5").read_bytes()
    result = run_cli("train", "--dataset", "shapes", "--width", "8", "--out", str(tiny_run))
    assert result.returncode == 1
    assert "already exists" in result.stderr and "Traceback" not in result.stderr
    assert (tiny_run / "predictions.h5").read_bytes() == before


def test_overwrite_never_deletes_a_folder_that_is_not_a_run(tmp_path):
    precious = tmp_path / "photos"
    precious.mkdir()
    (precious / "cat.jpg").write_bytes(b"meow")
    with pytest.raises(ConfigError, match="is not an explainkit run; nothing was deleted"):
        train_run(precious, overwrite=True, epochs=1)
    assert (precious / "cat.jpg").read_bytes() == b"meow"


def test_overwrite_replaces_a_previous_run(tmp_path):
    run = train_run(tmp_path / "r", epochs=1, limit_train=64, limit_eval=16)
    from explainkit.config import TrainConfig
    from explainkit.train.trainer import train

    config = TrainConfig(
        dataset="shapes",
        device="cpu",
        width=8,
        epochs=2,
        batch_size=32,
        limit_train=64,
        limit_eval=16,
    )
    train(config, registries(), out=run, overwrite=True, quiet=True)
    with open_store(run) as store:
        assert store.epochs == [1, 2]


def test_a_run_dir_in_use_is_refused(tmp_path):
    run = tmp_path / "busy"
    run.mkdir()
    (run / "config.json").write_text("{}")
    from explainkit.rundir import RunLock

    with RunLock(run), pytest.raises(RunError, match="in use"):  # held as a live trainer holds it
        train_run(run, epochs=1)


def test_keep_checkpoints_keeps_first_best_and_last_k(tmp_path):
    run = train_run(tmp_path / "k", epochs=4, limit_train=64, limit_eval=16, keep_checkpoints=1)
    names = {p.name for p in (run / "checkpoints").glob("epoch_*.pt")}
    best = load_checkpoint(run / "checkpoints" / "best.pt", registries())["epoch"]
    assert names == {"epoch_001.pt", "epoch_004.pt", f"epoch_{best:03d}.pt"}


def test_config_file_is_overridden_by_command_line(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"width": 16, "epochs": 3, "batch-size": 32}))
    config = resolve_config({"width": 8, "epochs": 20, "batch_size": 128}, {"width"}, path)
    assert (config.width, config.epochs, config.batch_size) == (8, 3, 32)


def test_presets_sit_under_the_config_file_and_the_command_line(tmp_path):
    seed = resolve_config({"preset": "seed"}, {"preset"})
    assert (seed.label_smoothing, seed.ema, seed.tta) == (0.0, 0.0, False)
    mixed = resolve_config({"preset": "seed", "ema": 0.99}, {"preset", "ema"})
    assert mixed.ema == 0.99 and mixed.label_smoothing == 0.0
    default = resolve_config({}, set())
    assert default == TrainConfig()
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"preset": "seed", "tta": True}))
    assert resolve_config({}, set(), path).tta is True


def test_yaml_config_files_are_read(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 4\nlabel_smoothing: 0.1\n")
    config = resolve_config({}, set(), path)
    assert config.epochs == 4 and config.label_smoothing == 0.1


def test_config_file_typos_and_bad_types_are_refused(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"epocs": 3}))
    with pytest.raises(ConfigError, match="unknown option"):
        resolve_config({}, set(), path)
    path.write_text(json.dumps({"epochs": "many"}))
    with pytest.raises(ConfigError, match="epochs must be int"):
        resolve_config({}, set(), path)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--epochs", "-1"], "--epochs must be at least 1"),
    ],
)
def test_bad_numbers_get_one_sentence(tmp_path, args, message):
    result = run_cli("train", "--dataset", "shapes", "--out", str(tmp_path / "x"), *args)
    assert result.returncode == 2  # a bad value is a usage error
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "x").exists()


def test_train_device_is_checked_like_analyze_device(tmp_path):
    result = run_cli(
        "train", "--dataset", "shapes", "--device", "foo", "--out", str(tmp_path / "x")
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "'foo' is not a device; use auto, cpu, cuda, cuda:N or mps" in result.stderr
    assert not (tmp_path / "x").exists()


def test_a_bad_value_from_a_config_file_is_a_usage_error_too(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("dataset: shapes\nweight_decay: -0.01\n")
    result = run_cli("train", "--config", str(path), "--out", str(tmp_path / "x"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"Error: {path}: weight_decay must be at least 0.0, got -0.01" in result.stderr
    assert not (tmp_path / "x").exists()


def test_the_parameter_count_used_by_the_memory_check_is_exact():
    """Counted on the meta device for any model (10 classes), exactly what the model holds."""
    from tests.helpers import build_model

    for arch in ("resnet18-s8", "resnet18", "torchvision:resnet18"):
        for width in (8, 64):
            model = build_model(arch, 10, **({"width": width} if ":" not in arch else {}))
            expected = sum(p.numel() for p in model.parameters())
            assert registries().count_parameters(arch, width, 32) == expected, (arch, width)
    assert registries().count_parameters("no-such-model", 8, 32) == 0  # refused elsewhere


def test_every_config_the_project_uses_fits_a_small_machine(monkeypatch):
    """The memory check refuses only the absurd: defaults, presets, the tests' and the demo's
    configs all pass on a 2 GiB machine."""
    from explainkit import config as config_module
    from explainkit.demo import demo_config
    from tests.helpers import TINY, TRAINED

    monkeypatch.setattr(config_module, "physical_memory", lambda: 2 * 2**30)
    configs = [TrainConfig(), TrainConfig(preset="seed"), TrainConfig(dataset="shapes", **TINY)]
    configs.append(TrainConfig(**TRAINED))
    configs += [TrainConfig(dataset="cifar10", **TINY), TrainConfig(model="resnet18")]
    for gpu in (False, True):
        for dataset in ("shapes", "cifar10"):
            configs.append(demo_config(dataset, data_dir="cifar", device="cpu", gpu=gpu))
    for config in configs:
        config.validate(registries=registries())
    big = TrainConfig(width=512)  # 700 M parameters: 11 GiB for weights, gradients, momentum, EMA
    with pytest.raises(ConfigError, match=r"need at least 1\d\.\d GiB of memory .* has 2\.0 GiB"):
        big.validate(registries=registries())
    big.validate(check_memory=False)  # a finished run's config is readable anywhere


def test_the_memory_check_counts_the_data_and_the_batch(monkeypatch):
    from explainkit import config as config_module
    from explainkit.config import memory_needed

    monkeypatch.setattr(config_module, "physical_memory", lambda: 8 * 2**30)
    full = memory_needed(TrainConfig(image_size=1024))  # 60,000 CIFAR images of 1024 px
    assert full["data"] == 60_000 * 1024 * 1024 * 3
    with pytest.raises(ConfigError, match="lower --width, --image-size"):
        TrainConfig(image_size=1024).validate()
    TrainConfig(image_size=1024, limit_train=500, limit_eval=100, batch_size=16).validate()
    assert memory_needed(TrainConfig(dataset="folder", data_dir="x", limit_train=10**9))[
        "data"
    ] == (
        2 * 32 * 32 * 3  # a folder's size is unknown: one image per split is the lower bound
    )
    monkeypatch.setattr(config_module, "physical_memory", lambda: None)
    TrainConfig(image_size=1024).validate()  # no figure from the OS: no refusal


def test_train_cli_on_the_cifar_sample(tmp_path):
    out = tmp_path / "cli"
    result = run_cli(
        "train",
        "--dataset",
        "cifar10",
        "--data-dir",
        str(CIFAR_MINI),
        "--width",
        "8",
        "--epochs",
        "1",
        "--limit-train",
        "128",
        "--limit-eval",
        "64",
        "--batch-size",
        "64",
        "--device",
        "cpu",
        "--out",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    assert "epoch   1/1" in result.stderr
    assert TrainConfig(**json.loads((out / "config.json").read_text())["config"]).epochs == 1


def test_every_random_state_round_trips_through_a_checkpoint(tmp_path):
    import random

    from explainkit.train.checkpoint import save_checkpoint
    from explainkit.train.state import restore_rng_state, rng_state

    data, aug = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    np.random.seed(3)
    np.random.rand(5)  # move numpy's position off its fresh value
    random.seed(4)
    save_checkpoint(tmp_path / "r.pt", {**minimal_payload(), "rng": rng_state(data, aug)})
    expected = (np.random.rand(), random.random(), torch.rand(1), torch.rand(1, generator=aug))
    np.random.rand(9), random.random(), torch.rand(4), torch.rand(4, generator=aug)
    restore_rng_state(load_checkpoint(tmp_path / "r.pt", registries())["rng"], data, aug)
    again = (np.random.rand(), random.random(), torch.rand(1), torch.rand(1, generator=aug))
    assert expected[:2] == again[:2]
    assert torch.equal(expected[2], again[2]) and torch.equal(expected[3], again[3])


# -- what the history records: the objective and the plain cross-entropy --------------------


def test_a_step_returns_the_objective_and_the_plain_cross_entropy_of_the_same_logits(tmp_path):
    from explainkit.train.trainer import Trainer

    config = TrainConfig(dataset="shapes", device="cpu", width=8, limit_train=64, limit_eval=16)
    trainer = Trainer(config, tmp_path / "run", registries(), quiet=True)
    x = trainer.data.augment(trainer.data.train.images[:32])
    y = trainer.data.train.targets[:32]
    out, loss, ce = trainer._step(x, y)
    assert config.label_smoothing == 0.1
    expected_loss = torch.nn.functional.cross_entropy(out.detach(), y, label_smoothing=0.1)
    torch.testing.assert_close(loss.detach(), expected_loss)
    torch.testing.assert_close(ce, torch.nn.functional.cross_entropy(out.detach(), y))
    assert not ce.requires_grad and ce.device == out.device  # a tensor: no sync per step


def test_history_has_the_objective_and_the_comparable_cross_entropies(tiny_run):
    """train_ce is recorded beside train_loss; eval_loss is the plain cross-entropy of the
    stored logits."""
    with open_store(tiny_run) as store:
        history = store.history
        logits = torch.from_numpy(store.logits(2))
        targets = torch.from_numpy(store.targets)
    assert list(history)[:3] == ["epoch", "train_loss", "train_ce"]
    assert np.isfinite(history["train_ce"]).all() and (history["train_ce"] > 0).all()
    assert not np.array_equal(history["train_ce"], history["train_loss"])  # smoothing 0.1
    eval_ce = torch.nn.functional.cross_entropy(logits, targets).item()
    assert history["eval_loss"][1] == pytest.approx(eval_ce, rel=1e-5)


def test_without_label_smoothing_the_objective_is_the_cross_entropy(tmp_path, monkeypatch):
    from explainkit.train.trainer import Trainer

    run = train_run(tmp_path / "r", epochs=1, limit_train=64, limit_eval=16, label_smoothing=0.0)
    with open_store(run) as store:
        history = store.history
    assert np.array_equal(history["train_ce"], history["train_loss"])

    # No .item() (a device sync) in the epoch: the sums stay on the device until it ends.
    config = TrainConfig(dataset="shapes", device="cpu", width=8, limit_train=128, limit_eval=16)
    trainer = Trainer(config, tmp_path / "s", registries(), quiet=True)
    calls = []
    original = torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "item", lambda t: calls.append(1) or original(t))
    from explainkit.train.trainer import _StopFlag

    stats = trainer.train_epoch_stats(_StopFlag())
    assert calls == [] and set(stats) == {"train_loss", "train_ce", "train_acc", "images_per_s"}


# -- the training log ---------------------------------------------------------------------------


def test_train_log_holds_the_printed_lines_and_a_resume_continues_it(tmp_path):
    out = tmp_path / "run"
    args = ["--dataset", "shapes", "--width", "8", "--batch-size", "64", "--device", "cpu"]
    args += ["--limit-train", "128", "--limit-eval", "32", "--cutout", "0", "--quiet"]
    first = run_cli("train", *args, "--epochs", "1", "--out", str(out))
    assert first.returncode == 0, first.stderr
    log = out / "train.log"
    printed = [line for line in first.stderr.splitlines() if line.startswith("epoch ")]
    assert log.read_text().splitlines() == printed and printed[0].startswith("epoch   1/1  ")

    resumed = run_cli("train", "--resume", str(out), "--epochs", "2", "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    lines = log.read_text().splitlines()
    assert lines[0] == printed[0]
    assert lines[1] == f"resuming {out} after epoch 1" and lines[1] in resumed.stderr
    assert lines[2].startswith("epoch   2/2  train loss ") and lines[2] in resumed.stderr
    assert len(lines) == 3 and log.read_text().endswith("\n")  # whole lines, flushed


# -- presets -----------------------------------------------------------------------------------


def test_the_seed_preset_is_the_seed_recipe_exactly():
    seed = resolve_config({"preset": "seed"}, {"preset"})
    assert (seed.crop_padding, seed.cutout, seed.image_size) == (4, 16, 32)  # crop 32 pad 4
    assert seed.flip is False and seed.label_smoothing == 0.0
    assert seed.ema == 0.0 and seed.tta is False
    default = resolve_config({"preset": "default"}, {"preset"})
    assert default.flip is True and default == TrainConfig()
    assert resolve_config({"preset": "seed", "flip": True}, {"preset", "flip"}).flip is True


def _doc_value(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"{value:g}" if isinstance(value, float) else str(value)


def test_docs_training_table_says_what_each_preset_contains():
    """docs/training.md's preset table matches config.PRESETS: a column per preset, a row for
    every option a preset sets, and each cell the value ``--preset NAME`` resolves to."""
    from explainkit.config import FIELDS, PRESETS
    from tests.helpers import REPO

    text = (REPO / "docs" / "training.md").read_text()
    table = [
        [cell.strip() for cell in line.strip().strip("|").split("|")]
        for line in text.split("| option |", 1)[1].split("\n\n", 1)[0].splitlines()[2:]
    ]
    header = text.split("| option |", 1)[1].splitlines()[0].strip().strip("|").split("|")
    presets = [cell.strip().removesuffix(" preset") for cell in header[:-1]]
    assert sorted(presets) == sorted(PRESETS)
    resolved = {name: resolve_config({"preset": name}, {"preset"}) for name in presets}
    documented = set()
    for row in table:
        flags = re.findall(r"`--([a-z-]+)`", row[0])
        assert flags, row
        for flag in flags:
            name = flag.replace("-", "_")
            assert name in FIELDS, flag
            documented.add(name)
            for preset, cell in zip(presets, row[1:], strict=False):
                assert cell == _doc_value(getattr(resolved[preset], name)), (flag, preset)
    for values in PRESETS.values():
        assert set(values) <= documented


# -- any model, any dataset: the registries ------------------------------------------------------

PLUGIN = """
from explainkit import hookimpl
from explainkit.data import Dataset, DatasetEntry
from explainkit import ModelEntry


def tiny(num_classes, width=4):
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(width, num_classes),
    )


def stripes(split, image_size, seed):
    import numpy as np

    n = 48 if split == "train" else 16
    rng = np.random.default_rng(seed + (split == "eval"))
    images = rng.integers(0, 60, (n, image_size, image_size, 3), dtype=np.uint8)
    targets = np.arange(n) % 2
    images[targets == 1, ::4] = 255
    return Dataset(images=images, targets=targets, classes=["plain", "striped"],
                   index=np.arange(n))


@hookimpl
def register_models(register):
    register(ModelEntry("ek_tiny", tiny, summary="A convolution and a head."))


@hookimpl
def register_datasets(register):
    register(DatasetEntry("ek_stripes", stripes, summary="Plain or striped noise."))
"""

FAST = ("--epochs", "1", "--batch-size", "8", "--device", "cpu", "--quiet")


@pytest.fixture
def plugin_dir(tmp_path):
    folder = tmp_path / "myplugins"
    folder.mkdir()
    (folder / "stripes.py").write_text(PLUGIN)
    return folder


@pytest.mark.parametrize("how", ["--plugins-dir", "EXPLAINKIT_PLUGINS_DIR"])
def test_a_plugins_model_and_dataset_train_through_the_cli(plugin_dir, tmp_path, how):
    out = tmp_path / "run"
    args = ["train", "--model", "ek_tiny", "--dataset", "ek_stripes", "--width", "3"]
    args += ["--image-size", "16", *FAST, "--out", str(out)]
    if how == "--plugins-dir":
        result = run_cli(*args, "--plugins-dir", str(plugin_dir))
    else:
        result = run_cli(*args, env={"EXPLAINKIT_PLUGINS_DIR": str(plugin_dir)})
    assert result.returncode == 0, result.stderr
    doc = json.loads((out / "config.json").read_text())
    assert doc["model"] == {
        "arch": "ek_tiny",
        "width": 3,
        "kwargs": {"width": 3},  # the plugin's build takes width: it got --width
        "num_classes": 2,
        "input_shape": [3, 16, 16],
        "default_layer": "1",  # none registered: the last spatial layer, located
        "reshape": "nchw",
    }
    assert doc["data"]["dataset"] == "ek_stripes" and doc["data"]["num_train"] == 48
    assert (doc["config"]["crop_padding"], doc["config"]["cutout"]) == (2, 8)  # 16 px / 8, / 2
    from explainkit.manager import load_registries, reset_plugins

    try:
        with_plugin = load_registries(plugin_dir)  # so that the registry knows ek_tiny
        last = load_checkpoint(out / "checkpoints" / "last.pt", with_plugin)
    finally:
        reset_plugins()
    assert last["model"]["kwargs"] == {"width": 3}
    assert last["state_dict"]["0.weight"].shape == (3, 3, 3, 3)


def test_a_plugins_run_is_analyzed_with_its_plugin_and_named_without_it(plugin_dir, tmp_path):
    out = tmp_path / "run"
    trained = run_cli(
        "train", "--model", "ek_tiny", "--dataset", "ek_stripes", "--image-size", "16", *FAST,
        "--out", str(out), "--plugins-dir", str(plugin_dir),
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr
    analyzed = run_cli(
        "analyze", str(out), "--plugin", "gradcam", "--device", "cpu", "--plugins-dir",
        str(plugin_dir),
    )  # fmt: skip
    assert analyzed.returncode == 0, analyzed.stderr
    assert "using '1' from the run's metadata" in analyzed.stderr
    without = run_cli("analyze", str(out), "--plugin", "gradcam", "--device", "cpu")
    assert without.returncode == 1
    assert "its model arch 'ek_tiny' is unknown" in without.stderr
    assert "a plugin's model needs that plugin: --plugins-dir" in without.stderr


def _image_folder(root, classes=("cat", "dog"), per_class=8):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 80, (40 + 3 * i, 56, 3), dtype=np.uint8)  # not square
            pixels[..., c] += 150
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def test_a_torchvision_model_trains_on_an_image_folder_at_any_size(tmp_path):
    from explainkit import load_model

    data, out = _image_folder(tmp_path / "photos"), tmp_path / "run"
    result = run_cli(
        "train", "--model", "torchvision:resnet18", "--dataset", "folder", "--data-dir",
        str(data), "--image-size", "64", "--width", "8", "--limit-train", "12", *FAST,
        "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "note: torchvision:resnet18 takes no --width; --width 8 is ignored" in result.stderr
    doc = json.loads((out / "config.json").read_text())
    assert doc["model"] == {
        "arch": "torchvision:resnet18",
        "kwargs": {},
        "num_classes": 2,
        "input_shape": [3, 64, 64],
        "default_layer": "layer4",
        "reshape": "nchw",
    }
    # Augmentation scaled to 64 pixels: RandomCrop padding 64/8, Cutout 64/2.
    assert (doc["config"]["crop_padding"], doc["config"]["cutout"]) == (8, 32)
    model = load_model(out)
    assert type(model).__name__ == "ResNet" and model.fc.out_features == 2
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 2)
    with open_store(out) as store:
        assert store.images().shape[1:] == (64, 64, 3)
    inspected = run_cli("inspect", str(out))  # a model without --width reads back too
    assert inspected.returncode == 0, inspected.stderr
    assert "torchvision:resnet18, 2 classes" in inspected.stdout


@pytest.mark.parametrize("classes_there", [2, 1000])
def test_weights_from_a_local_torchvision_state_dict(tmp_path, classes_there):
    import torchvision

    data, out = _image_folder(tmp_path / "photos"), tmp_path / "run"
    source = torchvision.models.resnet18(num_classes=classes_there)
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    result = run_cli(
        "train", "--model", "torchvision:resnet18", "--dataset", "folder", "--data-dir",
        str(data), "--weights", str(path), "--lr", "1e-9", "--ema", "0", *FAST,
        "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    log = (out / "train.log").read_text()
    assert f"weights: file {path} (" in log
    head = "the classifier head (fc.weight, fc.bias) was trained for 1000 classes"
    assert (head in log) == (classes_there == 1000)
    doc = json.loads((out / "config.json").read_text())
    assert doc["config"]["weights"] == str(path)
    assert doc["data"]["mean"] == pytest.approx([0.485, 0.456, 0.406])  # what they expect
    trained = load_checkpoint(out / "checkpoints" / "last.pt", registries())["state_dict"]
    start = source.state_dict()
    for key in ("conv1.weight", "layer4.1.conv2.weight"):  # lr 1e-9: as loaded
        assert torch.allclose(trained[key], start[key], atol=1e-6), key
    assert trained["fc.weight"].shape == (2, 512)  # this run's head
    assert torch.allclose(trained["fc.weight"], start["fc.weight"][:2], atol=1e-6) == (
        classes_there == 2
    )


def test_weights_from_an_explainkit_checkpoint_fine_tune_on_other_classes(tiny_run, tmp_path):
    data, out = _image_folder(tmp_path / "photos"), tmp_path / "tuned"
    checkpoint = tiny_run / "checkpoints" / "best.pt"
    result = run_cli(
        "train", "--dataset", "folder", "--data-dir", str(data), "--width", "8", "--weights",
        str(checkpoint), *FAST, "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "the classifier head (linear.weight, linear.bias) was trained for 10 classes" in (
        result.stderr
    )
    tiny = json.loads((tiny_run / "config.json").read_text())["data"]
    assert json.loads((out / "config.json").read_text())["data"]["mean"] == tiny["mean"]


def test_weights_that_cannot_be_had_stop_before_anything_is_written(tmp_path):
    out = tmp_path / "never"
    missing = run_cli("train", "--dataset", "shapes", "--weights", "nope.pt", "--out", str(out))
    assert missing.returncode == 2 and "neither a file nor a weights name" in missing.stderr
    wrong = run_cli("train", "--dataset", "shapes", "--weights", "IMAGENET1K_V1", "--out", str(out))
    assert wrong.returncode == 2 and "model resnet18-s8 has no named weights" in wrong.stderr
    assert not out.exists() and "Traceback" not in missing.stderr + wrong.stderr


def test_unknown_model_names_exit_2_with_a_did_you_mean(tmp_path):
    out = tmp_path / "never"
    small = ("--dataset", "shapes", "--width", "8", *FAST, "--out", str(out))
    typo = run_cli("train", "--model", "resnet19", *small)
    assert typo.returncode == 2 and "Traceback" not in typo.stderr
    assert "Error: --model: unknown model 'resnet19'; did you mean 'resnet18'?" in typo.stderr
    bare = run_cli("train", "--model", "resnet50", *small)
    assert bare.returncode == 2 and "did you mean 'torchvision:resnet50'?" in bare.stderr
    family = run_cli("train", "--model", "torchvision:resnt18", *small)  # checked at build
    assert family.returncode == 2, family.stderr
    assert "unknown model 'torchvision:resnt18'; did you mean 'torchvision:resnet18'?" in (
        family.stderr
    )
    dataset = run_cli("train", "--model", "resnet18", "--dataset", "shapse", *small[2:])
    assert dataset.returncode == 2 and "did you mean 'shapes'?" in dataset.stderr
    assert not out.exists()


def _old_style(spec: dict) -> dict:
    """A model spec as runs wrote it before the registry: arch and width, no kwargs."""
    return {k: v for k, v in spec.items() if k not in ("kwargs", "reshape")}


def test_a_run_from_before_the_registry_still_loads_and_resumes(tiny_run):
    from explainkit import load_model

    path = tiny_run / "config.json"
    doc = json.loads(path.read_text())
    doc["model"] = _old_style(doc["model"])
    del doc["config"]["weights"]
    path.write_text(json.dumps(doc))
    for checkpoint in (tiny_run / "checkpoints").glob("*.pt"):
        data = torch.load(checkpoint, weights_only=True)
        data["model"] = _old_style(data["model"])
        del data["config"]["weights"]
        torch.save(data, checkpoint)
    assert set(doc["model"]) == {"arch", "width", "num_classes", "input_shape", "default_layer"}
    model = load_model(tiny_run)
    assert model.layer1[0].conv1.out_channels == 8  # width 8, from the old spec
    assert run_cli("inspect", str(tiny_run)).returncode == 0
    resumed = run_cli("train", "--resume", str(tiny_run), "--epochs", "3", "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert load_checkpoint(tiny_run / "checkpoints" / "last.pt", registries())["epoch"] == 3


def test_augmentation_scales_with_the_image_size_unless_set():
    assert (TrainConfig().crop_padding, TrainConfig().cutout) == (4, 16)  # 32 px
    big = resolve_config({"image_size": 96}, {"image_size"})
    assert (big.crop_padding, big.cutout) == (12, 48)
    set_by_user = resolve_config({"image_size": 96, "cutout": 0}, {"image_size", "cutout"})
    assert (set_by_user.crop_padding, set_by_user.cutout) == (12, 0)
    seed = resolve_config({"image_size": 16, "preset": "seed"}, {"image_size", "preset"})
    assert (seed.crop_padding, seed.cutout) == (2, 8)
