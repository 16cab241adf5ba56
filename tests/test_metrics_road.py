"""ROAD, Average Drop / Increase in Confidence, and agreement of the metrics with Quantus
and pytorch-grad-cam on the same maps and model.

Tolerances: imputation equals pytorch-grad-cam's sparse solve within 1e-4 (conjugate
gradients in float32 to a relative residual of 1e-6); ROAD probabilities within 5e-3 of
pytorch-grad-cam's (its percentile threshold may remove one pixel more than floor(f * H * W));
Quantus's ROAD accuracy curve, pixel flipping and pointing game exactly (noise 0, same order).
Quantus's ROAD runs only on one-channel inputs (0.6.0 indexes a one-channel mask with the
flattened channel x pixel order), so it is compared on a grayscale model.
"""

from __future__ import annotations

import importlib.util
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from explainkit.errors import AnalyzerError
from explainkit.explain import metrics as M
from explainkit.explain import metrics_road as R
from tests.helpers import build_model

pytestmark = pytest.mark.usefixtures("one_thread")
needs_pgc = pytest.mark.skipif(
    importlib.util.find_spec("pytorch_grad_cam") is None, reason="pytorch-grad-cam not installed"
)
needs_quantus = pytest.mark.skipif(
    importlib.util.find_spec("quantus") is None, reason="quantus not installed"
)


class _Gray(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 16, 10)

    def forward(self, x):
        return self.fc(nn.functional.adaptive_avg_pool2d(self.conv(x).relu(), 4).flatten(1))


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = build_model("resnet18-s8", num_classes=10, width=8).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        t = model(x).argmax(1)
    # Smooth maps (as CAMs are), so ROAD removes blobs, not salt and pepper.
    maps = M.gaussian_blur(torch.rand(4, 1, 32, 32), 3.0)[:, 0]
    return model, x, t, maps


def test_imputation_fills_with_the_neighbours_mean():
    """Each filled pixel is the weighted mean of its in-image neighbours; kept pixels stay."""
    torch.manual_seed(1)
    x = torch.randn(2, 3, 12, 12)
    removed = torch.rand(2, 12, 12) < 0.6
    out = R.impute_linear(x, removed, noise=0.0)
    assert torch.equal(out[~removed[:, None].expand_as(x)], x[~removed[:, None].expand_as(x)])
    padded = nn.functional.pad(out, (1, 1, 1, 1))
    ones = nn.functional.pad(torch.ones(1, 1, 12, 12), (1, 1, 1, 1))
    total, weight = torch.zeros_like(out), torch.zeros(1, 1, 12, 12)
    for (dy, dx), w in R._NEIGHBOURS:
        total += w * padded[..., 1 + dy : 13 + dy, 1 + dx : 13 + dx]
        weight += w * ones[..., 1 + dy : 13 + dy, 1 + dx : 13 + dx]
    mean = total / weight
    sel = removed[:, None].expand_as(x)
    assert torch.allclose(out[sel], mean[sel], atol=1e-5)


@needs_pgc
def test_imputation_and_road_equal_pytorch_grad_cam(setup):
    from pytorch_grad_cam.metrics.perturbation_confidence import (
        PerturbationConfidenceMetric,
        RemoveLeastRelevantFirst,
        RemoveMostRelevantFirst,
    )
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    model, x, t, maps = setup
    removed = maps > maps.flatten(1).median(1).values[:, None, None]
    theirs = torch.stack(
        [NoisyLinearImputer(noise=0)(x[i], (~removed[i]).float()) for i in range(4)]
    )
    assert (R.impute_linear(x, removed, noise=0.0) - theirs).abs().max() < 1e-4

    fractions = (0.2, 0.5, 0.8)
    ours = R.road_curves(model, x, maps, t, fractions=fractions, noise=0.0)
    targets = [ClassifierOutputSoftmaxTarget(int(c)) for c in t]
    imputer = NoisyLinearImputer(noise=0)
    for kind, cls in (("morf", RemoveMostRelevantFirst), ("lerf", RemoveLeastRelevantFirst)):
        got = []
        for f in fractions:
            keep = 100 * (1 - f)  # their percentile: pixels below it are kept
            metric = PerturbationConfidenceMetric(cls(keep, imputer))
            got.append(metric(x, maps.numpy(), targets, model))
        expected = torch.from_numpy(np.stack(got, 1)).double()
        diff = getattr(ours, kind).double() - ours.original.double()[:, None] - expected
        assert diff.abs().max() < 5e-3, (kind, diff.abs().max())


@needs_pgc
def test_confidence_equals_pytorch_grad_cam(setup):
    from pytorch_grad_cam.metrics.cam_mult_image import DropInConfidence, IncreaseInConfidence
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    model, x, t, maps = setup
    drop, increase = R.confidence_change(model, x, maps, t, max_batch=3)
    targets = [ClassifierOutputSoftmaxTarget(int(c)) for c in t]
    with torch.no_grad():
        y = model(x).softmax(1).gather(1, t[:, None])[:, 0]
    theirs = torch.from_numpy(DropInConfidence()(x, maps.numpy(), targets, model))
    # pytorch-grad-cam leaves out the paper's division by the intact confidence.
    assert torch.allclose(drop, theirs.float() / y, atol=1e-5)
    inc = torch.from_numpy(IncreaseInConfidence()(x, maps.numpy(), targets, model))
    assert increase.tolist() == inc.bool().tolist()


@needs_quantus
def test_deletion_pointing_game_and_road_equal_quantus(setup):
    import quantus

    model, x, t, maps = setup
    xb, yb, ab = x.numpy(), t.numpy(), maps[:, None].numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # Quantus flips (channel, pixel) features; 128 per step = a third of 128 pixels.
        pf = quantus.PixelFlipping(features_in_step=128, perturb_baseline=0.0, normalise=False,
                                   disable_warnings=True)  # fmt: skip
        theirs = np.array(pf(model=model, x_batch=xb, y_batch=yb, a_batch=ab, device="cpu"))
        curves = M.perturbation_curves(model, x, maps, t, steps=8, baseline="mean")
        assert np.abs(theirs[:, 2::3] - curves.deletion[:, 1:].numpy()).max() < 1e-5

        peak = maps.flatten(1).argmax(1)
        masks = torch.zeros(4, 32 * 32, dtype=torch.bool)
        masks[[0, 1], peak[:2]] = True  # two maps point inside, two do not
        masks = masks.view(4, 32, 32)
        masks[2:, :4, :4] = True
        pg = quantus.PointingGame(disable_warnings=True)
        hits = pg(model=model, x_batch=xb, y_batch=yb, a_batch=ab,
                  s_batch=masks[:, None].numpy().astype(float), device="cpu")  # fmt: skip
        assert M.pointing_game(maps, masks).tolist() == [bool(h) for h in hits] == [
            True, True, False, False,
        ]  # fmt: skip

        torch.manual_seed(0)
        gray = _Gray().eval()
        g = torch.randn(6, 1, 32, 32)
        with torch.no_grad():
            gt = gray(g).argmax(1)
        gmaps = M.gaussian_blur(torch.rand(6, 1, 32, 32), 3.0)[:, 0]
        percentages = [10, 30, 50, 70, 90]
        road = quantus.ROAD(noise=0.0, percentages=percentages, normalise=False,
                            disable_warnings=True)  # fmt: skip
        theirs = road(model=gray, x_batch=g.numpy(), y_batch=gt.numpy(),
                      a_batch=gmaps[:, None].numpy(), device="cpu")  # fmt: skip
    ours = R.road_curves(gray, g, gmaps, gt, fractions=tuple(p / 100 for p in percentages),
                         noise=0.0)  # fmt: skip
    assert ours.morf_kept.double().mean(0).tolist() == [theirs[p] for p in percentages]


def test_road_scores_rank_a_faithful_map_above_its_inverse():
    """A model that reads only the top-left quarter: the map that marks it removes the
    evidence first (low MoRF, high LeRF), its inverse the other way round."""

    class Quarter(nn.Module):
        def forward(self, x):
            s = 6 * x[:, :, :16, :16].mean((1, 2, 3))
            return torch.stack([s, -s], 1)

    x = torch.ones(3, 3, 32, 32) + 0.1 * torch.randn(3, 3, 32, 32)
    good = torch.zeros(3, 32, 32)
    good[:, :16, :16] = 1
    good += 0.01 * torch.rand(3, 32, 32)
    t = torch.zeros(3, dtype=torch.long)
    gen = torch.Generator().manual_seed(0)
    a = R.road_curves(Quarter(), x, good, t, generator=gen)
    b = R.road_curves(Quarter(), x, 1 - good, t, generator=gen)
    assert (a.morf_score < b.morf_score).all() and (a.lerf_score > b.lerf_score).all()
    assert (a.combined > 0).all() and (b.combined < 0).all()
    drop, increase = R.confidence_change(Quarter(), x, good, t)
    drop_bad, _ = R.confidence_change(Quarter(), x, 1 - good, t)
    assert (drop < drop_bad).all() and drop.shape == increase.shape == (3,)
    summary = R.summarize_road({"good": a})["good"]
    assert len(summary["morf"]["mean"]) == len(R.ROAD_FRACTIONS)
    assert all(lo <= m <= hi for lo, m, hi in zip(summary["morf"]["ci_low"],
               summary["morf"]["mean"], summary["morf"]["ci_high"], strict=True))  # fmt: skip


def test_road_refuses_bad_input(setup):
    model, x, t, maps = setup
    with pytest.raises(AnalyzerError, match="fractions"):
        R.road_curves(model, x, maps, t, fractions=(0.0, 0.5))
    with pytest.raises(AnalyzerError, match="maps must be"):
        R.confidence_change(model, x, maps[:, :8], t)
