"""The README's main job: ``ace-diffusers demo`` on the bundled miniature world."""

import re

import pytest

from ace_diffusers.cli import main

from ..shapes.conftest import NEEDS_WEIGHTS


@pytest.mark.slow
@NEEDS_WEIGHTS
def test_demo_erases_and_writes_the_grid(tmp_path, capsys):
    output = tmp_path / "demo.png"
    assert main(["demo", "--output", str(output), "--images-per-prompt", "1"]) == 0
    text = capsys.readouterr().out
    assert output.stat().st_size > 1000 and output.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    before, after = map(float, re.search(r"Acc_e .*?([\d.]+)%\s+([\d.]+)%", text).groups())
    assert after < before  # the erased shape is drawn less often after erasure
