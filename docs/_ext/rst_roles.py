"""A griffe extension for the API page: reStructuredText roles in docstrings become Markdown.

The package's docstrings use Sphinx roles (``:class:`~ace_diffusers.core.adapter.ACEAdapter```) and
double-backtick literals, which mkdocstrings would print literally. At docs build time this turns a role
whose target is rendered on ``docs/api.md`` into a cross-reference link
(``[ACEAdapter][ace_diffusers.ACEAdapter]``), any other role into inline code, and ````x```` into
```x```. The source stays as it is (the roles are what ``help()`` and IDEs show).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import griffe

API_PAGE = Path(__file__).resolve().parents[1] / "api.md"
_ROLE = re.compile(r":(?:mod|func|class|meth|data|attr|obj|exc):`(~?)([^`<]+?)`")
_LITERAL = re.compile(r"``([^`]+)``")


def documented() -> dict[str, str]:
    """``{short name: identifier}`` of the objects rendered on the API page (``::: ace_diffusers.X``)."""
    names = re.findall(r"^::: (\S+)", API_PAGE.read_text(encoding="utf-8"), re.M)
    return {name.rsplit(".", 1)[-1]: name for name in names}


class RolesToMarkdown(griffe.Extension):
    def __init__(self) -> None:
        super().__init__()
        self.targets = documented()

    def _link(self, match: re.Match) -> str:
        short, target = match.group(1) == "~", match.group(2).strip()
        parts = target.split(".")
        text = parts[-1] if short else target
        for i in range(len(parts)):  # the rendered object and, for a member, the rest of the path
            if parts[i] in self.targets:
                return f"[`{text}`][{'.'.join([self.targets[parts[i]], *parts[i + 1 :]])}]"
        return f"`{text}`"

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            value = _ROLE.sub(self._link, obj.docstring.value)
            obj.docstring.value = _LITERAL.sub(r"`\1`", value)
