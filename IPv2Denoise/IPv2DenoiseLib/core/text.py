"""Untrusted text (tag values, a PACS's answers) made fit to show on one line.

A DICOM tag or a server's reply may hold control characters: terminal escape sequences, line
breaks that forge a second log or table line. Everything shown to a person goes through
:func:`printable_line` first (paths have their own rules in :mod:`IPv2DenoiseLib.core.paths`).
"""

from __future__ import annotations


def printable_line(text: object, limit: int = 64) -> str:
    """``text`` with its control characters dropped and its length capped (an ellipsis at the cut).

    Parameters
    ----------
    text : object
        A tag value or any other untrusted text (``str()`` of it is taken).
    limit : int
        Characters kept at most.

    Returns
    -------
    str
        One printable line.
    """
    line = "".join(c for c in str(text) if c.isprintable())
    return line if len(line) <= limit else line[: limit - 1] + "…"


__all__ = ["printable_line"]
