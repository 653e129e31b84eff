"""Locate the extension's ``Resources/`` folder (models registry, sample data, icons)."""

from __future__ import annotations

from pathlib import Path

from IPv2DenoiseLib.core.errors import UserError


def _candidates() -> list[Path]:
    here = Path(__file__).resolve().parents[1]  # .../IPv2DenoiseLib (this file is in core/)
    return [
        here / "Resources",  # wheel or sdist install: site-packages/IPv2DenoiseLib/Resources (pyproject.toml)
        here.parent.parent / "Resources",  # source checkout (and editable install): <repo>/Resources
        here.parent / "Resources",  # Slicer build: .../qt-scripted-modules/IPv2DenoiseLib
    ]


def resources_dir() -> Path:
    """The ``Resources/`` folder of a source checkout, a Slicer module or an installed wheel.

    Returns
    -------
    Path
        The first of ``<site-packages>/IPv2DenoiseLib/Resources``, ``<checkout>/Resources`` and
        ``<qt-scripted-modules>/Resources`` that holds a ``Models`` folder.

    Raises
    ------
    UserError
        None of them exists (e.g. the package was copied without its resources).
    """
    for path in _candidates():
        if (path / "Models").is_dir():
            return path
    tried = ", ".join(str(p) for p in _candidates())
    raise UserError(
        f"cannot find the IPv2Denoise Resources folder (tried {tried}); pass --weights FILE instead"
    )


def models_dir() -> Path:
    """``Resources/Models``: ``models.json`` and the ``.safetensors`` weights it lists."""
    return resources_dir() / "Models"
