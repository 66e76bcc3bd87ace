"""The README's main job: ``ace-diffusers demo`` on the bundled miniature world."""

import re

import pytest

from ace_diffusers.cli import main

from ..shapes.conftest import NEEDS_WEIGHTS


@pytest.mark.slow
@NEEDS_WEIGHTS
def test_demo_erases_and_writes_the_grid(tmp_path, capsys):
    output = tmp_path / "demo.png"
    assert main(["demo", "--output", str(output), "--images-per-prompt", "1", "--steps", "40"]) == 0
    text = capsys.readouterr().out
    assert output.stat().st_size > 1000 and output.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    found = re.search(r"Acc_e .*?([\d.]+)%\s+([\d.]+)%\s+([\d.]+)%", text)
    before, closed, tuned = map(float, found.groups())
    assert closed < before and tuned < before  # both erasures draw the shape less often
    assert "closed form" in text and "fine-tuned" in text and "fit seconds" in text
