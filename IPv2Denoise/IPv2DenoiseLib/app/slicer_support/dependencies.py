"""Python packages the denoiser subprocess needs, installed lazily (at Apply) and only with consent.

Rules (docs/slicer-module.md, installing dependencies):

- torch through the PyTorch extension (``PyTorchUtils``) when it is installed, which picks the
  CUDA build matching the driver; otherwise ``pip install torch`` after the user agreed;
- the others through ``slicer.packaging.pip_ensure`` (Slicer >= 5.12, prompts and offers a
  restart) or ``slicer.util.pip_install`` after a confirmation (Slicer 5.10);
- never on module load, never replacing Slicer's own SimpleITK, numpy, vtk, torch or requests;
- probing uses ``importlib.util.find_spec`` so torch is not imported into the Slicer process.

Slicer-only (app layer, next to the bridge): imported by the Slicer module, never by the CLI.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

import slicer

from IPv2DenoiseLib.core.resources import resources_dir

__all__ = [
    "REQUIREMENTS",
    "SKIP_PACKAGES",
    "TORCH_REQUIREMENT",
    "DependencyError",
    "ensure_in_slicer",
    "missing_requirements",
]

TORCH_REQUIREMENT = "torch>=2.1"
#: Import name -> pip requirement, for what Slicer does not bundle (numpy, SimpleITK, vtk are bundled).
REQUIREMENTS = {
    "safetensors": "safetensors>=0.4",
    "pydicom": "pydicom>=2.4",
    "skimage": "scikit-image>=0.22",
    "scipy": "scipy>=1.10",
    "psutil": "psutil>=5.9",
    "tqdm": "tqdm>=4.60",
    "pynetdicom": "pynetdicom>=2.1",
    "dicomweb_client": "dicomweb-client>=0.59",
}
#: Packages pip must never replace inside Slicer (Slicer ships its own builds).
SKIP_PACKAGES = ["SimpleITK", "numpy", "vtk", "torch", "requests"]


class DependencyError(RuntimeError):
    """Packages are missing and were not installed (declined, or the install failed)."""

    def __init__(self, message: str, *, restart_required: bool = False):
        super().__init__(message)
        self.restart_required = restart_required


def _installed(import_name: str) -> bool:
    try:
        return importlib.util.find_spec(import_name) is not None
    except (ImportError, ValueError):
        return False


def missing_requirements(*, include_torch: bool = True) -> list[str]:
    """pip requirement strings of the packages that cannot be imported here (torch first)."""
    missing = [TORCH_REQUIREMENT] if include_torch and not _installed("torch") else []
    missing += [req for name, req in REQUIREMENTS.items() if not _installed(name)]
    return missing


def requirements_file() -> Path:
    """``Resources/requirements.txt`` (what ``slicer.packaging.load_requirements`` reads)."""
    return resources_dir() / "requirements.txt"


def ensure_in_slicer(*, confirm: Callable[[str, str], bool] | None = None) -> None:
    """Inside Slicer: install what is missing, asking first. Call from Apply, never on load.

    Parameters
    ----------
    confirm : callable(text, details) -> bool, optional
        Asks the user; default ``slicer.util.confirmOkCancelDisplay``.

    Raises
    ------
    DependencyError
        The user declined or an install failed; nothing was changed in the declined case.
    """
    confirm = confirm or (
        lambda text, details: slicer.util.confirmOkCancelDisplay(text, detailedText=details)
    )
    if not _installed("torch"):
        _ensure_torch(slicer, confirm)
    others = missing_requirements(include_torch=False)
    if not others:
        return
    packaging = getattr(slicer, "packaging", None)
    if packaging is not None and hasattr(packaging, "pip_ensure"):  # Slicer >= 5.12
        packaging.pip_ensure(others, skip_packages=SKIP_PACKAGES, requester="IPv2 Denoise")
    else:
        if not confirm("IPv2 Denoise needs a few Python packages. Install them now?", "\n".join(others)):
            raise DependencyError("IPv2 Denoise needs: " + ", ".join(others) + " (installation declined)")
        slicer.util.pip_install(" ".join(f'"{r}"' for r in others))
    still = missing_requirements(include_torch=False)
    if still:
        raise DependencyError(
            "could not install: " + ", ".join(still) + "; restart Slicer and try again", restart_required=True
        )


def _ensure_torch(slicer, confirm: Callable[[str, str], bool]) -> None:
    try:
        import PyTorchUtils  # lazy: the optional PyTorch extension (EXTENSION_DEPENDS "PyTorch")
    except ImportError:
        PyTorchUtils = None
    if PyTorchUtils is not None:
        logic = PyTorchUtils.PyTorchUtilsLogic()
        if not logic.torchInstalled():
            torch = logic.installTorch(askConfirmation=True, torchVersionRequirement=TORCH_REQUIREMENT[5:])
            if torch is None:
                raise DependencyError(
                    "PyTorch is required; install it in the PyTorch Utils module (declined)"
                )
        return
    if not confirm(
        "IPv2 Denoise needs PyTorch (about 1-3 GB). Install it now with pip? "
        "(Installing the PyTorch extension first picks the right GPU build.)",
        TORCH_REQUIREMENT,
    ):
        raise DependencyError("PyTorch is required; install the PyTorch extension or accept the install")
    slicer.util.pip_install(f'"{TORCH_REQUIREMENT}"')
    if not _installed("torch"):
        raise DependencyError("PyTorch installation failed; see the Python console", restart_required=True)
