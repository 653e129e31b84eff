"""Turn untrusted text into output paths that cannot leave their output folder.

A DICOM tag (SeriesInstanceUID, PatientID ...), a manifest cell or a file name found in an archive
is hostile until checked: ``../../etc`` or ``/abs`` must never become part of an output path.
:func:`safe_component` makes any text one harmless path component, :func:`safe_relative` a
relative path of such components, and :func:`path_inside` is the last check before anything is
written or removed: the resolved path (symlinks included) must lie inside the output root.
:func:`make_in_shared_folder` creates something in a folder that other writers may remove meanwhile
(the staging folders of ``core/atomic.py`` and the lock files in them).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from IPv2DenoiseLib.core.errors import UserError

_Made = TypeVar("_Made")

#: Longest component kept as is (bytes of UTF-8); longer ones are cut and given a short hash.
MAX_COMPONENT_BYTES = 200


def safe_component(text: str) -> str:
    """``text`` as one safe path component (unchanged when it already is one).

    Path separators, control characters and NUL become ``_``; leading dots become ``_`` (no
    ``.``, ``..`` or hidden names, so nothing can collide with the state folders); an empty
    result is ``_``; a name too long for a file system is cut and ends in a hash of the original.
    """
    cleaned = "".join("_" if ch in "/\\" or not ch.isprintable() else ch for ch in str(text)).strip()
    stripped = cleaned.lstrip(".")
    cleaned = "_" * (len(cleaned) - len(stripped)) + stripped
    if not cleaned:
        return "_"
    if len(cleaned.encode("utf-8")) > MAX_COMPONENT_BYTES:
        tag = hashlib.sha1(str(text).encode("utf-8", "surrogatepass")).hexdigest()[:10]
        cut = cleaned.encode("utf-8")[: MAX_COMPONENT_BYTES - 11].decode("utf-8", "ignore")
        cleaned = f"{cut}-{tag}"
    return cleaned


def safe_relative(text: str) -> str:
    """A ``/``-separated relative path whose every part is a :func:`safe_component` (``..``, ``.``
    and empty parts are dropped, a leading ``/`` or backslash parts never make it absolute)."""
    parts = [p for p in str(text).replace("\\", "/").split("/") if p.strip() not in ("", ".", "..")]
    return "/".join(safe_component(p) for p in parts) or "_"


def path_inside(root: str | os.PathLike, path: str | os.PathLike) -> Path:
    """``path`` resolved (symlinks included); raises when it is not strictly inside ``root``.

    Call it on every output path built from data before writing or removing there.

    Raises
    ------
    UserError
        The resolved path is ``root`` itself or lies outside it.
    """
    resolved_root = Path(root).resolve()
    resolved = (Path(root) / path).resolve()
    if resolved == resolved_root or not resolved.is_relative_to(resolved_root):
        raise UserError(f"{path} would lie outside the output folder {root}; refused")
    return resolved


def make_in_shared_folder(
    folder: Path, make: Callable[[], _Made], *, parents: bool = False, attempts: int = 50
) -> _Made:
    """Create ``folder`` (with its missing parents when ``parents``) and call ``make`` in it.

    A shared staging folder is removed by whichever writer finishes and finds it empty; that can
    happen inside ``mkdir``'s own exist_ok check (FileExistsError) or between ``mkdir`` and
    ``make`` (FileNotFoundError), so both steps are retried together. Raises NotADirectoryError
    when a file stands in the folder's place, and TimeoutError after ``attempts`` tries (also when,
    without ``parents``, the folder's parent is missing); callers turn both into their own
    one-line :class:`UserError`.
    """
    for _ in range(attempts):
        try:
            folder.mkdir(parents=parents, exist_ok=True)
            return make()
        except (FileNotFoundError, FileExistsError):
            # one stat only: "exists, then not a dir" would be two, and the folder can go in between
            if folder.is_file():
                raise NotADirectoryError(str(folder)) from None
    raise TimeoutError(f"{folder} keeps disappearing")


__all__ = ["MAX_COMPONENT_BYTES", "make_in_shared_folder", "path_inside", "safe_component", "safe_relative"]
