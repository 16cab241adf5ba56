"""A layer-by-layer model summary, like ``torchsummary``'s table (public API).

``summarize_model`` runs one forward pass on a single image (a batch of 1 zeros on the model's
device, eval mode, no gradients) with forward hooks on the model's leaf modules, and records one
row per call: layer name (from ``named_modules``), type, output shape and parameters. A module
called twice gets a row per call. A module that holds parameters of its own besides children
(``nn.MultiheadAttention``, a ViT's class token on the model itself) is hooked too, and its
row counts only those own parameters, so every parameter of a called module appears in
exactly one row per call.

The totals count each parameter once (shared parameters too), including those of modules the
forward pass never calls. Sizes are in MB of 2**20 bytes at 4 bytes per value (float32), as
``torchsummary`` computes them: the input; the forward/backward pass (the output activations of
every row, twice: once kept for the backward pass, once for their gradients); the parameters;
and their sum.

Example:
    >>> from explainkit.models import build_model
    >>> from explainkit.models.summary import format_table, summarize_model
    >>> summary = summarize_model(build_model("resnet18-s8", 10, 64), (3, 32, 32))
    >>> summary.totals["total_params"]
    11189322
    >>> print(format_table(summary))  # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["BYTES_PER_VALUE", "ModelSummary", "format_table", "summarize_model"]

BYTES_PER_VALUE = 4  # float32
MB = 1024**2
ROOT_NAME = "(model)"  # the row name of the model itself, whose named_modules name is ""


@dataclass
class ModelSummary:
    """The rows and totals of one summary.

    Attributes:
        rows: One dict per module call, in call order: ``layer`` (name), ``type`` (class
            name), ``output_shape`` (list of ints, batch of 1 first; ``[]`` when the output
            holds no tensor), ``params`` and ``trainable`` (the module's own parameters and
            how many of them are trainable).
        totals: ``total_params``, ``trainable_params``, ``non_trainable_params`` (each
            parameter counted once), ``input_size_mb``, ``forward_backward_pass_size_mb``,
            ``params_size_mb``, ``estimated_total_size_mb``.
        input_shape: The shape of one input image, without the batch dimension.
    """

    rows: list[dict[str, Any]] = field(default_factory=list)
    totals: dict[str, Any] = field(default_factory=dict)
    input_shape: tuple[int, ...] = ()


def summarize_model(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    trainable: Collection[str] | None = None,
) -> ModelSummary:
    """Summarize ``model`` on one input of ``input_shape`` (e.g. ``(3, 32, 32)``, no batch).

    The model's training flags are restored afterwards and every hook is removed, also when
    the forward pass raises.

    Args:
        model: Any ``nn.Module`` that takes one tensor.
        input_shape: Shape of one input without the batch dimension, e.g. ``(C, H, W)``.
        trainable: Names (from ``named_parameters``) of the parameters to count as trainable;
            default: those with ``requires_grad``. Pass every name to describe how a model was
            trained when it has since been frozen for inference.

    Returns:
        The rows and totals.

    Raises:
        ValueError: ``input_shape`` is empty or holds a value that is not a positive integer.
    """
    shape = _check_shape(input_shape)
    names = {id(p): n for n, p in model.named_parameters()}
    if trainable is None:
        trained = {id(p) for p in model.parameters() if p.requires_grad}
    else:
        wanted = set(trainable)
        trained = {i for i, n in names.items() if n in wanted}
    rows = _record_calls(model, shape, trained)
    return ModelSummary(rows=rows, totals=_totals(model, shape, rows, trained), input_shape=shape)


def _check_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in input_shape)
        exact = all(int(v) == v for v in input_shape)
    except (TypeError, ValueError):
        shape, exact = (), False
    if not shape or not exact or min(shape) < 1:
        raise ValueError(
            f"input_shape {input_shape!r} is not a shape; pass positive integers without the "
            "batch dimension, e.g. (3, 32, 32)"
        )
    return shape


def _hooked_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Leaf modules, and modules with parameters of their own besides their children."""
    found = []
    for name, module in model.named_modules():
        leaf = next(module.children(), None) is None
        own = next(module.parameters(recurse=False), None) is not None
        if leaf or own:
            found.append((name or ROOT_NAME, module))
    return found


def _record_calls(model: nn.Module, shape: tuple[int, ...], trained: set[int]) -> list[dict]:
    """One forward pass on a batch of 1 zeros; a row per hooked module call."""
    rows: list[dict[str, Any]] = []

    def hook_for(name: str, module: nn.Module) -> Any:
        own = list(module.parameters(recurse=False))
        params = sum(p.numel() for p in own)
        trainable = sum(p.numel() for p in own if id(p) in trained)

        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            tensor = _first_tensor(output)
            rows.append(
                {
                    "layer": name,
                    "type": type(module).__name__,
                    "output_shape": list(tensor.shape) if tensor is not None else [],
                    "params": params,
                    "trainable": trainable,
                }
            )

        return hook

    device, dtype = _device_and_dtype(model)
    modes = {m: m.training for m in model.modules()}
    handles = []
    try:
        for name, module in _hooked_modules(model):
            handles.append(module.register_forward_hook(hook_for(name, module)))
        model.eval()
        with torch.no_grad():
            model(torch.zeros((1, *shape), device=device, dtype=dtype))
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    return rows


def _first_tensor(output: Any) -> torch.Tensor | None:
    """The output itself, or the first tensor in a tuple, list or dict (depth first)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, list | tuple):
        for item in output:
            found = _first_tensor(item)
            if found is not None:
                return found
    return None


def _device_and_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where the input goes: the first parameter's (or buffer's) device and floating dtype."""
    tensors = [*model.parameters(), *model.buffers()]
    device = tensors[0].device if tensors else torch.device("cpu")
    dtype = next((t.dtype for t in tensors if t.is_floating_point()), torch.float32)
    return device, dtype


def _totals(
    model: nn.Module, shape: tuple[int, ...], rows: list[dict], trained: set[int]
) -> dict[str, Any]:
    params = list(model.parameters())  # each shared parameter once
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if id(p) in trained)
    activations = sum(math.prod(r["output_shape"]) for r in rows if r["output_shape"])
    input_mb = math.prod(shape) * BYTES_PER_VALUE / MB
    pass_mb = 2 * activations * BYTES_PER_VALUE / MB
    params_mb = total * BYTES_PER_VALUE / MB
    return {
        "total_params": total,
        "trainable_params": trainable,
        "non_trainable_params": total - trainable,
        "input_size_mb": input_mb,
        "forward_backward_pass_size_mb": pass_mb,
        "params_size_mb": params_mb,
        "estimated_total_size_mb": input_mb + pass_mb + params_mb,
    }


_TOTAL_LINES = (
    ("Total params", "total_params"),
    ("Trainable params", "trainable_params"),
    ("Non-trainable params", "non_trainable_params"),
)
_SIZE_LINES = (
    ("Input size (MB)", "input_size_mb"),
    ("Forward/backward pass size (MB)", "forward_backward_pass_size_mb"),
    ("Params size (MB)", "params_size_mb"),
    ("Estimated total size (MB)", "estimated_total_size_mb"),
)


def format_table(summary: ModelSummary) -> str:
    """The summary as a fixed-width text table, laid out like ``torchsummary``'s."""
    header = ("Layer", "Type", "Output shape", "Param #")
    body = [
        (r["layer"], r["type"], _shape_text(r["output_shape"]), f"{r['params']:,}")
        for r in summary.rows
    ]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        left = "  ".join(c.ljust(w) for c, w in zip(cells[:2], widths[:2], strict=True))
        right = "  ".join(c.rjust(w) for c, w in zip(cells[2:], widths[2:], strict=True))
        return f"{left}  {right}"

    width = len(line(header))
    totals = summary.totals
    lines = ["-" * width, line(header), "=" * width, *(line(row) for row in body), "=" * width]
    lines += [f"{label}: {totals[key]:,}" for label, key in _TOTAL_LINES]
    lines += ["-" * width, f"Input shape: {_shape_text([1, *summary.input_shape])}"]
    lines += [f"{label}: {totals[key]:.2f}" for label, key in _SIZE_LINES]
    lines.append("-" * width)
    return "\n".join(lines) + "\n"


def _shape_text(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(v) for v in shape) + "]" if shape else "-"
