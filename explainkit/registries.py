"""What the plugins registered: analyzers, models and datasets, looked up by name.

The host builds one :class:`Registries` from the plugins' hooks
(:func:`explainkit.manager.load_registries`, or ``explainkit.load_registries()`` from Python)
and hands it to whatever needs a name looked up: training, ``evaluate``, loading a run's model,
an analyzer's context. Nothing looks the registries up in a global, so a library call names
the plugins it runs with as explicitly as the CLI does::

    import explainkit

    registries = explainkit.load_registries()            # built-ins and installed plugins
    entry = registries.model_entry("torchvision:resnet18")  # default_layer "layer4"
    model = registries.build_model("resnet18-s8", num_classes=10, width=16)

A model entry is one model (``--model resnet18``); a family is many under a prefix
(``--model torchvision:resnet50``, ``--model timm:convnext_tiny``, ``import:pkg.mod:factory``).
Importing this module imports no torch; building a model does.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from explainkit.errors import ConfigError, DataError, ExplainkitError, brief, did_you_mean
from explainkit.hookspecs import DatasetEntry, ModelEntry, ModelFamily

if TYPE_CHECKING:  # pragma: no cover - typing only
    from torch import nn

__all__ = [
    "AnalyzerEntry",
    "Registered",
    "Registries",
    "accepted_kwargs",
    "spec_kwargs",
]


@dataclass(frozen=True)
class AnalyzerEntry:
    """One registered analyzer and the plugin that provided it."""

    cls: type
    plugin_name: str
    source: str


@dataclass(frozen=True)
class Registered:
    """One registered model, model family or dataset and the plugin that provided it.

    ``item`` is a :class:`ModelEntry`, :class:`ModelFamily` or :class:`DatasetEntry`.
    """

    item: Any
    plugin_name: str
    source: str


@dataclass(frozen=True)
class Registries:
    """Every analyzer, model and dataset the plugins registered, by name, built-ins first.

    Attributes:
        analyzers: Name -> :class:`AnalyzerEntry`, sorted by name.
        models: A ModelEntry's name (``"resnet18"``) or a family's prefix and a colon
            (``"torchvision:"``) -> :class:`Registered`, in registration order.
        datasets: Name -> :class:`Registered`, in registration order.
        resolve_target_layer: The plugins' ``resolve_target_layer`` hook,
            ``(model, analyzer_name) -> name or None``.
    """

    analyzers: Mapping[str, AnalyzerEntry] = field(default_factory=dict)
    models: Mapping[str, Registered] = field(default_factory=dict)
    datasets: Mapping[str, Registered] = field(default_factory=dict)
    resolve_target_layer: Callable[[Any, str], str | None] = field(
        default=lambda model, analyzer_name: None, repr=False
    )

    # -- models ----------------------------------------------------------------------------
    def model_names(self) -> list[str]:
        """The registered names in registration order, a family as ``PREFIX:NAME``."""
        return [key + "NAME" if key.endswith(":") else key for key in self.models]

    def model_entry(self, name: str) -> ModelEntry:
        """The registered model ``name``: a ModelEntry's name or ``PREFIX:NAME`` of a family.

        Raises:
            ConfigError: No plugin registered ``name`` (one sentence with a did-you-mean), or
                a family's ``resolve`` refused it.
        """
        models = self.models
        plain = isinstance(name, str) and not name.endswith(":")
        registered = models.get(name) if plain else None
        if registered is not None:
            return registered.item
        prefix, colon, rest = name.partition(":") if isinstance(name, str) else ("", "", "")
        if colon and "." in prefix and "import:" in models:
            prefix, rest = "import", name  # package.module:factory, as runs of 0.2 recorded it
        family_key = f"{prefix}:"
        if not colon or family_key not in models or not rest:
            raise ConfigError(self.unknown_model_message(str(name)))
        plugin = models[family_key].plugin_name
        try:
            entry = models[family_key].item.resolve(rest)
        except KeyError:
            entry = None
        except ExplainkitError:
            raise
        except Exception as e:  # the family's own code failed: say which plugin
            raise ConfigError(
                f"model family {prefix!r} of plugin {plugin!r} failed to resolve {brief(rest)}: "
                f"{type(e).__name__}: {e}"
            ) from e
        if entry is None:
            raise ConfigError(self.unknown_model_message(name))
        if not isinstance(entry, ModelEntry):
            raise ConfigError(
                f"model family {prefix!r} of plugin {plugin!r} resolved {brief(rest)} to "
                f"{type(entry).__name__}, not a ModelEntry; fix the plugin"
            )
        return entry

    def build_model(self, name: str, num_classes: int, **kwargs: Any) -> nn.Module:
        """An untrained (randomly initialized) model of the registered ``name``.

        ``kwargs`` go to the entry's ``build`` as they are (``width=16`` for explainkit's
        ResNets); see :func:`accepted_kwargs` to offer only what a model takes.

        Raises:
            ConfigError: The name is not registered, or ``build`` refuses the arguments.
        """
        entry = self.model_entry(name)
        try:
            return entry.build(num_classes, **kwargs)
        except TypeError as e:
            if not kwargs or accepted_kwargs(entry.build, kwargs) == kwargs:
                raise
            extra = ", ".join(sorted(set(kwargs) - set(accepted_kwargs(entry.build, kwargs))))
            raise ConfigError(f"model {name!r} takes no argument {extra} ({e})") from e

    def count_parameters(self, name: str, width: int, image_size: int) -> int:
        """Parameters of model ``name`` built for 10 classes on the meta device (no memory is
        allocated); 0 when it cannot be built that way (it is checked again when built)."""
        import torch

        try:
            entry = self.model_entry(name)
            kwargs = accepted_kwargs(entry.build, {"width": width, "image_size": image_size})
            with torch.device("meta"):
                model = entry.build(10, **kwargs)
            return sum(p.numel() for p in model.parameters())
        except Exception:  # a model that computes shapes from data; or a bad name, said later
            return 0

    def unknown_model_message(self, name: str) -> str:
        """``unknown model 'resnet50'; did you mean 'torchvision:resnet50'? available: ...``.

        A name a family has (``resnet50`` without its prefix) is suggested with the prefix;
        else the closest registered name, or the closest name of a family. Families are asked
        for their names here only (it may import their library); one that cannot answer is
        left out.
        """
        suggestion = _suggest_model(name, self.models)
        shown = repr(name) if len(name) <= 60 else repr(name[:59]) + "…"
        text = f"unknown model {shown}"
        text += f"; did you mean {suggestion!r}?" if suggestion else ";"
        return (
            f"{text} available: {', '.join(self.model_names())} "
            "(plugins register more: explainkit plugins --all lists them)"
        )

    # -- datasets --------------------------------------------------------------------------
    def dataset_entry(self, name: str) -> tuple[DatasetEntry, str]:
        """The registered dataset ``name`` and the plugin that registered it.

        Raises:
            DataError: No plugin registered it (one sentence with a did-you-mean).
        """
        found = self.datasets.get(name) if isinstance(name, str) else None
        if found is None:
            raise DataError(f"unknown dataset: {self.unknown_dataset_message(str(name))}")
        return found.item, found.plugin_name

    def unknown_dataset_message(self, name: str) -> str:
        """``'mnist' is not one of cifar10, shapes, folder; did you mean ...?``, the value cut."""
        known = list(self.datasets)
        shown = repr(name) if len(name) <= 60 else repr(name[:59]) + "…"
        close = did_you_mean(name, known) if len(name) <= 200 else []
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return (
            f"{shown} is not one of {', '.join(known) or 'none'}{hint} (plugins register more: "
            "explainkit plugins --all lists them)"
        )

    def check_names(
        self, dataset: str, model: str, label: Callable[[str], str] = lambda name: f"--{name}"
    ) -> None:
        """ConfigError (with a did-you-mean) when no plugin registered ``dataset`` or
        ``model``.

        Cheap: a family name (``torchvision:NAME``) is checked for its prefix only; the name
        after the colon is checked when the model is built (:meth:`model_entry`), before a
        run writes anything. Only a mistyped name asks the families for their names (for the
        suggestion), which may import their library.
        """
        if dataset not in self.datasets:
            raise ConfigError(
                f"{label('dataset')} must be one of the registered datasets: "
                f"{self.unknown_dataset_message(dataset)}"
            )
        prefix, colon, rest = model.partition(":")
        known = model in self.models or (colon and rest and f"{prefix}:" in self.models)
        if model.endswith(":") or not known:
            raise ConfigError(f"{label('model')}: {self.unknown_model_message(model)}")


def accepted_kwargs(build: Callable[..., Any], offered: Mapping[str, Any]) -> dict[str, Any]:
    """The ``offered`` keyword arguments that ``build`` names as parameters (a ``**kwargs``
    catch-all does not count: explainkit passes ``width`` only to models that take it)."""
    try:
        params = inspect.signature(build).parameters
    except (TypeError, ValueError):  # a builtin without a signature: offer nothing
        return {}
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {k: v for k, v in offered.items() if k in params and params[k].kind in kinds}


def spec_kwargs(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments a recorded model spec builds with.

    Runs record ``kwargs``; older runs (explainkit's ResNets only) recorded ``width`` alone.
    """
    kwargs = spec.get("kwargs")
    if isinstance(kwargs, Mapping):
        return dict(kwargs)
    return {"width": spec["width"]} if "width" in spec else {}


def _family_names(family: ModelFamily) -> list[str]:
    try:
        return [str(n) for n in family.names()]
    except Exception:  # a suggestion is optional (timm not installed, say)
        return []


def _suggest_model(name: str, models: Mapping[str, Registered]) -> str | None:
    if len(name) > 200:
        return None
    plain = [key for key in models if not key.endswith(":")]
    families = [r.item for key, r in models.items() if key.endswith(":")]
    prefix, colon, rest = name.partition(":")
    if colon:  # PREFIX:NAME: among that family's names, or the closest prefix
        family = next((f for f in families if f.prefix == prefix), None)
        if family is None:
            close = _closest(prefix, [f.prefix for f in families])
            return f"{close}:{rest}" if close else None
        members = _family_names(family)
        if rest not in members:  # torchvision:fasterrcnn_resnet50_fpn -> the family that has it
            other = next(
                (f for f in families if f is not family and rest in _family_names(f)), None
            )
            if other is not None:
                return f"{other.prefix}:{rest}"
        close = _closest(rest, members)
        return f"{prefix}:{close}" if close else None
    qualified: dict[str, str] = {}
    for family in families:
        for member in _family_names(family):
            qualified.setdefault(member, f"{family.prefix}:{member}")
    if name in qualified:  # resnet50 -> torchvision:resnet50
        return qualified[name]
    close = _closest(name, plain)
    if close:
        return close
    close = _closest(name, list(qualified))
    return qualified[close] if close else None


def _closest(name: str, known: list[str]) -> str | None:
    """The known name closest to a mistyped one, or None."""
    close = did_you_mean(name, known)
    return close[0] if close else None
