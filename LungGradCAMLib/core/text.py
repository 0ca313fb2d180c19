"""Text that comes from a file (a DICOM field, a CSV cell, a model card, a file name) or another
library, made safe to print: on one line, with nothing a terminal would act on."""

from __future__ import annotations

from typing import Optional


def escaped(text: object, limit: Optional[int] = 400) -> str:
    """``text`` with every character that is not printable (newline, carriage return, tab, the
    escape that starts an ANSI sequence, bell, Unicode format characters such as a right-to-left
    override) written as its Python escape (``\\n``, ``\\x1b``, ``\\u202e``), and cut to ``limit``
    characters (None: not cut), the cut marked by "..."."""
    out = "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))
    return out if limit is None or len(out) <= limit else out[: max(0, limit - 3)] + "..."


def first_line(text: object, limit: int = 200) -> str:
    """The first non-empty line of ``text`` (another library's error message, which may go on with
    a C++ stack), :func:`escaped` and cut to ``limit`` characters."""
    lines = [line for line in str(text).splitlines() if line.strip()]
    return escaped(lines[0].strip() if lines else "", limit)
