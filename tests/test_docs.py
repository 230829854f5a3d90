"""docs/api.md stays true to the code: every name it lists exists, and every public name is listed."""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from types import ModuleType

import pytest

API = (Path(__file__).resolve().parents[1] / "docs" / "api.md").read_text()


def _sections() -> dict[str, list[str]]:
    """The names in the first column of each ``| name | ...`` table, by the module its heading names
    (``## `invertnet.x```)."""
    sections: dict[str, list[str]] = {}
    module, names_table = None, True
    for line in API.splitlines():
        heading = re.match(r"#{2,3} `(invertnet[\w.]*)`", line)
        if heading:
            module = heading.group(1)
            sections.setdefault(module, [])
        elif line.startswith("#"):
            module = None
        elif module and line.startswith("| ") and not line.startswith("| ---"):
            first = line.strip().strip("|").split(" | ")[0].strip()
            if first in ("name", "kind"):  # a table's header: only "name" tables list public names
                names_table = first == "name"
                continue
            if not names_table:
                continue
            names = [re.match(r"[A-Za-z_][\w.]*", token) for token in re.findall(r"`([^`]+)`", first)]
            sections[module] += [name.group(0) for name in names if name]
    return sections


SECTIONS = _sections()


def _resolve(module: ModuleType, dotted: str) -> bool:
    target: object = module
    for part in dotted.split("."):
        if hasattr(target, part):
            target = getattr(target, part)
            continue
        try:
            target = importlib.import_module(f"{target.__name__}.{part}")  # type: ignore[attr-defined]
        except (ImportError, AttributeError):
            return False
    return True


def test_the_api_page_documents_every_package():
    assert {"invertnet", "invertnet.layers", "invertnet.solvers", "invertnet.training", "invertnet.app.kinds"} <= set(
        SECTIONS
    )


@pytest.mark.parametrize("module_name", sorted(SECTIONS))
def test_every_listed_name_exists(module_name):
    module = importlib.import_module(module_name)
    missing = [name for name in SECTIONS[module_name] if not _resolve(module, name)]
    assert not missing, f"docs/api.md lists names that {module_name} does not have: {missing}"


@pytest.mark.parametrize("module_name", sorted(SECTIONS))
def test_every_public_name_is_listed(module_name):
    module = importlib.import_module(module_name)
    listed = {name.split(".")[0] for name in SECTIONS[module_name]}
    for other, names in SECTIONS.items():  # a name may be documented under the submodule that defines it
        if other.startswith(f"{module_name}."):
            submodule = importlib.import_module(other)
            listed |= {name for name in names if getattr(module, name, None) is getattr(submodule, name, object())}
    unlisted = sorted(set(getattr(module, "__all__", [])) - listed)
    assert not unlisted, f"docs/api.md does not list {module_name}'s {unlisted}"
