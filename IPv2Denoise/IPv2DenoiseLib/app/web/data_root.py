"""The one folder the web app reads from and writes into; every path a browser sends is checked here.

A browser names inputs and export folders as text relative to ``--data-root``. :class:`DataRoot`
resolves them (symbolic links included, through :func:`~IPv2DenoiseLib.core.paths.path_inside`)
and refuses, in one line, anything that lands outside the root, so a crafted ``../../etc`` or a
link out of the root never reaches a reader or writer.

Only regular files are read: a named pipe (FIFO), socket or device in the root is neither listed
nor opened, since opening a FIFO blocks until someone writes to it, which may be never.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from IPv2DenoiseLib.core.atomic import STAGING_DIR, check_output_path
from IPv2DenoiseLib.core.errors import UserError
from IPv2DenoiseLib.core.paths import path_inside

#: File names the readers of ``io/volumes.py`` take as one volume.
VOLUME_SUFFIXES = (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd")
#: Listing stops after this many entries (a huge archive must not stall the page).
MAX_LISTED = 500
#: Listing looks into at most this many folders (a few thousand take about a second on a local disk).
MAX_FOLDERS = 2000
#: How many files of a folder are looked at for the DICOM mark (``DICM`` at byte 128).
DICOM_PROBES = 5


def _why(exc: BaseException) -> str:
    """An OSError's own words (``File name too long``), or the message of another error."""
    return (exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)) or type(exc).__name__


def is_regular_file(path: Path) -> bool:
    """Whether ``path`` is (or links to) a regular file: not a folder, FIFO, socket or device."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def is_dicom_file(path: Path) -> bool:
    """A regular file that is DICOM Part 10 (``DICM`` at byte 128) or named ``.dcm``.

    Anything else (a FIFO, socket or device included) is False without being read: it is opened
    non-blocking and checked again once open, so a FIFO put there meanwhile cannot block.
    """
    if not is_regular_file(path):
        return False
    if path.suffix.lower() == ".dcm":
        return True
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError:
        return False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        return os.pread(fd, 4, 128) == b"DICM"
    except OSError:
        return False
    finally:
        os.close(fd)


@dataclass
class InputListing:
    """What :meth:`DataRoot.list_inputs` found, and whether it stopped early."""

    #: Volume files and DICOM folders, relative to the root (``/``-separated).
    paths: list[str] = field(default_factory=list)
    #: Empty when the whole root was listed, else one line for the page (why the list is short).
    note: str = ""


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
        """An existing volume file or DICOM folder inside the root (never a FIFO, socket or device)."""
        path = self.resolve(text, what="input")
        if not path.exists():
            raise UserError(f"input {text} does not exist in the data root")
        if not (path.is_dir() or is_regular_file(path)):
            raise UserError(f"input {text} is not a file or folder (a pipe, socket or device); refused")
        return path

    def export_folder(self, text: str, *, source: Path | None = None) -> Path:
        """A new (or empty) folder inside the root for a derived series; never the input or inside it."""
        path = self.resolve(text, what="export folder")
        check_output_path(path, inputs=[source] if source else (), folder=True, what="export folder")
        return path

    def inputs(self) -> list[str]:
        """Volume files and DICOM folders under the root (see :meth:`list_inputs`)."""
        return self.list_inputs().paths

    def list_inputs(self, *, max_folders: int = MAX_FOLDERS, max_listed: int = MAX_LISTED) -> InputListing:
        """Volume files and DICOM folders under the root, folder by folder in name order.

        Hidden entries, links that lead out of the root (or nowhere) and anything that is not a
        regular file or folder are skipped; linked folders are not entered. Blocking file system
        work: the page runs it in a worker thread.

        Parameters
        ----------
        max_folders : int
            Folders looked into at most; the listing stops there and says so.
        max_listed : int
            Entries listed at most.

        Returns
        -------
        InputListing
            The relative paths, and a note when a limit cut the listing short.
        """
        found: list[str] = []
        visited = 0
        stack = [self.root]
        while stack:
            if visited >= max_folders:
                return InputListing(
                    found[:max_listed],
                    f"the list stops after {max_folders} folders; type the path of a scan it does not show",
                )
            here = stack.pop()
            visited += 1
            files, folders = self._entries(here)
            if here != self.root and any(is_dicom_file(here / f) for f in files[:DICOM_PROBES]):
                found.append(self.relative(here))
            found.extend(self.relative(here / f) for f in files if f.lower().endswith(VOLUME_SUFFIXES))
            if len(found) >= max_listed:
                return InputListing(
                    found[:max_listed],
                    f"the list stops after {max_listed} scans; type the path of a scan it does not show",
                )
            stack.extend(reversed(folders))  # depth first, in name order
        return InputListing(found)

    def _entries(self, folder: Path) -> tuple[list[str], list[Path]]:
        """(names of the regular files, sub-folders to enter) of ``folder``, sorted; hidden ones skipped."""
        files: list[str] = []
        folders: list[Path] = []
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            return files, folders
        for entry in entries:
            if entry.name.startswith(".") or entry.name == STAGING_DIR:
                continue
            try:
                if entry.is_symlink():
                    # a link is listed when it leads to a regular file inside the root; never entered
                    if entry.is_file() and self.holds(Path(entry.path)):
                        files.append(entry.name)
                elif entry.is_dir(follow_symlinks=False):
                    folders.append(Path(entry.path))
                elif entry.is_file(follow_symlinks=False):  # regular only: no FIFO, socket or device
                    files.append(entry.name)
            except OSError:
                continue
        return files, folders


__all__ = [
    "MAX_FOLDERS",
    "MAX_LISTED",
    "VOLUME_SUFFIXES",
    "DataRoot",
    "InputListing",
    "is_dicom_file",
    "is_regular_file",
]
