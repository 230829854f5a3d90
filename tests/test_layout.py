"""The package layout: the library never imports the application or the studies, and no import cycles."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "invertnet"
LIBRARY = (
    "core", "layers", "solvers", "logdet", "models", "analysis", "recovery", "data", "training", "figures", "_optional",
    "_files",
)  # fmt: skip


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _imported(node: ast.AST, module: str, path: Path) -> list[str]:
    """Names of the modules an import statement imports (``from a import b`` gives a.b when that is a module)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:  # relative import: resolve against this module's package
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = f"{package}.{node.module}" if node.module else package
    else:
        base = node.module or ""
    return [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]


def _all_imports(module: str) -> set[str]:
    """Every module imported anywhere in ``module``'s file (top level, functions, TYPE_CHECKING blocks)."""
    path = MODULES[module]
    return {name for node in ast.walk(ast.parse(path.read_text())) for name in _imported(node, module, path)}


def _runtime_imports(module: str) -> set[str]:
    """The invertnet modules ``module`` imports at run time: at the top level and inside functions (an import
    moved into a function to dodge a cycle is still a cycle), but not in ``if TYPE_CHECKING`` blocks."""
    path = MODULES[module]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for statement in child.orelse:
                    found.update(_imported(statement, module, path))
                    visit(statement)
                continue
            found.update(_imported(child, module, path))
            visit(child)

    visit(ast.parse(path.read_text()))
    return {name for name in found if name in MODULES}


def _library(module: str) -> bool:
    return module == "invertnet" or any(
        module == f"invertnet.{part}" or module.startswith(f"invertnet.{part}.") for part in LIBRARY
    )


def test_the_layout_is_what_the_test_checks():
    assert {"invertnet.app.cli", "invertnet.app.runs", "invertnet.experiments.stability"} <= set(MODULES)
    assert sum(_library(module) for module in MODULES) > 40  # the library is found, not an empty match


@pytest.mark.parametrize("module", sorted(module for module in MODULES if _library(module)))
def test_the_library_never_imports_the_application_or_the_studies(module):
    forbidden = sorted(
        name
        for name in _all_imports(module)
        if name.startswith(("invertnet.app", "invertnet.experiments")) or name == "invertnet.cli"
    )
    assert not forbidden, f"{module} imports {forbidden}"


@pytest.mark.parametrize("module", sorted(module for module in MODULES if module.startswith("invertnet.experiments")))
def test_the_studies_use_the_library_only(module):
    assert not [name for name in _all_imports(module) if name.startswith("invertnet.app")]


def _cycle() -> list[str] | None:
    """One import cycle among the invertnet modules (as a path a -> b -> ... -> a), or None."""
    graph = {module: _runtime_imports(module) - {module} for module in MODULES}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def test_no_import_cycles():
    cycle = _cycle()
    assert cycle is None, " -> ".join(cycle or [])


def test_the_cycle_check_finds_a_cycle(monkeypatch):
    """The check above is not vacuous: a module importing one that imports it back is reported."""
    fake = {"invertnet.app.runs": {"invertnet.app.config"}, "invertnet.app.config": {"invertnet.app.runs"}}
    monkeypatch.setattr(sys.modules[__name__], "_runtime_imports", lambda module: fake.get(module, set()))
    assert _cycle() in (
        ["invertnet.app.config", "invertnet.app.runs", "invertnet.app.config"],
        ["invertnet.app.runs", "invertnet.app.config", "invertnet.app.runs"],
    )


def test_the_command_line_help_loads_no_torch():
    code = (
        "import sys\n"
        "from invertnet.app.cli import main\n"
        "try:\n"
        "    main(['--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = sorted(m for m in ('torch', 'matplotlib', 'scipy', 'pydantic') if m in sys.modules)\n"
        "print(heavy)\n"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "Usage:" in completed.stdout and completed.stdout.strip().endswith("[]"), completed.stdout
