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


@pytest.mark.slow
@pytest.mark.parametrize("code", list(runnable_snippets()))
def test_runnable_snippets_run(code):
    exec(compile(code, "<docs snippet>", "exec"), {"__name__": "__docs__"})


def test_figures_command_writes_the_method_png(tmp_path):
    from ace_diffusers.cli import main

    path = tmp_path / "images" / "method.png"
    assert main(["figures", "--output", str(path)]) == 0
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) < 200_000
    assert b"Software" not in data[:4096]  # no version metadata: reruns give the same bytes


def test_method_figure_shows_what_its_caption_says():
    """docs/method.md describes the figure in words; these are the numbers behind those words."""
    from ace_diffusers.bench.method_figure import method_figure_data
    from ace_diffusers.docs_figures import DEFAULT_PROMPTS
    from ace_diffusers.shapes.erasure import erase_arguments
    from ace_diffusers.shapes.pipeline import load_shapes_pipeline

    pipe = load_shapes_pipeline()
    pipe.erase_concept(**erase_arguments("circle"), adapter_name="figure")
    rows = {r.prompt: r for r in method_figure_data(pipe, "figure", "circle", list(DEFAULT_PROMPTS)).rows}
    assert set(rows) == {"a red circle", "a green disc", "a blue square", ""}
    assert min(rows["a red circle"].gate) > 0.9  # bidirectional encoder: every position carries it
    disc = rows["a green disc"]
    word = disc.tokens.index("disc")
    assert disc.gate[word] > 0.9 and max(g for i, g in enumerate(disc.gate) if i != word) < 0.5
    for prompt in ("a blue square", ""):  # gate closed; the ungated edit would move every token
        row = rows[prompt]
        assert max(row.gate) < 0.01 and max(row.change_gated) < 0.01
        assert min(row.change_ungated) > 10 * max(row.change_gated)
