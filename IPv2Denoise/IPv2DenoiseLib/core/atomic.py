"""Write files so that a reader never sees a half-written one (DESIGN.md §3)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
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
