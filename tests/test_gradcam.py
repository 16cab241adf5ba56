"""Native Grad-CAM engine: agreement with Captum, targets, hook hygiene, state restoration."""

from __future__ import annotations

import gc
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from explainkit.errors import AnalyzerError
from explainkit.explain.gradcam import (
    CAM,
    METHODS,
    CAMResult,
    GradCAM,
    LayerCAM,
    compute_cam,
    iter_cam,
    normalize_maps,
)
from explainkit.models import build_model

N = 16


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_model("resnet18-s8", width=8)
    # Non-trivial BatchNorm statistics, so eval mode differs from train mode.
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 1.5)
    return m.eval()


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(1)
    return torch.randn(N, 3, 32, 32, generator=g)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _verify_maps(result: CAMResult, n: int = N) -> None:
    assert result.maps.shape == (n, 32, 32)
    assert result.maps.dtype == torch.float32
    assert torch.isfinite(result.maps).all() and torch.isfinite(result.raw).all()
    assert result.maps.min() >= 0 and result.maps.max() <= 1
    assert (result.raw >= 0).all()
    assert result.targets.dtype == torch.int64 and result.targets.shape == (n,)
    assert result.predicted.shape == (n,) and result.logits.shape == (n, 10)


@pytest.mark.parametrize("layer", ["layer4", "layer3.1"])
def test_gradcam_matches_captum(model, images, layer):
    captum_attr = pytest.importorskip("captum.attr")
    with GradCAM(model, layer) as cam:
        result = cam(images, target="predicted")
    _verify_maps(result)
    module = dict(model.named_modules())[layer]
    ref = captum_attr.LayerGradCam(model, module).attribute(
        images, target=result.targets, relu_attributions=True
    )
    ref_up = captum_attr.LayerAttribution.interpolate(ref, (32, 32), "bilinear")
    ref, ref_up = ref.detach()[:, 0], ref_up.detach()[:, 0]
    assert ref.abs().max() > 0  # the comparison is not vacuous
    assert result.raw.shape == ref.shape
    assert _rel(result.raw, ref) <= 1e-5
    assert _rel(result.maps, normalize_maps(ref_up)) <= 1e-5
    assert torch.equal(result.predicted, model(images).argmax(1))


def test_target_choices(model, images):
    labels = torch.arange(N) % 10
    with GradCAM(model, "layer4") as cam:
        pred = cam(images, target="predicted")
        true = cam(images, target="true", true_targets=labels)
        three = cam(images, target=3)
        given = cam(images, target=labels.flip(0))
        as_list = cam(images, target=labels.tolist())
    assert torch.equal(pred.targets, pred.predicted)
    assert torch.equal(pred.predicted, pred.logits.argmax(1))
    assert torch.equal(true.targets, labels)
    assert torch.equal(three.targets, torch.full((N,), 3))
    assert torch.equal(given.targets, labels.flip(0))
    assert torch.equal(as_list.targets, labels)
    # A different class gives a different explanation.
    assert not torch.allclose(three.raw, given.raw)


@pytest.mark.parametrize(
    "target, true_targets",
    [
        ("true", None),
        ("best", None),
        (10, None),
        (-1, None),
        (torch.zeros(N - 1, dtype=torch.int64), None),
        (torch.zeros(N), None),
        (torch.full((N,), 10), None),
    ],
)
def test_bad_targets_raise(model, images, target, true_targets):
    with GradCAM(model, "layer4") as cam, pytest.raises(AnalyzerError):
        cam(images, target=target, true_targets=true_targets)
    assert len(model.layer4._forward_hooks) == 0


def test_unknown_layer_lists_valid_names(model):
    with pytest.raises(AnalyzerError) as info:
        GradCAM(model, "layer5")
    message = str(info.value)
    assert "layer5" in message and "did you mean" in message
    for name in ("conv1", "layer1", "layer4", "layer4.1", "linear"):
        assert name in message
    assert "layer4.1.conv1" not in message  # compact: top- and block-level names only
    with pytest.raises(AnalyzerError):
        GradCAM(model, "")


def test_layer_without_spatial_output_raises(model, images):
    with pytest.raises(AnalyzerError, match="linear"), GradCAM(model, "linear") as cam:
        cam(images)
    assert len(model.linear._forward_hooks) == 0


def test_bad_images_raise(model):
    with GradCAM(model, "layer4") as cam:
        with pytest.raises(AnalyzerError):
            cam(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
        with pytest.raises(AnalyzerError):
            cam(torch.zeros(3, 32, 32))


def test_one_hook_during_call_none_after(model, images):
    seen = []
    probe = model.linear.register_forward_hook(
        lambda *_: seen.append(len(model.layer4._forward_hooks))
    )
    try:
        cam = GradCAM(model, "layer4")
        cam(images[:2])
        assert seen == [1]
        assert len(model.layer4._forward_hooks) == 0 and cam._handles == []
        cam.close()  # idempotent
    finally:
        probe.remove()


def test_state_restored_after_exception_in_forward(model, images):
    model.train()
    model.layer2.eval()
    flags = {n: i % 3 != 0 for i, (n, _) in enumerate(model.named_parameters())}
    for n, p in model.named_parameters():
        p.requires_grad_(flags[n])
    modes = {n: m.training for n, m in model.named_modules()}

    def boom(*_):
        raise RuntimeError("boom")

    probe = model.linear.register_forward_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"), GradCAM(model, "layer4") as cam:
            cam(images[:2])
    finally:
        probe.remove()
    assert len(model.layer4._forward_hooks) == 0
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags

    # After a normal call too; and the call ran in eval mode (matches the eval-mode result).
    result = GradCAM(model, "layer4")(images[:4])
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    with torch.no_grad():
        assert torch.allclose(result.logits, model(images[:4]), atol=1e-6)


def test_no_growth_over_many_calls(model, images):
    small = images[:2]
    with GradCAM(model, "layer4") as cam:
        for _ in range(5):
            cam(small)
        gc.collect()
        before = len(gc.get_objects())
        for _ in range(100):
            cam(small)
        gc.collect()
        after = len(gc.get_objects())
    assert after - before < 50
    assert all(len(m._forward_hooks) == 0 for m in model.modules())
    assert len(model.layer4._forward_hooks) == 0


def test_batched_equals_per_image(model, images):
    batched = compute_cam(model, images, "layer4")
    singles = CAMResult.cat([GradCAM(model, "layer4")(images[i : i + 1]) for i in range(N)])
    chunks = list(iter_cam(model, images, "layer4", batch_size=5))
    assert [len(c) for c in chunks] == [5, 5, 5, 1]
    for other in (singles, CAMResult.cat(chunks)):
        assert torch.equal(batched.targets, other.targets)
        assert _rel(other.raw, batched.raw) <= 1e-5
        assert (other.maps - batched.maps).abs().max() <= 1e-4


@pytest.mark.parametrize("method", sorted(METHODS))
def test_methods_give_finite_maps(model, images, method):
    result = compute_cam(model, images, "layer4", method=method, target=2)
    _verify_maps(result)
    assert issubclass(METHODS[method], CAM) and METHODS[method].name == method
    assert (result.targets == 2).all()
    with pytest.raises(AnalyzerError, match="available"):
        compute_cam(model, images, "layer4", method="scorecam")


def test_layercam_matches_its_definition(model, images):
    x, labels = images[:6], torch.arange(6)
    store = {}

    def keep(_, __, out):
        out.retain_grad()
        store["a"] = out

    handle = model.layer2.register_forward_hook(keep)
    try:
        logits = model(x)
        logits.gather(1, labels[:, None]).sum().backward()
    finally:
        handle.remove()
        model.zero_grad(set_to_none=True)
    a, g = store["a"].detach(), store["a"].grad
    expected = F.relu((F.relu(g) * a).sum(1))
    result = LayerCAM(model, "layer2")(x, target=labels)
    assert result.raw.shape == (6, 16, 16)
    assert _rel(result.raw, expected) <= 1e-5


def test_normalize_maps_keeps_zero_maps_zero():
    maps = torch.zeros(3, 4, 4)
    maps[1] = torch.arange(16.0).view(4, 4)
    maps[2] = 5.0
    out = normalize_maps(maps)
    assert torch.isfinite(out).all()
    assert torch.equal(out[0], torch.zeros(4, 4)) and torch.equal(out[2], torch.zeros(4, 4))
    assert out[1].min() == 0 and out[1].max() == 1


def test_works_under_inference_mode(model, images):
    with torch.inference_mode():
        result = compute_cam(model, images[:4], "layer4")
    _verify_maps(result, 4)


def test_inplace_op_after_layer_is_handled(images):
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1),
        torch.nn.ReLU(inplace=True),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(4, 3),
    ).eval()
    captum_attr = pytest.importorskip("captum.attr")
    result = GradCAM(net, "0")(images[:4], target=1)
    ref = captum_attr.LayerGradCam(net, net[0]).attribute(
        images[:4], target=1, relu_attributions=True
    )
    assert _rel(result.raw, ref.detach()[:, 0]) <= 1e-5
    assert len(net[0]._forward_hooks) == 0


@settings(max_examples=50, deadline=None, derandomize=True)
@given(
    level=st.floats(-1e6, 1e6, allow_nan=False).filter(lambda v: abs(v) > 1e-3),
    ripple=st.floats(0, 1e-6),
)
def test_a_map_constant_up_to_float_noise_normalizes_to_zero(level, ripple):
    g = torch.Generator().manual_seed(0)
    noise = (torch.rand(2, 8, 8, generator=g, dtype=torch.float64) - 0.5) * ripple * abs(level)
    maps = (level + noise).float()
    assert torch.equal(normalize_maps(maps), torch.zeros_like(maps))


def test_a_varying_map_still_spans_zero_to_one():
    maps = torch.linspace(3.0, 3.5, 64).view(1, 8, 8)  # small range, far from zero: not noise
    out = normalize_maps(maps)
    assert out.min().item() == 0.0 and out.max().item() == pytest.approx(1.0)


def test_a_1x1_layer_gives_zero_maps_and_one_warning_naming_a_better_layer():
    import torchvision

    model = torchvision.models.resnet18(weights=None).eval()
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with GradCAM(model, "layer4") as cam:
            first, second = cam(images), cam(images)
    assert first.raw.shape[-2:] == (1, 1)
    assert torch.equal(first.maps, torch.zeros_like(first.maps))  # not stretched noise
    assert torch.equal(second.maps, first.maps)
    (warning,) = [str(w.message) for w in caught]  # once per engine
    assert "'layer4' gives 1x1 maps for 32x32 inputs" in warning and "'layer3'" in warning


def test_locate_layer_picks_the_last_spatial_layer_the_logits_use():
    import torchvision

    from explainkit.explain.layers import locate_layer

    model = torchvision.models.resnet18(weights=None).eval()
    assert locate_layer(model, torch.randn(1, 3, 32, 32)) == "layer3"
    assert locate_layer(model, torch.randn(1, 3, 224, 224)) == "layer4"
    assert not model.training
