"""Locate the extension's ``Resources/`` folder (models registry, sample data, icons)."""

from __future__ import annotations

from pathlib import Path

from IPv2DenoiseLib.core.errors import UserError


def _candidates() -> list[Path]:
    here = Path(__file__).resolve().parents[1]  # .../IPv2DenoiseLib (this file is in core/)
    return [
        here.parent.parent / "Resources",  # source checkout: <repo>/IPv2Denoise/IPv2DenoiseLib
        here.parent / "Resources",  # Slicer build: .../qt-scripted-modules/IPv2DenoiseLib
    ]


def resources_dir() -> Path:
    """The ``Resources/`` folder of a source checkout or of an installed Slicer module.

    Raises
    ------
    UserError
        Neither location exists (e.g. a wheel install without resources).
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
