"""``import ace_diffusers`` is light and still gives every pipeline the ACE verbs once diffusers loads."""

import subprocess
import sys

from ace_diffusers._verbs import PIPELINE_METHODS
from ace_diffusers.version import __version__


def run(code):
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.split()


def test_importing_the_package_loads_neither_torch_nor_diffusers():
    assert run("import sys, ace_diffusers; print('torch' in sys.modules, 'diffusers' in sys.modules)") == [
        "False",
        "False",
    ]


def test_the_verbs_arrive_with_diffusers_in_either_import_order():
    names = sorted(PIPELINE_METHODS)
    check = f"print(all(hasattr(DiffusionPipeline, n) for n in {names!r}))"
    assert run("import ace_diffusers\nfrom diffusers import DiffusionPipeline\n" + check) == ["True"]
    assert run("from diffusers import DiffusionPipeline\nimport ace_diffusers\n" + check) == ["True"]
    # diffusers first imported half-way through importing ace_diffusers' own modules (no import cycle)
    assert run(
        "import ace_diffusers.fitting.closed_form\nfrom diffusers import DiffusionPipeline\n" + check
    ) == ["True"]


def test_public_names_resolve_on_first_use():
    assert run(
        "import ace_diffusers; print(ace_diffusers.ACEAdapter.__module__, 'ACETrainer' in dir(ace_diffusers))"
    ) == [
        "ace_diffusers.core.adapter",
        "True",
    ]


def test_the_command_answers_version_and_help_without_torch():
    code = (
        "import sys, contextlib, io\nfrom ace_diffusers.cli import main\n"
        "out = io.StringIO()\nwith contextlib.redirect_stdout(out): main(['--version']); main(['--help'])\n"
        "print(out.getvalue().splitlines()[0].replace(' ', '_'), 'torch' in sys.modules)"
    )
    assert run(code) == [f"ace-diffusers_{__version__}", "False"]
