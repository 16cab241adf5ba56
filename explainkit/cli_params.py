"""What the CLI's commands are made of: parameter types, the options generated from the
config dataclasses, and ``analyze`` with one flag per analyzer option.

Only the standard library, click and explainkit's light modules are imported here.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from explainkit.config import Options

__all__ = [
    "PLUGINS_DIR_OPTION",
    "AnalyzeCommand",
    "Choice",
    "FloatOption",
    "IntOption",
    "check_device",
    "config_options",
]


class IntOption(click.IntRange):
    """An integer whose range shows in --help; the range itself is checked by
    TrainConfig.validate, so the command line and config files get the same sentence."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        return _convert_number(self, int, value, param, ctx)


class FloatOption(click.FloatRange):
    """A float whose range shows in --help (nan and inf are refused by validate)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        return _convert_number(self, float, value, param, ctx)


def _convert_number(
    ptype: click.ParamType,
    kind: type,
    value: Any,
    param: click.Parameter | None,
    ctx: click.Context | None,
) -> Any:
    if isinstance(value, kind) and not isinstance(value, bool):
        return value
    try:
        return kind(value)
    except (ValueError, TypeError, OverflowError):
        from explainkit.errors import brief

        what = "an integer" if kind is int else "a number"
        if isinstance(value, str) and len(value) > 100:  # int() refuses over 4300 digits
            ptype.fail(f"{brief(value)} is too long to be {what}", param, ctx)
        ptype.fail(f"{brief(value)} is not {what}", param, ctx)


class Choice(click.Choice):
    """click.Choice that shows at most ~60 characters of a refused value."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str) and len(value) > 60:
            from explainkit.errors import brief

            choices = ", ".join(map(str, self.choices))
            self.fail(f"{brief(value)} is not one of {choices}", param, ctx)
        return super().convert(value, param, ctx)


def train_device(ctx: click.Context, param: click.Parameter, value: str) -> str:
    if len(value) > 60:
        from explainkit.errors import brief

        raise click.BadParameter(
            f"{brief(value)} is not a device; use auto, cpu, cuda, cuda:N or mps"
        )
    return check_device(ctx, param, value)


PLUGINS_DIR_OPTION = click.option(
    "--plugins-dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    envvar="EXPLAINKIT_PLUGINS_DIR",
    help="Also load plugin modules (*.py) from this folder [env: EXPLAINKIT_PLUGINS_DIR].",
)


def _trust_imports(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    """Consent, for this command only, to import the modules its run directory names."""
    if value:
        from explainkit import trust

        trust.grant(True)
        ctx.call_on_close(trust.revoke)


TRUST_IMPORTS_OPTION = click.option(
    "--trust-imports",
    is_flag=True,
    expose_value=False,
    callback=_trust_imports,
    help="Import the module a run names for its model (import:pkg.mod:Class): that runs its "
    "code, so only for runs you trust [allow-list: env EXPLAINKIT_TRUST_IMPORTS=pkg,...].",
)


def config_options(options: type[Options]) -> Callable[[Any], Any]:
    """A decorator adding one click option per field of ``options`` (TrainConfig for
    ``train``, EvalConfig for ``evaluate``), so the dataclass stays the one source."""
    return functools.partial(_add_config_options, options=options)


def _add_config_options(func: Any, options: type[Options]) -> Any:
    for f in reversed(dataclasses.fields(options)):
        flag = f.name.replace("_", "-")
        help_text = f.metadata["help"]
        choices = f.metadata.get("choices")
        if f.type in ("bool", bool):
            decl = [f"--{flag}/--no-{flag}"]
            kwargs: dict[str, Any] = {"default": f.default}
        else:
            decl = [f"--{flag}"]
            # Annotations are strings here ("int | None"): the first word names the type.
            kind = str(f.type).split()[0]
            ptype: Any = str
            if kind in ("int", "float"):
                meta = f.metadata
                number = IntOption if kind == "int" else FloatOption
                ptype = number(
                    meta.get("min"),
                    meta.get("max"),
                    min_open=meta.get("min_open", False),
                    max_open=meta.get("max_open", False),
                )
            if choices:
                ptype = Choice(choices)
            kwargs = {"default": f.default, "type": ptype}
            if f.metadata.get("pattern"):
                kwargs["callback"] = train_device
        kwargs["show_default"] = f.default is not None
        func = click.option(*decl, f.name, help=help_text, **kwargs)(func)
    return func


def check_device(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """Validate --device without importing torch: auto, cpu, cuda, cuda:N or mps."""
    import re

    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", value):
        raise click.BadParameter(f"{value!r} is not a device; use auto, cpu, cuda, cuda:N or mps")
    return value


def scan_plugins_dir(args: list[str]) -> str | None:
    """Find --plugins-dir in raw arguments, so its analyzers' options exist before parsing."""
    for i, arg in enumerate(args):
        if arg == "--plugins-dir" and i + 1 < len(args):
            value: str | None = args[i + 1]
        elif arg.startswith("--plugins-dir="):
            value = arg.split("=", 1)[1]
        else:
            continue
        # A bad folder is left to the option's own validation (exit 2 with a clear message).
        return value if value and Path(value).is_dir() else None
    return None


class AnalyzeCommand(click.Command):
    """``analyze`` with one ``--<analyzer>-<option>`` flag per declared analyzer option.

    The flags are built from the plugin registry when this command is resolved (parsing its
    arguments or its help), never for ``explainkit --help``, so listing commands stays cheap.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._base_params = list(self.params)
        self._analyzer_groups: list[tuple[str, str, list[click.Parameter]]] | None = None
        self._built_for: Any = None

    def _build(self, plugins_dir: str | None) -> None:
        from explainkit.manager import load_plugins

        pm = load_plugins(plugins_dir)  # cached: cheap after the first call
        if self._analyzer_groups is not None and self._built_for is pm:
            return
        from explainkit.manager import get_analyzers

        entries = get_analyzers(pm)
        params = list(self._base_params)
        used = {p.name for p in params} | {o for p in params for o in getattr(p, "opts", [])}
        groups = []
        for name, entry in entries.items():
            group: list[click.Parameter] = []
            for opt in entry.cls.options:
                flag, key = opt.flag(name), opt.key(name)
                if flag in used or key in used:
                    click.echo(
                        f"warning: option {flag} of analyzer {name} clashes with another "
                        "option and is not available on the command line",
                        err=True,
                    )
                    continue
                used |= {flag, key}
                if opt.is_flag():
                    decls = [f"{flag}/--no-{flag[2:]}", key]
                    kwargs: dict[str, Any] = {"default": bool(opt.default)}
                else:
                    decls = [flag, key]
                    kwargs = {"type": opt.click_type(), "default": opt.default}
                group.append(
                    click.Option(
                        decls, help=opt.help, show_default=opt.default is not None, **kwargs
                    )
                )
            params.extend(group)
            groups.append((name, entry.cls.summary, group))
        self.params = params
        self._analyzer_groups = groups
        self._built_for = pm

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        self._build(scan_plugins_dir(args))
        return super().parse_args(ctx, args)

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        if self._analyzer_groups is None:
            self._build(None)
        return super().get_params(ctx)

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        params = self.get_params(ctx)
        grouped = {id(p) for _, _, group in self._analyzer_groups or [] for p in group}
        records = [
            r
            for p in params
            if id(p) not in grouped and not isinstance(p, click.Argument)
            if (r := p.get_help_record(ctx))
        ]
        with formatter.section("Options"):
            formatter.write_dl(records)
        groups = self._analyzer_groups or []
        if groups:
            with formatter.section("Analyzers (--plugin NAME)"):
                formatter.write_dl([(name, summary) for name, summary, _ in groups])
        for name, _summary, group in groups:
            rows = [r for p in group if (r := p.get_help_record(ctx))]
            if rows:
                with formatter.section(f"Options of {name}"):
                    formatter.write_dl(rows)
