"""Write files so that a reader never sees a half-written one, and check output paths up front.

Outputs are written under a *staging folder* beside the destination,
``<folder>/.ipv2-denoise-tmp/<host>-<pid>-<random>/<name>``, and renamed into place at the end
(same file system, so the rename is atomic). A crash or ``kill -9`` therefore leaves nothing with
the output's name, only a hidden, clearly named folder that holds the writer's process id; the
next write into the same folder removes the leftovers of writers that are no longer running.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from glob import escape as glob_escape
from pathlib import Path

from IPv2DenoiseLib.core.errors import UserError
from IPv2DenoiseLib.core.paths import make_in_shared_folder

try:  # POSIX; on Windows the claim falls back to the no-clobber rename alone
    from IPv2DenoiseLib.core.locks import (
        lock_holder,
        open_lock_file,
        record_holder,
        remove_if_unheld,
        try_lock,
    )
except ImportError:  # pragma: no cover - Windows (no fcntl)
    open_lock_file = remove_if_unheld = None

#: Name of the hidden staging folder created beside outputs while they are written.
STAGING_DIR = ".ipv2-denoise-tmp"
#: Name suffix of a claim's lock file in the staging folder (:func:`claim_output`).
LOCK_SUFFIX = ".lock"
#: Seconds a claim that does not wait still retries before it refuses: a staging clean-up
#: (``clean_stale_staging(locks=True)``) holds an unheld lock file for an instant while it tests it.
CLAIM_GRACE_S = 0.5
#: Seconds between two tries of a claim that waits for its holder (``claim_output(wait=True)``).
CLAIM_POLL_S = 0.1


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _host() -> str:
    return socket.gethostname().replace("-", "_") or "host"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def clean_stale_staging(folder: str | os.PathLike, *, locks: bool = False) -> list[Path]:
    """Remove what crashed writers left in ``folder``'s staging folder; returns what was removed.

    Only entries made on this host by a process that is no longer running are removed, so a
    concurrent writer (another process, or another machine on a shared disk) is never disturbed.
    With ``locks``, claim lock files (:func:`claim_output`) that no process holds are removed
    too: testing one holds it for an instant, so only a caller whose claimers wait (a batch run's
    end) asks for it; a plain claim retries for :data:`CLAIM_GRACE_S` besides.
    """
    staging = Path(folder) / STAGING_DIR
    removed: list[Path] = []
    if not staging.is_dir():
        return removed
    host = _host()
    try:
        entries = list(staging.iterdir())
    except FileNotFoundError:  # removed by a writer that finished meanwhile
        return removed
    for entry in entries:
        if entry.name.endswith(LOCK_SUFFIX):
            if (
                locks and remove_if_unheld is not None and remove_if_unheld(entry)
            ):  # a claim whose holder died before it removed its file
                removed.append(entry)
            continue
        parts = entry.name.split("-")
        if len(parts) < 3 or parts[0] != host or not parts[1].isdigit():
            continue
        if int(parts[1]) != os.getpid() and not _pid_alive(int(parts[1])):
            if entry.is_dir():
                _restore_replaced(entry)
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
            removed.append(entry)
    try:
        staging.rmdir()  # only when empty
    except OSError:
        pass
    return removed


def clean_stale_staging_tree(root: str | os.PathLike) -> list[Path]:
    """:func:`clean_stale_staging` in every folder under ``root`` that has a staging folder.

    A batch run calls it at its end: a worker killed mid-write (``kill -9``, out of memory) leaves
    its private staging entry in whichever folder it was writing, and the retry may never write
    in that folder again. A worker killed after it recorded a case but before it removed the case's
    lock file leaves that file, and the retry, which finds the record, never claims the case: such
    unheld lock files are removed too. Entries of live writers are kept, as in
    :func:`clean_stale_staging`.
    """
    removed: list[Path] = []
    for staging in sorted(Path(root).rglob(STAGING_DIR)):
        if staging.is_dir() and not staging.is_symlink():
            removed += clean_stale_staging(staging.parent, locks=True)
    return removed


def remove_stale_partials(path: str | os.PathLike) -> list[Path]:
    """Delete what a killed writer of ``path`` left: its staging entries, whatever their pid or host.

    Only call this when no other process is writing ``path`` (e.g. a batch run that owns its
    output tree). Also removes the ``.<name>.*.partial*`` files of versions before the staging
    folder. Returns what was removed.
    """
    path = Path(path)
    removed: list[Path] = []
    if not path.parent.is_dir():
        return removed
    for stale in path.parent.glob(f".{glob_escape(path.name)}.*.partial*"):
        if stale.is_file():
            stale.unlink(missing_ok=True)
            removed.append(stale)
    staging = path.parent / STAGING_DIR
    try:
        entries = list(staging.iterdir())
    except (FileNotFoundError, NotADirectoryError):  # none, or a finishing writer just removed it
        return removed
    for entry in entries:
        if entry.is_dir():
            _restore_replaced(entry, path.name)
        if (entry / path.name).exists():
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    try:
        staging.rmdir()
    except OSError:
        pass
    return removed


def _make_private_entry(staging: Path) -> Path:
    """Create ``staging`` and a fresh private folder in it, robust to concurrent clean-ups
    (another writer in the same folder removes ``staging`` when it finishes and finds it empty)."""
    try:
        return make_in_shared_folder(
            staging, lambda: Path(tempfile.mkdtemp(prefix=f"{_host()}-{os.getpid()}-", dir=staging))
        )
    except NotADirectoryError:
        raise UserError(f"{staging} is a file; remove it to write into {staging.parent}") from None
    except TimeoutError:
        raise UserError(
            f"cannot create a staging folder in {staging.parent} (it keeps disappearing)"
        ) from None


@contextmanager
def _staging_entry(destination: Path) -> Iterator[Path]:
    """A fresh private folder under ``destination.parent``'s staging folder, removed afterwards."""
    clean_stale_staging(destination.parent)
    staging = destination.parent / STAGING_DIR
    entry = _make_private_entry(staging)
    try:
        yield entry
    finally:
        shutil.rmtree(entry, ignore_errors=True)
        try:
            staging.rmdir()
        except OSError:
            pass


def _written_meanwhile(path: Path) -> UserError:
    return UserError(
        f"{path} was written by another run while this one worked; the first writer wins, "
        "this result was discarded (pass --overwrite to replace it)"
    )


@contextmanager
def atomic_path(path: str | os.PathLike, *, suffix: str = "", replace: bool = True) -> Iterator[str]:
    """Yield a temporary file name for ``path``; move it to ``path`` when the block succeeds.

    The temporary file has ``path``'s own name (writers dispatch on the extension) inside the
    staging folder (see the module docstring). On any error it is removed and ``path`` is left as
    it was. The file gets the usual permissions (0666 minus the umask). With ``replace=False`` an
    existing ``path`` is never replaced, not even one another process created meanwhile (the
    move is a hard link, which fails atomically when the name exists): :class:`UserError`.
    ``suffix`` is accepted for compatibility; the name already carries the extension.
    """
    path = Path(path)
    with _staging_entry(path) as entry:
        tmp = entry / path.name
        yield str(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        if replace:
            os.replace(tmp, path)
            return
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise _written_meanwhile(path) from None


#: Name suffix of a folder an ``atomic_dir(replace=True)`` moved aside while it renames the new one in.
REPLACED_SUFFIX = ".replaced"


def _exchange(new: Path, old: Path) -> bool:
    """Swap two folders in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    system or file system cannot, and the caller falls back to two renames.

    Hand-written through ``ctypes``: the standard library has no ``renameat2`` and no well-kept
    package offers it. Without it, a ``kill -9`` between moving the old output aside and moving
    the new one in would leave neither under the output's name.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    done = renameat2(at_fdcwd, os.fsencode(new), at_fdcwd, os.fsencode(old), rename_exchange)
    return done == 0


def _restore_replaced(entry: Path, name: str | None = None) -> None:
    """Put back an output that a killed ``atomic_dir(replace=True)`` had moved aside into its
    staging ``entry`` and not yet replaced: its name is free, and the entry holds the only copy.
    ``name``: only that output's (an entry of a live writer of another output is not touched)."""
    folder = entry.parent.parent
    pattern = "*" if name is None else glob_escape(name)
    try:
        aside_folders = list(entry.glob(pattern + REPLACED_SUFFIX))
    except OSError:  # removed meanwhile by the writer that owns it, or by another clean-up
        return
    for aside in aside_folders:
        final = folder / aside.name[: -len(REPLACED_SUFFIX)]
        if aside.is_dir() and not final.exists() and not final.is_symlink():
            try:
                os.rename(aside, final)
            except OSError:
                pass


def save_figure(figure, path: str | os.PathLike, *, dpi: int = 110) -> Path:
    """Save a matplotlib figure under ``path`` through :func:`atomic_path` (format from its suffix).

    ``savefig`` writes straight to its name: a kill while it writes left a truncated image there,
    and a rerun truncated the previous one while drawing the next.

    Parameters
    ----------
    figure : matplotlib.figure.Figure
        The figure to save.
    path : path-like
        The image file; its folder is made if missing.
    dpi : int
        Resolution.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=dpi, format=path.suffix.lstrip(".").lower() or "png")
    return path


@contextmanager
def atomic_dir(path: str | os.PathLike, *, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary folder to fill; it becomes ``path`` when the block succeeds.

    ``path`` must be absent or empty, unless ``replace`` is True: then an existing folder is
    moved aside into the staging folder, the new one renamed into place, and the old one removed
    (callers check first that it is theirs to replace). Another writer that filled ``path``
    meanwhile is never overwritten without ``replace``: :class:`UserError`. The folder gets the
    usual permissions (0777 minus the umask), not ``mkdtemp``'s 0700.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _staging_entry(path) as entry:
        tmp = entry / path.name
        tmp.mkdir()
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        try:
            if replace and path.is_dir() and any(path.iterdir()):
                if _exchange(tmp, path):  # one step: the old folder is now ``tmp``, removed with the entry
                    return
                # two steps (no RENAME_EXCHANGE here): a kill between them leaves the old folder in
                # the entry as ``<name>.replaced``, which the next clean-up puts back (``_restore``)
                os.replace(path, entry / f"{path.name}{REPLACED_SUFFIX}")
            elif path.exists():
                path.rmdir()  # callers check it is empty first; another writer may have filled it
            os.replace(tmp, path)
        except OSError as exc:
            if path.exists():
                raise _written_meanwhile(path) from None
            raise UserError(f"cannot move the finished output to {path} ({exc.strerror or exc})") from None


@contextmanager
def claim_output(path: str | os.PathLike, *, what: str = "OUT", wait: bool = False) -> Iterator[None]:
    """Hold an exclusive claim on writing ``path`` for the block: a second writer fails at once.

    Two runs writing one output would otherwise both work and one result would be lost. The claim
    is an ``flock`` on ``<folder>/.ipv2-denoise-tmp/<name>.lock``: the kernel releases it when
    the holder dies (``kill -9`` included), so a crashed run never blocks the next one. The lock
    file names the holder (host and pid) for the error message. Call it after the output checks
    and before the work; the first writer wins, the second gets :class:`UserError` (after
    :data:`CLAIM_GRACE_S` of retries, which a staging clean-up testing the lock file may need).

    With ``wait`` the second writer waits until the holder releases the claim (or dies) instead,
    then holds it: for a retried batch case whose first attempt may still be running, which then
    finds the first attempt's result rather than writing it a second time.
    """
    path = Path(path)
    staging = path.parent / STAGING_DIR
    if open_lock_file is None:  # pragma: no cover - Windows: the no-clobber rename still protects the output
        yield
        return
    lock = staging / f"{path.name}{LOCK_SUFFIX}"
    grace_until = time.monotonic() + CLAIM_GRACE_S
    while True:
        fd = open_lock_file(lock)
        if not try_lock(fd):
            os.close(fd)
            if wait or time.monotonic() < grace_until:
                time.sleep(CLAIM_POLL_S)
                continue
            raise UserError(
                f"{what} {path} is being written by another run ({lock_holder(lock)}); wait for it to "
                "finish or choose another output"
            )
        try:  # the holder before us may have removed the file after we opened it: retry on the new one
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        record_holder(fd)
        yield
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)
        try:
            staging.rmdir()
        except OSError:
            pass


def _probe_writable(folder: Path, what: str) -> None:
    """Create and remove a file in ``folder``: ``os.access`` says yes to root on read-only disks."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".ipv2-denoise-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UserError(f"{what}: cannot write into {folder} ({exc.strerror or exc})") from None


def resolve_path(path: Path, what: str) -> Path:
    """``path.resolve()``, with a loop of symbolic links as :class:`UserError` (pathlib raises RuntimeError)."""
    try:
        return path.resolve()
    except (RuntimeError, OSError) as exc:
        raise UserError(
            f"{what} {path}: cannot follow it ({exc}); a symbolic link points to itself"
        ) from None


def check_output_path(
    path: str | os.PathLike,
    *,
    inputs: Iterable[str | os.PathLike] = (),
    overwrite: bool = False,
    folder: bool = False,
    what: str = "OUT",
    overwrite_hint: str = "--overwrite",
) -> Path:
    """Check before any work that ``path`` can be written; returns it as a Path.

    Refused, each with one line: ``path`` is (or lies inside) one of ``inputs``, or would hold
    one of them (the input is never modified); ``path`` exists and ``overwrite`` is False (for
    ``folder=True``: exists and is not an empty folder, or is not a folder at all); its parent folder is missing, not a
    folder, or not writable (checked by creating a file there).
    """
    out = Path(path)
    resolved = resolve_path(out, what)
    _refuse_overlap_with_inputs(out, resolved, inputs, folder=folder, what=what)
    if folder:
        _refuse_existing_folder(out, overwrite=overwrite, what=what, overwrite_hint=overwrite_hint)
    else:
        _refuse_existing_file(out, overwrite=overwrite, what=what, overwrite_hint=overwrite_hint)
    _probe_writable(_existing_parent(out, resolved, folder=folder, what=what), what)
    return out


def _refuse_overlap_with_inputs(
    out: Path, resolved: Path, inputs: Iterable[str | os.PathLike], *, folder: bool, what: str
) -> None:
    """Refuse an output that is an input, lies inside an input folder, or (as a folder) holds an input."""
    for source in inputs:
        src = resolve_path(Path(source), "IN")
        if resolved == src or (src.is_dir() and resolved.is_relative_to(src)):
            raise UserError(
                f"{what} {out} is the input or lies inside it; the input is never modified, "
                "choose an output outside it"
            )
        if src.is_relative_to(resolved) and (folder or out.is_dir()):
            raise UserError(f"{what} {out} contains the input {source}; choose another output")


def _refuse_existing_folder(out: Path, *, overwrite: bool, what: str, overwrite_hint: str) -> None:
    """An output folder may exist only as a folder, and only empty unless ``overwrite``."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{what} {out} already exists and is not a folder; choose a new folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(
            f"{what} {out} already exists and is not an empty folder; choose a new folder "
            f"(or pass {overwrite_hint} to replace it)"
        )


def _refuse_existing_file(out: Path, *, overwrite: bool, what: str, overwrite_hint: str) -> None:
    """An output file may not be a folder, nor exist unless ``overwrite``."""
    if out.is_dir():
        raise UserError(f"{what} {out} is a folder; give a file name such as {out / 'denoised.nrrd'}")
    if out.exists() and not overwrite:
        raise UserError(f"{what} {out} already exists; pass {overwrite_hint} to replace it")


def _existing_parent(out: Path, resolved: Path, *, folder: bool, what: str) -> Path:
    """The folder the output will be created in; for an output folder (created with its parents)
    the nearest existing ancestor. Refused when missing or not a folder."""
    parent = resolved.parent
    if folder:
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
    if not parent.exists():
        raise UserError(f"{what}: folder {out.parent} does not exist; create it first")
    if not parent.is_dir():
        raise UserError(f"{what}: {out.parent} is not a folder")
    return parent


def make_output_folder(path: str | os.PathLike, *, what: str = "--out") -> Path:
    """Create ``path`` (and parents) for outputs and check it is writable, before any work."""
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{what}: cannot create folder {out} ({exc.strerror or exc})") from None
    if not out.is_dir():
        raise UserError(f"{what}: {out} exists and is not a folder")
    _probe_writable(out, what)
    return out


__all__ = [
    "STAGING_DIR",
    "atomic_dir",
    "atomic_path",
    "check_output_path",
    "claim_output",
    "clean_stale_staging",
    "clean_stale_staging_tree",
    "make_output_folder",
    "remove_stale_partials",
    "resolve_path",
]
