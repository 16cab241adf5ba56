"""Finding a layer worth explaining: the last one whose output still has a spatial extent.

A CAM of a layer whose output is 1x1 is one number stretched over the image: it cannot
localize anything. :func:`locate_layer` runs one example through the model with a forward
hook on every module and picks the last module, in execution order, whose output is an
(N, C, H, W) map larger than 1x1 and on which the logits depend (as torch-cam locates
candidate layers, with the dependence checked by autograd).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["locate_layer"]


def locate_layer(model: nn.Module, example: Tensor) -> str | None:
    """The name of the last spatial (>1x1) layer the logits depend on, or None.

    Args:
        model: A classifier returning (N, C) logits.
        example: One or a few normalized input images (N, C, H, W) on the model's device.
    """
    outputs: list[tuple[str, Tensor]] = []
    handles = []

    def keep(name: str):
        def hook(module: nn.Module, inputs: object, output: object) -> None:
            if isinstance(output, Tensor) and output.dim() == 4 and output.shape[-2:].numel() > 1:
                outputs.append((name, output))

        return hook

    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_hook(keep(name)))
    training = model.training
    try:
        model.eval()
        x = example[:1].detach().clone().requires_grad_(True)
        with torch.inference_mode(False), torch.enable_grad():
            logits = model(x)
            candidates = [(n, o) for n, o in outputs if o.requires_grad]
            if not candidates:
                return None
            grads = torch.autograd.grad(logits.sum(), [o for _, o in candidates], allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
        model.train(training)
    used = [name for (name, _), g in zip(candidates, grads, strict=True) if g is not None]
    return used[-1] if used else None
