"""The documentation builds strictly, names every command, and its runnable snippets run."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ace_diffusers.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def runnable_snippets():
    for page in sorted(DOCS.rglob("*.md")):
        text = page.read_text()
        for match in re.finditer(r"<!-- runnable -->\s*```python\n(.*?)```", text, re.S):
            yield pytest.param(
                match.group(1), id=f"{page.relative_to(DOCS)}:{text[: match.start()].count(chr(10)) + 1}"
            )


def test_cli_reference_names_every_command():
    text = (DOCS / "cli.md").read_text()
    missing = [name for name in COMMANDS if f"`ace-diffusers {name}`" not in text]
    assert not missing, f"docs/cli.md does not describe {missing}"


@pytest.mark.slow
def test_site_builds_strictly(tmp_path):
    if shutil.which("mkdocs") is None:
        pytest.fail("mkdocs is part of the test extra: pip install -e '.[test]'")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    roles = re.findall(r":(?:class|func|meth|mod|data|attr|exc):`", api)
    assert not roles, f"the API page shows {len(roles)} reStructuredText roles"
    assert 'href="#ace_diffusers.ACEAdapter"' in api  # roles became links
    assert not (tmp_path / "site" / "_ext").exists()


@pytest.mark.slow
@pytest.mark.parametrize("code", list(runnable_snippets()))
def test_runnable_snippets_run(code):
    exec(compile(code, "<docs snippet>", "exec"), {"__name__": "__docs__"})


def test_every_test_the_docs_name_exists():
    """A docs cell that says 'backed by tests/x.py::test_y' must point at a real test."""
    missing = []
    for page in Path(__file__).resolve().parents[1].joinpath("docs").rglob("*.md"):
        for ref in set(re.findall(r"`(tests/[\w/]+\.py)(?:::(\w+))?", page.read_text(encoding="utf-8"))):
            path, name = ref
            source = Path(__file__).resolve().parents[1] / path
            if not source.is_file() or (name and f"def {name}(" not in source.read_text(encoding="utf-8")):
                missing.append(f"{page.name}: {path}::{name}")
    assert not missing, missing
