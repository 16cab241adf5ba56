"""Every model explainkit can train and explain, by name: the registry fed by plugins.

Plugins register models through the ``register_models`` hook, explainkit's own among them
(``explainkit.plugins.models``): a :class:`ModelEntry` is one model (``--model resnet18``),
a :class:`ModelFamily` many under a prefix (``--model torchvision:resnet50``,
``--model timm:convnext_tiny``). Look a name up with :func:`model_entry` and build it with
:func:`build_model`::

    from explainkit.models.registry import build_model, model_entry

    entry = model_entry("torchvision:resnet18")  # default_layer "layer4", reshape "nchw"
    model = build_model("torchvision:resnet18", num_classes=10)
    small = build_model("resnet18-s8", num_classes=10, width=16)

A run records how to rebuild its model (:func:`model_spec`): the registered name (``arch``)
and the keyword arguments its ``build`` was given (``kwargs``, e.g. ``{"width": 64}``). A
module no plugin registered is recorded by import path, ``import:package.module:factory``
(the built-in ``import`` family; a bare ``package.module:factory`` means the same).

Importing this module imports no torch; building a model does.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from explainkit.config import ConfigError, brief
from explainkit.errors import ExplainkitError
from explainkit.hookspecs import RESHAPES, ModelEntry, ModelFamily
from explainkit.manager import model_choices, unknown_model_message

if TYPE_CHECKING:  # pragma: no cover - typing only
    from torch import nn

    from explainkit.manager import ExplainkitPluginManager, Registered

__all__ = [
    "RESHAPES",
    "ModelEntry",
    "ModelFamily",
    "accepted_kwargs",
    "build_model",
    "model_choices",
    "model_entry",
    "model_names",
    "spec_kwargs",
    "unknown_model_message",
]


def _registry(pm: ExplainkitPluginManager | None) -> dict[str, Registered]:
    from explainkit.manager import current_plugins, get_models

    return get_models(pm if pm is not None else current_plugins())


def model_names(pm: ExplainkitPluginManager | None = None) -> list[str]:
    """The registered names in registration order, a family as ``PREFIX:NAME``."""
    return [key + "NAME" if key.endswith(":") else key for key in _registry(pm)]


def model_entry(name: str, pm: ExplainkitPluginManager | None = None) -> ModelEntry:
    """The registered model ``name``: a ModelEntry's name or ``PREFIX:NAME`` of a family.

    Args:
        name: What ``--model`` takes.
        pm: The plugin manager (default: the one the running command loaded,
            :func:`explainkit.manager.current_plugins`).

    Raises:
        ConfigError: No plugin registered ``name`` (one sentence with a did-you-mean), or a
            family's ``resolve`` refused it.
    """
    models = _registry(pm)
    registered = models.get(name) if isinstance(name, str) and not name.endswith(":") else None
    if registered is not None:
        return registered.item
    prefix, colon, rest = name.partition(":") if isinstance(name, str) else ("", "", "")
    if colon and "." in prefix and "import:" in models:
        prefix, rest = "import", name  # package.module:factory, as runs of 0.2 recorded it
    family_key = f"{prefix}:"
    if not colon or family_key not in models or not rest:
        raise ConfigError(unknown_model_message(name, models))
    family: ModelFamily = models[family_key].item
    try:
        entry = family.resolve(rest)
    except KeyError:
        entry = None
    except ExplainkitError:
        raise
    except Exception as e:  # the family's own code failed: say which plugin
        plugin = models[family_key].plugin_name
        raise ConfigError(
            f"model family {prefix!r} of plugin {plugin!r} failed to resolve {brief(rest)}: "
            f"{type(e).__name__}: {e}"
        ) from e
    if entry is None:
        raise ConfigError(unknown_model_message(name, models))
    if not isinstance(entry, ModelEntry):
        plugin = models[family_key].plugin_name
        raise ConfigError(
            f"model family {prefix!r} of plugin {plugin!r} resolved {brief(rest)} to "
            f"{type(entry).__name__}, not a ModelEntry; fix the plugin"
        )
    return entry


def accepted_kwargs(build: Callable[..., Any], offered: Mapping[str, Any]) -> dict[str, Any]:
    """The ``offered`` keyword arguments that ``build`` names as parameters (a ``**kwargs``
    catch-all does not count: explainkit passes ``width`` only to models that take it)."""
    try:
        params = inspect.signature(build).parameters
    except (TypeError, ValueError):  # a builtin without a signature: offer nothing
        return {}
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {k: v for k, v in offered.items() if k in params and params[k].kind in kinds}


def build_model(
    name: str,
    num_classes: int,
    pm: ExplainkitPluginManager | None = None,
    **kwargs: Any,
) -> nn.Module:
    """An untrained (randomly initialized) model of the registered ``name``.

    Args:
        name: A registered model name (``resnet18-s8``, ``torchvision:resnet50``, ...).
        num_classes: Outputs of the classifier.
        pm: The plugin manager (default: the running command's).
        **kwargs: Passed to the entry's ``build`` as they are (``width=16`` for explainkit's
            ResNets); see :func:`accepted_kwargs` to offer only what a model takes.

    Raises:
        ConfigError: The name is not registered, or ``build`` refuses the arguments.
    """
    entry = model_entry(name, pm)
    try:
        return entry.build(num_classes, **kwargs)
    except TypeError as e:
        if not kwargs or accepted_kwargs(entry.build, kwargs) == kwargs:
            raise
        extra = ", ".join(sorted(set(kwargs) - set(accepted_kwargs(entry.build, kwargs))))
        raise ConfigError(f"model {name!r} takes no argument {extra} ({e})") from e


def spec_kwargs(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments a recorded model spec builds with.

    Runs record ``kwargs``; older runs (explainkit's ResNets only) recorded ``width`` alone.
    """
    kwargs = spec.get("kwargs")
    if isinstance(kwargs, Mapping):
        return dict(kwargs)
    return {"width": spec["width"]} if "width" in spec else {}
