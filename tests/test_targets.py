"""Targets: what the CAM engine explains, for detectors, segmenters, video, embeddings, and
classifier variants; agreement with pytorch-grad-cam's detection and segmentation targets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from explainkit.errors import AnalyzerError
from explainkit.explain.gradcam import GradCAM, compute_cam
from explainkit.explain.targets import (
    Binary,
    ClassLogit,
    ClassProbability,
    Detection,
    EmbeddingSimilarity,
    MultiLabel,
    Regression,
    SegmentationRegion,
    TargetModel,
)
from tests.helpers import build_model, registries

torchvision = pytest.importorskip("torchvision")


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


# -- detection ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def detector():
    torch.manual_seed(0)
    model = registries().build_model(
        "torchvision_detection:fasterrcnn_resnet50_fpn", 5, image_size=128
    )
    model.roi_heads.score_thresh = 0.0  # random weights: keep every box
    # Fewer proposals than torchvision's 1,000: the same computation, a tenth of the time.
    model.rpn._pre_nms_top_n["testing"] = 200
    model.rpn._post_nms_top_n["testing"] = 50
    model.roi_heads.detections_per_img = 20
    return model.eval()


@pytest.fixture(scope="module")
def scene():
    g = torch.Generator().manual_seed(3)
    return torch.rand(2, 3, 128, 128, generator=g)[1:]


def test_detection_gradcam_equals_pytorch_grad_cam(detector, scene):
    """Grad-CAM of two boxes (FasterRCNNBoxScoreTarget) within 1e-4 of the peer's, on the
    FPN's finest level: at 128 px every box is pooled from it."""
    pgc = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import FasterRCNNBoxScoreTarget

    with torch.no_grad():
        dets = detector(scene)
    boxes = [d["boxes"][:2] for d in dets]
    labels = [d["labels"][:2] for d in dets]
    assert all(len(b) == 2 for b in boxes), "the detector must find boxes to explain"
    layer = "backbone.fpn.layer_blocks.0"
    ours = compute_cam(detector, scene, layer, target=Detection(boxes, labels))
    assert ours.maps.shape == (1, 128, 128) and ours.targets.tolist() == [int(labels[0][0])]
    assert bool((ours.scores > 2.0).all())  # IoU 1 plus a class score, per matched box
    with pgc.GradCAM(detector, [detector.backbone.fpn.layer_blocks[0]]) as cam:
        target = FasterRCNNBoxScoreTarget(labels[0].numpy(), boxes[0].numpy())
        theirs = cam(scene, targets=[target])[0]
    assert np.abs(ours.maps[0].numpy() - theirs).max() < 1e-4
    assert theirs.max() > 0.99 and (theirs > 0.5).mean() > 0.01  # a real map, not zeros


def test_detection_top_box_and_no_match(detector, scene):
    top = compute_cam(detector, scene, "backbone.fpn.layer_blocks.0", target=Detection("top"))
    assert top.maps.max() == 1.0 and 1.0 < float(top.scores[0]) <= 2.0
    far = torch.tensor([[0.0, 0.0, 1.0, 1.0]])  # no detection overlaps this box
    with pytest.warns(UserWarning, match="does not depend"):
        none = compute_cam(detector, scene, target=Detection(far, torch.tensor([1])))
    assert float(none.maps.abs().max()) == 0.0 and float(none.scores[0]) == 0.0


def test_detection_target_refuses_a_classifier():
    model = build_model("resnet18-s8", width=8).eval()
    with pytest.raises(AnalyzerError, match="list of"):
        compute_cam(model, torch.rand(1, 3, 32, 32), "layer4", target=Detection("top"))


# -- segmentation ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def segmenter():
    torch.manual_seed(0)
    return registries().build_model("torchvision_segmentation:deeplabv3_resnet50", 4).eval()


class _Out(nn.Module):
    """pytorch-grad-cam's wrapper for torchvision segmentation (it needs a tensor)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)["out"]


@pytest.mark.parametrize("region", ["predicted", "box"])
def test_segmentation_gradcam_equals_pytorch_grad_cam(segmenter, region):
    pgc = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget

    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = segmenter(x)["out"]
    cls = int(out.argmax(1).flatten().mode().values)  # the most common predicted class
    if region == "predicted":
        mask = (out.argmax(1)[0] == cls).float().numpy()
        target = SegmentationRegion(cls)
    else:
        mask = np.zeros((64, 64), np.float32)
        mask[10:40, 20:50] = 1.0
        target = SegmentationRegion(cls, (20, 10, 50, 40))
    ours = compute_cam(segmenter, x, target=target)  # default layer: backbone.layer4
    with pgc.GradCAM(_Out(segmenter), [segmenter.backbone.layer4]) as cam:
        theirs = cam(x, targets=[SemanticSegmentationTarget(cls, mask)])[0]
    assert np.abs(ours.maps[0].numpy() - theirs).max() < 1e-4
    assert theirs.max() > 0.99
    expected = (out[0, cls] * torch.from_numpy(mask)).sum()
    assert torch.allclose(ours.scores[0], expected, rtol=1e-4)


def test_segmentation_given_mask_and_errors(segmenter):
    x = torch.rand(2, 3, 64, 64)
    mask = torch.zeros(2, 64, 64, dtype=torch.bool)
    mask[:, 8:24, 8:24] = True
    result = compute_cam(segmenter, x, target=SegmentationRegion([1, 2], mask), batch_size=1)
    assert result.targets.tolist() == [1, 2]
    with pytest.raises(AnalyzerError, match="output's resolution"):
        compute_cam(segmenter, x, target=SegmentationRegion(1, torch.ones(32, 32)))
    with pytest.raises(AnalyzerError, match="one per image"):
        compute_cam(segmenter, x, target=SegmentationRegion([1, 2, 3]))


# -- video -------------------------------------------------------------------------------------


def test_video_maps_are_one_per_frame():
    torch.manual_seed(0)
    model = registries().build_model("torchvision_video:r3d_18", 3).eval()
    clips = torch.randn(2, 3, 8, 32, 32)
    acts = {}
    handle = model.layer4.register_forward_hook(lambda m, i, o: acts.setdefault("a", o))
    x = clips.clone()
    logits = model(x)
    handle.remove()
    grads = torch.autograd.grad(logits[:, 1].sum(), acts["a"])[0]
    expected = F.relu((grads.mean((2, 3, 4), keepdim=True) * acts["a"]).sum(1)).detach()

    result = compute_cam(model, clips, target=1)  # default layer: layer4
    assert result.maps.shape == (2, 8, 32, 32)
    assert result.raw.shape == expected.shape == (2, 1, 2, 2)
    assert torch.allclose(result.raw, expected, atol=1e-5 * float(expected.abs().max()))
    assert result.maps.amax((1, 2, 3)).tolist() == [1.0, 1.0]  # scaled per clip


# -- embeddings --------------------------------------------------------------------------------


class _TwoTower(nn.Module):
    """A CLIP-like model: an image tower (mean color, through a 1x1 convolution) and a text
    tower (an embedding per word) in one 3-D space."""

    def __init__(self):
        super().__init__()
        self.visual = nn.Sequential(
            nn.Conv2d(3, 3, 1, bias=False), nn.AdaptiveAvgPool2d(1), nn.Flatten()
        )
        self.text = nn.Embedding(2, 3)
        with torch.no_grad():
            self.visual[0].weight.copy_(torch.eye(3)[:, :, None, None])
            self.text.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]))

    def encode_image(self, x):
        return self.visual(x)

    def encode_text(self, tokens):
        return self.text(tokens)


def test_embedding_similarity_on_a_two_tower_model():
    clip = _TwoTower().eval()
    image = torch.zeros(1, 3, 32, 32)
    image[0, 0, 4:12, 4:12] = 1.0  # a red square, top left
    image[0, 2, 20:28, 20:28] = 1.0  # a blue square, bottom right
    red, blue = clip.encode_text(torch.tensor([0, 1])).detach()
    for word, inside, outside in ((red, (4, 12), (20, 28)), (blue, (20, 28), (4, 12))):
        result = compute_cam(clip.visual, image, "0", target=EmbeddingSimilarity(word))
        here = result.maps[0, inside[0] : inside[1], inside[0] : inside[1]].mean()
        there = result.maps[0, outside[0] : outside[1], outside[0] : outside[1]].mean()
        assert here > 0.9 and there < 0.1
        expected = F.cosine_similarity(clip.encode_image(image), word[None])
        assert torch.allclose(result.scores, expected.detach())
        assert result.targets.tolist() == [-1]


# -- classifier variants -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def classifier():
    torch.manual_seed(0)
    return build_model("resnet18-s8", width=8).eval()


def test_class_targets_match_manual_gradients(classifier):
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    for target, score in (
        (ClassLogit([1, 2, 3]), lambda y: y.gather(1, torch.tensor([[1], [2], [3]]))[:, 0]),
        (ClassProbability(4), lambda y: y.softmax(1)[:, 4]),
        (MultiLabel(5, probability=True), lambda y: y[:, 5].sigmoid()),
        (Regression(6, sign=-1), lambda y: -y[:, 6]),
    ):
        acts: dict = {}
        h = classifier.layer4.register_forward_hook(lambda m, i, o, acts=acts: acts.update(a=o))
        y = classifier(x)
        h.remove()
        g = torch.autograd.grad(score(y).sum(), acts["a"])[0]
        manual = F.relu((g.mean((2, 3), keepdim=True) * acts["a"]).sum(1)).detach()
        result = compute_cam(classifier, x, "layer4", target=target)
        assert torch.allclose(result.raw, manual, atol=1e-6 + 1e-5 * float(manual.abs().max()))
        assert torch.allclose(result.scores, score(y).detach(), atol=1e-6)


def test_binary_target_sides():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model.append(nn.Linear(4, 1))
    x = torch.randn(2, 3, 16, 16)
    pos = compute_cam(model, x, "0", target=Binary("positive"))
    neg = compute_cam(model, x, "0", target=Binary("negative"))
    assert torch.allclose(pos.scores, -neg.scores)
    pred = compute_cam(model, x, "0", target=Binary("predicted"))
    assert bool((pred.scores >= 0).all())
    with pytest.raises(AnalyzerError, match="side must be"):
        Binary("up")


def test_target_model_for_captum(classifier):
    captum_attr = pytest.importorskip("captum.attr")
    x = torch.randn(2, 3, 32, 32)
    wrapped = TargetModel(classifier, ClassLogit([3, 7]))
    ig = captum_attr.IntegratedGradients(wrapped).attribute(x, target=0, n_steps=4)
    direct = captum_attr.IntegratedGradients(classifier).attribute(
        x, target=torch.tensor([3, 7]), n_steps=4
    )
    assert torch.allclose(ig, direct, atol=1e-6)


def test_unknown_task_model_names_what_is_supported():
    from explainkit.errors import ConfigError

    reg = registries()
    with pytest.raises(ConfigError, match="torchvision_detection:fasterrcnn_resnet50_fpn"):
        reg.model_entry("torchvision:fasterrcnn_resnet50_fpn")
    with pytest.raises(ConfigError, match="cannot be explained yet.*fasterrcnn_resnet50_fpn"):
        reg.model_entry("torchvision_detection:maskrcnn_resnet50_fpn")


def test_gradcam_class_keeps_the_hook_off_after_a_bad_target(classifier):
    cam = GradCAM(classifier, "layer4")
    with pytest.raises(AnalyzerError):
        cam(torch.randn(1, 3, 32, 32), target=SegmentationRegion(1))
    assert not classifier.layer4._forward_hooks


def test_captum_methods_explain_a_target_through_attribution_fn():
    """Saliency of a segmentation region through explainkit's attribution dispatch equals
    the input gradient of that region's score (max |.| over channels, scaled to [0, 1])."""
    pytest.importorskip("captum")
    from explainkit.explain.attribution import attribute, attribution_fn
    from explainkit.explain.gradcam import normalize_maps

    torch.manual_seed(0)
    seg = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 3, padding=1))
    x = torch.randn(3, 3, 16, 16)
    target = SegmentationRegion([0, 1, 2], (4, 4, 12, 12))
    maps = attribute(attribution_fn("saliency"), seg, x, target, batch_size=2)
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(target.scores(seg(xg)).sum(), xg)
    assert torch.allclose(maps, normalize_maps(grad.abs().amax(1)), atol=1e-6)
    cams = attribute(attribution_fn("gradcam", layer="0"), seg, x, target, batch_size=2)
    assert torch.allclose(cams, compute_cam(seg, x, "0", target=target).maps, atol=1e-6)


# -- perturbation CAMs on detection and segmentation targets -----------------------------------
# Score-CAM and Ablation-CAM of explainkit's own small detector and segmenter (fcos-s8, fcn-s8,
# width 8, 32 px, random weights) against pytorch-grad-cam's ScoreCAM / AblationCAM with its
# FasterRCNNBoxScoreTarget / SemanticSegmentationTarget, two images, each with its own boxes
# or region. Tolerances (max |difference| of the [0, 1] maps): Ablation-CAM 1e-4 at every
# layer (both zero the channel: the layers are post-ReLU). Score-CAM 1e-4 at a full-resolution
# layer (layer1), where both build the same masks; at a stride-4 layer (layer4) 1e-2 with
# Pearson > 0.9999, as pytorch-grad-cam upsamples its masks with align_corners=True
# (tests/test_perturbation.py; measured 2.5e-3 on the detector, 5.8e-3 on the segmenter).

PERTURBATION_TOLERANCE = {
    ("scorecam", "layer1"): 1e-4,
    ("scorecam", "layer4"): 1e-2,
    ("ablationcam", "layer1"): 1e-4,
    ("ablationcam", "layer4"): 1e-4,
}


@pytest.fixture(scope="module")
def small_detector():
    """fcos-s8 at 32 px; its box regression bias raised so that random weights give boxes
    with an extent (at 0 each box is a point, whose IoU is undefined); every box kept."""
    torch.manual_seed(0)
    model = registries().build_model("fcos-s8", 4, width=8, image_size=32).eval()
    model.score_thresh = 0.0
    with torch.no_grad():
        model.head.regression_head.bbox_reg.bias.fill_(1.0)
    return model


@pytest.fixture(scope="module")
def small_segmenter():
    """fcn-s8; its last bias zeroed, else one class wins every pixel of random weights."""
    torch.manual_seed(2)
    model = registries().build_model("fcn-s8", 4, width=8).eval()
    with torch.no_grad():
        model.head[-1].bias.zero_()
    return model


def _peer_perturbation(pgc, method, model, module, x, targets):
    peer = {"scorecam": pgc.ScoreCAM, "ablationcam": pgc.AblationCAM}[method]
    with peer(model, [module]) as cam:
        cam.batch_size = 64
        return cam(x, targets=targets)


def _check_agreement(ours, theirs, method, stage):
    diff = float(np.abs(ours.maps.numpy() - theirs).max())
    r = _pearson(ours.maps.numpy(), theirs)
    assert diff < PERTURBATION_TOLERANCE[(method, stage)] and r > 0.9999, (method, stage, diff, r)
    assert theirs.max() > 0.99 and (theirs > 0.5).mean() > 0.01  # real maps, not zeros


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("stage", ["layer1", "layer4"])
def test_perturbation_cams_on_detections_equal_pytorch_grad_cam(small_detector, stage):
    """Each image's two boxes, matched by IoU on every perturbed copy's own detections."""
    pgc = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import FasterRCNNBoxScoreTarget

    from explainkit.explain import perturbation as P

    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        dets = small_detector(x)
    boxes, labels = [d["boxes"][:2] for d in dets], [d["labels"][:2] for d in dets]
    assert all(len(b) == 2 for b in boxes) and not torch.equal(boxes[0], boxes[1])
    pairs = zip(boxes, labels, strict=True)
    theirs_targets = [FasterRCNNBoxScoreTarget(t.numpy(), b.numpy()) for b, t in pairs]
    layer = f"backbone.body.{stage}"
    module = dict(small_detector.named_modules())[layer]
    for method in ("scorecam", "ablationcam"):
        ours = P.PERTURBATION_CLASSES[method](small_detector, layer)(x, Detection(boxes, labels))
        assert bool((ours.scores > 2.0).all())  # two matched boxes: IoU 1 plus a score each
        assert ours.targets.tolist() == [int(t[0]) for t in labels]
        theirs = _peer_perturbation(pgc, method, small_detector, module, x, theirs_targets)
        _check_agreement(ours, theirs, method, stage)
    # "top" is each intact image's best detection, not each perturbed copy's own best one.
    best = [int(d["scores"].argmax()) for d in dets]
    tops = [slice(b, b + 1) for b in best]
    given = Detection([d["boxes"][t] for d, t in zip(dets, tops, strict=True)],
                      [d["labels"][t] for d, t in zip(dets, tops, strict=True)])  # fmt: skip
    top = P.ScoreCAM(small_detector, layer)(x, Detection("top"))
    assert torch.allclose(top.maps, P.ScoreCAM(small_detector, layer)(x, given).maps, atol=1e-6)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("stage", ["layer1", "layer4"])
@pytest.mark.parametrize("region", ["predicted", "box"])
def test_perturbation_cams_on_segmentation_equal_pytorch_grad_cam(small_segmenter, region, stage):
    """A class over its predicted region (fixed on the intact images, as the peer's mask is)
    or over a box."""
    pgc = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget

    from explainkit.explain import perturbation as P

    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = small_segmenter(x)
    cls = 2
    if region == "predicted":
        masks = (out.argmax(1) == cls).float().numpy()
        assert 0.1 < masks.mean() < 0.9  # a partial region: fixing it matters
        target = SegmentationRegion(cls)
    else:
        masks = np.zeros((2, 32, 32), np.float32)
        masks[:, 4:20, 8:28] = 1.0
        target = SegmentationRegion(cls, (8, 4, 28, 20))
    layer = f"backbone.{stage}"
    module = dict(small_segmenter.named_modules())[layer]
    theirs_targets = [SemanticSegmentationTarget(cls, m) for m in masks]
    for method in ("scorecam", "ablationcam"):
        ours = P.PERTURBATION_CLASSES[method](small_segmenter, layer)(x, target)
        expected = (out[:, cls] * torch.from_numpy(masks)).sum((1, 2))
        assert torch.allclose(ours.scores, expected, rtol=1e-5)
        theirs = _peer_perturbation(pgc, method, small_segmenter, module, x, theirs_targets)
        _check_agreement(ours, theirs, method, stage)


@pytest.mark.usefixtures("one_thread")
def test_perturbation_cams_of_an_unmatched_box_are_zero(small_detector):
    """No copy's detections match the box: nothing to explain, a zero map and a warning, as
    Grad-CAM gives (not Score-CAM's uniform softmax over equal scores)."""
    from explainkit.explain import perturbation as P

    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    far = Detection(torch.tensor([[0.0, 0.0, 1.0, 1.0]]), torch.tensor([1]))
    with pytest.warns(UserWarning, match="does not depend"):
        results = {"scorecam": P.ScoreCAM(small_detector, "backbone.body.layer4")(x, far)}
    results["ablationcam"] = P.AblationCAM(small_detector, "backbone.body.layer4")(x, far)
    results["rise"] = P.RISE(small_detector, masks=16)(x, far)
    for method, result in results.items():
        assert float(result.maps.abs().max()) == 0.0 and float(result.scores[0]) == 0.0, method
