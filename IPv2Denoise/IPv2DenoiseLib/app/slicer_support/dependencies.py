"""Python packages the denoiser subprocess needs, installed lazily (at Apply) and only with consent.

Rules (docs/slicer-module.md, installing dependencies):

- torch through the PyTorch extension (``PyTorchUtils``) when it is installed, which picks the
  CUDA build matching the driver; otherwise, where no NVIDIA GPU is present, ``pip install torch``
  of PyTorch's CPU build after the user agreed (the rule of ``scripts/setup.sh``, in
  :func:`torch_pip_args`), and with an NVIDIA GPU one line asking for the PyTorch extension;
- the others through Slicer's ``pip_ensure`` (``slicer.pydeps``; Slicer >= 5.12, prompts and offers a
  restart) or ``slicer.util.pip_install`` after a confirmation (Slicer 5.10);
- a declined or failed install (no network, a proxy) is one :class:`DependencyError` line that
  names the packages and what to do; never a raw ``CalledProcessError``;
- never on module load, never replacing Slicer's own SimpleITK, numpy, vtk, torch or requests;
- probing uses ``importlib.util.find_spec`` so torch is not imported into the Slicer process.

``REQUIREMENTS`` is the one list of what Slicer lacks (pyproject.toml pins the same versions).
Slicer-only (app layer, next to the bridge): imported by the Slicer module, never by the CLI.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import platform
import shutil
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import slicer

__all__ = [
    "NVIDIA_DRIVER_GPUS",
    "REQUIREMENTS",
    "SKIP_PACKAGES",
    "TORCH_CPU_INDEX_URL",
    "TORCH_REQUIREMENT",
    "DependencyError",
    "ensure_in_slicer",
    "ensure_torch",
    "install_failure",
    "missing_requirements",
    "nvidia_gpu_present",
    "torch_pip_args",
]

TORCH_REQUIREMENT = "torch>=2.1"
#: PyTorch's index of CPU-only wheels; the environment variable ``TORCH_CPU_INDEX_URL`` (as for
#: scripts/setup.sh) names a mirror of it instead.
TORCH_CPU_INDEX_URL = "https://download.pytorch.org/whl/cpu"
#: One entry per GPU while NVIDIA's kernel driver is loaded (Linux).
NVIDIA_DRIVER_GPUS = Path("/proc/driver/nvidia/gpus")
#: Import name -> pip requirement, for what Slicer does not bundle (numpy, SimpleITK, vtk are bundled).
REQUIREMENTS = {
    "safetensors": "safetensors>=0.4",
    "pydicom": "pydicom>=3.0",
    "skimage": "scikit-image>=0.22",
    "scipy": "scipy>=1.10",
    "psutil": "psutil>=5.9",
    "tqdm": "tqdm>=4.60",
    "pynetdicom": "pynetdicom>=3.0",
    "dicomweb_client": "dicomweb-client>=0.59",
}
#: Packages pip must never replace inside Slicer (Slicer ships its own builds).
SKIP_PACKAGES = ["SimpleITK", "numpy", "vtk", "torch", "requests"]
#: Where the offline install (a wheelhouse) is described.
OFFLINE_HELP = "docs/slicer-module.md, 'Behind a proxy, or offline'"
NEEDS_PYTORCH_EXTENSION = (
    "IPv2 Denoise needs PyTorch: this computer has an NVIDIA GPU, so install the PyTorch extension "
    "(Extensions Manager), which picks the CUDA build for its driver, restart Slicer and click Apply again"
)


class DependencyError(RuntimeError):
    """Packages are missing and were not installed (declined, or the install failed).

    Parameters
    ----------
    message : str
        One line for the status label: what is missing and what to do.
    restart_required : bool, optional
        Installed, but only a restart of Slicer makes the packages importable.
    """

    def __init__(self, message: str, *, restart_required: bool = False):
        super().__init__(message)
        self.restart_required = restart_required


def _installed(import_name: str) -> bool:
    try:
        return importlib.util.find_spec(import_name) is not None
    except (ImportError, ValueError):
        return False


def missing_requirements(*, include_torch: bool = True) -> list[str]:
    """pip requirement strings of the packages that cannot be imported here, or are too old (torch first).

    Parameters
    ----------
    include_torch : bool, optional
        Also check torch (default True).

    Returns
    -------
    list of str
        The requirements of the packages missing or older than asked, e.g. ``["torch>=2.1",
        "pydicom>=3.0"]``.
    """
    importlib.invalidate_caches()  # see what a pip run in another process just installed
    missing = [TORCH_REQUIREMENT] if include_torch and not _installed("torch") else []
    missing += [req for name, req in REQUIREMENTS.items() if not _installed(name) or not _new_enough(req)]
    return missing


def _new_enough(requirement: str) -> bool:
    """Whether the installed distribution of ``requirement`` satisfies its version range (Slicer 5.10
    bundles pydicom 2.4, whose ``save_as`` cannot write what the export needs: present is not enough)."""
    try:
        # lazy: PyPA ``packaging`` (shipped with pip in Slicer); this module loads before any install
        from packaging.requirements import Requirement
    except ImportError:  # cannot tell: take what is importable
        return True
    wanted = Requirement(requirement)
    try:
        installed = importlib.metadata.version(wanted.name)
    except importlib.metadata.PackageNotFoundError:
        return True  # importable without metadata (e.g. a build of Slicer's own): take it
    return wanted.specifier.contains(installed, prereleases=True)


def install_failure(packages: Sequence[str], error: BaseException) -> DependencyError:
    """The one line for an install that was declined or failed (no network, a proxy, pip's error).

    Parameters
    ----------
    packages : sequence of str
        The requirements that were to be installed.
    error : BaseException
        What the install raised: ``RuntimeError("User declined package installation")`` from
        ``pip_ensure``, ``subprocess.CalledProcessError`` from pip, or another error.

    Returns
    -------
    DependencyError
        Naming the packages; after a failure, saying to check the network or proxy, or to install
        offline from a wheelhouse.
    """
    if isinstance(error, RuntimeError) and "declined" in str(error).lower():
        return _declined(packages)
    return DependencyError(
        f"could not install {', '.join(packages)}: pip failed (no internet connection, or a proxy in the way?); "
        f"check the network or proxy and click Apply again, or install offline from a wheelhouse "
        f"({OFFLINE_HELP})"
    )


def _declined(packages: Sequence[str]) -> DependencyError:
    return DependencyError(
        f"IPv2 Denoise needs {', '.join(packages)} (installation declined; nothing was changed)"
    )


def _run_install(install: Callable[[], object], packages: Sequence[str]) -> object:
    """Run one install step and return what it returned; a refusal or a failed pip becomes one
    :class:`DependencyError` line."""
    try:
        return install()
    except DependencyError:
        raise
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        raise install_failure(packages, exc) from exc


def nvidia_gpu_present(
    *, which: Callable[[str], str | None] = shutil.which, driver_gpus: Path = NVIDIA_DRIVER_GPUS
) -> bool:
    """Whether an NVIDIA GPU is present: ``nvidia-smi -L`` lists one, or NVIDIA's kernel driver does.

    The rule ``scripts/setup.sh`` uses to choose between torch's CUDA and CPU builds.

    Parameters
    ----------
    which : callable(str) -> str or None, optional
        Finds a program on PATH (default ``shutil.which``).
    driver_gpus : Path, optional
        The driver's GPU list (default :data:`NVIDIA_DRIVER_GPUS`).

    Returns
    -------
    bool
        True when either probe finds a GPU.
    """
    smi = which("nvidia-smi")
    if smi:
        try:
            if subprocess.run([smi, "-L"], capture_output=True, timeout=20).returncode == 0:
                return True
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        return any(driver_gpus.iterdir())
    except OSError:
        return False


def torch_pip_args(
    *, nvidia_gpu: bool | None = None, system: str | None = None, cpu_index_url: str | None = None
) -> str:
    """What ``slicer.util.pip_install`` gets to install torch without the PyTorch extension.

    Without an NVIDIA GPU, PyTorch's CPU build (PyPI's Linux wheel is the multi-GB CUDA build):
    PyTorch's CPU index is added to pip's own index, never replacing it (a mirror in pip's
    configuration keeps working, as in scripts/setup.sh), and its ``X+cpu`` wheel ranks above
    PyPI's ``X`` of the same release. On macOS, PyPI's wheel (the CPU/MPS build). With an NVIDIA
    GPU the CUDA build must match the driver, which the PyTorch extension picks: no pip install.

    Parameters
    ----------
    nvidia_gpu : bool, optional
        Whether an NVIDIA GPU is present (default: :func:`nvidia_gpu_present`).
    system : str, optional
        ``platform.system()`` (default: this computer's).
    cpu_index_url : str, optional
        The CPU index (default: the ``TORCH_CPU_INDEX_URL`` environment variable, else
        :data:`TORCH_CPU_INDEX_URL`).

    Returns
    -------
    str
        pip arguments, e.g. ``"torch>=2.1" --extra-index-url https://download.pytorch.org/whl/cpu``.

    Raises
    ------
    DependencyError
        An NVIDIA GPU is present: one line asking for the PyTorch extension.
    """
    if nvidia_gpu is None:
        nvidia_gpu = nvidia_gpu_present()
    if nvidia_gpu:
        raise DependencyError(NEEDS_PYTORCH_EXTENSION)
    if (system or platform.system()) == "Darwin":
        return f'"{TORCH_REQUIREMENT}"'
    index = cpu_index_url or os.environ.get("TORCH_CPU_INDEX_URL") or TORCH_CPU_INDEX_URL
    return f'"{TORCH_REQUIREMENT}" --extra-index-url {index}'


def slicer_pip_ensure() -> Callable[..., Any] | None:
    """Slicer's own ``pip_ensure`` (prompts, installs, offers a restart), or None before Slicer 5.12.

    It is ``slicer.pydeps.pip_ensure`` in current Slicer (``slicer.packaging`` in some builds before
    it), which ``import slicer`` does not import; it takes ``packaging`` Requirement objects.
    """
    for name in ("slicer.pydeps", "slicer.packaging"):
        module = getattr(slicer, name.split(".")[1], None)
        if module is None:
            try:
                module = importlib.import_module(name)
            except ImportError:
                continue
        if hasattr(module, "pip_ensure"):
            return module.pip_ensure
    return None


def ensure_in_slicer(*, confirm: Callable[[str, str], bool] | None = None) -> None:
    """Inside Slicer: install what is missing, asking first. Call from Apply, never on load.

    Parameters
    ----------
    confirm : callable(text, details) -> bool, optional
        Asks the user; default ``slicer.util.confirmOkCancelDisplay``.

    Raises
    ------
    DependencyError
        The user declined or an install failed (one line; nothing was changed in the declined
        case); ``restart_required`` when pip succeeded but only a restart makes them importable.
    """
    confirm = confirm or (
        lambda text, details: slicer.util.confirmOkCancelDisplay(text, detailedText=details)
    )
    if not _installed("torch"):
        ensure_torch(confirm)
    others = missing_requirements(include_torch=False)
    if not others:
        return
    pip_ensure = slicer_pip_ensure()
    if pip_ensure is not None:  # Slicer >= 5.12
        # lazy: the PyPA ``packaging`` library, which Slicer ships with pip; only this path needs it
        from packaging.requirements import Requirement

        wanted = [Requirement(r) for r in others]  # pip_ensure takes Requirement objects, not strings
        _run_install(
            lambda: pip_ensure(wanted, skip_packages=SKIP_PACKAGES, requester="IPv2 Denoise"),
            others,
        )
    else:
        if not confirm("IPv2 Denoise needs a few Python packages. Install them now?", "\n".join(others)):
            raise _declined(others)
        _run_install(lambda: slicer.util.pip_install(" ".join(f'"{r}"' for r in others)), others)
    still = missing_requirements(include_torch=False)
    if still:
        raise DependencyError(
            f"installed but not yet importable: {', '.join(still)}; restart Slicer and click Apply again",
            restart_required=True,
        )


def ensure_torch(
    confirm: Callable[[str, str], bool], *, nvidia_gpu: bool | None = None, system: str | None = None
) -> None:
    """Install torch: through the PyTorch extension when present, else the CPU build with pip.

    Parameters
    ----------
    confirm : callable(text, details) -> bool
        Asks the user before a pip install.
    nvidia_gpu, system : optional
        As for :func:`torch_pip_args` (default: probed on this computer).

    Raises
    ------
    DependencyError
        Declined, an NVIDIA GPU without the PyTorch extension, or the install failed.
    """
    try:
        import PyTorchUtils  # lazy: the optional PyTorch extension (EXTENSION_DEPENDS "PyTorch")
    except ImportError:
        PyTorchUtils = None
    if PyTorchUtils is not None:
        logic = PyTorchUtils.PyTorchUtilsLogic()
        if not logic.torchInstalled():
            torch = _run_install(
                lambda: logic.installTorch(
                    askConfirmation=True, torchVersionRequirement=TORCH_REQUIREMENT[5:]
                ),
                [TORCH_REQUIREMENT],
            )
            if torch is None:
                raise DependencyError(
                    "PyTorch is required; install it in the PyTorch Utils module (declined)"
                )
        return
    args = torch_pip_args(nvidia_gpu=nvidia_gpu, system=system)
    if not confirm(
        "IPv2 Denoise needs PyTorch. Install its CPU build now with pip (a few hundred MB)? "
        "(For a GPU, install the PyTorch extension instead.)",
        args,
    ):
        raise DependencyError("PyTorch is required; install the PyTorch extension or accept the install")
    _run_install(lambda: slicer.util.pip_install(args), [TORCH_REQUIREMENT])
    importlib.invalidate_caches()
    if not _installed("torch"):
        raise DependencyError(
            "PyTorch was installed but cannot be imported yet; restart Slicer and click Apply again",
            restart_required=True,
        )
