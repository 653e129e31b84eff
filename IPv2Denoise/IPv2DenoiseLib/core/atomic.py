"""Write files so that a reader never sees a half-written one (DESIGN.md §3)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from glob import escape as glob_escape
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | os.PathLike, *, suffix: str = "") -> Iterator[str]:
    """Yield a temporary file name beside ``path``; rename it to ``path`` when the block succeeds.

    ``suffix`` keeps the extension writers dispatch on (e.g. ``.nii.gz``). On any error the
    temporary file is removed and ``path`` is left as it was. The file gets the usual permissions
    (0666 minus the umask), not mkstemp's 0600.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".partial{suffix}", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_stale_partials(path: str | os.PathLike) -> list[Path]:
    """Delete temporary files that an :func:`atomic_path` for ``path`` left behind when its process was killed.

    Only call this when no other process is writing ``path``. Returns the removed files.
    """
    path = Path(path)
    if not path.parent.is_dir():
        return []
    removed = []
    for stale in path.parent.glob(f".{glob_escape(path.name)}.*.partial*"):
        if stale.is_file():
            stale.unlink(missing_ok=True)
            removed.append(stale)
    return removed
