"""The plugin contract: every hook explainkit calls, with what it passes and expects back.

Plugins implement these with ``@explainkit.hookimpl``. An implementation may accept any subset
of a hook's arguments (pluggy's opt-in arguments), so new arguments can be added later without
breaking existing plugins. docs/plugin-hooks.md documents each hook; a test keeps it in sync.

What the registering hooks expect back is defined here too, so that the plugin manager and
the modules that look names up share one definition without importing each other:
:class:`ModelEntry`, :class:`ModelFamily` and :class:`DatasetEntry` (all public as
``explainkit.ModelEntry`` and so on). Nothing here imports torch
or numpy: an entry holds functions, and those import what they need when called.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pluggy

from explainkit.errors import PluginError

if TYPE_CHECKING:  # pragma: no cover - typing only, keeps this module free of heavy imports
    import click
    from torch import nn

# The contract names the types it hands over (explainkit.Analyzer, explainkit.Dataset) in
# words, not imports: the modules that define them register through it.

__all__ = [
    "RESHAPES",
    "DatasetEntry",
    "ModelEntry",
    "ModelFamily",
    "check_dataset_entry",
    "check_model_item",
    "hookspec",
]

# How a layer's output becomes (N, C, h, w) maps: as it is, ViT tokens (N, 1+h*w, C), or
# channels-last maps (N, h, w, C) as Swin stages output them.
RESHAPES = ("nchw", "vit", "swin")
TASKS = ("classification", "multilabel", "segmentation", "detection", "video")
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,99}$")
FAMILY_PREFIX = re.compile(r"^[a-z][a-z0-9_]{0,29}$")
DATASET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,99}$")


@dataclass(frozen=True)
class ModelEntry:
    """A model explainkit can build, train and explain, registered by name.

    Attributes:
        name: What ``--model`` takes, e.g. ``"resnet18-s8"``: letters, digits and ``_.+-``
            (a family's names are ``PREFIX:NAME``, see :class:`ModelFamily`).
        build: ``build(num_classes: int, **kwargs) -> nn.Module`` returning an untrained
            classifier with random weights (never downloads). explainkit passes ``width``
            (``--width``) and ``image_size`` (``--image-size``) when ``build`` names them as
            parameters, and records what it passed, so the run can rebuild the same model.
        default_layer: The module (a name from ``model.named_modules()``) explained when the
            user names none, or None to let ``explainkit.explain.layers.locate_layer`` pick
            the last spatial layer the logits depend on (when training starts).
        reshape: How ``default_layer``'s output becomes maps: ``"nchw"`` (N, C, H, W),
            ``"vit"`` tokens (N, 1+H*W, C) or ``"swin"`` channels-last (N, H, W, C); None: the
            CAM engine decides from the output's shape.
        input_size: The image side the model expects (its pretrained weights were trained
            at), or None when any size works.
        mean, std: The per-channel normalization the model's pretrained weights expect, in
            [0, 1] units, or None. Used instead of the dataset's own statistics when a run
            starts from such weights (``--weights``).
        summary: One line for ``explainkit plugins``.
        weights: ``weights(name) -> state_dict`` for named pretrained weights (``--weights
            IMAGENET1K_V1``), or None when the model has none. May download; raise OSError
            when it cannot, and KeyError for a name it does not know.
        resize_size: The shorter side images are resized to before the centre
            ``input_size`` square is cropped (torchvision's 256 for 224), or None: resized to
            ``input_size`` itself. What ``explainkit evaluate`` uses by default.
        own_weights: The ``weights`` name meaning "the weights that come with the model"
            (a local ``save_pretrained`` folder's), used by ``evaluate`` when ``--weights``
            is not given; None: ``--weights`` is required.
        task: What the model's outputs answer: ``classification`` (class scores, the
            default), ``multilabel``, ``segmentation`` (per-pixel class scores, the
            background first) or ``detection`` (boxes; ``build`` takes the number of object
            classes and adds any background class the model needs itself). ``explainkit
            evaluate`` evaluates the model on this task unless ``--task`` says otherwise.
    """

    name: str
    build: Callable[..., nn.Module]
    default_layer: str | None = None
    reshape: str | None = None
    input_size: int | None = None
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None
    summary: str = ""
    weights: Callable[[str], Mapping[str, Any]] | None = None
    resize_size: int | None = None
    own_weights: str | None = None
    task: str = "classification"


@dataclass(frozen=True)
class ModelFamily:
    """Many models under one prefix: ``--model PREFIX:NAME`` (``torchvision:resnet50``).

    Attributes:
        prefix: The part before the colon: lowercase letters, digits and ``_``.
        resolve: ``resolve(name) -> ModelEntry`` for the part after the colon; raise KeyError
            for a name the family does not have (explainkit then suggests one of ``names()``),
            or an ExplainkitError saying what is missing (a package not installed).
        names: ``names() -> list[str]``: every name ``resolve`` accepts. Called only to
            suggest a name for a mistyped one, never to list plugins (it may import a lot).
        summary: One line for ``explainkit plugins``.
    """

    prefix: str
    resolve: Callable[[str], ModelEntry]
    names: Callable[[], list[str]]
    summary: str = ""


@dataclass(frozen=True)
class DatasetEntry:
    """A dataset explainkit can train on, registered by name (what ``--dataset`` takes).

    Attributes:
        name: Letters, digits and ``_.+-``.
        load: ``load(split, data_dir, image_size, seed, limit, download) -> Dataset`` with
            ``split`` "train" or "eval", ``data_dir`` ``--data-dir`` (a str or None),
            ``image_size`` the side in pixels, ``limit`` None or how many images to keep,
            ``download`` whether fetching files is allowed; also ``holdout`` (False: the eval
            split of data without one is every image, as ``evaluate`` asks), ``fit`` and
            ``resize`` (how to make squares, :mod:`explainkit.data.fit`). Only the arguments
            ``load`` names are passed (all of them with ``**kwargs``). Returns an
            ``explainkit.data.Dataset``; explainkit checks it, keeps a seeded class-balanced
            ``limit`` of its images and fits images of another size to ``image_size``
            squares.
        summary: One line for ``explainkit plugins``.
    """

    name: str
    load: Callable[..., Any]  # returns an explainkit.Dataset
    summary: str = ""


def _check_text(value: Any, pattern: re.Pattern[str], what: str, plugin: str) -> None:
    if not isinstance(value, str) or not pattern.match(value):
        raise PluginError(
            f"{what} {value!r} of plugin {plugin!r} is not a valid name "
            f"(it must match {pattern.pattern})"
        )


def _check_callable(value: Any, what: str, plugin: str) -> None:
    if not callable(value):
        raise PluginError(f"{what} of plugin {plugin!r} is {value!r}, not a function")


def _check_stats(value: Any, what: str, plugin: str, positive: bool) -> None:
    if value is None:
        return
    ok = isinstance(value, (list, tuple)) and len(value) == 3
    ok = ok and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value
    )
    if not ok or (positive and min(value) <= 0):
        raise PluginError(
            f"{what} of plugin {plugin!r} is {value!r}, not 3 finite numbers"
            + (" above 0" if positive else "")
        )


def check_model_item(item: Any, plugin: str) -> str:
    """The registry key of a ModelEntry (its name) or ModelFamily (``"PREFIX:"``).

    Raises:
        PluginError: ``item`` is neither, or a field breaks the contract (named with the
            plugin).
    """
    if isinstance(item, ModelFamily):
        _check_text(item.prefix, FAMILY_PREFIX, "model family prefix", plugin)
        _check_callable(item.resolve, f"model family {item.prefix!r}: resolve", plugin)
        _check_callable(item.names, f"model family {item.prefix!r}: names", plugin)
        if not isinstance(item.summary, str):
            raise PluginError(f"the summary of model family {item.prefix!r} must be a str")
        return f"{item.prefix}:"
    if isinstance(item, ModelEntry):
        check_model_entry(item, plugin)
        return item.name
    raise PluginError(
        f"plugin {plugin!r} registered {type(item).__name__} {item!r:.60}, not a ModelEntry or "
        "ModelFamily (from explainkit)"
    )


def check_model_entry(entry: ModelEntry, plugin: str) -> None:
    """Raise PluginError naming ``plugin`` when a field of ``entry`` breaks the contract."""
    _check_text(entry.name, MODEL_NAME, "model name", plugin)
    what = f"model {entry.name!r}"
    _check_callable(entry.build, f"{what}: build", plugin)
    if entry.default_layer is not None and (
        not isinstance(entry.default_layer, str) or not entry.default_layer
    ):
        raise PluginError(f"{what} of plugin {plugin!r}: default_layer must be a module name")
    if entry.reshape is not None and entry.reshape not in RESHAPES:
        raise PluginError(
            f"{what} of plugin {plugin!r}: reshape {entry.reshape!r} is not one of "
            f"{', '.join(RESHAPES)}"
        )
    size = entry.input_size
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise PluginError(f"{what} of plugin {plugin!r}: input_size must be a positive int")
    size = entry.resize_size
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise PluginError(f"{what} of plugin {plugin!r}: resize_size must be a positive int")
    _check_stats(entry.mean, f"{what}: mean", plugin, positive=False)
    _check_stats(entry.std, f"{what}: std", plugin, positive=True)
    if entry.weights is not None:
        _check_callable(entry.weights, f"{what}: weights", plugin)
    if not isinstance(entry.summary, str):
        raise PluginError(f"{what} of plugin {plugin!r}: summary must be a str")
    if entry.task not in TASKS:
        raise PluginError(
            f"{what} of plugin {plugin!r}: task {entry.task!r} is not one of {', '.join(TASKS)}"
        )


def check_dataset_entry(item: Any, plugin: str) -> str:
    """The name of a DatasetEntry; PluginError naming ``plugin`` for anything else."""
    if not isinstance(item, DatasetEntry):
        raise PluginError(
            f"plugin {plugin!r} registered {type(item).__name__} {item!r:.60}, not a "
            "DatasetEntry (from explainkit.data)"
        )
    _check_text(item.name, DATASET_NAME, "dataset name", plugin)
    _check_callable(item.load, f"dataset {item.name!r}: load", plugin)
    if not isinstance(item.summary, str):
        raise PluginError(f"the summary of dataset {item.name!r} must be a str")
    return item.name


hookspec = pluggy.HookspecMarker("explainkit")
"""Marker for hook specifications (explainkit's own use)."""


@hookspec
def register_analyzers(register: Callable[[type], None]) -> None:
    """Call ``register(cls)`` once per Analyzer subclass this plugin provides.

    Called once per process when a command needs the analyzer registry (``analyze``,
    ``plugins``), never at import. ``register`` raises PluginError for a class that is not an
    Analyzer subclass, has an invalid name, or reuses a name another plugin registered.
    Import torch and other heavy modules inside ``Analyzer.run``, not at module level, so
    listing plugins stays cheap.

    Args:
        register: Callback taking one Analyzer subclass (the class, not an instance).
    """


@hookspec
def register_commands(cli: click.Group) -> None:
    """Add click commands to the ``explainkit`` group with ``@cli.command()``.

    Called when the CLI resolves a command name it does not know, so plugin commands cost
    nothing until used. Keep heavy imports inside the command body.

    Args:
        cli: The top-level ``explainkit`` click group.
    """


@hookspec(firstresult=True)
def resolve_target_layer(model: Any, analyzer_name: str) -> str | None:
    """Return a dotted name from ``model.named_modules()``, or None to defer.

    Asked by layer-based analyzers (Grad-CAM and friends) when the user gave no layer and the
    run's metadata names none. The first non-None answer wins; the host checks that the name
    exists in the model.

    Args:
        model: The ``torch.nn.Module`` being explained (eval mode).
        analyzer_name: Name of the analyzer asking, e.g. ``"gradcam"``.

    Returns:
        A module name such as ``"layer4"``, or None to let other plugins or the default decide.
    """


@hookspec
def register_models(register: Callable[[ModelEntry | ModelFamily], None]) -> None:
    """Call ``register(entry)`` once per ModelEntry or ModelFamily this plugin provides.

    Called when a command needs the model registry (``train``, loading a run's model,
    ``plugins``), never at import. explainkit's own models are registered through this hook
    too (``explainkit.plugins.default_models``). ``register`` raises PluginError for
    something that is not a ModelEntry or ModelFamily, an invalid name or field, or a name
    (or family prefix) another plugin registered; a plugin whose hook raises contributes no
    models. Keep torch and friends inside ``build`` / ``resolve``: listing plugins must stay
    cheap.

    Args:
        register: Callback taking one ``explainkit.ModelEntry`` (a model,
            ``--model NAME``) or ``ModelFamily`` (many models, ``--model PREFIX:NAME``).
    """


@hookspec
def register_datasets(register: Callable[[DatasetEntry], None]) -> None:
    """Call ``register(entry)`` once per DatasetEntry this plugin provides.

    Called when a command needs the dataset registry (``train``, the ``data`` analyzer,
    ``plugins``), never at import. explainkit's own datasets are registered through this hook
    too (``explainkit.plugins.default_datasets``). ``register`` raises PluginError for
    something that is not a DatasetEntry, an invalid name, or a name another plugin
    registered; a plugin whose hook raises contributes no datasets. Import heavy modules
    inside ``load``.

    Args:
        register: Callback taking one ``explainkit.data.DatasetEntry`` (``--dataset NAME``).
    """
