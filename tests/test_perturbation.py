"""Perturbation CAMs and the new Captum methods: agreement with the peers, batching, refusals.

Peers (test-only): pytorch-grad-cam (ScoreCAM, AblationCAM) and torch-cam (ScoreCAM, SSCAM,
ISCAM) on the same width-8 ResNet, layer, targets and images. Maps are compared scaled to
[0, 1] at the input size (peers' maps upsampled bilinearly where they return the layer's
grid). Tolerances, stated per method:

- Score-CAM: max |diff| < 2e-3, Pearson > 0.9999. The peers build the masks slightly
  differently (pytorch-grad-cam upsamples with align_corners=True; torch-cam scales at the
  layer's resolution, then upsamples); explainkit follows the paper's order, H = s(Up(A)).
- SS-CAM: max |diff| < 2e-3 with the same seeded noise (torch-cam draws from the global
  generator, one (N, C, H, W) draw per sample, as explainkit does for one group of images).
- IS-CAM: max |diff| < 2e-3: the coefficients i(i+1)/2N of torch-cam's loop (the paper's
  printed sum starts at j=0, which would add an all-zero first input; see docs/methods.md).
- Ablation-CAM: max |diff| < 1e-4 (both zero the channel: the layer is post-ReLU).
"""

from __future__ import annotations

import importlib.util
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from explainkit.errors import AnalyzerError
from explainkit.explain import attribution as A
from explainkit.explain import methods as EM
from explainkit.explain import perturbation as P
from explainkit.explain.cam_result import normalize_maps
from tests.helpers import build_model

pytestmark = pytest.mark.usefixtures("one_thread")
needs_pgc = pytest.mark.skipif(
    importlib.util.find_spec("pytorch_grad_cam") is None, reason="pytorch-grad-cam not installed"
)
needs_tc = pytest.mark.skipif(
    importlib.util.find_spec("torchcam") is None, reason="torch-cam not installed"
)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = build_model("resnet18-s8", num_classes=10, width=8).eval()
    images = torch.randn(2, 3, 32, 32)
    targets = torch.tensor([3, 7])
    return model, images, targets


def _agree(ours: torch.Tensor, theirs) -> tuple[float, float]:
    theirs = torch.as_tensor(theirs).float()
    if theirs.shape[-2:] != ours.shape[-2:]:
        theirs = F.interpolate(theirs[:, None], size=ours.shape[-2:], mode="bilinear")[:, 0]
    a, b = ours.flatten().double(), normalize_maps(theirs).flatten().double()
    return float((a - b).abs().max()), float(torch.corrcoef(torch.stack([a, b]))[0, 1])


def _torchcam(cls, model, layer, images, targets, **kw):
    logging.disable(logging.WARNING)  # torch-cam logs its layer choice
    try:
        with cls(model, layer, input_shape=tuple(images.shape[1:]), **kw) as cam:
            with torch.no_grad():
                model(images)
            return cam(targets.tolist())[0]
    finally:
        logging.disable(logging.NOTSET)


@needs_pgc
@pytest.mark.parametrize("layer", ["layer3", "layer4"])
def test_scorecam_and_ablationcam_equal_pytorch_grad_cam(setup, layer):
    from pytorch_grad_cam import AblationCAM, ScoreCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model, x, t = setup
    module = dict(model.named_modules())[layer]
    wanted = [ClassifierOutputTarget(int(c)) for c in t]
    with ScoreCAM(model, [module]) as cam:
        cam.batch_size = 64
        diff, r = _agree(P.ScoreCAM(model, layer)(x, t).maps, cam(x, wanted))
    assert diff < 2e-3 and r > 0.9999, (diff, r)
    with AblationCAM(model, [module], batch_size=64) as cam:
        diff, r = _agree(P.AblationCAM(model, layer, max_batch=16)(x, t).maps, cam(x, wanted))
    assert diff < 1e-4 and r > 0.99999, (diff, r)


@needs_tc
def test_score_family_equals_torch_cam(setup):
    from torchcam.methods import ISCAM, SSCAM, ScoreCAM

    model, x, t = setup
    layer = "layer3"
    diff, r = _agree(P.ScoreCAM(model, layer)(x, t).maps, _torchcam(ScoreCAM, model, layer, x, t))
    assert diff < 2e-3 and r > 0.9999, ("scorecam", diff, r)
    torch.manual_seed(5)
    theirs = _torchcam(SSCAM, model, layer, x, t, num_samples=3, std=0.5)
    ours = P.SSCAM(model, layer, samples=3, std=0.5, seed=5, max_batch=48)(x, t).maps
    diff, r = _agree(ours, theirs)
    assert diff < 2e-3 and r > 0.9999, ("sscam", diff, r)
    theirs = _torchcam(ISCAM, model, layer, x, t, num_samples=4)
    diff, r = _agree(P.ISCAM(model, layer, samples=4)(x, t).maps, theirs)
    assert diff < 2e-3 and r > 0.9999, ("iscam", diff, r)


def test_batching_and_channel_selection(setup):
    """max_batch changes nothing but the passes; channel pre-selection keeps the k most
    varying channels and zeroes the rest; the result is the engine's CAMResult."""
    model, x, t = setup
    big = P.ScoreCAM(model, "layer3", max_batch=512)(x, t)
    small = P.ScoreCAM(model, "layer3", max_batch=7, mask_budget=1)(x, t)
    assert torch.allclose(big.maps, small.maps, atol=1e-5)
    assert big.maps.shape == (2, 32, 32) and big.raw.shape == (2, 8, 8)
    assert big.targets.tolist() == t.tolist() and big.logits.shape == (2, 10)
    a = P.AblationCAM(model, "layer3", max_batch=5)(x, t)
    b = P.AblationCAM(model, "layer3", max_batch=1000)(x, t)
    assert torch.allclose(a.maps, b.maps, atol=1e-5)
    few = P.ScoreCAM(model, "layer3", channels=4)(x, t)
    assert not torch.allclose(few.maps, big.maps, atol=1e-3)
    assert float(few.maps.max()) == pytest.approx(1.0)


def test_multilabel_target_equals_a_hand_computation(setup):
    """Score-CAM and Ablation-CAM of one sigmoid label per image (a MultiLabel target) against
    the papers' formulas computed by hand, one channel at a time; the target of each image
    follows its masked copies through any batching."""
    from explainkit.explain.targets import MultiLabel

    model, x, _ = setup
    labels = torch.tensor([2, 5])
    target = MultiLabel(labels, probability=True)
    acts: dict = {}
    hook = model.layer3.register_forward_hook(lambda m, i, o: acts.update(a=o.detach()))
    with torch.no_grad():
        base = model(x).gather(1, labels[:, None])[:, 0].sigmoid()
    hook.remove()
    a = acts["a"]  # (2, 32, 8, 8)

    def score(inputs, ablate=None):
        handle = model.layer3.register_forward_hook(
            lambda m, i, o: o if ablate is None else o.index_fill(1, torch.tensor([ablate]), 0)
        )
        try:
            with torch.no_grad():
                return model(inputs).gather(1, labels[:, None])[:, 0].sigmoid()
        finally:
            handle.remove()

    up = F.interpolate(a, size=(32, 32), mode="bilinear", align_corners=False)
    low, high = up.amin((2, 3), keepdim=True), up.amax((2, 3), keepdim=True)
    masks = (up - low) / (high - low).clamp_min(1e-8)
    channels = range(a.shape[1])
    by_hand = {
        "scorecam": torch.stack([score(x * masks[:, k : k + 1]) for k in channels], 1).softmax(1),
        "ablationcam": (base[:, None] - torch.stack([score(x, k) for k in channels], 1))
        / base[:, None],
    }
    for method, weights in by_hand.items():
        raw = F.relu(torch.einsum("nc,nchw->nhw", weights, a))
        engine = P.PERTURBATION_CLASSES[method]
        ours = engine(model, "layer3")(x, target)
        assert torch.allclose(ours.raw, raw, atol=1e-5 * float(raw.max())), method
        assert torch.allclose(ours.scores, base, atol=1e-6) and ours.targets.tolist() == [2, 5]
        small = engine(model, "layer3", max_batch=5, mask_budget=1)(x, target)
        assert torch.allclose(small.maps, ours.maps, atol=1e-5), method
        one = P.compute_perturbation(model, x, "layer3", method, target=target, batch_size=1)
        assert torch.allclose(one.maps, ours.maps, atol=1e-5), method


def test_a_class_target_equals_the_class_index(setup):
    """A Target that picks a class gives the maps of the fast class-index path: the logit
    for the CAMs, the probability for RISE; "predicted" is the intact image's class."""
    from explainkit.explain.targets import ClassLogit, ClassProbability

    model, x, t = setup
    for method in ("scorecam", "ablationcam"):
        engine = P.PERTURBATION_CLASSES[method](model, "layer3")
        assert torch.allclose(engine(x, ClassLogit(t)).maps, engine(x, t).maps, atol=1e-6)
        assert torch.allclose(engine(x, ClassLogit()).maps, engine(x).maps, atol=1e-6)
    sscam = P.SSCAM(model, "layer3", samples=2)
    assert torch.allclose(sscam(x, ClassLogit(t)).maps, sscam(x, t).maps, atol=1e-6)
    rise = P.RISE(model, masks=64)
    assert torch.allclose(rise(x, ClassProbability(t)).maps, rise(x, t).maps, atol=1e-6)


def test_ablation_skip_around_layer_falls_back():
    """A skip connection around the target layer cannot take the expanded batch: the
    ablated copies then run from the input and give the same maps as a plain model."""

    class Skip(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 4, 3, padding=1)
            self.body = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            s = self.stem(x)
            return self.head((self.body(s) + s).mean((2, 3)))

    torch.manual_seed(1)
    model = Skip().eval()
    x, t = torch.randn(3, 3, 16, 16), torch.tensor([0, 1, 2])
    engine = P.AblationCAM(model, "body")
    result = engine(x, t)
    assert not engine._expand  # the expanded batch failed and was given up
    # Against the definition, one channel at a time.
    with torch.no_grad():
        acts = model.body(model.stem(x))
        base = model(x).gather(1, t[:, None])[:, 0]
        w = torch.zeros(3, 4)
        for k in range(4):
            ablated = acts.clone()
            ablated[:, k] = 0
            logit = model.head((ablated + model.stem(x)).mean((2, 3))).gather(1, t[:, None])[:, 0]
            w[:, k] = (base - logit) / base
        raw = F.relu(torch.einsum("nc,nchw->nhw", w, acts))
    assert torch.allclose(result.raw, raw, atol=1e-5)


def test_rise_finds_the_region_the_model_reads():
    """A model whose class-0 logit grows with the mean of the top-left quarter: RISE puts its
    saliency there, and the maps do not depend on max_batch."""

    class Quarter(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.tensor(8.0))

        def forward(self, x):
            s = (x[:, :, :16, :16].mean((1, 2, 3)) - 0.5) * self.scale
            return torch.stack([s, -s], 1)

    x = torch.ones(2, 3, 32, 32)
    a = P.RISE(Quarter(), masks=300, max_batch=64)(x, 0)
    b = P.RISE(Quarter(), masks=300, max_batch=1000)(x, 0)
    assert torch.allclose(a.maps, b.maps, atol=1e-5)
    inside = a.maps[:, :16, :16].mean()
    outside = a.maps[:, 16:, 16:].mean()
    assert inside > outside + 0.25, (inside, outside)


def test_registered_and_wired(setup):
    model, x, t = setup
    for name in EM.PERTURBATION_METHODS:
        assert name in EM.available_methods()
    assert EM.parse_methods("scorecam,smoothgrad:saliency", "--m") == [
        "scorecam",
        "smoothgrad:saliency",
    ]
    fn = A.attribution_fn("ablationcam", layer="layer3")
    direct = P.AblationCAM(model, "layer3")(x, t).maps
    assert torch.allclose(fn(model, x, t), direct)
    with pytest.raises(AnalyzerError, match="needs a target layer"):
        A.attribution_fn("scorecam")
    with pytest.raises(AnalyzerError, match="unknown"):
        EM.parse_methods("smoothgrad:nothing", "--m")
    with pytest.raises(AnalyzerError, match="max_batch"):
        P.ScoreCAM(model, "layer3", max_batch=0)


def test_bad_input_is_one_sentence(setup):
    model, x, t = setup
    with pytest.raises(AnalyzerError, match="float"):
        P.ScoreCAM(model, "layer3")(x.long(), t)
    with pytest.raises(AnalyzerError, match=r"\[0, 10\)"):
        P.AblationCAM(model, "layer3")(x, torch.tensor([3, 99]))
    with pytest.raises(AnalyzerError, match="unknown target layer"):
        P.ScoreCAM(model, "nope")
    segmenter = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1))
    with pytest.raises(AnalyzerError, match=r"class index is explained on \(N, C\) logits"):
        P.ScoreCAM(segmenter, "1")(x, 1)


needs_captum = pytest.mark.skipif(
    importlib.util.find_spec("captum") is None, reason="captum not installed"
)


class _Plain(nn.Module):
    """A CNN whose every leaf has a Captum LRP rule (flatten is functional)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.relu(self.conv(x))), 1))


@needs_captum
def test_new_captum_methods_equal_captum():
    import captum.attr as ca

    torch.manual_seed(0)
    model = _Plain().eval()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([0, 2])
    theirs = {
        "deeplift": ca.DeepLift(model).attribute(x.clone(), baselines=0.0, target=t),
        "lrp": ca.LRP(model).attribute(x.clone(), target=t),
    }
    for name, attr in theirs.items():
        ours = A.attribution_fn(name)(model, x, t)
        expected = normalize_maps(attr.detach().abs().sum(1))
        assert torch.allclose(ours, expected, atol=1e-5), name
    torch.manual_seed(3)
    nt = ca.NoiseTunnel(ca.Saliency(model))
    sigma = 0.15 * float(x.max() - x.min())
    attr = nt.attribute(x.clone().requires_grad_(True), target=t, nt_type="smoothgrad",
                        nt_samples=4, nt_samples_batch_size=32, stdevs=sigma, abs=True)  # fmt: skip
    ours = A.attribution_fn("smoothgrad:saliency", seed=3, smoothgrad_samples=4)(model, x, t)
    assert torch.allclose(ours, normalize_maps(attr.abs().amax(1)), atol=1e-5)
    shap = A.attribution_fn("gradient_shap", seed=1)
    assert torch.equal(shap(model, x, t), shap(model, x, t))  # seeded


@needs_captum
def test_lrp_refuses_a_model_its_rules_do_not_cover(setup):
    model, x, t = setup
    with pytest.raises(AnalyzerError, match="LRP has no rule for"):
        A.attribution_fn("lrp")(model, x, t)
