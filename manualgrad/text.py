"""Plain-text formatting shared by the reports, the grader and the CLI."""

from __future__ import annotations

import re
from collections.abc import Sequence


def first_line(error: BaseException | str) -> str:
    """The first line of an error's message (or of a text), empty when there is none: a report row
    or a one-line refusal shows this, not a multi-line traceback."""
    text = str(error)
    return text.splitlines()[0] if text.strip() else ""


def either(names: Sequence[str]) -> str:
    """``"a, b or c"``."""
    *first, last = names
    return f"{', '.join(first)} or {last}" if first else last


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """``1 epoch``, ``2 epochs``: ``n`` and ``noun``, plural (``plural``, or ``noun + "s"``) unless ``n`` is 1."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def table(
    rows: Sequence[Sequence[object]],
    *,
    indent: str = "",
    separator: str = "  ",
    align: str | None = None,
    rule: tuple[str, str] | None = None,
) -> list[str]:
    """``rows`` (the first the header) as aligned lines, each column as wide as its widest cell.

    ``align`` gives one character per column, ``<`` (the default) or ``>``; ``rule``, a pair
    ``(fill, junction)`` such as ``("─", "─┼─")``, draws a line under the header. Trailing spaces
    are stripped, so the last column is never padded.
    """
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    align = align or "<" * len(widths)
    lines = [(indent + separator.join(f"{c:{a}{w}}" for c, a, w in zip(row, align, widths))).rstrip() for row in cells]
    if rule is not None:
        fill, junction = rule
        lines.insert(1, indent + junction.join(fill * w for w in widths))
    return lines


_ROLE = re.compile(r":(?:[a-z]+:)?[a-z]+:`~?([^`<]+?)(?:\s*<[^>]*>)?`")  # :func:`x`, :py:mod:`~a.b`, :ref:`t <x>`
_LITERAL = re.compile(r"``(.+?)``", re.S)  # a literal may run across a line break


def plain(text: str) -> str:
    """reST markup as a terminal shows it: ````x```` and ``:func:`x``` become ``x`` (a role's ``~a.b``
    becomes ``b``, as Sphinx shows it), so ``--help``, ``explain`` and exercise files read cleanly."""
    text = _ROLE.sub(lambda m: m.group(1).rsplit(".", 1)[-1] if m.group(0).count("~") else m.group(1), text)
    return _LITERAL.sub(r"\1", text)
