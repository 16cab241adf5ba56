"""The plugin contract: every hook explainkit calls, with what it passes and expects back.

Plugins implement these with ``@explainkit.hookimpl``. An implementation may accept any subset
of a hook's arguments (pluggy's opt-in arguments), so new arguments can be added later without
breaking existing plugins. docs/plugin-hooks.md documents each hook; a test keeps it in sync.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:  # pragma: no cover - typing only, keeps this module free of heavy imports
    import click

    from explainkit.analyzer import Analyzer

hookspec = pluggy.HookspecMarker("explainkit")
"""Marker for hook specifications (explainkit's own use)."""


@hookspec
def register_analyzers(register: Callable[[type[Analyzer]], None]) -> None:
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
