"""Explanation-quality metrics: unit checks on hand-made inputs, properties on a trained model.

The property tests need a model that has learned the shapes: the session fixture
``trained_shapes_run`` (tests/conftest.py) trains one (width 8, 6 epochs, 1,500 images).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from explainkit.plugins.quality import DEFAULT_METHODS
from torch import nn

from explainkit.explain import attribution as A
from explainkit.explain import methods as EM
from explainkit.explain import metrics as M
from explainkit.explain import stats as S

pytestmark = pytest.mark.usefixtures("one_thread")


def all_methods(layer: str = "layer4", **kwargs):
    """Every attribution method available here, by name."""
    return {n: A.attribution_fn(n, layer=layer, **kwargs) for n in EM.available_methods()}


@pytest.fixture(scope="module")
def trained(trained_shapes_run):
    """(model, images, labels, predicted, masks) of the trained run's eval split."""
    from explainkit import load_model
    from explainkit.store import open_store

    run = trained_shapes_run
    model = load_model(run, device="cpu")
    for p in model.parameters():
        p.requires_grad_(False)
    with open_store(run) as store:
        x = torch.from_numpy(store.images()).permute(0, 3, 1, 2).float() / 255
        mean = torch.tensor(store.mean).view(1, 3, 1, 1)
        std = torch.tensor(store.std).view(1, 3, 1, 1)
        images = (x - mean) / std
        labels = torch.from_numpy(store.targets)
        masks = torch.from_numpy(store.masks)
    with torch.no_grad():
        predicted = model(images).argmax(1)
    accuracy = float((predicted == labels).double().mean())
    assert accuracy > 0.6, f"the fixture model did not learn (accuracy {accuracy:.2f})"
    return model, images, labels, predicted, masks


# -- unit tests ----------------------------------------------------------------------------


def test_auc_of_known_curves():
    x = torch.linspace(0, 1, 17)
    curves = torch.stack([x, torch.full_like(x, 0.3), 1 - x, x**2])
    got = M.auc(curves)
    assert got.tolist() == pytest.approx([0.5, 0.3, 0.5, 1 / 3], abs=2e-3)
    # uneven fractions are honoured
    f = torch.tensor([0.0, 0.1, 1.0])
    assert M.auc(torch.tensor([[1.0, 1.0, 0.0]]), f).item() == pytest.approx(0.1 + 0.45)


def test_ssim_identical_is_one_and_drops_for_different_maps():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(4, 32, 32, generator=g)
    b = torch.rand(4, 32, 32, generator=g)
    assert M.ssim(a, a).tolist() == pytest.approx([1.0] * 4, abs=1e-9)
    assert (M.ssim(a, b) < 0.2).all()
    assert (M.ssim(a, 0.8 * a + 0.2 * b) > M.ssim(a, 0.2 * a + 0.8 * b)).all()
    small = torch.rand(2, 5, 7, generator=g)  # window shrinks to fit
    assert M.ssim(small, small).tolist() == pytest.approx([1.0, 1.0], abs=1e-9)


def _rankdata(v: np.ndarray) -> np.ndarray:
    """Average ranks, the slow obvious way."""
    return np.array([(v < x).sum() + ((v == x).sum() - 1) / 2 for x in v], dtype=float)


def test_rank_correlation_matches_spearman_with_ties():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 5, (3, 40)).astype(np.float32)  # many ties
    b = a + rng.normal(0, 2, a.shape).astype(np.float32)
    got = S.spearman(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    want = [np.corrcoef(_rankdata(x), _rankdata(y))[0, 1] for x, y in zip(a, b, strict=True)]
    assert got == pytest.approx(want, abs=1e-9)
    assert S.spearman(torch.from_numpy(a), torch.from_numpy(a)).tolist() == pytest.approx([1.0] * 3)
    const = torch.zeros(1, 10)
    assert S.spearman(const, torch.arange(10.0)[None]).item() == 0.0


def test_pointing_game_and_energy_on_hand_made_maps():
    masks = torch.zeros(3, 4, 4, dtype=torch.uint8)
    masks[:, 1:3, 1:3] = 1  # a 2x2 object in the middle
    maps = torch.zeros(3, 4, 4)
    maps[0, 1, 2] = 1.0  # peak inside
    maps[0, 0, 0] = 0.5
    maps[1, 3, 3] = 1.0  # peak outside
    maps[1, 1, 1] = 0.9
    # maps[2] stays zero: argmax is the top-left corner, outside
    assert M.pointing_game(maps, masks).tolist() == [True, False, False]
    energy = M.energy_in_mask(maps, masks)
    assert energy.tolist() == pytest.approx([1 / 1.5, 0.9 / 1.9, 0.0])


def test_bootstrap_ci_contains_the_mean_and_is_seeded():
    rng = np.random.default_rng(1)
    values = rng.normal(3.0, 1.0, 200)
    mean, low, high, n = S.bootstrap_ci(values, seed=0)
    assert n == 200 and mean == pytest.approx(values.mean())
    assert low < mean < high
    assert high - low == pytest.approx(2 * 1.96 / math.sqrt(200), rel=0.25)
    assert S.bootstrap_ci(values, seed=0) == (mean, low, high, n)
    assert S.bootstrap_ci(torch.tensor([0.5])) == (0.5, 0.5, 0.5, 1)
    empty = S.bootstrap_ci([])
    assert empty[3] == 0 and math.isnan(empty[0])


def test_gaussian_blur_keeps_constants_and_smooths():
    x = torch.full((2, 3, 16, 16), 0.7)
    assert torch.allclose(M.gaussian_blur(x), x, atol=1e-6)
    noise = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert M.gaussian_blur(noise).std() < 0.5 * noise.std()
    assert M.perturbation_baseline(noise, "mean").abs().sum() == 0


class _Tiny(nn.Module):
    """A fixed linear classifier: its output depends on every pixel."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3 * 8 * 8, 4)
        with torch.no_grad():
            self.linear.weight.copy_(
                torch.randn(4, 192, generator=torch.Generator().manual_seed(0))
            )

    def forward(self, x):
        return self.linear(x.flatten(1))


def test_perturbation_curves_endpoints_and_chunking():
    model = _Tiny().eval()
    g = torch.Generator().manual_seed(0)
    images = torch.randn(5, 3, 8, 8, generator=g)
    maps = torch.rand(5, 8, 8, generator=g)
    targets = torch.tensor([0, 1, 2, 3, 0])
    c = M.perturbation_curves(model, images, maps, targets, steps=4, baseline="blur")
    with torch.no_grad():
        intact = model(images).softmax(1)[torch.arange(5), targets]
        blurred = model(M.gaussian_blur(images)).softmax(1)[torch.arange(5), targets]
    assert c.fractions.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert c.deletion.shape == c.insertion.shape == (5, 5)
    assert torch.allclose(c.deletion[:, 0], intact) and torch.allclose(c.deletion[:, -1], blurred)
    assert torch.allclose(c.insertion[:, 0], blurred) and torch.allclose(c.insertion[:, -1], intact)
    small = M.perturbation_curves(
        model, images, maps, targets, steps=4, max_batch=1, generator=torch.Generator()
    )
    assert torch.allclose(small.deletion, c.deletion) and torch.allclose(
        small.insertion, c.insertion
    )
    # deleting by the true per-pixel contribution is faster than deleting at random
    contrib = (model.linear.weight[targets].view(5, 3, 8, 8) * images).sum(1)
    best = M.perturbation_curves(model, images, contrib, targets, steps=8, baseline="mean")
    rand = M.perturbation_curves(model, images, maps, targets, steps=8, baseline="mean")
    assert best.deletion_auc.mean() < rand.deletion_auc.mean()


def _reference_curves(model, images, maps, targets, steps, baseline, generator):
    """Deletion and insertion the slow obvious way: every image, every step, one at a time."""
    n, c, h, w = images.shape
    base = M.perturbation_baseline(images, baseline)
    noise = torch.rand(maps.flatten(1).shape, generator=generator)
    deletion = torch.zeros(n, steps + 1)
    insertion = torch.zeros(n, steps + 1)
    with torch.no_grad():
        for i in range(n):
            # most attributed first; equal values in the order of their random noise
            keys = sorted(range(h * w), key=lambda j: (-maps[i].flatten()[j].item(), noise[i, j]))
            for k in range(steps + 1):
                top = torch.zeros(h * w, dtype=torch.bool)
                top[keys[: round(k / steps * h * w)]] = True
                top = top.view(1, h, w)
                for curve, x in (
                    (deletion, torch.where(top, base[i], images[i])),
                    (insertion, torch.where(top, images[i], base[i])),
                ):
                    curve[i, k] = model(x[None]).softmax(1)[0, targets[i]]
    return deletion, insertion


def _small_resnet():
    """A random explainkit ResNet whose batch norms have non-trivial statistics to fold."""
    from tests.helpers import build_model

    torch.manual_seed(0)
    model = build_model("resnet18-s8", num_classes=5, width=4)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


@pytest.mark.parametrize("baseline", ["blur", "mean"])
@pytest.mark.parametrize("steps", [1, 3, 8])
def test_batched_curves_equal_the_one_image_at_a_time_reference(baseline, steps):
    model = _small_resnet()
    g = torch.Generator().manual_seed(steps)
    images = torch.randn(6, 3, 12, 12, generator=g)
    maps = torch.rand(6, 12, 12, generator=g)
    maps[0] = 0.5  # all ties: the order is the seeded noise
    maps[1] = (maps[1] * 4).round()  # many ties
    targets = torch.tensor([0, 1, 2, 3, 4, 0])
    got = M.perturbation_curves(
        model, images, maps, targets, steps=steps, baseline=baseline, max_batch=7,
        generator=torch.Generator().manual_seed(1),
    )  # fmt: skip
    want_del, want_ins = _reference_curves(
        model, images, maps, targets, steps, baseline, torch.Generator().manual_seed(1)
    )
    assert torch.allclose(got.deletion, want_del, atol=1e-5)
    assert torch.allclose(got.insertion, want_ins, atol=1e-5)


def test_inference_model_folds_batch_norms_and_leaves_the_model_alone():
    model = _small_resnet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = M.inference_model(model)
    assert fast is not model and M.inference_model(fast) is fast
    kinds = {type(m) for m in fast.modules()}
    assert nn.BatchNorm2d not in kinds  # folded into the convolutions
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(fast(x), model(x), atol=1e-5)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert model.training is False and any(p.requires_grad for p in model.parameters())
    # a model in training mode, or one fx cannot trace, is used as it is
    assert M.inference_model(model.train()) is model

    class Branchy(nn.Module):
        def forward(self, x):
            return x.flatten(1) if x.sum() > 0 else -x.flatten(1)  # data-dependent

    branchy = Branchy().eval()
    assert M.inference_model(branchy) is branchy


def test_cams_computed_together_give_the_same_sanity_check():
    from explainkit.explain.gradcam import compute_cams

    model = _small_resnet()
    images = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    targets = torch.tensor([0, 1, 2, 3, 4, 0])
    methods = {n: A.attribution_fn(n, layer="layer4") for n in ("gradcam", "gradcampp", "random")}
    calls = []

    def together(net, x, t):
        calls.append(len(x))
        out = compute_cams(net, x, "layer4", ["gradcam", "gradcampp"], target=t)
        return {name: r.maps for name, r in out.items()}

    alone = M.randomization_check(model, images, targets, methods, batch_size=4)
    joint = M.randomization_check(model, images, targets, methods, batch_size=4, together=together)
    assert calls == [4, 2] * len(M.DEFAULT_CASCADE)  # one call per batch and step
    for name in methods:
        assert torch.equal(alone[name].spearman, joint[name].spearman)
        assert torch.equal(alone[name].ssim, joint[name].ssim)
    maps = M.attribute_all(methods, model, images, targets, 4, together)
    assert list(maps) == list(methods)
    assert torch.equal(maps["gradcampp"], A.attribute(methods["gradcampp"], model, images, targets))


def _reference_ssim(a, b, window=11, sigma=1.5):
    """SSIM with the full 2-D Gaussian window, filtered one quantity at a time."""
    x, y = a[:, None].double(), b[:, None].double()
    size = min(window, a.shape[-1], a.shape[-2])
    size -= 1 - size % 2
    r = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    k = torch.exp(-(r**2) / (2 * sigma**2))
    k = (k / k.sum()).double()  # the library's window is made in float32 too
    kernel = (k[:, None] * k[None, :])[None, None]

    def filt(t):
        return torch.nn.functional.conv2d(t, kernel)

    mx, my = filt(x), filt(y)
    sxx, syy, sxy = filt(x * x) - mx**2, filt(y * y) - my**2, filt(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
    return s.mean((1, 2, 3))


def test_ssim_equals_the_two_dimensional_window_reference():
    g = torch.Generator().manual_seed(3)
    for shape in ((5, 32, 32), (3, 9, 14), (2, 4, 4)):
        a, b = torch.rand(*shape, generator=g), torch.rand(*shape, generator=g)
        b = 0.5 * a + 0.5 * b
        assert torch.allclose(M.ssim(a, b), _reference_ssim(a, b), rtol=0, atol=1e-12)


def test_random_map_depends_on_the_image_not_the_model():
    fn = all_methods()["random"]
    g = torch.Generator().manual_seed(0)
    images = torch.randn(3, 3, 8, 8, generator=g)
    a = fn(_Tiny(), images, torch.zeros(3, dtype=torch.long))
    b = fn(nn.Identity(), images, torch.zeros(3, dtype=torch.long))
    assert torch.equal(a, b) and a.shape == (3, 8, 8)
    assert 0 <= a.min() and a.max() < 1
    assert S.spearman(a[0:1], a[1:2]).abs().item() < 0.3  # different images differ


def test_registry_and_defaults():
    methods = all_methods("layer4")
    assert {"gradcam", "gradcampp", "xgradcam", "layercam", "random"} <= set(methods)
    assert set(EM.CAPTUM_METHODS) <= set(methods) or not EM.captum_available()
    assert set(DEFAULT_METHODS.split(",")) <= set(methods)
    with pytest.raises(Exception, match="baseline"):
        M.perturbation_baseline(torch.zeros(1, 3, 4, 4), "noise")


# -- properties on a trained model ---------------------------------------------------------


def test_gradcam_points_at_the_object_more_often_than_random(trained):
    model, images, labels, predicted, masks = trained
    methods = all_methods("layer4")
    hits = {}
    for name in ("gradcam", "random"):
        maps = A.attribute(methods[name], model, images, labels, batch_size=64)
        hits[name] = M.pointing_game(maps, masks).double()
    g, r = (S.bootstrap_ci(hits[k]) for k in ("gradcam", "random"))
    print(f"pointing game: gradcam {g[0]:.3f} [{g[1]:.3f}, {g[2]:.3f}], random {r[0]:.3f}")
    assert g[0] > r[0] + 0.15
    assert g[1] > r[2]  # the intervals do not overlap


def test_gradcam_deletion_auc_below_insertion_auc(trained):
    model, images, labels, predicted, masks = trained
    methods = all_methods("layer4")
    g = torch.Generator().manual_seed(0)
    curves = {}
    for name in ("gradcam", "random"):
        maps = A.attribute(methods[name], model, images, predicted, batch_size=64)
        curves[name] = M.perturbation_curves(
            model, images, maps, predicted, steps=8, max_batch=256, generator=g
        )
    gc, rnd = curves["gradcam"], curves["random"]
    d, i = gc.deletion_auc.mean().item(), gc.insertion_auc.mean().item()
    print(f"gradcam deletion {d:.3f} insertion {i:.3f}; random {rnd.deletion_auc.mean():.3f}")
    assert d < i - 0.15
    assert d < rnd.deletion_auc.mean().item() - 0.05
    assert i > rnd.insertion_auc.mean().item() + 0.05


def test_randomization_changes_gradcam_but_not_the_random_map(trained):
    model, images, labels, predicted, masks = trained
    methods = all_methods("layer4")
    chosen = {k: methods[k] for k in ("gradcam", "random")}
    before = [p.clone() for p in model.parameters()]
    results = M.randomization_check(model, images[:64], predicted[:64], chosen, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    gc = results["gradcam"]
    assert gc.layers == ["linear", "layer4", "layer3", "layer2", "layer1", "conv1+bn1"]
    assert gc.spearman.shape == gc.ssim.shape == (6, 64)
    passed, value, step = M.sanity_verdict(gc)
    print("gradcam spearman per step", gc.spearman.mean(1).tolist())
    assert passed and step == "layer4" and value < 0.5
    assert gc.spearman.mean(1).max() < 0.5 and gc.ssim.mean(1).max() < 0.5  # a large change
    passed, value, _ = M.sanity_verdict(results["random"])
    assert not passed and value == pytest.approx(1.0)
    # same seed, same result
    again = M.randomization_check(model, images[:64], predicted[:64], chosen, seed=0)
    assert torch.equal(again["gradcam"].spearman, gc.spearman)


@pytest.mark.skipif(not EM.captum_available(), reason="captum not installed")
def test_captum_methods_give_normalized_maps(trained):
    model, images, labels, predicted, masks = trained
    methods = all_methods("layer4", ig_steps=4)
    for name in EM.CAPTUM_METHODS:
        if name == "lrp":  # refused on a ResNet: tests/test_perturbation.py
            continue
        maps = methods[name](model, images[:8], predicted[:8])
        assert maps.shape == (8, 32, 32), name
        assert maps.min() >= 0 and maps.max() <= 1 and not maps.requires_grad


def test_the_randomization_cascade_follows_any_models_own_module_tree():
    """Models without explainkit's ResNet names get a cascade from their own modules, from
    the logits down, and the verdict is read once the explained layer is randomized."""
    import torchvision

    from explainkit.explain.metrics import DEFAULT_CASCADE, SANITY_DEPTH, model_cascade
    from tests.helpers import build_model

    ours = build_model("resnet18-s8", num_classes=3, width=8)
    assert model_cascade(ours, "layer3") == ([tuple(g) for g in DEFAULT_CASCADE], SANITY_DEPTH)
    groups, depth = model_cascade(torchvision.models.resnet18(num_classes=3), "layer4")
    assert groups[:3] == [("fc",), ("layer4",), ("layer3",)] and depth == "layer4"
    swin = torchvision.models.swin_t(num_classes=3)
    groups, depth = model_cascade(swin, "features.7")
    assert groups[:4] == [("head",), ("norm",), ("features.7",), ("features.6",)]
    assert depth == "features.7" and groups[-1] == ("features.0",)
    modules = dict(swin.named_modules())
    assert all(name in modules for (name,) in groups)


def test_mprt_equals_quantus(trained):
    """Our cascading randomization equals quantus.MPRT (top-down, Spearman) on the trained
    model, the same maps and the same re-initialized layers: one module per step in Quantus's
    order, reseeded before each as Quantus does (its seed + 1). Tolerance 1e-9 (both rank in
    float64 with averaged ties); a constant map ranks nothing: NaN in Quantus, 0 here."""
    quantus = pytest.importorskip("quantus")
    model, images, _, predicted, _ = trained
    x, y = images[:6], predicted[:6]
    cascade = [
        (n,) for n, m in reversed(list(model.named_modules())) if hasattr(m, "reset_parameters")
    ]
    for name in ("gradcam", "fullgrad"):
        fn = A.attribution_fn(name, layer="layer4")

        def explain(model, inputs, targets, fn=fn, **kwargs):
            maps = fn(model, torch.as_tensor(inputs), torch.as_tensor(targets))
            return maps.detach().numpy()[:, None]

        metric = quantus.MPRT(layer_order="top_down", seed=42, abs=False, normalise=False,
                              disable_warnings=True, display_progressbar=False)  # fmt: skip
        a = explain(model, x, y)
        theirs = metric(model=model, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=a,
                        explain_func=explain, device="cpu")  # fmt: skip
        ours = M.randomization_check(model, x, y, {name: fn}, cascade=cascade, seed=43,
                                     reseed=True)[name]  # fmt: skip
        assert ours.layers == [k for k in theirs if k != "original"]
        q = np.array([theirs[k] for k in ours.layers])
        finite = np.isfinite(q)
        assert finite.mean() > 0.5 and np.allclose(theirs["original"], 1.0)
        assert np.abs(q[finite] - ours.spearman.numpy()[finite]).max() < 1e-9
        assert (ours.spearman.numpy()[~finite] == 0).all()
        assert (q[finite] < 0.9).mean() > 0.5  # randomized layers change the maps: not all 1s
