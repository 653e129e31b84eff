"""Advisory file locks (``flock``) that name their holder: the one mechanism behind "one writer".

``claim_output`` (one output, :mod:`IPv2DenoiseLib.core.atomic`) and ``batch_lock`` (one batch run
per OUT, shared by shards) are built on these. The kernel releases a lock when its holder dies,
even by ``kill -9``, so a stale lock never blocks; the lock file holds ``pid N on host H`` for the
refusal message. POSIX only (``fcntl``).
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

from IPv2DenoiseLib.core.errors import UserError
from IPv2DenoiseLib.core.paths import make_in_shared_folder


def open_lock_file(path: str | os.PathLike) -> int:
    """A read/write descriptor on ``path`` (created with its folder; a symbolic link is refused).

    Parameters
    ----------
    path : path-like
        The lock file.

    Returns
    -------
    int
        The descriptor; closing it releases any lock taken on it.

    Raises
    ------
    UserError
        The file cannot be created or opened.
    """
    path = Path(path)
    try:  # the folder may be a staging folder that other writers remove when they finish
        return make_in_shared_folder(
            path.parent, lambda: os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666), parents=True
        )
    except NotADirectoryError:
        raise UserError(f"cannot open the lock file {path} ({path.parent} is a file)") from None
    except TimeoutError:
        raise UserError(f"cannot open the lock file {path} (its folder keeps disappearing)") from None
    except OSError as exc:
        raise UserError(f"cannot open the lock file {path} ({exc.strerror or exc})") from None


def try_lock(fd: int, *, shared: bool = False) -> bool:
    """Take the lock on ``fd`` without waiting; False when another process holds it.

    Parameters
    ----------
    fd : int
        From :func:`open_lock_file`.
    shared : bool
        A shared (reader) lock instead of an exclusive one.

    Returns
    -------
    bool
        Whether the lock was taken.
    """
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def unlock(fd: int) -> None:
    """Release the lock on ``fd`` (keeping the descriptor open).

    Parameters
    ----------
    fd : int
        From :func:`open_lock_file`.
    """
    fcntl.flock(fd, fcntl.LOCK_UN)


def record_holder(fd: int) -> None:
    """Write ``pid N on host H`` of this process into the locked file.

    Parameters
    ----------
    fd : int
        A descriptor this process holds the exclusive lock on.
    """
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode(), 0)


def remove_if_unheld(path: str | os.PathLike) -> bool:
    """Remove the lock file ``path`` when no process holds its lock; True when it was removed.

    A holder killed between creating its lock file and removing it (``kill -9`` inside a claim's
    first lines, or a second attempt killed while it waited) leaves the file behind; the kernel
    has released its lock. Removing it is safe against a claimer that opened the file meanwhile:
    claimers check, once locked, that the name still leads to the file they locked, and retry.
    The file is never created here, and a symbolic link is never followed.

    Parameters
    ----------
    path : path-like
        The lock file.

    Returns
    -------
    bool
        Whether the file was removed (False: held, gone already, or not a regular file).
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
    except OSError:  # gone, a link, or not ours to open
        return False
    try:
        if not try_lock(fd):
            return False
        try:
            if os.fstat(fd).st_ino != os.stat(path).st_ino:  # replaced after we opened it
                return False
        except FileNotFoundError:
            return False
        os.unlink(path)
        return True
    finally:
        os.close(fd)


def lock_holder(path: str | os.PathLike) -> str:
    """Who holds a lock, as its file says (``pid N on host H``), for a refusal message.

    Parameters
    ----------
    path : path-like
        The lock file.

    Returns
    -------
    str
        The holder, or ``pid ? on host ?`` when the file says nothing.
    """
    try:
        text = Path(path).read_text(encoding="utf-8").strip()
    except OSError:
        text = ""
    return text or "pid ? on host ?"


__all__ = ["lock_holder", "open_lock_file", "record_holder", "remove_if_unheld", "try_lock", "unlock"]
