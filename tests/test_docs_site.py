"""The documentation site: a strict mkdocs build (every cross-reference and every docstring resolves) and the
tutorials' code, run as written."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "docs" / "index.md", *sorted((ROOT / "docs" / "tutorials").glob("*.md"))]


def _build(config: Path, site: Path) -> subprocess.CompletedProcess:
    environment = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-f", str(config), "-d", str(site)]
    return subprocess.run(command, cwd=config.parent, capture_output=True, text=True, env=environment, timeout=300)


def test_the_site_builds_strictly(tmp_path):
    result = _build(ROOT / "mkdocs.yml", tmp_path / "site")
    assert result.returncode == 0, result.stdout + result.stderr
    reference = (tmp_path / "site" / "reference" / "models" / "index.html").read_text()
    assert "rsample_and_log_prob" in reference and "evaluate_log_prob" in reference


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
