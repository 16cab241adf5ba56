"""Is an explanation true? Faithfulness, sanity and localization metrics, batched in torch.

Every metric works on whole batches on the model's device; only per-image scores (a few
numbers per image) travel to the CPU, once, for the bootstrap confidence intervals.

- **Deletion / insertion** (Petsiuk et al. 2018, RISE, arXiv:1806.07421): remove (or add) the
  most-attributed pixels in ``K`` steps and watch the target class's probability. A faithful
  map makes the deletion curve fall fast (low AUC) and the insertion curve rise fast (high AUC).
- **Model-parameter randomization** (Adebayo et al. 2018, "Sanity Checks for Saliency Maps",
  arXiv:1810.03292): re-initialize layers cascading from the top and compare the maps with the
  original ones (Spearman rank correlation, SSIM). Maps that do not change do not explain the
  model.
- **Localization** with ground-truth masks: the pointing game (Zhang et al. 2016/2018,
  arXiv:1608.00507) and the share of attribution energy inside the mask (Wang et al. 2020,
  Score-CAM, arXiv:1910.01279).

Attribution methods come from :mod:`explainkit.explain.attribution` as functions
``fn(model, images, targets) -> (N, H, W)`` maps scaled per image to [0, 1], so every metric
treats native CAMs, Captum methods and the random baseline alike; rank statistics and
confidence intervals come from :mod:`explainkit.explain.stats`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from explainkit.errors import AnalyzerError
from explainkit.explain.attribution import AttributionFn, attribute
from explainkit.explain.fastmodel import inference_model
from explainkit.explain.fastmodel import memory_format as _memory_format
from explainkit.explain.gradcam import normalize_maps
from explainkit.explain.outputs import scores_of
from explainkit.explain.stats import spearman

__all__ = [
    "BASELINES",
    "DEFAULT_CASCADE",
    "model_cascade",
    "SANITY_DEPTH",
    "SANITY_THRESHOLD",
    "PerturbationCurves",
    "SanityResult",
    "JointAttributionFn",
    "attribute_all",
    "auc",
    "energy_in_mask",
    "gaussian_blur",
    "inference_model",
    "perturbation_baseline",
    "curves_of",
    "perturbation_curves",
    "pointing_game",
    "randomization_check",
    "sanity_verdict",
    "ssim",
]

BASELINES = ("blur", "mean")
# Cascading randomization order: from the logits down to the stem (Adebayo et al. 2018).
DEFAULT_CASCADE: tuple[tuple[str, ...], ...] = (
    ("linear",),
    ("layer4",),
    ("layer3",),
    ("layer2",),
    ("layer1",),
    ("conv1", "bn1"),
)
# A method fails the sanity check when, with the layers down to SANITY_DEPTH re-initialized
# (for a ResNet: the classifier and the last stage), its maps still correlate with the
# trained model's maps by a mean Spearman rank correlation above SANITY_THRESHOLD.
SANITY_DEPTH = "layer4"
SANITY_THRESHOLD = 0.5


# -- deletion / insertion ------------------------------------------------------------------


def _gaussian_kernel(sigma: float, size: int, device: torch.device) -> Tensor:
    x = torch.arange(size, device=device, dtype=torch.float32) - (size - 1) / 2
    k = torch.exp(-(x**2) / (2 * sigma**2))
    return k / k.sum()


def gaussian_blur(images: Tensor, sigma: float | None = None) -> Tensor:
    """Separable Gaussian blur of (N, C, H, W), reflect-padded.

    The default sigma is an eighth of the image side (4 px at 32 px), strong enough to erase
    the object's shape but keep its colours, as RISE's blurred baseline does at 224 px.
    """
    n, c, h, w = images.shape
    sigma = sigma if sigma is not None else max(1.0, min(h, w) / 8)
    size = min(2 * int(math.ceil(2 * sigma)) + 1, 2 * min(h, w) - 1)
    size -= 1 - size % 2  # keep it odd
    k = _gaussian_kernel(sigma, size, images.device).to(images.dtype)
    pad = size // 2
    x = images.reshape(n * c, 1, h, w)
    x = F.conv2d(F.pad(x, (pad, pad, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, pad, pad), mode="reflect"), k.view(1, 1, -1, 1))
    return x.reshape(n, c, h, w)


def perturbation_baseline(images: Tensor, kind: str = "blur") -> Tensor:
    """What removed pixels become: the blurred image, or the dataset mean (0 once normalized)."""
    if kind == "blur":
        return gaussian_blur(images)
    if kind == "mean":
        return torch.zeros_like(images)
    raise AnalyzerError(
        f"unknown perturbation baseline {kind!r}; use one of {', '.join(BASELINES)}"
    )


@dataclass
class PerturbationCurves:
    """Target-class probabilities along deletion and insertion, on the device.

    Attributes:
        fractions: (K+1,) fraction of pixels removed (deletion) or added (insertion).
        deletion: (N, K+1) probabilities; column 0 is the intact image.
        insertion: (N, K+1) probabilities; column 0 is the baseline image.
    """

    fractions: Tensor
    deletion: Tensor
    insertion: Tensor

    @property
    def deletion_auc(self) -> Tensor:
        return auc(self.deletion, self.fractions)

    @property
    def insertion_auc(self) -> Tensor:
        return auc(self.insertion, self.fractions)


def auc(curves: Tensor, fractions: Tensor | None = None) -> Tensor:
    """Area under (N, K+1) curves by the trapezoid rule over ``fractions`` (default 0..1)."""
    if fractions is None:
        fractions = torch.linspace(0, 1, curves.shape[-1], device=curves.device)
    return torch.trapezoid(curves, fractions.to(curves.device, curves.dtype), dim=-1)


def _pixel_ranks(maps: Tensor, generator: torch.Generator | None) -> Tensor:
    """(N, H*W) rank of each pixel, 0 = most attributed; ties in random (seeded) order."""
    flat = maps.flatten(1)
    noise = torch.rand(flat.shape, generator=generator).to(flat.device)
    shuffle = noise.argsort(1)
    order = flat.gather(1, shuffle).argsort(dim=1, descending=True, stable=True)
    order = shuffle.gather(1, order)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return ranks


@torch.no_grad()
def perturbation_curves(
    model: nn.Module,
    images: Tensor,
    maps: Tensor,
    targets: Tensor,
    *,
    steps: int = 16,
    baseline: str = "blur",
    max_batch: int = 512,
    generator: torch.Generator | None = None,
) -> PerturbationCurves:
    """Deletion and insertion curves of ``maps`` (Petsiuk et al. 2018).

    Pixels are ordered by attribution (ties in seeded random order). At step ``k`` of
    ``steps`` the top ``round(k / steps * H * W)`` pixels are replaced by the baseline
    (deletion) or copied onto the baseline (insertion), all channels at once. Both curves
    start or end at the intact image and at the baseline image, so each image has ``2 * steps``
    distinct versions; those of a chunk of images are built as one tensor and classified in one
    forward pass of at most ``max_batch`` images by :func:`inference_model` (pass its result as
    ``model`` to build it once for several calls).

    Args:
        model: classifier in eval mode returning logits.
        images: (N, C, H, W) normalized images on the model's device.
        maps: (N, H, W) attributions (any scale; only the order matters).
        targets: (N,) class whose softmax probability is tracked.
        steps: number of steps ``K``.
        baseline: ``"blur"`` or ``"mean"`` (see :func:`perturbation_baseline`).
        max_batch: largest batch of perturbed images per forward pass.
        generator: CPU generator for tie-breaking (seeded for reproducibility).
    """
    targets = targets.to(images.device)

    def probability(outputs: Any, rows: Tensor) -> Tensor:
        p = scores_of(outputs).float().softmax(1)
        return p.gather(1, targets[rows.to(targets.device)][:, None])[:, 0]

    return curves_of(model, images, maps, probability, steps, baseline, max_batch, generator)


def curves_of(
    model: nn.Module,
    images: Tensor,
    maps: Tensor,
    score: Callable[[Any, Tensor], Tensor],
    steps: int = 16,
    baseline: str = "blur",
    max_batch: int = 512,
    generator: torch.Generator | None = None,
) -> PerturbationCurves:
    """Deletion and insertion curves of any score: ``score(outputs, rows)`` reads one number
    per perturbed image from the model's outputs, ``rows`` the image each came from (see
    :func:`perturbation_curves`, which tracks a class's softmax probability)."""
    if steps < 1:
        raise AnalyzerError(f"steps must be at least 1, got {steps}")
    n, c, h, w = images.shape
    if maps.shape != (n, h, w):
        raise AnalyzerError(f"maps must be (N, H, W) = {(n, h, w)}; got {tuple(maps.shape)}")
    device = images.device
    model = inference_model(model)
    base = perturbation_baseline(images, baseline)
    ranks = _pixel_ranks(maps, generator)  # (N, HW)
    counts = torch.round(torch.linspace(0, h * w, steps + 1, device=device)).long()
    inner = counts[1:-1]  # steps 0 and K are the intact and the baseline image
    versions = 2 * steps  # intact, baseline, then K-1 deletion and K-1 insertion steps
    per_chunk = max(1, max_batch // versions)
    fmt = _memory_format(model)
    scores = []
    for s in range(0, n, per_chunk):
        x, b, r = (v[s : s + per_chunk] for v in (images, base, ranks))
        m = x.shape[0]
        top = (r[:, None, :] < inner[None, :, None]).view(m, steps - 1, 1, h, w)
        deleted = torch.where(top, b[:, None], x[:, None])
        inserted = torch.where(top, x[:, None], b[:, None])
        batch = torch.cat([x[:, None], b[:, None], deleted, inserted], 1)
        batch = batch.reshape(m * versions, c, h, w).contiguous(memory_format=fmt)
        rows = torch.arange(s, s + m).repeat_interleave(versions)
        scores.append(score(model(batch), rows).float().view(m, versions))
    p = torch.cat(scores)
    intact, blank = p[:, :1], p[:, 1:2]
    deletion = torch.cat([intact, p[:, 2 : steps + 1], blank], 1)
    insertion = torch.cat([blank, p[:, steps + 1 :], intact], 1)
    return PerturbationCurves(counts.float() / (h * w), deletion, insertion)


# -- comparing maps ------------------------------------------------------------------------


def ssim(
    a: Tensor, b: Tensor, *, window: int = 11, sigma: float = 1.5, data_range: float = 1.0
) -> Tensor:
    """Structural similarity (Wang et al. 2004) per image of (N, H, W) maps, Gaussian window.

    Uses valid (unpadded) filtering, ``C1 = (0.01 R)^2``, ``C2 = (0.03 R)^2``; the window
    shrinks (odd) to fit small maps. Identical maps give exactly 1 up to rounding.
    """
    n = a.shape[0]
    x, y = a[:, None].double(), b[:, None].double()
    size = min(window, a.shape[-1], a.shape[-2])
    size -= 1 - size % 2
    k1 = _gaussian_kernel(sigma, size, a.device).double()
    # The 2-D Gaussian window is separable: one pass along rows, one along columns, over all
    # five filtered quantities at once.
    stack = torch.cat([x, y, x * x, y * y, x * y])
    stack = F.conv2d(F.conv2d(stack, k1.view(1, 1, 1, -1)), k1.view(1, 1, -1, 1))
    mx, my, fxx, fyy, fxy = stack.split(n)
    sxx = fxx - mx**2
    syy = fyy - my**2
    sxy = fxy - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
    return s.mean((1, 2, 3))


# -- sanity check --------------------------------------------------------------------------


@dataclass
class SanityResult:
    """Similarity of one method's maps to the trained model's maps, per randomization depth.

    Attributes:
        layers: the cascade: entry ``i`` names the group randomized at step ``i`` (all groups
            before it stay randomized).
        spearman: (steps, N) rank correlation with the original maps.
        ssim: (steps, N) SSIM with the original maps.
    """

    layers: list[str]
    spearman: Tensor
    ssim: Tensor


def _reinit(module: nn.Module) -> None:
    for m in module.modules():
        reset = getattr(m, "reset_parameters", None)
        if callable(reset):
            reset()
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()


def model_cascade(model: nn.Module, layer: str) -> tuple[list[tuple[str, ...]], str]:
    """The randomization cascade of ``model`` (groups of module names, from the logits down)
    and the group after which the sanity verdict is read: the one holding ``layer``.

    explainkit's ResNets keep :data:`DEFAULT_CASCADE` and :data:`SANITY_DEPTH`. Any other
    model is split along its own module tree: its parameterized top-level modules in reverse
    order, the one holding ``layer`` split again into its children, down to ``layer`` (for a
    torchvision Swin and ``features.7``: the head, the norm, then each stage from the last;
    the verdict is read once ``layer`` is randomized).
    """
    modules = dict(model.named_modules())
    if all(name in modules for name in ("linear", SANITY_DEPTH)):
        return [tuple(g) for g in DEFAULT_CASCADE], SANITY_DEPTH
    groups, depth = _cascade_below(model, "", layer)
    if not groups:
        raise AnalyzerError("the model has no modules with parameters to randomize")
    return groups, depth or groups[0][0]


def _cascade_below(parent: nn.Module, prefix: str, layer: str) -> tuple[list[tuple[str]], str]:
    """``parent``'s parameterized children from the last, the one holding ``layer`` split
    again while ``layer`` lies below it; and the group that is or holds ``layer``."""
    children = [
        (prefix + name, child)
        for name, child in parent.named_children()
        if next(child.parameters(), None) is not None
    ]
    groups: list[tuple[str]] = []
    depth = ""
    for name, child in reversed(children):
        holds = layer == name or layer.startswith(name + ".")
        if holds and layer != name:
            below, depth = _cascade_below(child, name + ".", layer)
            groups += below
            continue
        groups.append((name,))
        depth = name if holds else depth
    return groups, depth


JointAttributionFn = Callable[[nn.Module, Tensor, Tensor], dict[str, Tensor]]


def attribute_all(
    methods: Mapping[str, AttributionFn],
    model: nn.Module,
    images: Tensor,
    targets: Tensor,
    batch_size: int = 64,
    together: JointAttributionFn | None = None,
) -> dict[str, Tensor]:
    """Every method's maps (N, H, W), ``batch_size`` images at a time; the methods that
    ``together`` returns come from its one call per batch, the others one by one."""
    joint: dict[str, list[Tensor]] = {}
    if together is not None:
        targets = targets.to(images.device)
        for s in range(0, images.shape[0], batch_size):
            sl = slice(s, s + batch_size)
            for name, maps in together(model, images[sl], targets[sl]).items():
                joint.setdefault(name, []).append(maps)
    return {
        name: torch.cat(joint[name])
        if name in joint
        else attribute(fn, model, images, targets, batch_size)
        for name, fn in methods.items()
    }


def randomization_check(
    model: nn.Module,
    images: Tensor,
    targets: Tensor,
    methods: Mapping[str, AttributionFn],
    *,
    cascade: Sequence[Sequence[str]] = DEFAULT_CASCADE,
    batch_size: int = 64,
    seed: int = 0,
    original: Mapping[str, Tensor] | None = None,
    together: JointAttributionFn | None = None,
    reseed: bool = False,
) -> dict[str, SanityResult]:
    """Cascading model-parameter randomization (Adebayo et al. 2018).

    A deep copy of ``model`` is re-initialized group by group from the top (each group's
    modules get their ``reset_parameters``, batch norms also fresh running statistics, from a
    seeded RNG that leaves the global one untouched); after each step every method's maps are
    recomputed for the same images and targets and compared with the original maps.

    Args:
        model: the trained model (left unchanged).
        images, targets: what to explain; targets stay fixed across steps.
        methods: name -> attribution function.
        cascade: groups of module names, top first; names the model lacks are skipped.
        batch_size: images per attribution call.
        seed: seed of the re-initialization.
        original: precomputed maps of the trained model per method (computed when missing).
        together: computes several methods' maps at once (native CAMs of one layer share
            their forward and backward pass: :func:`explainkit.explain.gradcam.compute_cams`);
            the methods it returns are not computed one by one.
        reseed: seed the RNG with ``seed`` again before each group, so that a group's new
            weights do not depend on the groups randomized before it. Quantus's ``MPRT``
            does this (with its ``seed + 1``); with one module per group in its order, the
            values equal its (tests/test_metrics.py).
    """
    modules = dict(model.named_modules())
    groups = [[name for name in group if name in modules] for group in cascade]
    steps = [g for g in groups if g]
    if not steps:
        raise AnalyzerError(
            "none of the layers to randomize exist in this model "
            f"({', '.join('+'.join(g) for g in cascade)}); pass cascade= with its module names"
        )
    original = dict(original or {})
    for name, fn in methods.items():
        if name not in original:
            original[name] = attribute(fn, model, images, targets, batch_size)
    rand = copy.deepcopy(model).eval()
    rmods = dict(rand.named_modules())
    device = next(rand.parameters()).device
    spear: dict[str, list[Tensor]] = {name: [] for name in methods}
    sims: dict[str, list[Tensor]] = {name: [] for name in methods}
    fork = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork):
        torch.manual_seed(seed)
        for group in steps:
            if reseed:
                torch.manual_seed(seed)
            for name in group:
                _reinit(rmods[name])
            for p in rand.parameters():
                p.requires_grad_(False)
            for name, maps in attribute_all(
                methods, rand, images, targets, batch_size, together
            ).items():
                spear[name].append(spearman(original[name], maps))
                sims[name].append(ssim(normalize_maps(original[name]), normalize_maps(maps)))
    labels = ["+".join(g) for g in steps]
    return {
        name: SanityResult(labels, torch.stack(spear[name]), torch.stack(sims[name]))
        for name in methods
    }


def sanity_verdict(
    result: SanityResult, depth: str = SANITY_DEPTH, threshold: float = SANITY_THRESHOLD
) -> tuple[bool, float, str]:
    """Pass/fail of one method: mean Spearman at ``depth`` must not exceed ``threshold``.

    Returns:
        ``(passed, mean correlation at that depth, label of the step used)``. When ``depth``
        is not in the cascade, the last step is used.
    """
    index = next((i for i, g in enumerate(result.layers) if depth in g.split("+")), -1)
    value = float(result.spearman[index].mean())
    return value <= threshold, value, result.layers[index]


# -- localization --------------------------------------------------------------------------


def pointing_game(maps: Tensor, masks: Tensor) -> Tensor:
    """(N,) bool: whether each map's maximum lies inside the object mask.

    Exact argmax, no tolerance (Zhang et al. allow 15 px at 224 px, about 2 px at 32 px;
    we keep it exact so small images are not judged leniently). Ties go to the first pixel
    in raster order, so an all-zero map points at the top-left corner.
    """
    flat = maps.flatten(1).argmax(1)
    return masks.flatten(1).gather(1, flat[:, None].to(masks.device))[:, 0] > 0


def energy_in_mask(maps: Tensor, masks: Tensor) -> Tensor:
    """(N,) share of attribution energy inside the mask, ``sum(map * mask) / sum(map)``.

    Maps must be non-negative (ours are in [0, 1]); an all-zero map scores 0.
    """
    m = maps.flatten(1).double()
    inside = (m * (masks.flatten(1).to(m.device) > 0)).sum(1)
    total = m.sum(1)
    return torch.where(total > 0, inside / total.clamp_min(1e-300), 0.0)
