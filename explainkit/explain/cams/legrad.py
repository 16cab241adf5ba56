"""LeGrad (Bousselham et al. 2024, arXiv:2404.03214): a vision transformer explained by the
gradient of each block's own class score with respect to that block's attention map.

For each explained block ``l`` with output tokens ``z^l`` and post-softmax attention
``P^l`` (N, heads, queries, keys), the block's score is the model's head applied to its
tokens, ``s^l = head(norm(mean_t z^l_t))`` (the authors' code and torch-cam pool by the mean
over all tokens, the class token included), and

    ``map^l = mean_{heads, queries} relu(d s^l_c / d P^l)`` over the patch keys,
    ``map = mean_l map^l`` on the patch grid, upsampled and scaled to [0, 1].

The attention values themselves are not multiplied in. torch-cam's ``LeGrad`` computes the
same (test: tests/test_cam_methods_more.py).

Why one backward pass serves every block: each attention map is recomputed from the block's
inputs as a leaf, and each block hands the next a detached copy of its tokens, so ``s^l``
depends on ``P^l`` only through block ``l``; the gradient of ``sum_l s^l`` with respect to
every ``P^l`` is then each block's own ``d s^l / d P^l``, and backward stops at the blocks.

Blocks: torchvision's ``EncoderBlock`` (``self_attention``, a batch-first
``nn.MultiheadAttention``) and timm's ``Block`` (``attn`` with ``qkv``); the head:
torchvision's ``encoder.ln`` and ``heads``, timm's ``norm``, ``fc_norm`` and ``head``.
The layer argument names the first block explained (or a module inside it): that block and
every later one are averaged (torch-cam's example takes the last four of ViT-B/16).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from explainkit.errors import AnalyzerError
from explainkit.explain.cam_result import CAMResult, normalize_maps
from explainkit.explain.cams.base import CAM, logits_and_predicted, target_classes
from explainkit.explain.layers import RESHAPES, Layout, resolve_layout
from explainkit.explain.targets import ClassLogit, Target

__all__ = ["LeGrad", "attention_blocks", "vit_head"]

NO_VIT = (
    "legrad explains vision transformers (torchvision's VisionTransformer or a timm ViT) "
    "through their attention maps; this model has {}; use another method"
)


def _attention(block: nn.Module) -> nn.Module | None:
    attn = getattr(block, "self_attention", None)
    if isinstance(attn, nn.MultiheadAttention):
        return attn
    attn = getattr(block, "attn", None)
    if attn is not None and all(hasattr(attn, a) for a in ("qkv", "num_heads", "scale", "proj")):
        return attn
    return None


def attention_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The (name, block) of each transformer block LeGrad can read, in the model's order."""
    return [(n, m) for n, m in model.named_modules() if _attention(m) is not None]


def vit_head(model: nn.Module) -> Callable[[Tensor], Tensor] | None:
    """The function from a block's (N, T, C) tokens to class logits, or None when unknown."""
    encoder = getattr(model, "encoder", None)
    if isinstance(getattr(encoder, "ln", None), nn.Module) and isinstance(
        getattr(model, "heads", None), nn.Module
    ):
        return lambda z: model.heads(encoder.ln(z.mean(1)))
    if all(isinstance(getattr(model, a, None), nn.Module) for a in ("norm", "head")):
        fc_norm = getattr(model, "fc_norm", None) or nn.Identity()
        return lambda z: model.head(fc_norm(model.norm(z.mean(1))))
    return None


class LeGrad(CAM):
    """LeGrad: positive gradients of each block's class score with respect to its attention,
    averaged over heads, queries and blocks. Explains classifier classes (logits), through
    its own pass."""

    name = "legrad"
    own_pass = True
    head: Callable[[Tensor], Tensor] | None = None  # None: :func:`vit_head` of the model

    def __init__(
        self, model: nn.Module, layer: str | nn.Module | None = None, reshape: str = "auto"
    ) -> None:
        if reshape not in RESHAPES:
            raise AnalyzerError(f"unknown reshape {reshape!r}; use one of {', '.join(RESHAPES)}")
        super().__init__(model, None, "auto")
        blocks = attention_blocks(model)
        if not blocks:
            raise AnalyzerError(NO_VIT.format("no attention blocks"))
        if layer is not None:
            name = layer if isinstance(layer, str) else _name_of(model, layer)
            first = [i for i, (n, _) in enumerate(blocks) if _within(name, n) or _within(n, name)]
            if not first:
                raise AnalyzerError(
                    f"legrad starts at a transformer block; layer {name!r} is in none of "
                    f"{blocks[0][0]!r} ... {blocks[-1][0]!r}: name one of them or a module inside"
                )
            blocks = blocks[first[0] :]
        self._blocks = blocks
        self.layer = blocks[0][0]
        self.module = None
        self._attn: list[Tensor] = []
        self._layer_scores: list[Tensor] = []
        self._tokens: Tensor | None = None

    def _explain(self, images: Tensor, target: Target, methods: Sequence[CAM]) -> list[CAMResult]:
        if list(methods) != [self]:
            raise AnalyzerError("legrad explains through its own pass; compute it alone")
        head = self.head or vit_head(self.model)
        if head is None:
            raise AnalyzerError(NO_VIT.format("no head LeGrad knows (encoder.ln and heads, or "
                                              "norm and head)"))  # fmt: skip
        if not isinstance(target, ClassLogit):
            raise AnalyzerError(
                "legrad explains a classifier's class logits (each block's score comes from the "
                f"classifier head), not a {type(target).__name__} target; use another method"
            )
        images = self._precheck(images)
        n, self._size = images.shape[0], tuple(int(s) for s in images.shape[2:])
        self._attn, self._layer_scores, self._tokens = [], [], None
        with self._frozen():
            for _, block in self._blocks:
                self._handles.append(
                    _attention(block).register_forward_hook(self._recompute, with_kwargs=True)
                )
                self._handles.append(block.register_forward_hook(self._score(head)))
            with torch.inference_mode(False), torch.enable_grad():
                output = self.model(images)
                classes = target_classes(target, output, n, True).to(images.device)
                fixed = ClassLogit(classes)
                objective = torch.stack(
                    [(s * fixed.objective(s)[1]).sum() for s in self._layer_scores]
                ).sum()
                grads = torch.autograd.grad(objective, self._attn, allow_unused=True)
            with torch.no_grad():
                layout = resolve_layout(self._tokens, "vit", self._size[-2:], self.layer)
                maps = [
                    torch.zeros_like(a[:, 0, 0]) if g is None else F.relu(g).mean((1, 2))
                    for a, g in zip(self._attn, grads, strict=True)
                ]
                relevance = torch.stack(maps).mean(0)[:, layout.leading :].float()
                raw = relevance.unflatten(1, layout.grid)
                up = F.interpolate(raw[:, None], size=self._size[-2:], mode="bilinear",
                                   align_corners=False)[:, 0]  # fmt: skip
                scores = fixed.scores(output).detach()
        self.layout = Layout("vit", layout.leading, layout.grid)
        self._attn, self._layer_scores, self._tokens = [], [], None
        logits, predicted = logits_and_predicted(output, scores, n)
        return [CAMResult(normalize_maps(up), raw, classes, predicted, logits, scores)]

    def _score(self, head: Callable[[Tensor], Tensor]) -> Callable[..., Tensor]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> Tensor:
            if not isinstance(output, Tensor) or output.dim() != 3:
                raise AnalyzerError(
                    f"legrad needs blocks that return (N, tokens, C) tokens; a block returned "
                    f"{type(output).__name__} {tuple(getattr(output, 'shape', ()))}"
                )
            self._layer_scores.append(head(output))
            self._tokens = output.detach()
            return output.detach()  # the next block's score does not reach this attention

        return hook

    def _recompute(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        """The attention's output again, from an attention map kept as a leaf."""
        x = args[0] if args else kwargs.get("query", kwargs.get("x"))
        if isinstance(module, nn.MultiheadAttention):
            if not module.batch_first or module.in_proj_weight is None:
                raise AnalyzerError("legrad needs batch-first attention with one in-projection")
            heads = module.num_heads
            q, k, v = F.linear(x, module.in_proj_weight, module.in_proj_bias).chunk(3, -1)
            q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))
            with torch.no_grad():
                attn = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(-1)
            leaf = attn.requires_grad_(True)
            out = module.out_proj((leaf @ v).transpose(1, 2).flatten(2))
            self._attn.append(leaf)
            return out, None
        b, t, _ = x.shape
        qkv = module.qkv(x).reshape(b, t, 3, module.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = module.q_norm(q), module.k_norm(k)
        with torch.no_grad():
            attn = ((q * module.scale) @ k.transpose(-2, -1)).softmax(-1)
        leaf = attn.requires_grad_(True)
        out = module.norm((leaf @ v).transpose(1, 2).flatten(2))
        gate = getattr(module, "gate", None)
        if gate is not None:
            out = out * gate(x).sigmoid()
        self._attn.append(leaf)
        return module.proj_drop(module.proj(out))


def _within(name: str, parent: str) -> bool:
    return parent == "" or name == parent or name.startswith(parent + ".")


def _name_of(model: nn.Module, module: nn.Module) -> str:
    for name, m in model.named_modules():
        if m is module:
            return name
    raise AnalyzerError("the layer given is not a module of the model")
