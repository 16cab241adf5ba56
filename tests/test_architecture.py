"""The shape of the code base: what the modules may import, and how long an analyzer's run is.

These read the source with ``ast`` (nothing is imported), so they hold for code paths the
other tests never reach: imports inside functions count, ``if TYPE_CHECKING:`` blocks do not.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from explainkit.manager import get_analyzers, get_plugin_manager

ROOT = Path(__file__).resolve().parents[1]
# Source folder -> the package name it is installed as.
PACKAGES = {ROOT / "explainkit": "explainkit", ROOT / "plugins": "explainkit.plugins"}
MAX_RUN_LINES = 60


def _modules() -> dict[str, Path]:
    found = {}
    for folder, package in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


MODULES = _modules()


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(module: str, typing: bool = False) -> list[tuple[str, list[str]]]:
    """(imported module, names) for every import in ``module``, wherever it stands; those of
    ``if TYPE_CHECKING:`` blocks too when ``typing``."""
    tree = ast.parse(MODULES[module].read_text())
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    found = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node) and not typing:
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend((alias.name, []) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            names = [alias.name for alias in node.names]
            # "from explainkit import figures" imports the module explainkit.figures.
            submodules = [f"{base}.{n}" for n in names if f"{base}.{n}" in MODULES]
            found.append((base, [n for n in names if f"{base}.{n}" not in MODULES]))
            found.extend((sub, []) for sub in submodules)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _graph(typing: bool = False) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for module in MODULES:
        targets = set()
        for imported, _ in _imports(module, typing):
            # Importing a.b.c runs a and a.b first; point at the deepest module we know.
            while imported and imported not in MODULES:
                imported = imported.rpartition(".")[0]
            if imported and imported != module:
                targets.add(imported)
        graph[module] = targets
    return graph


def _ancestors(module: str) -> set[str]:
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


@pytest.mark.parametrize("typing", [False, True], ids=["run time", "with TYPE_CHECKING"])
def test_no_import_cycle_anywhere_in_the_package(typing):
    """A cycle through imports inside functions is still a cycle: it only hides better; one
    through ``if TYPE_CHECKING:`` imports is a knot in the design all the same."""
    graph = _graph(typing)
    # A package's __init__ running before its submodules is not a cycle worth reporting.
    graph = {m: {t for t in ts if t not in _ancestors(m)} for m, ts in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(module: str) -> None:
        state[module] = 1
        stack.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycles.append(stack[stack.index(target) :] + [target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_no_module_imports_a_private_name_from_another_module():
    offenders = []
    for module in MODULES:
        for imported, names in _imports(module):
            if not imported.startswith("explainkit") or imported == module:
                continue
            private = [n for n in names if n.startswith("_") and not n.endswith("__")]
            offenders += [f"{module}: {imported}.{n}" for n in private]
            if any(part.startswith("_") for part in imported.split(".")):
                offenders.append(f"{module}: {imported}")
    assert not offenders


def test_builtin_plugins_import_only_public_explainkit_names():
    for module in (m for m in MODULES if m.startswith("explainkit.plugins.")):
        for imported, _ in _imports(module):
            assert not imported.startswith("explainkit.plugins"), (module, imported)


# The host: it builds the plugin manager and the registries and hands them down.
HOST = {
    "explainkit.manager",
    "explainkit.runner",
    "explainkit.api",
    "explainkit.cli",
    "explainkit.cli_params",
}
MAX_MODULE_LINES = 600


def test_the_analyzer_contract_imports_no_host_module():
    imported = {m for m, _ in _imports("explainkit.analyzer", typing=True)}
    assert not imported & HOST


def test_only_the_host_imports_the_plugin_manager():
    """Registries are built by the host and handed down, never looked up in a global."""
    offenders = [
        module
        for module in MODULES
        if module not in HOST
        for imported, _ in _imports(module, typing=True)
        if imported == "explainkit.manager"
    ]
    assert not offenders


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_is_longer_than_a_few_screens(module):
    lines = len(MODULES[module].read_text().splitlines())
    assert lines <= MAX_MODULE_LINES, f"{MODULES[module]} has {lines} lines"


BUILTINS = get_analyzers(get_plugin_manager(entrypoints=False, quiet=True))


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_builtin_analyzer_run_is_short(name):
    lines, _ = inspect.getsourcelines(BUILTINS[name].cls.run)
    assert len(lines) <= MAX_RUN_LINES, f"{name}.run() is {len(lines)} lines"


def _message_texts(node: ast.Raise) -> str | None:
    """The literal text of ``raise SomeError("...")`` / f-string, or None."""
    call = node.exc
    if not (isinstance(call, ast.Call) and call.args):
        return None
    func = call.func
    name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
    if not name.endswith("Error"):
        return None
    arg = call.args[0]
    parts = arg.values if isinstance(arg, ast.JoinedStr) else [arg]
    if not all(isinstance(p, ast.Constant | ast.FormattedValue) for p in parts):
        return None
    return "".join(p.value if isinstance(p, ast.Constant) else "{}" for p in parts)


def test_error_messages_are_one_lowercase_sentence_without_a_final_period():
    """Library errors read alike: ``what failed; what to do`` in lowercase, no final period."""
    bad = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise):
                text = _message_texts(node) or ""
                first = text.split(" ", 1)[0]
                acronym = first.replace("-", "").isupper()  # "YAML config files need ..."
                if text and ((text[0].isupper() and not acronym) or text.rstrip().endswith(".")):
                    bad.append(f"{module}:{node.lineno}: {text[:60]!r}")
    assert not bad, "\n".join(bad)


def test_no_test_module_imports_another():
    """What tests share lives in tests/helpers.py or conftest.py, not in a test module."""
    offenders = []
    for path in sorted((ROOT / "tests").rglob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            if any(name.rpartition(".")[2].startswith("test_") for name in names):
                offenders.append(f"{path.relative_to(ROOT)} imports {names[0]}")
    assert not offenders
