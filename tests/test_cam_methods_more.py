"""Smooth Grad-CAM++, LeGrad and Deep Feature Factorization (issue 28) agree with torch-cam's
and pytorch-grad-cam's on the same model, layer, targets, images (and noise, and solver)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from explainkit.errors import AnalyzerError
from explainkit.explain.gradcam import (
    CAM_CLASSES,
    SmoothGradCAMpp,
    compute_cam,
    deep_feature_factorization,
)
from explainkit.explain.methods import METHODS, parse_methods
from tests.helpers import build_model

torchcam = pytest.importorskip("torchcam.methods")
pgc_dff = pytest.importorskip("pytorch_grad_cam.feature_factorization.deep_feature_factorization")

NEW = ("smoothgradcampp", "legrad", "dff")


def _pooled_net() -> torch.nn.Module:
    """Convolutions, then global pooling and a smooth MLP head: the layer gradient is uniform
    over positions (so torch-cam's and the paper's Grad-CAM++ sums agree) yet depends on the
    input (so the noise matters)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 12, 3, stride=2, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(12, 16),
        torch.nn.GELU(),
        torch.nn.Linear(16, 5),
    )
    return net.eval()


def _scaled(x: torch.Tensor) -> torch.Tensor:
    low = x.amin((-2, -1), keepdim=True)
    return (x - low) / (x.amax((-2, -1), keepdim=True) - low)


def test_the_three_are_listed_and_accepted_everywhere():
    assert set(NEW) <= set(CAM_CLASSES) and all(METHODS[n].source == "native" for n in NEW)
    assert parse_methods("smoothgradcampp, legrad,DFF", "--quality-methods") == list(NEW)


def test_smoothgradcampp_equals_torchcam_with_the_same_noise():
    """Every copy gets the same noise (torch-cam's sampler patched) and the gradient is
    uniform over positions: there torch-cam's weights (its ``_get_weights``, what its
    ``__call__`` runs, with its 1e-8 denominator guard set to 0) times the clean activations
    are our map; max |difference| < 1e-5 of the map's peak."""
    net, k = _pooled_net(), 4
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(5)) * 0.3
    with torch.no_grad():
        predicted = net(x).argmax(1)

    class SameNoise:
        def sample(self, size):
            return eps.clone()

    with torchcam.SmoothGradCAMpp(net, "3", num_samples=k, input_shape=(3, 16, 16)) as cam:
        cam._distrib = SameNoise()
        net(x)
        clean = cam.hook_a[0].clone()
        weights = cam._get_weights(predicted.tolist(), None, 0.0)[0]
    expected = torch.relu(torch.einsum("nc,nchw->nhw", weights, clean))
    engine = SmoothGradCAMpp(net, "3")
    engine._noise = lambda images: iter([eps.clone() for _ in range(k)])
    ours = engine(x)
    assert ours.targets.tolist() == predicted.tolist() and expected.amax() > 0
    assert (ours.raw - expected).abs().max() < 1e-5 * expected.abs().amax()


def test_smoothgradcampp_averages_the_noisy_gradients():
    """Distinct noise per copy: the map is the hand computation from each copy's layer
    gradient (plain autograd), the clean activations and the clean image's class; with no
    noise it is Grad-CAM++."""
    net, k = _pooled_net(), 3
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    noise = [torch.randn(x.shape, generator=torch.Generator().manual_seed(s)) for s in (7, 8, 9)]
    seen: list[torch.Tensor] = []
    handle = net[3].register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad():
        classes = net(x).argmax(1)
    clean = seen.pop()
    grads = []
    for eps in noise:
        out = net(x + eps)
        grads.append(torch.autograd.grad(out.gather(1, classes[:, None]).sum(), seen.pop())[0])
    handle.remove()
    g1, g2, g3 = (sum(g**p for g in grads) / k for p in (1, 2, 3))
    alpha = g2 / (2 * g2 + clean.sum((2, 3), keepdim=True) * g3)
    w = (alpha.nan_to_num() * g1.clamp(min=0)).sum((2, 3))
    expected = torch.relu(torch.einsum("nc,nchw->nhw", w, clean)).detach()
    engine = SmoothGradCAMpp(net, "3")
    engine.num_samples = k
    engine._noise = lambda images: iter(noise)
    ours = engine(x)
    assert torch.allclose(ours.raw, expected, rtol=1e-4, atol=1e-6 * expected.max())
    engine.std = 0.0
    del engine._noise
    plain = compute_cam(net, x, "3", method="gradcampp")
    assert torch.allclose(engine(x).maps, plain.maps, atol=1e-6)
    assert not torch.allclose(ours.maps, plain.maps, atol=1e-3)  # the noise did something


@pytest.fixture(scope="module")
def vit():
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=3, num_heads=2,
                              hidden_dim=32, mlp_dim=64, num_classes=5)  # fmt: skip
    with torch.no_grad():  # torchvision starts the head at zero: no gradient would flow
        torch.nn.init.normal_(model.heads.head.weight, std=0.5)
    return model.eval()


def test_legrad_equals_torchcam(vit):
    """From each block on, torch-cam's LeGrad over the same blocks: the [0, 1] maps on the
    patch grid agree within 1e-5; the model is left without hooks."""
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        predicted = vit(x).argmax(1)
    for first in range(3):
        with torchcam.LeGrad(vit, list(vit.encoder.layers)[first:]) as cam:
            vit(x)
            theirs = cam(predicted.tolist())[0].detach()
        ours = compute_cam(vit, x, f"encoder.layers.encoder_layer_{first}.ln_1", method="legrad")
        assert ours.targets.tolist() == predicted.tolist() and ours.maps.shape == (4, 32, 32)
        assert ours.raw.shape == (4, 4, 4) and theirs.amax() > 0.99
        assert (_scaled(ours.raw) - theirs).abs().max() < 1e-5
    assert not any(m._forward_hooks for m in vit.modules())
    assert not any(p.grad is not None or not p.requires_grad for p in vit.parameters())
    with pytest.raises(AnalyzerError, match="in none of 'encoder.layers.encoder_layer_0'"):
        compute_cam(vit, x, "conv_proj", method="legrad")
    cnn = build_model("resnet18-s8", width=8).eval()
    with pytest.raises(AnalyzerError, match="legrad explains vision transformers"):
        compute_cam(cnn, x, "layer4", method="legrad")


def _resnet():
    torch.manual_seed(0)
    return build_model("resnet18-s8", width=8).eval()


def _layer4(model, x):
    seen = {}
    handle = model.layer4.register_forward_hook(lambda m, i, o: seen.setdefault("a", o))
    with torch.no_grad():
        model(x)
    handle.remove()
    return seen["a"]


def _peer_dff(acts: torch.Tensor, k: int):
    """pytorch-grad-cam's factorization (scikit-learn warns when it stops at 200 iterations,
    the stopping rule ours follows too)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pgc_dff.dff(acts.numpy().copy(), n_components=k)


def test_deep_feature_factorization_equals_pytorch_grad_cam():
    """The same NMF (scikit-learn's random start and coordinate descent): jointly over a
    batch, concepts, heatmaps and concept scores (the classifier on the embeddings) agree with
    pytorch-grad-cam's within 1e-4; each image's ``dff`` map is its own factorization's
    concept that raises the target most, to first order."""
    model = _resnet()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    acts = _layer4(model, x)
    concepts, heat = _peer_dff(acts, 4)

    def head(e):  # the classifier on a concept's embedding laid over its 2x2 pooled grid
        return model.linear(e[:, :, None, None].expand(-1, -1, 2, 2).flatten(1))

    ours = deep_feature_factorization(model, x, "layer4", k=4, head=head)
    assert np.abs(ours.raw.numpy() - heat).max() < 1e-4
    assert np.abs(ours.embeddings.numpy().T - concepts).max() < 1e-4
    their_scores = head(torch.from_numpy(np.float32(concepts.T))).detach()
    assert torch.allclose(ours.scores, their_scores, atol=1e-4)
    assert ours.heatmaps.shape == (3, 4, 32, 32) and ours.heatmaps.amax() <= 1

    maps = compute_cam(model, x, "layer4", method="dff")
    seen = {}
    handle = model.layer4.register_forward_hook(lambda m, i, o: seen.setdefault("a", o))
    logits = model(x)
    handle.remove()
    grads = torch.autograd.grad(logits.gather(1, maps.targets[:, None]).sum(), seen["a"])[0]
    for i in range(3):
        a = acts[i : i + 1].numpy().copy()
        concepts_i, heat_i = _peer_dff(acts[i : i + 1], 5)
        directions = concepts_i - a[0].reshape(a.shape[1], -1).min(1)[:, None]  # W: (C, 5)
        along = np.einsum("chw,ck->khw", grads[i].numpy(), directions)
        best = int(np.argmax((along * heat_i[0]).sum((1, 2))))
        assert np.abs(maps.raw[i].numpy() - heat_i[0, best]).max() < 1e-4
    assert maps.maps.shape == (3, 32, 32)


def test_cli_runs_the_three_on_a_tiny_run(tiny_run):
    """One analyze: dff is the method of every eval image's map, Smooth Grad-CAM++ is drawn
    beside it, and LeGrad, asked of a CNN, is left out with its one sentence."""
    import json

    import h5py

    from tests.helpers import run_cli

    args = ("--gradcam-method", "dff", "--gradcam-compare", "smoothgradcampp,legrad")
    result = run_cli("analyze", str(tiny_run), "--plugin", "gradcam", *args, "--gradcam-count", "2")
    assert result.returncode == 0, result.stderr
    out = tiny_run / "analyses" / "gradcam"
    summary = json.loads((out / "gradcam.json").read_text())
    assert summary["method"] == "dff"
    assert summary["compare"]["methods"] == ["dff", "smoothgradcampp"]
    assert "legrad explains vision transformers" in summary["compare"]["failed"]["legrad"]
    with h5py.File(out / "attributions.h5") as f:
        maps = f["maps"][:]
        assert f.attrs["method"] == "dff" and len(maps) == summary["num_images"]
    assert np.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1
    assert (maps.reshape(len(maps), -1).max(1) > 0.99).mean() > 0.9  # concept maps, not empty
    assert "Traceback" not in result.stderr
