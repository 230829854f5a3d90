"""The documentation site: a strict mkdocs build (every cross-reference and every docstring resolves), an API
reference generated from the docstrings that documents every public name, tables generated from the code, and the
tutorials' code, run as written."""

import importlib
import os
import pkgutil
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import invertnet

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "docs" / "index.md", *sorted((ROOT / "docs" / "tutorials").glob("*.md"))]

#: The modules whose ``__all__`` is the public API: every package, and the modules users import by name.
PUBLIC_MODULES = [
    "invertnet",
    "invertnet.analysis",
    "invertnet.analysis.sensitivity",
    "invertnet.analysis.spheres",
    "invertnet.app",
    "invertnet.app.config",
    "invertnet.app.crossvalidate",
    "invertnet.app.kinds",
    "invertnet.app.runs",
    "invertnet.data",
    "invertnet.experiments",
    "invertnet.experiments.demo",
    "invertnet.experiments.independence",
    "invertnet.experiments.receptive_field",
    "invertnet.experiments.recovery",
    "invertnet.experiments.stability",
    "invertnet.figures",
    "invertnet.layers",
    "invertnet.layers.operator_norms",
    "invertnet.logdet",
    "invertnet.models",
    "invertnet.models.spectra",
    "invertnet.recovery",
    "invertnet.solvers",
    "invertnet.training",
    "invertnet.transforms",
]


def _build(config: Path, site: Path) -> subprocess.CompletedProcess:
    environment = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-f", str(config), "-d", str(site)]
    return subprocess.run(command, cwd=config.parent, capture_output=True, text=True, env=environment, timeout=300)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    site = tmp_path_factory.mktemp("docs") / "site"
    result = _build(ROOT / "mkdocs.yml", site)
    assert result.returncode == 0, result.stdout + result.stderr
    return site


def test_the_site_builds_strictly(site):
    reference = (site / "reference" / "models" / "index.html").read_text()
    assert "rsample_and_log_prob" in reference and "evaluate_log_prob" in reference


def _resolve(dotted: str) -> object:
    """The object a reference anchor names (the longest importable module prefix, then attributes)."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            target: object = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for part in parts[cut:]:
            target = getattr(target, part, None)
        return target
    return None


def test_every_package_is_a_public_module():
    packages = {info.name for info in pkgutil.walk_packages(invertnet.__path__, "invertnet.") if info.ispkg}
    assert packages <= set(PUBLIC_MODULES)


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_the_reference_documents_every_public_name(site, module_name):
    anchors: dict[str, list[str]] = {}
    for page in site.rglob("*.html"):
        for anchor in re.findall(r'id="(invertnet[\w.]*)"', page.read_text()):
            anchors.setdefault(anchor.rsplit(".", 1)[-1], []).append(anchor)
    module = importlib.import_module(module_name)
    undocumented = [
        name
        for name in getattr(module, "__all__", [])
        if not any(_resolve(anchor) is getattr(module, name) for anchor in anchors.get(name, []))
    ]
    assert not undocumented, f"the API reference does not document {module_name}'s {undocumented}"


def test_the_generated_tables_cover_every_command_kind_and_config(site):
    from invertnet.app.cli import main
    from invertnet.app.embedded import embedded_configs
    from invertnet.app.kinds import KINDS

    page = (site / "cli" / "index.html").read_text()
    assert "generated:" not in page
    for name in [*main.commands, *KINDS, *embedded_configs()]:
        assert f"<code>{name}</code>" in page or f"<code>invertnet {name} " in page, name
    assert "<code>hidden_features</code> = <code>32</code>" in page  # a kind's field with its default


def test_a_broken_reference_fails_the_build(tmp_path):
    copy = tmp_path / "project"
    shutil.copytree(ROOT / "docs", copy / "docs")
    shutil.copy(ROOT / "mkdocs.yml", copy / "mkdocs.yml")
    (copy / "src").symlink_to(ROOT / "src")
    (copy / "docs" / "cli.md").write_text("# CLI\n\n::: invertnet.models.no_such_builder\n")
    result = _build(copy / "mkdocs.yml", tmp_path / "site")
    assert result.returncode != 0 and "no_such_builder" in result.stdout + result.stderr


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.stem)
def test_the_tutorials_code_runs(page, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.DOTALL)
    assert blocks, f"{page.name} has no python example"
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(page), "exec"), namespace)
