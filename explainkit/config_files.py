"""Reading a JSON or YAML config file (``--config``) into option values, within bounds.

A config file is a user's input like any other: read as a regular file of bounded size,
refused in one sentence when it is not UTF-8, not a flat mapping, repeats a key, or uses YAML
anchors (ten nested aliases make a billion values).
"""

from __future__ import annotations

import json
from collections.abc import Hashable, Iterable
from pathlib import Path
from typing import Any

from explainkit.errors import ConfigError, brief, cut_text
from explainkit.files import read_regular_file

__all__ = ["read_config_file"]


def _load_yaml(text: str, path: Path) -> Any:
    try:
        import yaml
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ConfigError("YAML config files need PyYAML: pip install pyyaml") from e

    class NoAliasLoader(yaml.SafeLoader):
        """Refuses anchors and aliases: ten nested aliases make a billion values."""

        def compose_node(self, parent: Any, index: Any) -> Any:
            event = self.peek_event()
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
                line = event.start_mark.line + 1 if event.start_mark else "?"
                raise ConfigError(
                    f"{path} uses a YAML anchor or alias (& or *) at line {line}; "
                    "write each value out"
                )
            return super().compose_node(parent, index)

        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            _no_repeats((self.construct_object(k, deep=True) for k, _ in node.value), path)
            return super().construct_mapping(node, deep)

    try:
        return yaml.load(text, Loader=NoAliasLoader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or type(e).__name__
        raise ConfigError(f"{path} is not valid YAML: {cut_text(problem)}{where}") from e
    except RecursionError as e:
        raise ConfigError(f"{path} nests too deeply; a config file is a flat mapping") from e
    except (ValueError, TypeError, OverflowError) as e:  # a date like 2001-13-01, 5000 digits
        raise ConfigError(
            f"{path} has a YAML value that cannot be read ({cut_text(str(e))}); fix or quote it"
        ) from e


def _no_repeats(keys: Iterable[Any], path: Path) -> None:
    """Refuse a key given twice in a config file: its last value would silently win."""
    seen: set[Any] = set()
    for key in keys:
        if isinstance(key, Hashable):  # PyYAML refuses the others in its own words
            if key in seen:
                raise ConfigError(f"{path} gives {brief(key, 30)} twice; keep one")
            seen.add(key)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a JSON or YAML config file into a dict; YAML needs PyYAML."""
    path = Path(path)
    raw = read_regular_file(path)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not UTF-8 text; write the config as JSON or YAML") from e
    if path.suffix.lower() in (".yaml", ".yml"):
        data = _load_yaml(text, path)
    else:
        try:
            data = json.loads(
                text, object_pairs_hook=lambda kv: _no_repeats((k for k, _ in kv), path) or dict(kv)
            )
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e.msg} at line {e.lineno}") from e
        except RecursionError as e:
            raise ConfigError(f"{path} nests too deeply; a config file is a flat mapping") from e
        except ValueError as e:  # an integer of more than 4300 digits
            raise ConfigError(f"{path} has a number too long to read; fix the value") from e
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path} must hold a mapping of option names to values, got {type(data).__name__}"
        )
    # Accept the option spelling of the CLI too (batch-size as well as batch_size).
    options: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_") if isinstance(key, str) else key
        if name in options:
            raise ConfigError(f"{path} gives {brief(name, 30)} twice; keep one")
        options[name] = value
    options.pop("config", None)
    return options
