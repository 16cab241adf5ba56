"""Issue 28's gradient and projection CAMs agree with pytorch-grad-cam's on the same model,
layer, targets and images (Pearson and max |difference| of [0, 1] maps, per method)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from explainkit.errors import AnalyzerError
from explainkit.explain.gradcam import CAM_CLASSES, compute_cam, compute_cams
from explainkit.explain.methods import CAM_METHODS
from explainkit.explain.targets import ClassProbability
from tests.helpers import build_model

pgc = pytest.importorskip("pytorch_grad_cam")
from pytorch_grad_cam.utils.model_targets import (  # noqa: E402
    ClassifierOutputSoftmaxTarget,
    ClassifierOutputTarget,
)

N = 4
# method -> (pytorch-grad-cam class, max |difference| allowed, Pearson at least).
# Exact methods: float32 round-off only. KPCA-CAM: scikit-learn decomposes in float32.
PEERS = {
    "hirescam": ("HiResCAM", 1e-4, 0.9999),
    "gradcam_elementwise": ("GradCAMElementWise", 1e-4, 0.9999),
    "fem": ("FEM", 1e-4, 0.9999),
    "kpcacam": ("KPCA_CAM", 1e-3, 0.999),
    "finercam": ("FinerCAM", 1e-4, 0.9999),
}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_model("resnet18-s8", width=8)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 1.5)
    return m.eval()


@pytest.fixture(scope="module")
def images():
    return torch.randn(N, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _peer(name, model, images, targets=None, **kwargs):
    cls = getattr(pgc, name)
    with cls(model, [model.layer4], **kwargs) as cam:
        return cam(images, targets=targets)


def _check(ours: np.ndarray, theirs: np.ndarray, tol: float, pearson: float) -> None:
    assert any(b.max() > 0.99 for b in theirs), "every peer map is empty: nothing compared"
    for a, b in zip(ours, theirs, strict=True):
        assert np.abs(a - b).max() < tol
        if b.max() > 0.99:  # an all-negative map is zero for both: no correlation to take
            assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > pearson


def test_every_native_method_is_registered():
    assert (
        set(CAM_CLASSES)
        == set(CAM_METHODS)
        >= {
            "hirescam",
            "gradcam_elementwise",
            "eigencam",
            "eigengradcam",
            "kpcacam",
            "fem",
            "shapleycam",
            "finercam",
            "randomcam",
        }
    )


@pytest.mark.parametrize("method", list(PEERS))
def test_method_equals_pytorch_grad_cam(model, images, method):
    peer, tol, pearson = PEERS[method]
    with torch.no_grad():
        predicted = model(images).argmax(1)
    targets = None if method == "finercam" else [ClassifierOutputTarget(int(c)) for c in predicted]
    theirs = _peer(peer, model, images, targets)
    ours = compute_cam(model, images, "layer4", method=method)
    assert ours.targets.tolist() == predicted.tolist()
    _check(ours.maps.numpy(), theirs, tol, pearson)


def test_shapleycam_equals_pytorch_grad_cam_with_a_softmax_target(model, images):
    """On a probability the Hessian term matters (on a logit through ReLUs it is zero)."""
    classes = [1, 3, 5, 7]
    targets = [ClassifierOutputSoftmaxTarget(c) for c in classes]
    theirs = _peer("ShapleyCAM", model, images, targets)
    result = compute_cams(
        model, images, "layer4", ("shapleycam", "gradcam"), target=ClassProbability(classes)
    )
    _check(result["shapleycam"].maps.numpy(), theirs, 1e-4, 0.9999)
    assert not torch.allclose(result["shapleycam"].maps, result["gradcam"].maps, atol=1e-3)


def _layer4(model, images):
    """Activations and logit-gradients of layer4, for the projections' reference."""
    seen = {}
    handle = model.layer4.register_forward_hook(lambda m, i, o: seen.setdefault("a", o))
    logits = model(images)
    handle.remove()
    a = seen["a"]
    g = torch.autograd.grad(logits.gather(1, logits.argmax(1, keepdim=True)).sum(), a)[0]
    return a.detach().numpy(), g.numpy()


def _minmax(x: np.ndarray) -> np.ndarray:
    x = np.maximum(x, 0)
    low = x.min((1, 2), keepdims=True)
    return (x - low) / (x.max((1, 2), keepdims=True) - low)


@pytest.mark.parametrize("method", ["eigencam", "eigengradcam"])
def test_eigen_methods_equal_the_sign_corrected_projection(model, images, method):
    """The first principal component as pytorch-grad-cam computes it, with Seg-Eigen-CAM's
    sign correction (NumPy's SVD sign is arbitrary); where the peer's EigenCAM happens to
    have the same sign its maps are ours."""
    from pytorch_grad_cam.utils.svd_on_activations import (
        get_2d_projection_with_sign_correction as project,
    )

    a, g = _layer4(model, images)
    reference = _minmax(project(a if method == "eigencam" else g * a))
    ours = compute_cam(model, images, "layer4", method=method)
    assert (
        np.abs(ours.raw.numpy() / ours.raw.amax((1, 2), keepdim=True).numpy() - reference).max()
        < 1e-4
    )
    peer = _peer("EigenCAM" if method == "eigencam" else "EigenGradCAM", model, images)
    same = [i for i in range(N) if np.corrcoef(peer[i].ravel(), ours.maps[i].ravel())[0, 1] > 0]
    assert same, "the peer's sign never matched: nothing compared"
    _check(ours.maps.numpy()[same], peer[same], 1e-4, 0.9999)


def _inplace_net() -> torch.nn.Module:
    """Convolutions with biases, batch norms and in-place ReLUs (a torchvision ResNet's
    pattern): the bias-gradient must be taken before the ReLU overwrites the output."""
    torch.manual_seed(2)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 3, padding=1),
        torch.nn.BatchNorm2d(6),
        torch.nn.ReLU(inplace=True),
        torch.nn.Conv2d(6, 8, 3, stride=2, padding=1),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(inplace=True),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 5),
    )
    with torch.no_grad():
        for mod in net.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                for t in (mod.running_mean, mod.bias):
                    t.uniform_(-0.3, 0.3)
                for t in (mod.running_var, mod.weight):
                    t.uniform_(0.5, 1.5)
    return net.eval()


def test_fullgrad_equals_pytorch_grad_cam(model, images):
    """FullGrad (the paper's Eq. 6, per-channel rescaling) against pytorch-grad-cam's: the
    ResNet of the other tests, and a net with in-place ReLUs; max |difference| < 1e-5."""
    for net in (model, _inplace_net()):
        with torch.no_grad():
            predicted = net(images).argmax(1)
        with pgc.FullGrad(net, []) as cam:
            theirs = cam(images, targets=[ClassifierOutputTarget(int(c)) for c in predicted])
        ours = compute_cam(net, images, "ignored", method="fullgrad")
        assert ours.targets.tolist() == predicted.tolist()
        assert ours.raw.shape == (N, 32, 32)
        _check(ours.maps.numpy(), theirs, 1e-5, 0.99999)
        assert not any(m._forward_hooks for m in net.modules())
    # the in-place ReLU changes nothing: the same net with out-of-place ReLUs
    net = _inplace_net()
    before = compute_cam(net, images, method="fullgrad").maps
    for mod in net.modules():
        if isinstance(mod, torch.nn.ReLU):
            mod.inplace = False
    assert torch.equal(compute_cam(net, images, method="fullgrad").maps, before)
    plain = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, bias=False), torch.nn.Flatten(),
                                torch.nn.LazyLinear(5))  # fmt: skip
    with pytest.raises(AnalyzerError, match="needs convolution or batch-norm layers with biases"):
        compute_cam(plain, images, method="fullgrad")


def test_fullgrad_bias_terms_are_what_the_decomposition_says():
    """Without the input term and with one bias layer, the map is that layer's
    |d logit / d z * b| rescaled per channel, summed and upsampled: a hand computation."""
    net = _inplace_net()
    for mod in net.modules():  # the hand computation reads z after the ReLU ran
        if isinstance(mod, torch.nn.ReLU):
            mod.inplace = False
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    seen = {}
    handle = net[4].register_forward_hook(lambda m, i, o: seen.setdefault("z", o))
    xg = x.clone().requires_grad_(True)
    logits = net(xg)
    handle.remove()
    target = logits[:, 2].sum()
    gz, gx = torch.autograd.grad(target, [seen["z"], xg])
    bn = net[4]
    b = bn.bias - bn.running_mean * bn.weight / torch.sqrt(bn.running_var + bn.eps)
    term = (gz * b.view(1, -1, 1, 1)).abs()
    low = term.amin((2, 3), keepdim=True)
    term = ((term - low) / (term.amax((2, 3), keepdim=True) - low + 1e-7)).sum(1, keepdim=True)
    expected = torch.nn.functional.interpolate(term, size=(16, 16), mode="bilinear")[:, 0]
    from explainkit.explain.cams.fullgrad import FullGrad

    with FullGrad(net) as cam:
        cam._biased = [bn]  # one bias layer only
        ours = cam(x, target=2)
    inputs = (gx * x).abs()
    low = inputs.amin((2, 3), keepdim=True)
    inputs = ((inputs - low) / (inputs.amax((2, 3), keepdim=True) - low + 1e-7)).sum(1)
    assert torch.allclose(ours.raw, expected.detach() + inputs.detach(), atol=1e-5)


def test_randomcam_is_a_repeatable_baseline(model, images):
    first = compute_cam(model, images, "layer4", method="randomcam")
    again = compute_cam(model, images, "layer4", method="randomcam")
    grad = compute_cam(model, images, "layer4", method="gradcam")
    assert torch.equal(first.maps, again.maps)  # a fresh engine starts from the same seed
    assert not torch.allclose(first.maps, grad.maps, atol=1e-2)


@pytest.mark.parametrize("method", sorted(set(CAM_CLASSES) - {"legrad"}))
def test_every_method_explains_video_and_token_layers(method):
    """(LeGrad reads a transformer's attention maps, not one layer: its ViT test is in
    tests/test_cam_methods_more.py.)"""
    torch.manual_seed(0)
    video = torch.nn.Sequential(
        torch.nn.Conv3d(3, 6, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool3d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(6, 5),
    ).eval()
    clips = torch.randn(2, 3, 4, 8, 8)
    result = compute_cam(video, clips, "1", method=method)
    assert result.maps.shape == (2, 4, 8, 8) and result.raw.shape == (2, 4, 8, 8)
    assert torch.isfinite(result.maps).all() and result.maps.max() <= 1
    tokens = torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 4, stride=4), torch.nn.Flatten(2), Transpose(), Head()
    ).eval()
    result = compute_cam(tokens, torch.randn(2, 3, 16, 16), "2", method=method, reshape="vit")
    assert result.maps.shape == (2, 16, 16) and torch.isfinite(result.maps).all()


class Transpose(torch.nn.Module):
    def forward(self, x):
        return x.transpose(1, 2)  # (N, 16 patches, 6 channels): ViT-style tokens


class Head(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(6, 5)

    def forward(self, x):
        return self.fc(torch.nn.functional.gelu(x).mean(1))


def test_cli_draws_methods_side_by_side_and_the_report_shows_them(tiny_run):
    """--gradcam-compare: one figure, a row per shown image and a column per method, listed
    in the manifest and the report; a name it does not know fails in one sentence."""
    import json

    from PIL import Image

    from explainkit.report import render_report
    from tests.helpers import registries, run_cli

    args = ("analyze", str(tiny_run), "--plugin", "gradcam", "--gradcam-count", "2")
    result = run_cli(*args, "--gradcam-compare", "fullgrad, scorecam,gradcam")
    assert result.returncode == 0, result.stderr
    out = tiny_run / "analyses" / "gradcam"
    compare = json.loads((out / "gradcam.json").read_text())["compare"]
    assert compare["methods"] == ["gradcam", "fullgrad", "scorecam"] and not compare["failed"]
    assert all(ms > 0 for ms in compare["ms_per_image"].values())
    manifest = json.loads((out / "manifest.json").read_text())
    assert "gradcam_compare.png" in [a["path"] for a in manifest["artifacts"]]
    width, height = Image.open(out / "gradcam_compare.png").size
    assert width > height  # 2 rows of 4 tiles (image + 3 methods), and a title
    page = render_report(tiny_run, registries())
    assert "Methods side by side" in page and "FullGrad" in page and "Score-CAM" in page
    bad = run_cli(*args, "--gradcam-compare", "gradcam,nope")
    assert bad.returncode != 0 and "unknown method 'nope'" in bad.stdout + bad.stderr
    assert "Traceback" not in bad.stdout + bad.stderr
