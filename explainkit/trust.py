"""Consent to import a module that a run directory names (``import:package.module:Class``).

A run directory received from someone else is untrusted input, like a pickle: its config.json
and checkpoints record how to rebuild the model, and an import path there would make
explainkit import that module, running its code. So a module named by a run is imported only
with the user's consent, given in one of three ways (like transformers' ``trust_remote_code``):

* ``--trust-imports`` on the command line (analyze, report, train --resume, evaluate,
  inspect): every module this command's run names;
* ``EXPLAINKIT_TRUST_IMPORTS=pkg_a,pkg_b`` in the environment: those modules and their
  submodules (``*`` or ``1``: every module);
* ``trust_imports=True`` (or a list of module names) in the Python API.

A module already imported in this process (the user's own session: the class of the model
handed to ``explainkit.evaluate``) runs no code when named again, so it needs no consent.
A module that is not found here (no such top-level package on ``sys.path``) runs nothing
either: the registry then says it is not importable. A model the user names himself
(``--model import:...``) is consent by itself.

Only the standard library is imported here: analysis commands check a run without torch.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from explainkit.errors import UntrustedImport, brief

__all__ = ["ENV", "check_trusted", "grant", "imported_module", "revoke", "trusted_imports"]

ENV = "EXPLAINKIT_TRUST_IMPORTS"
_ALL = "*"
_granted: list[frozenset[str]] = []  # the consents in force, innermost last
_open: list[Any] = []  # grant()'s open blocks


def imported_module(arch: object) -> str | None:
    """The module that building model ``arch`` imports (None: a registered name, no import).

    ``import:package.module:factory``, and the bare ``package.module:factory`` older runs
    recorded, both name one.
    """
    if not isinstance(arch, str):
        return None
    prefix, colon, rest = arch.partition(":")
    if prefix == "import" and colon:
        return rest.partition(":")[0] or None
    if colon and "." in prefix:
        return prefix
    return None


def _consented(module: str) -> bool:
    granted = set().union(*_granted) if _granted else set()
    env = os.environ.get(ENV, "")
    for name in env.split(","):
        name = name.strip()
        if name.lower() in ("*", "1", "true", "yes", "all"):
            granted.add(_ALL)
        elif name:
            granted.add(name)
    if _ALL in granted:
        return True
    return any(module == name or module.startswith(name + ".") for name in granted)


def _findable(top: str) -> bool:
    """Whether a top-level module exists here (looked up on sys.path, nothing imported)."""
    try:
        return importlib.util.find_spec(top) is not None
    except (ImportError, ValueError):
        return False


def check_trusted(arch: object, where: str) -> None:
    """Refuse to build ``arch`` (recorded in ``where``) when that would import a module the
    user did not consent to; nothing is imported here.

    Raises:
        UntrustedImport: One sentence that says how to give consent.
    """
    module = imported_module(arch)
    if module is None or module in sys.modules or _consented(module):
        return
    top = module.partition(".")[0]
    if not _findable(top):  # nothing to import, so nothing runs: "not importable" follows
        return
    raise UntrustedImport(
        f"{where} names the model {brief(arch, 80)}, and building it would import module "
        f"{brief(module, 60)} and run its code; a run directory from someone else is "
        f"untrusted, so explainkit imports it only with your consent: pass --trust-imports "
        f"(Python: trust_imports=True) or set {ENV}={top}"
    )


@contextmanager
def trusted_imports(trust: bool | str | Iterable[str] | None) -> Iterator[None]:
    """Within the block, the modules ``trust`` names may be imported: True every module, a
    name or names those modules and their submodules, False or None no more than before."""
    if trust is None or trust is False:
        yield
        return
    if trust is True:
        names = frozenset({_ALL})
    elif isinstance(trust, str):
        names = frozenset({trust})
    else:
        names = frozenset(str(n) for n in trust)
    _granted.append(names)
    try:
        yield
    finally:
        _granted.remove(names)


def grant(trust: bool | str | Iterable[str]) -> None:
    """Consent for the rest of this process, as :func:`trusted_imports` gives it in a block
    (the CLI's ``--trust-imports``; :func:`revoke` undoes it when the command ends)."""
    manager = trusted_imports(trust)
    manager.__enter__()
    _open.append(manager)


def revoke() -> None:
    """Undo the last :func:`grant`."""
    if _open:
        _open.pop().__exit__(None, None, None)
