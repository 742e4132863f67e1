"""A griffe extension: the reST bits of autoprec's docstrings, as Markdown for mkdocstrings.

The docstrings are Google style (sections parsed by griffe) written for ``help()`` and Sphinx readers, so two
reST habits remain, which Markdown would garble:

- Sphinx roles (:func:`autoprec.tune`, :class:`~autoprec.policy.PrecisionPolicy`) become code spans
  (`autoprec.tune()`, `PrecisionPolicy`). They are not links: most name modules the reference does not render.
- Doctest lines (``>>> ...`` and their output) outside an ``Examples:`` section would read as nested block
  quotes; they become ``pycon`` code blocks, without their ``# doctest:`` directives.

The docstrings themselves stay as they are: doctests run them, and ``help()`` shows them.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(func|meth|class|mod|data|attr|exc|obj|const):`(~?)([^`]+)`")
DIRECTIVE = re.compile(r"\s*# doctest:.*$")


def _role(match: re.Match[str]) -> str:
    kind, tilde, target = match.groups()
    shown = target.rsplit(".", 1)[-1] if tilde else target
    return f"`{shown}()`" if kind in ("func", "meth") else f"`{shown}`"


def _fence_doctests(text: str) -> str:
    """Wrap each run of doctest lines (a ``>>>`` line, then lines up to a blank one) in a pycon block."""
    out: list[str] = []
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        stripped = lines[i].lstrip()
        if not stripped.startswith(">>>"):
            out.append(lines[i])
            i += 1
            continue
        indent = lines[i][: len(lines[i]) - len(stripped)]
        out.append(f"{indent}```pycon")
        while i < len(lines) and lines[i].strip():
            out.append(DIRECTIVE.sub("", lines[i]))
            i += 1
        out.append(f"{indent}```")
    return "\n".join(out)


class ReSTToMarkdown(griffe.Extension):
    """Rewrite every docstring once the package is loaded, before mkdocstrings parses its sections."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _fence_doctests(ROLE.sub(_role, obj.docstring.value))
