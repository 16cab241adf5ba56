"""explainkit evaluate for detectors, segmenters and multi-label models: torchvision's Faster
R-CNN, RetinaNet and DeepLabV3 and a transformers SegFormer on COCO and VOC folders the
tests write, through evaluate, analyze and report; a trained task run's model evaluated
again gives back its stored results."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch

import explainkit
from explainkit import open_store
from explainkit.data.scenes import make_scenes
from explainkit.task_metrics import detection_map
from tests.helpers import (
    assert_clean_failure,
    build_model,
    registries,
    run_cli,
    write_coco,
    write_voc,
)

SIZE = 64


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A COCO and a VOC folder of 8 scenes (no train/val split: evaluate reads them all)."""
    root = tmp_path_factory.mktemp("task_folders")
    ds = make_scenes("eval", image_size=SIZE, seed=3, limit=8)
    return {
        "scenes": ds,
        "coco": write_coco(root / "coco", ds),
        "voc": write_voc(root / "voc", ds),
        "root": root,
    }


def _saved(root, task, name, num_classes, **build):
    """Random weights of torchvision's ``name``, saved as a state_dict file."""
    from explainkit.plugins.task_models import build_task_model

    torch.manual_seed(0)
    model = build_task_model(task, name, num_classes, **build)
    path = root / f"{name}.pt"
    torch.save(model.state_dict(), path)
    return path


def _history(run):
    with open_store(run) as store:
        return store.history


def test_faster_rcnn_goes_through_evaluate_analyze_and_report_on_a_coco_folder(folders):
    root = folders["root"]
    weights = _saved(root, "detection", "fasterrcnn_resnet50_fpn", 6, image_size=SIZE)
    run = root / "frcnn"
    model = "torchvision_detection:fasterrcnn_resnet50_fpn"
    result = run_cli(
        "evaluate", "--model", model, "--weights", str(weights), "--dataset", "coco",
        "--data-dir", str(folders["coco"]), "--image-size", str(SIZE), "--out", str(run),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "read 8 images of 6 classes" in result.stderr  # every image: no holdout
    config = json.loads((run / "config.json").read_text())
    assert config["config"]["task"] == "detection"  # the model's own task
    with open_store(run) as store:
        assert store.task == "detection"
        counts = store.epoch_data("box_counts")
        boxes, scores = store.epoch_data("boxes"), store.epoch_data("box_scores")
        labels = store.epoch_data("box_labels")
        truth = folders["scenes"].annotations.detections
        assert store.truth("eval/box_counts").tolist() == [len(d.labels) for d in truth]
        history = store.history
    assert len(counts) == 8 and counts.max() <= 20 and len(boxes) == counts.sum()
    assert ((scores >= 0.05) & (scores <= 1)).all() and labels.max(initial=0) < 6
    # eval_acc is the mAP at 0.5 of exactly the stored detections
    starts = np.concatenate([[0], np.cumsum(counts)])
    dets = [
        (boxes[a:b], scores[a:b], labels[a:b]) for a, b in zip(starts[:-1], starts[1:], strict=True)
    ]
    truths = [(d.boxes, d.labels) for d in truth]
    assert history["eval_acc"][0] == pytest.approx(detection_map(dets, truths, 6)["map_50"])
    assert history["eval_loss"][0] > 0  # Faster R-CNN's own losses, on the truth
    assert "train_acc" not in history
    analyzers = ["--plugin", "task_metrics", "--plugin", "task_mistakes", "--plugin", "gradcam"]
    analyzed = run_cli("analyze", str(run), *analyzers)
    assert analyzed.returncode == 0, analyzed.stderr
    assert (run / "analyses" / "gradcam" / "attributions.h5").is_file()  # a map per detection
    assert (run / "analyses" / "task_metrics" / "metrics.csv").is_file()
    assert (run / "analyses" / "task_mistakes" / "mistakes.png").is_file()
    reported = run_cli("report", str(run))
    assert reported.returncode == 0, reported.stderr
    html = (run / "report.html").read_text()
    assert "task_metrics" in html and "fasterrcnn_resnet50_fpn" in html


def test_retinanet_evaluates_on_a_voc_folder_from_python(folders):
    from explainkit.plugins.task_models import build_task_model

    root = folders["root"]
    torch.manual_seed(1)
    model = build_task_model("detection", "retinanet_resnet50_fpn", 6, image_size=SIZE)
    model.head.classification_head.cls_logits.bias.data.fill_(0.0)  # some scores over 0.05
    run = explainkit.evaluate(
        model, "voc", root / "retina", data_dir=folders["voc"], image_size=SIZE,
        task="detection", arch="torchvision_detection:retinanet_resnet50_fpn",
        mean=[0, 0, 0], std=[1, 1, 1],
    )  # fmt: skip
    with open_store(run) as store:
        counts = store.epoch_data("box_counts")
        assert store.truth("eval/boxes").shape == (sum(counts_of(folders)), 4)
    assert counts.sum() > 0 and counts.max() <= 20  # kept: the 20 best of each image
    rebuilt = explainkit.load_model(run / "checkpoints" / "last.pt")
    assert type(rebuilt).__name__ == "RetinaNet"  # analyzers can rebuild it


def counts_of(folders):
    return [len(d.labels) for d in folders["scenes"].annotations.detections]


def test_deeplabv3_and_a_transformers_segformer_segment_a_voc_folder(folders):
    transformers = pytest.importorskip("transformers")
    root = folders["root"]
    weights = _saved(root, "segmentation", "deeplabv3_resnet50", 7)
    torch.manual_seed(0)
    config = transformers.SegformerConfig(
        num_labels=7, num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1],
        hidden_sizes=[16, 32], num_attention_heads=[1, 2], decoder_hidden_size=32,
        patch_sizes=[7, 3], strides=[4, 2], mlp_ratios=[2, 2],
        architectures=["SegformerForSemanticSegmentation"],
    )  # fmt: skip
    transformers.SegformerForSemanticSegmentation(config).save_pretrained(root / "segformer")
    runs = {}
    for name, model, extra in [
        ("deeplab", "torchvision_segmentation:deeplabv3_resnet50", ["--weights", str(weights)]),
        ("segformer_run", f"hf:{root / 'segformer'}", []),
    ]:
        runs[name] = root / name
        result = run_cli(
            "evaluate", "--model", model, *extra, "--dataset", "voc", "--data-dir",
            str(folders["voc"]), "--image-size", str(SIZE), "--out", str(runs[name]),
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        with open_store(runs[name]) as store:
            masks = store.epoch_data("masks")
            assert masks.shape == (8, SIZE, SIZE) and masks.max() < 7
            assert store.classes[0] == "background" and len(store.classes) == 7
            assert np.array_equal(
                store.truth("eval/segmentation"), folders["scenes"].annotations.segmentation
            )
    spec = json.loads((runs["segformer_run"] / "config.json").read_text())["model"]
    assert spec["default_layer"] == "decode_head.linear_fuse"  # the decode head's fused map
    analyzed = run_cli(
        "analyze", str(runs["segformer_run"]), "--plugin", "task_metrics", "--plugin", "gradcam"
    )
    assert analyzed.returncode == 0, analyzed.stderr
    with h5py.File(runs["segformer_run"] / "analyses" / "gradcam" / "attributions.h5") as f:
        assert f["maps"].shape[1:] == (SIZE, SIZE)  # the quarter-size logits, upsampled
    rows = (runs["segformer_run"] / "analyses" / "task_metrics" / "metrics.csv").read_text()
    miou = _history(runs["segformer_run"])["eval_acc"][0]
    assert f"{miou:.4f}"[:5] in rows  # the analyzer's mean IoU is the stored one
    assert run_cli("report", str(runs["segformer_run"])).returncode == 0


def test_a_trained_task_model_evaluated_again_gives_its_stored_results(tmp_path):
    from explainkit.config import TrainConfig
    from explainkit.train.tasks import train

    options = dict(dataset="scenes", image_size=32, width=8, epochs=1, batch_size=16,
                   limit_train=32, limit_eval=12, device="cpu", lr=0.02)  # fmt: skip
    for task, name in (("segmentation", "masks"), ("multilabel", "logits")):
        trained = train(
            TrainConfig(task=task, **options), registries(), tmp_path / task, quiet=True
        )
        model = "fcn-s8" if task == "segmentation" else "resnet18-s8"
        result = run_cli(
            "evaluate", "--model", model, "--width", "8", "--task", task, "--weights",
            str(trained / "checkpoints" / "last.pt"), "--dataset", "scenes", "--limit-eval",
            "12", "--out", str(tmp_path / f"again_{task}"),
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        with open_store(trained) as a, open_store(tmp_path / f"again_{task}") as b:
            np.testing.assert_allclose(b.epoch_data(name), a.epoch_data(name), atol=1e-4)
            assert b.history["eval_loss"][0] == pytest.approx(a.history["eval_loss"][0])


def test_a_task_without_its_annotations_or_outputs_is_one_sentence(folders, tmp_path):
    weights = tmp_path / "classifier.pt"
    torch.save(build_model(num_classes=3, width=8).state_dict(), weights)
    shapes = run_cli(
        "evaluate", "--model", "resnet18-s8", "--width", "8", "--task", "detection",
        "--weights", str(weights), "--dataset", "shapes", "--out", str(tmp_path / "a"),
    )  # fmt: skip
    assert_clean_failure(shapes, (1, 2), "detection")
    assert not (tmp_path / "a").exists()
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 7, 1))  # not a detector's outputs
    with pytest.raises(explainkit.ExplainkitError, match="a detector must return"):
        explainkit.evaluate(
            model, "coco", tmp_path / "b", data_dir=folders["coco"], image_size=SIZE,
            task="detection",
        )  # fmt: skip
    assert not (tmp_path / "b").exists()  # nothing written


def test_a_transformers_architecture_explainkit_cannot_evaluate_is_one_sentence(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        image_size=32, patch_size=8, architectures=["ViTForMaskedImageModeling"],
    )  # fmt: skip
    config.save_pretrained(tmp_path / "mim")
    result = run_cli(
        "evaluate", "--model", f"hf:{tmp_path / 'mim'}", "--dataset", "shapes",
        "--out", str(tmp_path / "run"),
    )  # fmt: skip
    assert_clean_failure(result, (1, 2), "ViTForMaskedImageModeling", "ForObjectDetection")


def test_a_transformers_detr_from_a_local_folder_is_evaluated_and_explained(folders):
    transformers = pytest.importorskip("transformers")
    root = folders["root"]
    torch.manual_seed(0)
    backbone = transformers.ResNetConfig(
        embedding_size=16, hidden_sizes=[16, 32, 64, 64], depths=[1, 1, 1, 1],
        layer_type="basic", out_features=["stage4"],
    )  # fmt: skip
    config = transformers.DetrConfig(
        use_timm_backbone=False, backbone_config=backbone, use_pretrained_backbone=False,
        num_labels=6, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, num_queries=10,
        architectures=["DetrForObjectDetection"],
    )  # fmt: skip
    transformers.DetrForObjectDetection(config).save_pretrained(root / "detr")
    run = root / "detr_run"
    result = run_cli(
        "evaluate", "--model", f"hf:{root / 'detr'}", "--dataset", "coco", "--data-dir",
        str(folders["coco"]), "--image-size", str(SIZE), "--out", str(run),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    spec = json.loads((run / "config.json").read_text())["model"]
    assert spec["default_layer"] == "model.backbone.model.encoder.stages.3"  # a CNN map
    with open_store(run) as store:
        counts, scores = store.epoch_data("box_counts"), store.epoch_data("box_scores")
        assert store.task == "detection" and counts.max() <= 10  # at most one per query
        assert ((scores >= 0.05) & (scores <= 1)).all()
        assert store.history["eval_loss"][0] == 0.0  # its losses are not computed: said so
    analyzed = run_cli("analyze", str(run), "--plugin", "gradcam")
    assert analyzed.returncode == 0, analyzed.stderr
    with h5py.File(run / "analyses" / "gradcam" / "attributions.h5") as f:
        assert f["maps"].shape[1:] == (SIZE, SIZE)


def test_coco_weights_detect_the_dataset_classes_they_name(folders):
    """A detector with COCO's 91-category head (torchvision's COCO_V1 layout) on a dataset
    of other class ids: its detections are relabelled by name, other categories dropped."""
    import dataclasses

    from explainkit.plugins.task_models import build_task_model

    root = folders["root"]
    named = ["person", "dog", "car", "Traffic_Light", "kite", "blob"]
    coco = write_coco(root / "coco_named", dataclasses.replace(folders["scenes"], classes=named))
    torch.manual_seed(0)
    model = build_task_model("detection", "fasterrcnn_resnet50_fpn", 90, image_size=SIZE)
    bias = model.roi_heads.box_predictor.cls_score.bias.data
    bias[[1, 18, 5]] = 6.0  # confident person, dog and airplane (not the dataset's)
    torch.save(model.state_dict(), root / "coco91.pt")
    run = root / "coco91"
    result = run_cli(
        "evaluate", "--model", "torchvision_detection:fasterrcnn_resnet50_fpn", "--weights",
        str(root / "coco91.pt"), "--dataset", "coco", "--data-dir", str(coco),
        "--image-size", str(SIZE), "--out", str(run),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "5 of the 6 classes matched by name (blob are not COCO's" in result.stderr
    with open_store(run) as store:
        counts, labels = store.epoch_data("box_counts"), store.epoch_data("box_labels")
        scores = store.epoch_data("box_scores")
        images = store.images(np.arange(8))
    model.eval()
    with torch.no_grad():
        direct = model(list(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255))
    starts = np.concatenate([[0], np.cumsum(counts)])
    for i, out in enumerate(direct):
        keep = ((out["labels"] == 1) | (out["labels"] == 18)) & (out["scores"] >= 0.05)
        expected = sorted(out["scores"][keep].tolist(), reverse=True)[:20]
        np.testing.assert_allclose(scores[starts[i] : starts[i + 1]], expected, atol=1e-5)
    assert set(labels.tolist()) == {0, 1}  # person -> 0, dog -> 1; airplanes dropped
    rebuilt = explainkit.load_model(run / "checkpoints" / "last.pt")  # what analyzers explain
    assert rebuilt.explainkit_coco_ids[:2] == [1, 18]  # it relabels as evaluate did
