"""The one folder the web app reads from and writes into; every path a browser sends is checked here.

A browser names inputs and export folders as text relative to ``--data-root``. :class:`DataRoot`
resolves them (symbolic links included, through :func:`~IPv2DenoiseLib.core.paths.path_inside`)
and refuses, in one line, anything that lands outside the root, so a crafted ``../../etc`` or a
link out of the root never reaches a reader or writer.
"""

from __future__ import annotations

import os
from pathlib import Path

from IPv2DenoiseLib.core.atomic import STAGING_DIR, check_output_path
from IPv2DenoiseLib.core.errors import UserError
from IPv2DenoiseLib.core.paths import path_inside

#: File names the readers of ``io/volumes.py`` take as one volume.
VOLUME_SUFFIXES = (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd")
#: Listing stops after this many entries (a huge archive must not stall the page).
MAX_LISTED = 500


def _why(exc: BaseException) -> str:
    """An OSError's own words (``File name too long``), or the message of another error."""
    return (exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)) or type(exc).__name__


def is_dicom_file(path: Path) -> bool:
    """A DICOM Part 10 file (``DICM`` at byte 128) or a ``.dcm`` file."""
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with path.open("rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


class DataRoot:
    """``--data-root``: where inputs are listed and opened, and where exports are written."""

    def __init__(self, root: str | os.PathLike) -> None:
        path = Path(root).expanduser()
        if not path.is_dir():
            raise UserError(f"--data-root {root} is not an existing folder")
        self.root = path.resolve()

    def resolve(self, text: str, *, what: str = "path") -> Path:
        """``text`` (relative to the root, or absolute) resolved; refused unless it lies inside the root.

        Raises
        ------
        UserError
            Empty, the root itself, or outside it (after resolving ``..`` and symbolic links).
        """
        text = str(text or "").strip()
        if not text or "\x00" in text:
            raise UserError(f"{what}: choose a path inside the data root")
        try:  # a loop of symbolic links raises RuntimeError, a name too long OSError
            resolved = (self.root / text).resolve()
            resolved.exists()
        except (RuntimeError, OSError) as exc:
            raise UserError(f"{what} {text}: cannot follow it ({_why(exc)})") from None
        if resolved == self.root:
            raise UserError(f"{what}: choose a file or folder inside the data root, not the root")
        try:
            return path_inside(self.root, text)
        except UserError:
            raise UserError(f"{what} {text} is outside the data root; refused") from None

    def holds(self, path: Path) -> bool:
        """Whether ``path`` resolves inside the root (False for a loop of links or an unreadable name)."""
        try:
            return path.resolve().is_relative_to(self.root)
        except (RuntimeError, OSError):
            return False

    def relative(self, path: Path) -> str:
        """``path`` as the browser shows it (relative to the root, ``/``-separated)."""
        return path.resolve().relative_to(self.root).as_posix()

    def input(self, text: str) -> Path:
        """An existing volume file or DICOM folder inside the root."""
        path = self.resolve(text, what="input")
        if not path.exists():
            raise UserError(f"input {text} does not exist in the data root")
        return path

    def export_folder(self, text: str, *, source: Path | None = None) -> Path:
        """A new (or empty) folder inside the root for a derived series; never the input or inside it."""
        path = self.resolve(text, what="export folder")
        check_output_path(path, inputs=[source] if source else (), folder=True, what="export folder")
        return path

    def inputs(self) -> list[str]:
        """Volume files and DICOM folders under the root (relative paths, sorted, hidden ones skipped)."""
        found: list[str] = []
        for folder, dirs, files in os.walk(self.root):
            dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != STAGING_DIR)
            here = Path(folder)
            if here.is_symlink() or not self.holds(here):
                dirs[:] = []
                continue
            visible = sorted(f for f in files if not f.startswith(".") and self.holds(here / f))
            if here != self.root and any(is_dicom_file(here / f) for f in visible[:5]):
                found.append(self.relative(here))
            found.extend(self.relative(here / f) for f in visible if f.lower().endswith(VOLUME_SUFFIXES))
            if len(found) >= MAX_LISTED:
                break
        return found[:MAX_LISTED]


__all__ = ["MAX_LISTED", "VOLUME_SUFFIXES", "DataRoot", "is_dicom_file"]
