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
from explainkit.errors import PluginError, error_sentence, unknown_name_message
from explainkit.registries import AnalyzerEntry, Registered, Registries

__all__ = [
    "DEFAULT_PLUGINS",
    "ENTRYPOINT_GROUP",
    "LoadError",
    "ExplainkitPluginManager",
    "build_registries",
    "get_plugin_manager",
    "get_analyzers",
    "get_datasets",
    "get_models",
    "hook_names",
    "load_plugins",
    "load_registries",
    "reset_plugins",
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
    "explainkit.plugins.default_models",
    "explainkit.plugins.task_models",
    "explainkit.plugins.default_datasets",
    "explainkit.plugins.small_task_models",
    "explainkit.plugins.task_metrics",
    "explainkit.plugins.task_mistakes",
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
    records a PluginError naming both plugins; so does an option whose flag another
    analyzer's option already has (analyzer ``a_b`` option ``c`` and analyzer ``a`` option
    ``b_c`` are both ``--a-b-c``), which would otherwise overwrite it silently.
    """
    from explainkit.analyzer import check_analyzer_class

    def check(cls: Any, plugin: str) -> str:
        check_analyzer_class(cls, plugin)
        return cls.name

    found = _collect(pm, "register_analyzers", "analyzer name", check)
    entries: dict[str, AnalyzerEntry] = {}
    owners: dict[str, str] = {}  # option key -> the analyzer that has it
    for name, r in found.items():
        keys = [opt.key(name) for opt in r.item.options]
        taken = next((k for k in keys if k in owners), None)
        if taken is not None:
            other = found[owners[taken]]
            err = PluginError(
                f"option --{taken.replace('_', '-')} of analyzer {name!r} (plugin "
                f"{r.plugin_name!r}) is also an option of analyzer {owners[taken]!r} (plugin "
                f"{other.plugin_name!r}); rename the analyzer or the option"
            )
            pm.record_error(r.plugin_name, r.source, err)
            continue
        owners.update(dict.fromkeys(keys, name))
        entries[name] = AnalyzerEntry(r.item, r.plugin_name, r.source)
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


def load_plugins(
    plugins_dir: str | os.PathLike[str] | None = None,
) -> ExplainkitPluginManager:
    """The plugin manager for ``plugins_dir``, built on first use (idempotent, cached).

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
    return pm


def build_registries(pm: ExplainkitPluginManager) -> Registries:
    """What ``pm``'s plugins registered: the one object the host hands down to training,
    evaluation, checkpoint loading and the analyzers' context."""

    def resolve_target_layer(model: Any, analyzer_name: str) -> str | None:
        return pm.hook.resolve_target_layer(model=model, analyzer_name=analyzer_name)

    return Registries(
        analyzers=get_analyzers(pm),
        models=get_models(pm),
        datasets=get_datasets(pm),
        resolve_target_layer=resolve_target_layer,
    )


def load_registries(plugins_dir: str | os.PathLike[str] | None = None) -> Registries:
    """The registries of :func:`load_plugins`'s manager for ``plugins_dir``: built-ins,
    installed plugins and a plugins folder's (public as ``explainkit.load_registries``)."""
    return build_registries(load_plugins(plugins_dir))


def reset_plugins() -> None:
    """Forget the cached managers (and the warnings printed), as a fresh process would."""
    _loaded.clear()
    _WARNED.clear()


def hook_names(pm: pluggy.PluginManager) -> list[str]:
    """Every hook that has a specification, sorted."""
    return sorted(n for n, c in vars(pm.hook).items() if not n.startswith("_") and c.has_spec())
