"""Command help in plain words: module docstrings (reStructuredText for the API docs) as terminal text.

Every command builds its ``--help`` from its module docstring; this turns the markup people should not
see in a terminal (````code````, ``:mod:`x```, ``:func:`~a.b```, ``Examples::``) into plain text.
"""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import PurePath

_ROLE = re.compile(r":(?:mod|func|class|meth|data|attr|obj|exc):`~?([^`]+)`")


def plain(text: str | None, *, first_paragraph: bool = False) -> str:
    """``text`` without reStructuredText roles and literals (``~a.b`` keeps the last part, ``b``)."""
    text = (text or "").strip()
    if first_paragraph:
        text = text.split("\n\n")[0]

    def role(match: re.Match) -> str:
        target = match.group(1)
        return target.rsplit(".", 1)[-1] if "~" in match.group(0) else target

    text = _ROLE.sub(role, text)
    text = re.sub(r"``([^`]+)``", r"\1", text)
    return re.sub(r"::\n", ":\n", text)


def parser(
    prog: str, doc: str | None, *, first_paragraph: bool = False, **kwargs: object
) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` for ``ace-diffusers <prog>`` whose description is ``doc`` in plain words,
    laid out as written (examples keep their lines)."""
    return argparse.ArgumentParser(
        prog=f"ace-diffusers {prog}",
        description=plain(doc, first_paragraph=first_paragraph),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        **kwargs,
    )


def command_line(command: str, argv: list[str]) -> str:
    """``command`` and its arguments as a page quotes them: an absolute path is reduced to its file name
    (where a run wrote its JSON says nothing about the figures, and names a machine)."""
    shown = [PurePath(a).name if a.startswith("/") else a for a in argv]
    return " ".join([command, *(shlex.quote(a) for a in shown)])
