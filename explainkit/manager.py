"""The plugin manager: built-in analyzers and third-party plugins, loaded the same way.

Loading order: entry points of the group ``explainkit`` (third-party distributions), then
``DEFAULT_PLUGINS`` (built-ins, the same ``explainkit.hookimpl`` API), then modules from a
plugins folder, then a check for misspelled hook names. A plugin that fails to import, fails
validation or raises in a hook is recorded (shown by ``explainkit plugins``, mentioned once on
stderr) and skipped, so one broken plugin never breaks the CLI; set
``EXPLAINKIT_RAISE_ERRORS=1`` to get the traceback instead.

The registries built from the hooks (analyzers, models, datasets) are collected the same way:
each plugin's hook runs on its own, built-ins first, and a plugin that fails is skipped.

Nothing here imports torch: plugin modules import heavy code inside ``Analyzer.run``, a
model's ``build`` and a dataset's ``load``.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pluggy

from explainkit import hookspecs
from explainkit.errors import PluginError, did_you_mean, error_sentence, unknown_name_message

__all__ = [
    "DEFAULT_PLUGINS",
    "ENTRYPOINT_GROUP",
    "AnalyzerEntry",
    "LoadError",
    "ExplainkitPluginManager",
    "Registered",
    "current_plugins",
    "get_plugin_manager",
    "get_analyzers",
    "get_datasets",
    "get_models",
    "hook_names",
    "load_plugins",
    "model_choices",
    "reset_plugins",
    "unknown_model_message",
    "register_plugin_commands",
    "plugin_info",
]

ENTRYPOINT_GROUP = "explainkit"

DEFAULT_PLUGINS = (
    "explainkit.plugins.losses",
    "explainkit.plugins.gallery",
    "explainkit.plugins.data",
    "explainkit.plugins.gradcam",
    "explainkit.plugins.captum",
    "explainkit.plugins.quality",
    "explainkit.plugins.evolution",
    "explainkit.plugins.model",
    "explainkit.plugins.models",
    "explainkit.plugins.datasets",
)

# Where a plugin came from, as shown by ``explainkit plugins``.
SOURCE_BUILTIN = "builtin"
SOURCE_ENTRYPOINT = "entry point"
SOURCE_PLUGINS_DIR = "plugins-dir"
SOURCE_REGISTERED = "registered"  # pm.register() by hand (tests, notebooks)


@dataclass(frozen=True)
class LoadError:
    """A plugin that could not be loaded or whose hook failed; it is skipped."""

    plugin: str
    source: str
    error: str

    def sentence(self) -> str:
        """One line for stderr."""
        return (
            f"plugin {self.plugin!r} ({self.source}) failed and is skipped: {self.error} "
            "(set EXPLAINKIT_RAISE_ERRORS=1 for the traceback)"
        )


# Load failures already printed by this process: a command may build more than one plugin
# manager (a plugins folder given twice over, --help then the real parse), and the user
# needs to read each failure once.
_WARNED: set[LoadError] = set()


@dataclass(frozen=True)
class AnalyzerEntry:
    """One registered analyzer and the plugin that provided it."""

    cls: type
    plugin_name: str
    source: str


@dataclass(frozen=True)
class Registered:
    """One registered model, model family or dataset and the plugin that provided it.

    ``item`` is a ``ModelEntry``, ``ModelFamily`` or ``DatasetEntry`` (explainkit.hookspecs).
    """

    item: Any
    plugin_name: str
    source: str


class ExplainkitPluginManager(pluggy.PluginManager):
    """A PluginManager that also remembers where each plugin came from and what failed."""

    def __init__(self) -> None:
        super().__init__(ENTRYPOINT_GROUP)
        self.sources: dict[str, str] = {}
        self.load_errors: list[LoadError] = []
        self.quiet = False

    def source_of(self, name: str) -> str:
        """builtin / entry point / plugins-dir / registered."""
        return self.sources.get(name, SOURCE_REGISTERED)

    def record_error(self, plugin: str, source: str, exc: BaseException) -> None:
        """Remember a plugin failure once; re-raise it under EXPLAINKIT_RAISE_ERRORS=1."""
        if _env_flag("EXPLAINKIT_RAISE_ERRORS"):
            raise exc
        error = LoadError(plugin, source, error_sentence(exc, plain=_PLAIN_ERRORS))
        if error in self.load_errors:
            return
        self.load_errors.append(error)
        if not self.quiet and error not in _WARNED:  # several managers, one warning
            _WARNED.add(error)
            print(f"explainkit: warning: {error.sentence()}", file=sys.stderr)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


# pluggy's validation errors already read as sentences about the plugin.
_PLAIN_ERRORS = (pluggy.PluginValidationError,)


def get_plugin_manager(
    entrypoints: bool = True,
    plugins_dir: str | os.PathLike[str] | None = None,
    defaults: bool = True,
    quiet: bool = False,
) -> ExplainkitPluginManager:
    """Build a fresh plugin manager (a pure factory: no caching, no global state).

    Args:
        entrypoints: Load third-party plugins from the entry-point group ``explainkit``,
            limited to ``EXPLAINKIT_LOAD_PLUGINS=a,b`` when set (``''`` loads none).
        plugins_dir: A folder whose ``*.py`` files are imported and registered as plugins.
        defaults: Register the built-in ``DEFAULT_PLUGINS``.
        quiet: Record load errors without printing them to stderr.

    Returns:
        The manager; ``pm.load_errors`` lists the plugins that failed and were skipped.

    Raises:
        PluginError: ``plugins_dir`` is not a folder.
    """
    pm = ExplainkitPluginManager()
    pm.quiet = quiet
    pm.add_hookspecs(hookspecs)
    if _env_flag("EXPLAINKIT_TRACE_PLUGINS"):
        _install_tracing(pm)
    if entrypoints:
        _load_entrypoints(pm)
    if defaults:
        _load_defaults(pm)
    if plugins_dir is not None:
        _load_plugins_dir(pm, Path(plugins_dir))
    _check_pending(pm)
    return pm


def _install_tracing(pm: pluggy.PluginManager) -> None:
    def before(hook_name: str, hook_impls: list[Any], kwargs: dict[str, Any]) -> None:
        names = ", ".join(impl.plugin_name for impl in hook_impls)
        print(f"explainkit trace: {hook_name}({', '.join(kwargs)}) -> [{names}]", file=sys.stderr)

    def after(outcome: Any, hook_name: str, hook_impls: list[Any], kwargs: dict[str, Any]) -> None:
        exc = outcome.exception
        result = f"raised {exc!r}" if exc is not None else f"returned {outcome.get_result()!r}"
        print(f"explainkit trace: {hook_name} {result}", file=sys.stderr)

    pm.add_hookcall_monitoring(before, after)


def _entrypoint_names() -> list[str]:
    """Names in our entry-point group, without importing anything (cheap metadata scan)."""
    names = set()
    for dist in list(importlib.metadata.distributions()):
        for ep in dist.entry_points:
            if ep.group == ENTRYPOINT_GROUP:
                names.add(ep.name)
    return sorted(names)


def _load_entrypoints(pm: ExplainkitPluginManager) -> None:
    available = _entrypoint_names()
    wanted_env = os.environ.get("EXPLAINKIT_LOAD_PLUGINS")
    if wanted_env is None:
        wanted = available
    else:
        wanted = [n.strip() for n in wanted_env.split(",") if n.strip()]
        for name in wanted:
            if name not in available:
                err = PluginError(
                    f"EXPLAINKIT_LOAD_PLUGINS names {name!r}, but no installed distribution "
                    f"provides it; installed: {', '.join(available) or 'none'}"
                )
                pm.record_error(name, SOURCE_ENTRYPOINT, err)
        wanted = [n for n in wanted if n in available]
    for name in wanted:
        try:
            pm.load_setuptools_entrypoints(ENTRYPOINT_GROUP, name=name)
        except (Exception, SystemExit) as exc:
            if pm.has_plugin(name):  # registration failed half-way: drop what got in
                pm.unregister(name=name)
            pm.record_error(name, SOURCE_ENTRYPOINT, exc)
        else:
            if pm.has_plugin(name):
                pm.sources[name] = SOURCE_ENTRYPOINT


def _load_defaults(pm: ExplainkitPluginManager) -> None:
    for modname in DEFAULT_PLUGINS:
        try:
            module = importlib.import_module(modname)
        except (Exception, SystemExit) as exc:
            pm.record_error(modname, SOURCE_BUILTIN, exc)
            continue
        _register(pm, module, modname, SOURCE_BUILTIN)


def _load_plugins_dir(pm: ExplainkitPluginManager, folder: Path) -> None:
    if not folder.is_dir():
        raise PluginError(f"plugins folder {str(folder)!r} does not exist; pass an existing folder")
    for path in sorted(folder.glob("*.py")):
        if path.name.startswith("_"):
            continue
        name = path.stem
        modname = f"explainkit_plugins_dir.{name}"
        try:
            spec = importlib.util.spec_from_file_location(modname, path)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            sys.modules[modname] = module
            try:
                spec.loader.exec_module(module)
            except BaseException:
                sys.modules.pop(modname, None)
                raise
        except (Exception, SystemExit) as exc:
            pm.record_error(name, SOURCE_PLUGINS_DIR, exc)
            continue
        _register(pm, module, name, SOURCE_PLUGINS_DIR)


def _register(pm: ExplainkitPluginManager, plugin: object, name: str, source: str) -> None:
    try:
        pm.register(plugin, name=name)
    except (Exception, SystemExit) as exc:
        if pm.has_plugin(name) and pm.get_plugin(name) is plugin:
            pm.unregister(name=name)
        pm.record_error(name, source, exc)
    else:
        pm.sources[name] = source


def _check_pending(pm: ExplainkitPluginManager) -> None:
    """Report hook implementations without a spec (typos), per plugin, like check_pending."""
    if _env_flag("EXPLAINKIT_RAISE_ERRORS"):
        pm.check_pending()
        return
    known = hook_names(pm)
    for hook_name, caller in sorted(vars(pm.hook).items()):
        if hook_name.startswith("_") or caller.has_spec():
            continue
        for impl in caller.get_hookimpls():
            if impl.optionalhook:
                continue
            msg = unknown_name_message("hook", hook_name, known)
            err = pluggy.PluginValidationError(
                impl.plugin, f"{msg} in plugin {impl.plugin_name!r}; rename the function"
            )
            pm.record_error(impl.plugin_name, pm.source_of(impl.plugin_name), err)


def get_analyzers(pm: ExplainkitPluginManager) -> dict[str, AnalyzerEntry]:
    """Collect every plugin's analyzers into a validated registry, sorted by name.

    Each plugin's ``register_analyzers`` runs on its own, built-ins first: a plugin whose hook
    raises (or registers something invalid) is recorded in ``pm.load_errors`` and contributes
    nothing, and the others still load. A name clash keeps the first (built-ins win) and
    records a PluginError naming both plugins.
    """
    from explainkit.analyzer import check_analyzer_class

    def check(cls: Any, plugin: str) -> str:
        check_analyzer_class(cls, plugin)
        return cls.name

    found = _collect(pm, "register_analyzers", "analyzer name", check)
    entries = {k: AnalyzerEntry(r.item, r.plugin_name, r.source) for k, r in found.items()}
    return dict(sorted(entries.items()))


def get_models(pm: ExplainkitPluginManager) -> dict[str, Registered]:
    """Every plugin's models, collected like :func:`get_analyzers`, in registration order.

    Keys are a ModelEntry's name (``"resnet18"``) or a ModelFamily's prefix and a colon
    (``"torchvision:"``); built-ins come first. A failing plugin is recorded and skipped; a
    name or prefix registered twice keeps the first and records a PluginError naming both.
    Nothing is built and no family is asked for its names: this stays cheap.
    """
    return _collect(pm, "register_models", "model name", hookspecs.check_model_item)


def get_datasets(pm: ExplainkitPluginManager) -> dict[str, Registered]:
    """Every plugin's datasets by name, collected like :func:`get_models`."""
    return _collect(pm, "register_datasets", "dataset name", hookspecs.check_dataset_entry)


def model_choices(models: dict[str, Registered]) -> str:
    """``resnet18-s8, resnet18, torchvision:NAME, timm:NAME``: the registered names, short."""
    return ", ".join(key + "NAME" if key.endswith(":") else key for key in models)


def unknown_model_message(name: str, models: dict[str, Registered]) -> str:
    """``unknown model 'resnet50'; did you mean 'torchvision:resnet50'? available: ...``.

    A name a family has (``resnet50`` without its prefix) is suggested with the prefix; else
    the closest registered name, or the closest name of a family. Families are asked for
    their names here only (it may import their library); one that cannot answer is left out.
    """
    suggestion = _suggest_model(name, models)
    shown = repr(name) if len(name) <= 60 else repr(name[:59]) + "…"
    text = f"unknown model {shown}"
    text += f"; did you mean {suggestion!r}?" if suggestion else ";"
    return (
        f"{text} available: {model_choices(models)} "
        "(plugins register more: explainkit plugins --all lists them)"
    )


def _family_names(family: Any) -> list[str]:
    try:
        return [str(n) for n in family.names()]
    except Exception:  # a suggestion is optional (timm not installed, say)
        return []


def _suggest_model(name: str, models: dict[str, Registered]) -> str | None:
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
        close = _closest(rest, _family_names(family))
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


def _collect(
    pm: ExplainkitPluginManager,
    hook: str,
    what: str,
    check: Callable[[Any, str], str],
) -> dict[str, Registered]:
    """Call ``hook`` plugin by plugin (built-ins first, then by name) with a ``register``
    callback; ``check(item, plugin)`` validates an item and returns its key."""
    caller = getattr(pm.hook, hook)
    impls = caller.get_hookimpls()
    all_plugins = [impl.plugin for impl in impls]
    impls = sorted(
        impls, key=lambda i: (pm.source_of(i.plugin_name) != SOURCE_BUILTIN, i.plugin_name)
    )
    registry: dict[str, Registered] = {}
    for impl in impls:
        plugin_name = impl.plugin_name
        source = pm.source_of(plugin_name)
        found: dict[str, Registered] = {}

        def register(item: Any, _plugin: str = plugin_name, _found: dict = found) -> None:
            key = check(item, _plugin)
            other = registry.get(key) or _found.get(key)
            if other is not None:
                raise PluginError(
                    f"{what} {key!r} is registered by both plugin {other.plugin_name!r} and "
                    f"plugin {_plugin!r}; rename one of them"
                )
            _found[key] = Registered(item, _plugin, pm.source_of(_plugin))

        others = [p for p in all_plugins if p is not impl.plugin]
        try:
            pm.subset_hook_caller(hook, remove_plugins=others)(register=register)
        except (Exception, SystemExit) as exc:
            pm.record_error(plugin_name, source, exc)
            continue
        registry.update(found)
    return registry


def register_plugin_commands(cli: Any, pm: ExplainkitPluginManager) -> None:
    """Let every plugin add commands to ``cli``; a plugin whose hook raises is recorded."""
    caller = pm.hook.register_commands
    impls = sorted(caller.get_hookimpls(), key=lambda i: i.plugin_name)
    all_plugins = [impl.plugin for impl in impls]
    for impl in impls:
        others = [p for p in all_plugins if p is not impl.plugin]
        try:
            pm.subset_hook_caller("register_commands", remove_plugins=others)(cli=cli)
        except (Exception, SystemExit) as exc:
            pm.record_error(impl.plugin_name, pm.source_of(impl.plugin_name), exc)


def plugin_info(pm: ExplainkitPluginManager, include_builtin: bool = False) -> list[dict]:
    """Describe each plugin for ``explainkit plugins``: source, version, hooks, analyzers,
    models, datasets, errors.

    Plugins that failed to load appear with their ``errors`` and no hooks. Sorted by name.
    """
    analyzers = get_analyzers(pm)
    models = get_models(pm)
    datasets = get_datasets(pm)
    dists = {pm.get_name(plugin): dist for plugin, dist in pm.list_plugin_distinfo()}
    errors: dict[str, list[LoadError]] = {}
    for err in pm.load_errors:
        errors.setdefault(err.plugin, []).append(err)
    names = {name for name, _ in pm.list_name_plugin() if name is not None} | set(errors)
    rows = []
    for name in sorted(names):
        source = pm.source_of(name)
        if name in errors and name not in pm.sources:
            source = errors[name][0].source
        if source == SOURCE_BUILTIN and not include_builtin and name not in errors:
            continue  # a broken built-in is always shown
        plugin = pm.get_plugin(name)
        dist = dists.get(name)
        hooks = (
            sorted(c.name for c in pm.get_hookcallers(plugin) or []) if plugin is not None else []
        )
        if dist is not None:
            package, version = dist.project_name, dist.version
        elif source == SOURCE_BUILTIN:
            from explainkit import __version__

            package, version = "explainkit", __version__
        else:
            package, version = None, None
        rows.append(
            {
                "name": name,
                "package": package,
                "version": version,
                "source": source,
                "hooks": hooks,
                "analyzers": [
                    _analyzer_info(key, entry)
                    for key, entry in analyzers.items()
                    if entry.plugin_name == name
                ],
                "models": [_model_info(r.item) for r in models.values() if r.plugin_name == name],
                "datasets": [
                    {"name": r.item.name, "summary": r.item.summary}
                    for r in datasets.values()
                    if r.plugin_name == name
                ],
                "errors": [e.error for e in errors.get(name, [])],
            }
        )
    return rows


def _analyzer_info(name: str, entry: AnalyzerEntry) -> dict:
    cls: Any = entry.cls
    return {
        "name": name,
        "summary": cls.summary,
        "needs": sorted(cls.needs),
        "requires": list(cls.requires),
        "options": [opt.describe(name) for opt in cls.options],
    }


def _model_info(item: Any) -> dict:
    if isinstance(item, hookspecs.ModelFamily):
        return {"name": f"{item.prefix}:NAME", "family": True, "summary": item.summary}
    return {
        "name": item.name,
        "family": False,
        "summary": item.summary,
        "default_layer": item.default_layer,
        "reshape": item.reshape,
    }


# -- cached loading for the CLI ------------------------------------------------------------

_loaded: dict[str | None, ExplainkitPluginManager] = {}
_current: list[ExplainkitPluginManager] = []  # the one load_plugins returned last


def load_plugins(
    plugins_dir: str | os.PathLike[str] | None = None,
) -> ExplainkitPluginManager:
    """The process-wide plugin manager, built on first use (idempotent, cached).

    Environment variables are read when it is first built: ``EXPLAINKIT_LOAD_PLUGINS``,
    ``EXPLAINKIT_PLUGINS_DIR`` (used when ``plugins_dir`` is None),
    ``EXPLAINKIT_RAISE_ERRORS``, ``EXPLAINKIT_TRACE_PLUGINS``.
    """
    if plugins_dir is None:
        plugins_dir = os.environ.get("EXPLAINKIT_PLUGINS_DIR") or None
    key = str(Path(plugins_dir).resolve()) if plugins_dir is not None else None
    pm = _loaded.get(key)
    if pm is None:
        pm = get_plugin_manager(entrypoints=True, plugins_dir=plugins_dir)
        _loaded[key] = pm
    _current[:] = [pm]
    return pm


def current_plugins() -> ExplainkitPluginManager:
    """The manager this process's command loaded (with its ``--plugins-dir``), else
    :func:`load_plugins`'s default one.

    What name lookups use when given no manager (``explainkit.models.registry.model_entry``,
    ``explainkit.data.load_dataset``, loading a run's model), so a model or dataset from a
    plugins folder resolves wherever the command needs it.
    """
    return _current[0] if _current else load_plugins()


def reset_plugins() -> None:
    """Forget the cached manager (and the warnings printed), as a fresh process would."""
    _loaded.clear()
    _current.clear()
    _WARNED.clear()


def hook_names(pm: pluggy.PluginManager) -> list[str]:
    """Every hook that has a specification, sorted."""
    return sorted(n for n, c in vars(pm.hook).items() if not n.startswith("_") and c.has_spec())
