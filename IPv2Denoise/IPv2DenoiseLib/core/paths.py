"""Turn untrusted text into output paths that cannot leave their output folder.

A DICOM tag (SeriesInstanceUID, PatientID ...), a manifest cell or a file name found in an archive
is hostile until checked: ``../../etc`` or ``/abs`` must never become part of an output path.
:func:`safe_component` makes any text one harmless path component, :func:`safe_relative` a
relative path of such components, and :func:`path_inside` is the last check before anything is
written or removed: the resolved path (symlinks included) must lie inside the output root.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from IPv2DenoiseLib.core.errors import UserError

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


__all__ = ["MAX_COMPONENT_BYTES", "path_inside", "safe_component", "safe_relative"]
