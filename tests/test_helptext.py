"""Command help shows plain words: no reStructuredText roles or literals reach the terminal."""

import importlib

import pytest

from ace_diffusers.cli import COMMANDS
from ace_diffusers.helptext import plain


def test_roles_and_literals_become_plain_text():
    text = (
        "Use ``erase_concept`` (:func:`~ace_diffusers.fitting.erase.erase_concept`), "
        ":mod:`a.b`.\n\nMore."
    )
    assert plain(text) == "Use erase_concept (erase_concept), a.b.\n\nMore."
    assert plain(text, first_paragraph=True) == "Use erase_concept (erase_concept), a.b."
    assert plain("Examples::\n\n    x") == "Examples:\n\n    x"


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_help_is_plain_and_names_the_command(name, capsys):
    module = importlib.import_module(COMMANDS[name][0])
    with pytest.raises(SystemExit):
        module.main(["--help"])
    out = capsys.readouterr().out
    assert out.startswith(f"usage: ace-diffusers {name} ")
    assert "``" not in out and ":mod:" not in out and ":func:" not in out and ":class:" not in out


def test_command_lines_name_no_machine_paths(tmp_path):
    from ace_diffusers.helptext import command_line

    argv = ["--json", str(tmp_path / "a.json"), "--shapes", "a b"]
    line = command_line("ace-diffusers bench trainer", argv)
    assert line == "ace-diffusers bench trainer --json a.json --shapes 'a b'"
