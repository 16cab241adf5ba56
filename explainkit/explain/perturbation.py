"""Perturbation CAMs: Score-CAM, SS-CAM, IS-CAM, Ablation-CAM, and RISE, masks in large batches.

Gradient CAMs weigh a layer's channels by gradients; these weigh them by what the model does
when the input (Score-CAM family) or the layer (Ablation-CAM) is perturbed one channel at a
time, so they cost one forward pass per (image, channel, sample). pytorch-grad-cam runs those
passes 16 to 32 at a time, one image after another, reading each score back to the CPU. Here
the masks of many images and channels go through the model together, ``max_batch`` at a time,
on a batch-norm-folded copy of the model, and the scores stay on the device until the
weights are formed.

- **Score-CAM** (Wang et al. 2020, arXiv:1910.01279): ``H_k = s(Up(A_k))`` (bilinear upsampling,
  then min-max scaling per channel), ``w = softmax_k(y_c(X * H_k))`` (logits; the paper
  subtracts ``y_c`` of a baseline input, a constant that softmax ignores).
- **SS-CAM** (Wang et al. 2020, arXiv:2006.14255): as Score-CAM with ``H_k + N(0, std^2)``
  noise, the target logit averaged over ``samples`` noisy masks before the softmax.
- **IS-CAM** (Naidu et al. 2020, arXiv:2010.03023): the target logit averaged over inputs
  ``X * c_i H_k`` with ``c_i = sum_{j=1..i} j / N`` for ``i = 1..N`` (the integration path as
  the authors' code and torch-cam run it).
- **Ablation-CAM** (Desai & Ramaswamy 2020, WACV): ``w_k = (y_c - y_c^k) / y_c`` where
  ``y_c^k`` is the target logit with channel ``k`` of the layer set to zero.
- **RISE** (Petsiuk et al. 2018, arXiv:1806.07421): model-agnostic; random binary grids,
  upsampled and randomly shifted, weigh the target probability: ``S = E[p_c(X * M) M] / p``.

Channel pre-selection (``channels=k``): only the ``k`` channels of each image whose activation
maps vary most are perturbed (the rule of Faster Score-CAM; pytorch-grad-cam offers a similar
``ratio_channels_to_ablate``); the others get weight 0. The CAM is then ``relu(sum_k w_k A_k)``
at the layer's resolution, upsampled and scaled to [0, 1] as the gradient engine does.

Targets: a class index (the fast path) or any Target object (a detection, a segmentation
region...), chosen on the intact image and scored on every copy (:mod:`.perturbation_targets`).

Memory bound: one forward pass holds at most ``max_batch`` perturbed inputs (images, or
copies of the layer's output for Ablation-CAM). The upsampled masks of one group of images
(Score-CAM family; SS-CAM keeps its ``samples`` noisy copies) hold at most ``mask_budget``
floats, or one image's masks when those alone are larger. RISE builds ``max_batch`` masks at
a time from low-resolution grids drawn up front.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from explainkit.errors import AnalyzerError
from explainkit.explain.cam_result import CAMResult, normalize_maps
from explainkit.explain.fastmodel import inference_model, memory_format
from explainkit.explain.layers import RESHAPES, Layout, resolve_layout, target_layer
from explainkit.explain.outputs import scores_of
from explainkit.explain.perturbation_targets import (
    Target,
    cut_targets,
    explained_targets,
    output_rows,
    pick_scores,
    resolve_targets,
    varies,
)
from explainkit.explain.target_base import Target as ScoreTarget

__all__ = [
    "PERTURBATION_CLASSES",
    "RISE",
    "AblationCAM",
    "ISCAM",
    "PerturbationCAM",
    "SSCAM",
    "ScoreCAM",
    "compute_perturbation",
    "resolve_targets",
]


class _FastModel:
    """The model's :func:`inference_model` copy, rebuilt when a parameter or buffer changes
    in place (their version counters move: a sanity check re-initializing layers)."""

    def __init__(self) -> None:
        self.key: tuple = ()
        self.model: nn.Module | None = None
        self.format = torch.contiguous_format

    def __call__(self, model: nn.Module) -> nn.Module:
        tensors = [*model.parameters(), *model.buffers()]
        key = (id(model), len(tensors), sum(t._version for t in tensors))
        if key != self.key or self.model is None:
            self.model, self.key = inference_model(model), key
            self.format = memory_format(self.model)
        return self.model

    def run(self, model: nn.Module, inputs: Tensor) -> Any:
        """The fast copy's output as the model returns it (a tensor, a detection list...)."""
        fast = self(model)
        # Channels-last weights but contiguous inputs: measured fastest on the CPU.
        fmt = self.format if inputs.is_cuda else torch.contiguous_format
        return fast(inputs.contiguous(memory_format=fmt))


class _EvalMode:
    """Eval mode and no parameter gradients while explaining; restored after, even on error."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self) -> None:
        self.training = [m for m in self.model.modules() if m.training]
        self.model.eval()

    def __exit__(self, *exc: object) -> None:
        for m in self.training:
            m.training = True


class PerturbationCAM:
    """Shared template: one hooked forward pass for the activations, then ``_weights``.

    Args:
        model: a classifier (its output goes through :func:`scores_of`).
        layer: a dotted name, one of the model's modules, or None (see
            :func:`explainkit.explain.layers.target_layer`).
        reshape: how the layer's output becomes (N, C, h, w) maps (see
            :class:`explainkit.explain.layers.Layout`).
        max_batch: perturbed inputs per forward pass (the memory bound); default 256 on a
            GPU, 64 on the CPU (where larger batches only thrash the caches).
        channels: perturb only this many channels per image, those whose maps vary most;
            None perturbs all.
        mask_budget: floats of upsampled masks held at once (Score-CAM family).
    """

    name = "perturbation"

    def __init__(
        self,
        model: nn.Module,
        layer: str | nn.Module | None = None,
        reshape: str = "auto",
        *,
        max_batch: int | None = None,
        channels: int | None = None,
        mask_budget: int = 1 << 26,
    ) -> None:
        if reshape not in RESHAPES:
            raise AnalyzerError(f"unknown reshape {reshape!r}; use one of {', '.join(RESHAPES)}")
        max_batch = _default_batch(model) if max_batch is None else max_batch
        if max_batch < 1:
            raise AnalyzerError(f"max_batch must be at least 1, got {max_batch}")
        if channels is not None and channels < 1:
            raise AnalyzerError(f"channels must be at least 1 (or None for all), got {channels}")
        self.model, self.reshape = model, reshape
        self.max_batch, self.channels, self.mask_budget = max_batch, channels, mask_budget
        self.layer: str | None = None
        self.module: nn.Module | None = None
        if layer is not None or hasattr(model, "default_target_layer"):
            chosen = target_layer(model, layer)
            self.layer, self.module = chosen.name, chosen.module
        self.layout: Layout | None = None
        self._fast = _FastModel()

    def __enter__(self) -> PerturbationCAM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Nothing stays hooked between calls; kept for the engine's interface."""

    def __call__(
        self, images: Tensor, target: Target = "predicted", true_targets: Any = None
    ) -> CAMResult:
        """Explain one batch; the same contract as the gradient engine's ``CAM.__call__``."""
        images = _precheck(images, self.model)
        size = (int(images.shape[-2]), int(images.shape[-1]))
        if self.module is None:
            chosen = target_layer(self.model, None, images[:1])
            self.layer, self.module = chosen.name, chosen.module
        with _EvalMode(self.model), torch.no_grad():
            model_out, output = self._capture(images, size)
            n = images.shape[0]
            targets, base, result = explained_targets(target, true_targets, model_out, n)
            acts = self.layout.to_nchw(output).float()  # type: ignore[union-attr]
            chosen = _top_channels(acts, self.channels)
            weights = self._weights(images, output, acts, chosen, base, targets)
            raw = F.relu(torch.einsum("nc,nchw->nhw", weights, acts))
            up = F.interpolate(raw[:, None], size=size, mode="bilinear", align_corners=False)
        return CAMResult(normalize_maps(up[:, 0]), raw, *result)

    def _capture(self, images: Tensor, size: tuple[int, int]) -> tuple[Any, Tensor]:
        """The model's output and the layer's, from one hooked forward pass."""
        seen: list[Tensor] = []
        handle = self.module.register_forward_hook(  # type: ignore[union-attr]
            lambda m, i, out: seen.append(out.detach())
        )
        try:
            model_out = self.model(images)
        finally:
            handle.remove()
        if not seen:
            raise AnalyzerError(
                f"layer {self.layer!r} was not used in the forward pass; pick a layer the "
                "model runs"
            )
        self.layout = resolve_layout(seen[0], self.reshape, size, self.layer or "")
        return model_out, seen[0]

    def _weights(
        self,
        images: Tensor,
        output: Tensor,
        acts: Tensor,
        chosen: Tensor,
        base: Tensor,
        targets: Tensor | ScoreTarget,
    ) -> Tensor:
        """Channel weights (N, C); ``chosen`` (N, K) are the channels to perturb, ``base``
        (N,) the intact images' scores, ``targets`` classes (N,) or a fixed Target."""
        raise NotImplementedError

    def _scores(self, inputs: Tensor, targets: Tensor | ScoreTarget, owners: Tensor) -> Tensor:
        """Target scores of perturbed inputs (input ``b`` a copy of image ``owners[b]``), from
        the fast inference copy of the model."""
        return pick_scores(self._fast.run(self.model, inputs), targets, owners)


def _default_batch(model: nn.Module) -> int:
    param = next(model.parameters(), None)
    return 256 if param is not None and param.device.type == "cuda" else 64


def _precheck(images: Tensor, model: nn.Module) -> Tensor:
    if not isinstance(images, Tensor) or images.dim() != 4 or not images.is_floating_point():
        raise AnalyzerError(
            "images must be a float (N, C, H, W) tensor, normalized as for training; got "
            f"{getattr(images, 'dtype', type(images))} {tuple(getattr(images, 'shape', ()))}"
        )
    if images.shape[0] == 0:
        raise AnalyzerError("no images to explain; pass at least one")
    param = next(model.parameters(), None)
    return images.to(param.device) if param is not None else images


def _top_channels(acts: Tensor, k: int | None) -> Tensor:
    """(N, K) channel indices to perturb: all, or the ``k`` whose maps vary most per image."""
    n, c = acts.shape[:2]
    if k is None or k >= c:
        return torch.arange(c, device=acts.device).expand(n, c)
    return acts.flatten(2).var(2, unbiased=False).topk(k, dim=1).indices.sort(1).values


def _scatter(chosen: Tensor, values: Tensor, channels: int, fill: float) -> Tensor:
    """(N, C) with ``values`` (N, K) at the ``chosen`` channels and ``fill`` elsewhere."""
    out = values.new_full((values.shape[0], channels), fill)
    return out.scatter_(1, chosen, values)


class ScoreCAM(PerturbationCAM):
    """Score-CAM: each channel's upsampled, min-max scaled map masks the input; the target
    logits of the masked inputs, softmaxed over channels, are the weights."""

    name = "scorecam"

    def _variants(self, masks: Tensor, generator: torch.Generator | None) -> list[Tensor]:
        """The masks each (image, channel) is scored with; their mean score is the weight."""
        return [masks]

    def _generator(self, device: torch.device) -> torch.Generator | None:
        return None

    # A constant activation map scales to an all-zero mask: the masked input is a black
    # image whatever the channel, so one forward pass of zeros scores all such channels.
    # SS-CAM's noise makes each such mask different, so it scores them one by one.
    _share_blank = True

    def _weights(self, images, output, acts, chosen, base, targets):  # noqa: D102
        n, c = acts.shape[:2]
        k = chosen.shape[1]
        size = images.shape[-2:]
        per_image = k * size.numel() * max(1, self._copies())
        group = max(1, self.mask_budget // per_image)
        generator = self._generator(images.device)
        picked_all = acts.gather(1, chosen[:, :, None, None].expand(-1, -1, *acts.shape[2:]))
        flat = picked_all.flatten(2)
        live = (flat.amax(2) > flat.amin(2)) | (not self._share_blank)  # (N, K)
        blank = None
        if not bool(live.all()):
            blank = self._blank(images, targets)  # (N,)
        scores = []
        for s in range(0, n, group):
            sl = slice(s, s + group)
            masks = _scaled_masks(picked_all[sl], size)  # (G, K, H, W)
            total = torch.zeros(masks.shape[:2], device=images.device)
            variants = self._variants(masks, generator)
            part = cut_targets(targets, sl, n)
            for variant in variants:
                total += self._masked_scores(images[sl], variant, part, live[sl])
            total /= len(variants)
            if blank is not None:
                total = torch.where(live[sl], total, blank[sl, None])
            scores.append(total)
        scores = torch.cat(scores)
        weights = scores.softmax(1)
        if not isinstance(targets, Tensor):
            weights = weights * varies(scores, base)[:, None]
        return _scatter(chosen, weights, c, 0.0)

    def _copies(self) -> int:
        return 1

    def _blank(self, images: Tensor, targets: Tensor | ScoreTarget) -> Tensor:
        """(N,) scores of an all-black input: one pass for classes; a target's per-image data
        (its boxes, its region) makes it one black copy per image."""
        zeros = torch.zeros_like(images[:1])
        if isinstance(targets, Tensor):
            return scores_of(self._fast.run(self.model, zeros)).float()[0].gather(0, targets)
        n, step = images.shape[0], self.max_batch
        return torch.cat([
            self._scores(zeros.expand(min(step, n - s), *zeros.shape[1:]), targets,
                         torch.arange(s, min(s + step, n), device=images.device))
            for s in range(0, n, step)
        ])  # fmt: skip

    def _masked_scores(self, images: Tensor, masks: Tensor, targets: Any, live: Tensor):
        """(G, K) target logits of ``images[g] * masks[g, k]`` where ``live`` (0 elsewhere),
        ``max_batch`` inputs a pass."""
        g, k = masks.shape[:2]
        pairs = live.flatten().nonzero()[:, 0]
        flat = masks.flatten(0, 1)
        owner = torch.arange(g, device=images.device).repeat_interleave(k)
        out = torch.zeros(g * k, device=images.device)
        for s in range(0, pairs.numel(), self.max_batch):
            chunk = pairs[s : s + self.max_batch]
            idx = owner[chunk]
            out[chunk] = self._scores(images[idx] * flat[chunk, None], targets, idx)
        return out.view(g, k)


def _scaled_masks(acts: Tensor, size: Sequence[int]) -> Tensor:
    """(N, K, h, w) activations -> (N, K, H, W) upsampled, each scaled to [0, 1]."""
    n, k = acts.shape[:2]
    up = F.interpolate(acts.flatten(0, 1)[:, None], size=tuple(size), mode="bilinear",
                       align_corners=False).view(n, k, -1)  # fmt: skip
    low, high = up.aminmax(dim=2, keepdim=True)
    return ((up - low) / (high - low).clamp_min(1e-8)).view(n, k, *size)


class SSCAM(ScoreCAM):
    """SS-CAM: Score-CAM with each mask perturbed by ``samples`` draws of Gaussian noise.

    Args:
        samples: noisy masks per channel (torch-cam's default 35).
        std: the noise's standard deviation (torch-cam's default 2.0).
        seed: seed of the noise; None draws from torch's global generator (as torch-cam).
    """

    name = "sscam"
    _share_blank = False

    def __init__(self, *args: Any, samples: int = 35, std: float = 2.0, seed: int | None = 0,
                 **kwargs: Any) -> None:  # fmt: skip
        super().__init__(*args, **kwargs)
        if samples < 1:
            raise AnalyzerError(f"samples must be at least 1, got {samples}")
        self.samples, self.std, self.seed = samples, std, seed

    def _copies(self) -> int:
        return self.samples

    def _generator(self, device: torch.device) -> torch.Generator | None:
        if self.seed is None:
            return None
        return torch.Generator(device=device).manual_seed(self.seed)

    def _variants(self, masks, generator):  # noqa: D102
        return [
            masks + self.std * torch.randn(masks.shape, generator=generator, device=masks.device)
            for _ in range(self.samples)
        ]


class ISCAM(ScoreCAM):
    """IS-CAM: the target logit averaged along ``samples`` growing multiples of each mask."""

    name = "iscam"

    def __init__(self, *args: Any, samples: int = 10, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if samples < 1:
            raise AnalyzerError(f"samples must be at least 1, got {samples}")
        self.samples = samples

    def _variants(self, masks, generator):  # noqa: D102
        coeffs = torch.arange(1, self.samples + 1).cumsum(0) / self.samples
        return [float(c) * masks for c in coeffs]


class AblationCAM(PerturbationCAM):
    """Ablation-CAM: the relative drop of the target logit when a channel is zeroed.

    The ablated copies are made inside the layer's forward hook: the layers before it run once
    per image, and the hook hands the rest of the network ``K`` copies of the layer's output,
    each with one channel zeroed. A model whose later layers also read the input of the
    target layer (a skip around it) cannot take a larger batch there; it then runs each copy
    from the input (as pytorch-grad-cam always does), which gives the same weights.
    """

    name = "ablationcam"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._expand = True

    def _weights(self, images, output, acts, chosen, base, targets):  # noqa: D102
        n, c = acts.shape[:2]
        k = chosen.shape[1]
        base = base[:, None]  # (N, 1)
        axis = 1 if self.layout.kind == "nchw" else -1  # type: ignore[union-attr]
        dropped = torch.empty(n, k, device=base.device)
        per = max(1, self.max_batch // k)  # images per pass when all their copies fit
        step = min(k, self.max_batch)  # channels per pass of one image otherwise
        for s in range(0, n, per):
            for j in range(0, k, step):
                imgs = images[s : s + per]
                ch = chosen[s : s + per, j : j + step]
                owners = torch.arange(s, s + ch.shape[0], device=images.device)
                owners = owners.repeat_interleave(ch.shape[1])
                scores = self._ablated(imgs, ch, axis, targets, owners)
                dropped[s : s + per, j : j + step] = scores.view(ch.shape)
        ratio = (base - dropped) / torch.where(base == 0, 1e-12, base)
        return _scatter(chosen, ratio, c, 0.0)

    def _ablated(
        self, images: Tensor, channels: Tensor, axis: int, targets: Any, owners: Tensor
    ) -> Tensor:
        """Target scores with each of ``channels`` (G, K) zeroed, image by image."""
        g, k = channels.shape
        rows = torch.arange(g * k, device=images.device)
        flat = channels.flatten()

        def hook(module: nn.Module, inputs: Any, out: Tensor) -> Tensor:
            copies = out if out.shape[0] == g * k else out.repeat_interleave(k, 0)
            copies = copies.clone() if copies is out else copies
            if axis == 1:
                copies[rows, flat] = 0
            else:
                copies[rows, ..., flat] = 0
            return copies

        handle = self.module.register_forward_hook(hook)  # type: ignore[union-attr]
        try:
            if self._expand:
                try:
                    out = self.model(images)
                    if output_rows(out) == g * k:
                        return pick_scores(out, targets, owners)
                # A detector's heads or post-processing may refuse a batch its images do not
                # match (IndexError, ...): its copies then run from the input as well.
                except (RuntimeError, IndexError, ValueError, AssertionError):
                    pass
                # Something after the layer reads its input (or its batch size): run copies.
                self._expand = False
            return self._scores(images.repeat_interleave(k, 0), targets, owners)
        finally:
            handle.remove()


class RISE:
    """RISE: the target probability under random masks, weighted by the masks.

    Model-agnostic (no layer). ``masks`` binary grids of ``cells`` x ``cells`` cells, each
    open with probability ``p``, are upsampled bilinearly to ``(cells + 1)`` cell sizes and
    cropped at a random shift (Petsiuk et al. 2018); the same masks serve every image. Grids
    and shifts are drawn up front from ``seed``, so the maps do not depend on ``max_batch``.
    ``raw`` is the saliency at the input's resolution.
    """

    name = "rise"

    def __init__(self, model: nn.Module, layer: Any = None, reshape: str = "auto", *,
                 masks: int = 1000, cells: int = 7, p: float = 0.5, seed: int = 0,
                 max_batch: int | None = None) -> None:  # fmt: skip
        max_batch = _default_batch(model) if max_batch is None else max_batch
        if masks < 1 or cells < 1 or not 0 < p < 1 or max_batch < 1:
            raise AnalyzerError(
                f"RISE needs masks >= 1, cells >= 1, 0 < p < 1 and max_batch >= 1; got "
                f"masks={masks}, cells={cells}, p={p}, max_batch={max_batch}"
            )
        self.model, self.count, self.cells, self.p = model, masks, cells, p
        self.seed, self.max_batch = seed, max_batch
        self.layer = None
        self.layout: Layout | None = None  # the input's own grid, after a call
        self._fast = _FastModel()

    def __enter__(self) -> RISE:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def close(self) -> None:
        """Nothing to release."""

    def __call__(
        self, images: Tensor, target: Target = "predicted", true_targets: Any = None
    ) -> CAMResult:
        """Explain one batch (the gradient engine's contract)."""
        images = _precheck(images, self.model)
        n, _, h, w = images.shape
        self.layout = Layout("nchw", 0, (h, w))
        g = torch.Generator().manual_seed(self.seed)
        grids = (torch.rand(self.count, 1, self.cells, self.cells, generator=g) < self.p).float()
        cell = (math.ceil(h / self.cells), math.ceil(w / self.cells))
        rows = torch.randint(0, cell[0], (self.count,), generator=g)
        shifts = torch.stack([rows, torch.randint(0, cell[1], (self.count,), generator=g)], 1)
        up_size = ((self.cells + 1) * cell[0], (self.cells + 1) * cell[1])
        with _EvalMode(self.model), torch.no_grad():
            targets, _, result = explained_targets(target, true_targets, self.model(images), n)
            saliency = torch.zeros(n, h * w, device=images.device)
            per = max(1, self.max_batch // n)  # masks per pass, all images at once
            for s in range(0, self.count, per):
                m = _rise_masks(grids[s : s + per], shifts[s : s + per], up_size, (h, w))
                m = m.to(images.device)  # (B, H, W)
                inputs = (images[:, None] * m[None, :, None]).flatten(0, 1)
                chunks = range(0, inputs.shape[0], self.max_batch)  # > 1 when n > max_batch
                if isinstance(targets, Tensor):
                    probs = torch.cat([self._probs(inputs[i : i + self.max_batch])
                                       for i in chunks]).view(n, m.shape[0], -1)  # fmt: skip
                    p_t = probs.gather(2, targets[:, None, None].expand(-1, m.shape[0], 1))[..., 0]
                else:  # a Target's own score stands for the probability
                    owners = torch.arange(n, device=images.device).repeat_interleave(m.shape[0])
                    p_t = torch.cat([
                        pick_scores(self._fast.run(self.model, inputs[i : i + self.max_batch]),
                              targets, owners[i : i + self.max_batch])
                        for i in chunks
                    ]).view(n, m.shape[0])  # fmt: skip
                saliency += p_t @ m.flatten(1)
            raw = (saliency / (self.count * self.p)).view(n, h, w)
        return CAMResult(normalize_maps(raw), raw, *result)

    def _probs(self, inputs: Tensor) -> Tensor:
        return scores_of(self._fast.run(self.model, inputs)).float().softmax(1)


def _rise_masks(grids: Tensor, shifts: Tensor, up_size: tuple[int, int], size: tuple[int, int]):
    """(B, H, W) masks: each grid upsampled to ``up_size`` and cropped at its shift."""
    up = F.interpolate(grids, size=up_size, mode="bilinear", align_corners=False)[:, 0]
    h, w = size
    rows = shifts[:, :1] + torch.arange(h)  # (B, H)
    cols = shifts[:, 1:] + torch.arange(w)  # (B, W)
    b = torch.arange(up.shape[0])[:, None, None]
    return up[b, rows[:, :, None], cols[:, None, :]]


PERTURBATION_CLASSES: dict[str, type] = {
    cls.name: cls for cls in (ScoreCAM, SSCAM, ISCAM, AblationCAM, RISE)
}


def compute_perturbation(
    model: nn.Module,
    images: Tensor,
    layer: str | nn.Module | None = None,
    method: str = "scorecam",
    target: Target = "predicted",
    batch_size: int | None = None,
    true_targets: Any = None,
    reshape: str = "auto",
    **options: Any,
) -> CAMResult:
    """Explain ``images`` with one perturbation method, ``batch_size`` images per call.

    Arguments as :func:`explainkit.explain.gradcam.compute_cam`; ``options`` go to the
    method's class (``max_batch``, ``channels``, ``samples``, ``masks``, ...).
    """
    if method not in PERTURBATION_CLASSES:
        raise AnalyzerError(
            f"unknown perturbation method {method!r}; available: {', '.join(PERTURBATION_CLASSES)}"
        )
    if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[0] == 0:
        return PERTURBATION_CLASSES[method](model, layer, reshape, **options)(
            images
        )  # raises the error
    engine = PERTURBATION_CLASSES[method](model, layer, reshape, **options)
    n = images.shape[0]
    step = batch_size or n
    per_image = not isinstance(target, (str, int, ScoreTarget))
    t_all = torch.as_tensor(target) if per_image else None
    true_all = torch.as_tensor(true_targets) if true_targets is not None else None
    results = []
    for s in range(0, n, step):
        sl = slice(s, s + step)
        t = t_all[sl] if t_all is not None else target
        if isinstance(target, ScoreTarget):
            t = target.take(torch.arange(n)[sl])
        results.append(engine(images[sl], t, true_all[sl] if true_all is not None else None))
    return CAMResult.cat(results)
