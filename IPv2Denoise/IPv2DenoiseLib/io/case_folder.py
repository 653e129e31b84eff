"""Case folders: one ULDCT/NDCT pair per folder, as ``make-dataset`` writes them and ``train`` /
``evaluate`` read them.

Layout (``DIR/case_000/``): ``uldct.*`` and ``ndct.*`` (required); the synthetic cases add
``uldct_clean.*`` and ``ndct_clean.*`` (noise-free anatomy, the evaluation truth),
``labels_ndct.*`` and ``labels_uldct.*`` (tissue ids) and ``case.json``. ``*`` is any format
:func:`~IPv2DenoiseLib.io.volumes.read_volume` reads from :data:`CASE_SUFFIXES`; ``make-dataset``
writes NRRD. A folder is a case folder when it holds a ``uldct.*`` file.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from IPv2DenoiseLib.core.errors import UserError
from IPv2DenoiseLib.core.volume import Volume
from IPv2DenoiseLib.io.volumes import read_volume

__all__ = [
    "CASE_FILES",
    "CASE_SUFFIXES",
    "case_file",
    "REQUIRED_FILES",
    "case_folders_in",
    "expand_case_folders",
    "is_case_folder",
    "read_case",
]

#: Every volume a synthetic case folder holds (file stem = key).
CASE_FILES = ("ndct", "uldct", "ndct_clean", "uldct_clean", "labels_ndct", "labels_uldct")
#: The volumes a training or evaluation case needs.
REQUIRED_FILES = ("uldct", "ndct")
#: Accepted suffixes, in the order they are looked for.
CASE_SUFFIXES = (".nrrd", ".nii.gz", ".nii", ".mha")


def is_case_folder(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds a ``uldct.*`` file.

    Parameters
    ----------
    folder : path-like
        The folder to look in.

    Returns
    -------
    bool
        True for a case folder.
    """
    return any(Path(folder).glob("uldct.*"))


def case_folders_in(folder: str | os.PathLike) -> list[Path]:
    """The case folders directly inside ``folder``, sorted by name.

    Parameters
    ----------
    folder : path-like
        A dataset folder (an existing folder).

    Returns
    -------
    list of pathlib.Path
        Its sub-folders that are case folders (not recursive).
    """
    return sorted(c for c in Path(folder).iterdir() if c.is_dir() and is_case_folder(c))


def expand_case_folders(paths: Iterable[str | os.PathLike]) -> list[str]:
    """Case folders from a mix of case folders and dataset folders (folders of case folders).

    Parameters
    ----------
    paths : iterable of path-like
        Case folders and dataset folders, as a user gave them.

    Returns
    -------
    list of str
        The case folders, in the order given (a dataset's sorted by name).

    Raises
    ------
    UserError
        A path is not a folder, or a dataset folder holds no case folder.
    """
    cases: list[str] = []
    for p in map(Path, paths):
        if not p.is_dir():
            raise UserError(f"training data folder not found: {p}")
        if is_case_folder(p):
            cases.append(str(p))
        else:
            found = [str(c) for c in case_folders_in(p)]
            if not found:
                raise UserError(f"{p}: no case folders with uldct.nrrd/ndct.nrrd inside")
            cases.extend(found)
    return cases


def case_file(folder: str | os.PathLike, key: str) -> Path | None:
    """The file ``key`` (``uldct``, ``ndct``, ``ndct_clean`` …) of a case folder in any of
    :data:`CASE_SUFFIXES`, or None.

    Parameters
    ----------
    folder : path-like
        The case folder.
    key : str
        The file stem, one of :data:`CASE_FILES`.

    Returns
    -------
    pathlib.Path or None
        The first existing file in suffix order, or None.
    """
    folder = Path(folder)
    for suffix in CASE_SUFFIXES:
        if (folder / f"{key}{suffix}").exists():
            return folder / f"{key}{suffix}"
    return None


def read_case(folder: str | os.PathLike) -> dict[str, Volume]:
    """``uldct``, ``ndct`` and, when present, ``uldct_clean`` of one case folder.

    Parameters
    ----------
    folder : path-like
        The case folder.

    Returns
    -------
    dict of str to Volume
        The volumes by key, read with :func:`~IPv2DenoiseLib.io.volumes.read_volume` (HU checks
        included).

    Raises
    ------
    UserError
        ``uldct`` or ``ndct`` is missing.
    """
    folder = Path(folder)
    found: dict[str, Volume] = {}
    for key in (*REQUIRED_FILES, "uldct_clean"):
        path = case_file(folder, key)
        if path is not None:
            found[key] = read_volume(path)
    missing = [k for k in REQUIRED_FILES if k not in found]
    if missing:
        raise UserError(
            f"{folder}: training case lacks {', '.join(missing)} (expected uldct.nrrd and ndct.nrrd)"
        )
    return found
