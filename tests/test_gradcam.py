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
    CAM_CLASSES,
    CAMResult,
    GradCAM,
    LayerCAM,
    compute_cam,
    compute_cams,
    iter_cam,
    normalize_maps,
)
from tests.helpers import build_model

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


CNN_METHODS = sorted(set(CAM_CLASSES) - {"legrad"})  # LeGrad reads a ViT's attention maps


@pytest.mark.parametrize("method", CNN_METHODS)
def test_methods_give_finite_maps(model, images, method):
    result = compute_cam(model, images, "layer4", method=method, target=2)
    _verify_maps(result)
    assert issubclass(CAM_CLASSES[method], CAM) and CAM_CLASSES[method].name == method
    assert (result.targets == 2).all()
    with pytest.raises(AnalyzerError, match="available"):
        compute_cam(model, images, "layer4", method="scorecam")


def test_several_methods_from_one_pass_equal_each_method_alone(model, images, vit):
    names = CNN_METHODS
    labels = torch.arange(N) % 10
    joint = compute_cams(model, images, "layer4", names, target=labels, batch_size=6)
    assert list(joint) == names
    for name in names:
        alone = compute_cam(model, images, "layer4", method=name, target=labels, batch_size=6)
        for field in ("maps", "raw", "targets", "predicted", "logits"):
            assert torch.equal(getattr(joint[name], field), getattr(alone, field)), (name, field)
    assert all(len(m._forward_hooks) == 0 for m in model.modules())
    # token layers too, and the pass runs once: the layer's hook fires once per batch
    calls = []
    layer = VIT_LAYER
    handle = dict(vit.named_modules())[layer].register_forward_hook(lambda *a: calls.append(1))
    try:
        tokens = compute_cams(vit, images[:4], layer, ["gradcam", "gradcampp"], reshape="vit")
    finally:
        handle.remove()
    assert len(calls) == 1
    alone = compute_cam(vit, images[:4], layer, method="gradcampp", reshape="vit")
    assert torch.equal(tokens["gradcampp"].maps, alone.maps)
    with pytest.raises(AnalyzerError, match="at least one"):
        compute_cams(model, images, "layer4", [])


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


# -- transformers: token layers (ViT) and channels-last maps (Swin) ---------------------------

VIT_LAYER = "encoder.layers.encoder_layer_1.ln_1"  # the last block's first norm


def _tiny_vit(registers: int = 0) -> torch.nn.Module:
    """torchvision's ViT, small: 32 px images, 8 px patches, a 4x4 grid of patch tokens."""
    import torchvision

    torch.manual_seed(0)
    cls = _RegisterViT if registers else torchvision.models.VisionTransformer
    model = cls(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32,
                mlp_dim=64, num_classes=5)  # fmt: skip
    if registers:
        model.registers = torch.nn.Parameter(torch.randn(1, registers, 32))
    # torchvision starts the head at zero: every gradient would be zero, every map empty.
    torch.nn.init.normal_(model.heads.head.weight, std=0.5)
    return model.eval()


def _tiny_swin() -> torch.nn.Module:
    from torchvision.models.swin_transformer import SwinTransformer

    torch.manual_seed(0)
    model = SwinTransformer(patch_size=[4, 4], embed_dim=24, depths=[2, 2], num_heads=[2, 2],
                            window_size=[4, 4], num_classes=5)  # fmt: skip
    return model.eval()


def _register_vit_class():
    import torchvision

    class RegisterViT(torchvision.models.VisionTransformer):
        """A ViT with register tokens after the class token (Darcet et al. 2024), no pos-emb."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self._process_input(x)
            n = x.shape[0]
            x = torch.cat([self.class_token.expand(n, -1, -1), x], 1) + self.encoder.pos_embedding
            x = torch.cat([x[:, :1], self.registers.expand(n, -1, -1), x[:, 1:]], 1)
            x = self.encoder.ln(self.encoder.layers(self.encoder.dropout(x)))
            return self.heads(x[:, 0])

    return RegisterViT


_RegisterViT = _register_vit_class()


@pytest.fixture(scope="module")
def vit():
    return _tiny_vit()


@pytest.fixture(scope="module")
def swin():
    return _tiny_swin()


def _hand_cam(model, layer, x, targets, leading=None):
    """Grad-CAM by the textbook: keep the layer's output, autograd.grad, view as maps, weigh."""
    store = {}
    handle = dict(model.named_modules())[layer].register_forward_hook(
        lambda m, i, out: store.setdefault("out", out)
    )
    try:
        with torch.enable_grad():
            x = x.clone().requires_grad_(True)  # parameters may be frozen elsewhere
            logits = model(x)
            (g,) = torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), store["out"])
    finally:
        handle.remove()
    a = store["out"].detach()
    if leading is None:  # (N, H, W, C) channels-last
        a, g = a.permute(0, 3, 1, 2), g.permute(0, 3, 1, 2)
    else:  # (N, T, C) tokens: drop the leading ones, lay the patches out on their grid
        n, t, c = a.shape
        side = int((t - leading) ** 0.5)
        a = a[:, leading:].reshape(n, side, side, c).permute(0, 3, 1, 2)
        g = g[:, leading:].reshape(n, side, side, c).permute(0, 3, 1, 2)
    return F.relu((g.mean((2, 3), keepdim=True) * a).sum(1))


TOKEN_CASES = [
    ("vit", VIT_LAYER, "auto", (4, 4)),
    ("vit", VIT_LAYER, "vit", (4, 4)),
    ("vit", "encoder.layers.encoder_layer_0", "vit", (4, 4)),
    ("swin", "features.3", "swin", (4, 4)),
    ("swin", "norm", "swin", (4, 4)),
    ("swin", "features.1", "swin", (8, 8)),
]


@pytest.mark.parametrize("arch, layer, reshape, grid", TOKEN_CASES)
def test_token_layers_give_maps_with_every_method(request, images, arch, layer, reshape, grid):
    model = request.getfixturevalue(arch)
    x = images[:6]
    model.train()
    (model.encoder if arch == "vit" else model.features).eval()
    modes = {n: m.training for n, m in model.named_modules()}
    try:
        # The four oldest methods and two of the new kinds (ShapleyCAM: a second derivative
        # through attention); every method runs on a token layer in test_cam_methods.py.
        methods = ("gradcam", "gradcampp", "xgradcam", "layercam", "shapleycam", "eigencam")
        for method in methods:
            one = compute_cam(model, x, layer, method, target=1, reshape=reshape)
            other = compute_cam(model, x, layer, method, target=3, reshape=reshape)
            for result in (one, other):
                assert result.maps.shape == (6, 32, 32) and result.raw.shape == (6, *grid)
                assert torch.isfinite(result.maps).all() and torch.isfinite(result.raw).all()
                assert result.maps.min() >= 0 and result.maps.max() <= 1
                assert result.maps.amax((1, 2)).min() > 0  # not all-zero maps
            if CAM_CLASSES[method].uses_gradients:  # Eigen-CAM, FEM...: class-agnostic
                assert not torch.allclose(one.maps, other.maps), method  # targets differ
            assert all(len(m._forward_hooks) == 0 for m in model.modules())
            assert {n: m.training for n, m in model.named_modules()} == modes
            assert all(p.grad is None for p in model.parameters())
    finally:
        model.eval()


def test_vit_token_map_equals_the_hand_computation(vit, images):
    x, targets = images[:6], torch.tensor([0, 1, 2, 3, 4, 0])
    with GradCAM(vit, VIT_LAYER) as cam:
        result = cam(x, target=targets)
    assert cam.layout.kind == "vit" and cam.layout.leading == 1 and cam.layout.grid == (4, 4)
    expected = _hand_cam(vit, VIT_LAYER, x, targets, leading=1)
    assert expected.abs().max() > 0  # the comparison is not vacuous
    assert (result.raw - expected).abs().max() <= 1e-5 * expected.abs().max()
    up = F.interpolate(expected[:, None], size=(32, 32), mode="bilinear", align_corners=False)
    assert (result.maps - normalize_maps(up[:, 0])).abs().max() <= 1e-5


def test_swin_map_equals_the_hand_computation(swin, images):
    x, targets = images[:6], torch.tensor([4, 3, 2, 1, 0, 1])
    result = GradCAM(swin, "features.3", reshape="swin")(x, target=targets)
    expected = _hand_cam(swin, "features.3", x, targets)
    assert expected.abs().max() > 0
    assert (result.raw - expected).abs().max() <= 1e-5 * expected.abs().max()
    # The final norm read channels-last is the permute module after it read as NCHW.
    norm = GradCAM(swin, "norm", reshape="swin")(x, target=targets)
    permuted = GradCAM(swin, "permute")(x, target=targets)
    assert _rel(norm.raw, permuted.raw) <= 1e-5


def test_register_tokens_are_dropped_before_the_grid():
    model = _tiny_vit(registers=4)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    targets = torch.tensor([0, 2, 4])
    with GradCAM(model, VIT_LAYER, reshape="vit") as cam:
        result = cam(x, target=targets)
    assert cam.layout.leading == 5 and cam.layout.grid == (4, 4)  # class + 4 registers
    expected = _hand_cam(model, VIT_LAYER, x, targets, leading=5)
    assert expected.abs().max() > 0
    assert (result.raw - expected).abs().max() <= 1e-5 * expected.abs().max()


@pytest.mark.parametrize(
    "shape, expected",
    [
        ((197, 224, 224), (1, 14, 14)),  # ViT-B/16: class token + 14x14 patches
        ((198, 224, 224), (2, 14, 14)),  # DeiT: class and distillation tokens
        ((201, 224, 224), (5, 14, 14)),  # class token + 4 registers
        ((17, 32, 32), (1, 4, 4)),  # 3x3 after 8 tokens fits too: a class token wins
        ((10, 32, 32), (1, 3, 3)),  # 2x2 after 6 tokens fits too: a class token wins
        ((16, 32, 32), (0, 4, 4)),  # no class token: 4x4 (p = 8) beats 3x3 after 7 tokens
        ((25, 32, 48), (1, 4, 6)),  # a wide image: the grid follows its aspect ratio
        ((14 * 19 + 1, 224, 300), (1, 14, 19)),  # 300 px, not a multiple of 16: padded
        ((47, 32, 32), None),  # no k in 0..8 leaves a perfect square
        ((69, 32, 48), None),  # no k leaves a grid with the image's aspect ratio
    ],
)
def test_token_grid_rule(shape, expected):
    from explainkit.explain.layers import token_grid

    assert token_grid(*shape) == expected


def _one_sentence(message: str) -> None:
    assert message[0].islower() and not message.endswith(".") and ". " not in message
    assert "; " in message  # what failed; what to do


@pytest.mark.parametrize(
    "arch, layer, reshape, words",
    [
        ("model", "layer3", "vit", ["'layer3'", "(N, tokens, C)", "'nchw'"]),
        ("model", "layer3", "swin", ["'layer3'", "channels-last", "'nchw'"]),
        ("vit", VIT_LAYER, "nchw", [VIT_LAYER, "(N, C, H, W)", "'vit'"]),
        ("vit", VIT_LAYER, "swin", [VIT_LAYER, "(N, H, W, C)", "'vit'"]),
        ("vit", "heads", "auto", ["'heads'", "2-D tensor"]),
        ("swin", "features.3", "vit", ["'features.3'", "(N, tokens, C)"]),
    ],
)
def test_a_wrong_reshape_is_one_sentence(request, images, arch, layer, reshape, words):
    model = request.getfixturevalue(arch)
    with pytest.raises(AnalyzerError) as info, GradCAM(model, layer, reshape=reshape) as cam:
        cam(images[:2])
    message = str(info.value)
    _one_sentence(message)
    assert all(w in message for w in words), message
    assert all(len(m._forward_hooks) == 0 for m in model.modules())


class _Tokens(torch.nn.Module):
    """(N, 3, 32, 32) -> (N, 47, 8): 47 tokens, which no grid of a 32x32 image fits."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, : 47 * 8].unflatten(1, (47, 8))


def test_unknown_reshape_and_tokens_without_a_grid_are_one_sentence(vit, images):
    with pytest.raises(AnalyzerError) as info:
        GradCAM(vit, VIT_LAYER, reshape="tokens")
    _one_sentence(str(info.value))
    assert "'tokens'" in str(info.value) and "auto, nchw, vit, swin" in str(info.value)

    net = torch.nn.Sequential(_Tokens(), torch.nn.Identity(), torch.nn.Flatten(),
                              torch.nn.Linear(47 * 8, 3))  # fmt: skip
    with pytest.raises(AnalyzerError) as info:
        GradCAM(net, "1")(images[:2])
    _one_sentence(str(info.value))
    assert "47 tokens" in str(info.value) and "32x32" in str(info.value)


def test_locate_layer_and_suggest_reshape_know_token_layers(vit, swin, images):
    import torchvision

    from explainkit.explain.layers import locate_layer, suggest_reshape

    x = images[:1]
    # The last block's output and encoder.ln come later, but only their class token reaches
    # the logits: the last layer whose patch tokens matter is the last block's first norm.
    assert locate_layer(vit, x, reshape="vit") == VIT_LAYER
    assert locate_layer(vit, x, reshape="auto") == VIT_LAYER
    assert locate_layer(vit, x) == "conv_proj"  # "nchw": the patch embedding
    assert locate_layer(swin, x, reshape="swin") == "norm"
    assert locate_layer(swin, x) == "permute"  # the same tensor as (N, C, H, W)
    resnet = torchvision.models.resnet18(weights=None).eval()
    assert locate_layer(resnet, x, reshape="vit") is None
    assert locate_layer(resnet, x, reshape="swin") is None
    assert not vit.training and not swin.training
    with pytest.raises(AnalyzerError, match="auto, nchw, vit, swin"):
        locate_layer(vit, x, reshape="tokens")

    expected = {
        (vit, VIT_LAYER): "vit",
        (vit, "encoder.layers.encoder_layer_0"): "vit",
        (vit, "conv_proj"): "nchw",
        (swin, "features.3"): "swin",
        (swin, "norm"): "swin",
        (swin, "permute"): "nchw",
        (resnet, "layer3"): "nchw",
    }
    for (net, layer), reshape in expected.items():
        assert suggest_reshape(net, layer, x) == reshape, layer
    with pytest.raises(AnalyzerError, match="'heads'"):
        suggest_reshape(vit, "heads", x)
    with pytest.raises(AnalyzerError, match="'nope'"):
        suggest_reshape(vit, "nope", x)


def test_a_vit_block_output_gives_zero_maps_and_one_warning_naming_its_norm(vit, images):
    layer = "encoder.layers.encoder_layer_1"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with GradCAM(vit, layer) as cam:
            first, second = cam(images[:4]), cam(images[:4])
    assert torch.equal(first.maps, torch.zeros_like(first.maps))
    assert torch.equal(second.raw, first.raw)
    (warning,) = [str(w.message) for w in caught]  # once per engine
    assert f"'{layer}'" in warning and f"'{VIT_LAYER}'" in warning and "class token" in warning


def test_auto_on_a_channels_last_layer_warns_once_to_use_swin(swin, images):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with GradCAM(swin, "features.3") as cam:
            cam(images[:2])
            cam(images[:2])
        GradCAM(swin, "features.3", reshape="nchw")(images[:2])  # asked for: no warning
        GradCAM(swin, "permute")(images[:2])  # NCHW indeed: no warning
    (warning,) = [str(w.message) for w in caught]
    assert "'features.3'" in warning and "channels-last" in warning and "'swin'" in warning


def test_the_analyzer_offers_the_engines_reshapes():
    from explainkit.explain.layers import RESHAPES
    from explainkit.manager import get_analyzers, get_plugin_manager

    analyzers = get_analyzers(get_plugin_manager(entrypoints=False, quiet=True))
    (option,) = [o for o in analyzers["gradcam"].cls.options if o.name == "reshape"]
    assert tuple(option.choices) == RESHAPES and option.default == "auto"
