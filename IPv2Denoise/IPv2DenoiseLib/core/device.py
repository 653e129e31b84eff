"""Compute device selection: the one device vocabulary (``--device``, the Slicer module, the
background job, the projector), and a one-line description for the "running on:" label.

torch is imported inside the functions, not at the top: the Slicer module checks device names
(through :mod:`IPv2DenoiseLib.app.slicer_support.process`) before torch is installed, and ``ipv2-denoise --help``
builds its parser from :data:`DEVICE_CHOICES` without loading torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from IPv2DenoiseLib.core.errors import UserError

if TYPE_CHECKING:
    import torch

#: Values accepted by ``--device`` (``cuda:N`` selects one GPU).
DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")
#: Device kinds ``auto`` may pick, in order of preference.
GPU_KINDS = ("cuda", "mps")


def check_device_name(name: str) -> str:
    """The lower-cased device name if it is in :data:`DEVICE_CHOICES` (``cuda:N`` allowed); no torch needed.

    Raises
    ------
    UserError
        Unknown name.
    """
    key = str(name).strip().lower()
    if key.split(":", 1)[0] not in DEVICE_CHOICES:
        raise UserError(f"--device {name!r} is not one of {', '.join(DEVICE_CHOICES)}")
    return key


def _mps_available() -> bool:
    import torch  # lazy: see the module docstring

    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(name: str | torch.device = "auto", *, kinds: tuple[str, ...] = GPU_KINDS) -> torch.device:
    """Turn a ``--device`` value into a :class:`torch.device`.

    Parameters
    ----------
    name : {"auto", "cpu", "cuda", "mps"} or torch.device
        ``auto`` picks CUDA, then Apple MPS, then CPU. ``cuda:1`` style indices are allowed.
        A :class:`torch.device` is returned unchanged.
    kinds
        The GPU kinds the caller can run on (the projector: CUDA only); ``auto`` picks among them
        and asking for another one is an error.

    Raises
    ------
    UserError
        Unknown name, or a GPU kind that this machine (or the caller) does not have.
    """
    import torch  # lazy: see the module docstring

    if isinstance(name, torch.device):
        return name
    key = check_device_name(name)
    kind = key.split(":", 1)[0]
    if kind in GPU_KINDS and kind not in kinds:
        raise UserError(f"--device {name!r} is not supported here; use {', '.join(('auto', 'cpu', *kinds))}")
    if kind == "auto":
        if "cuda" in kinds and torch.cuda.is_available():
            return torch.device("cuda")
        if "mps" in kinds and _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise UserError("CUDA requested but no CUDA GPU is available; use --device auto or cpu")
        try:
            device = torch.device(key)
        except RuntimeError:
            raise UserError(f"--device {name!r} is not a valid CUDA device; use cuda or cuda:N") from None
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(
                f"--device {name!r}: only {torch.cuda.device_count()} CUDA GPU(s) present; use --device cuda"
            )
        return device
    if kind == "mps":
        if not _mps_available():
            raise UserError("MPS requested but Apple MPS is not available; use --device auto or cpu")
        return torch.device("mps")
    return torch.device("cpu")


def describe_device(device: torch.device | str) -> str:
    """One line for the user, e.g. ``"CUDA NVIDIA H100 80GB HBM3, 79.1 GiB"`` or ``"CPU (2 threads)"``."""
    import torch  # lazy: see the module docstring

    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        return f"CUDA {props.name}, {props.total_memory / 2**30:.1f} GiB"
    if device.type == "mps":
        return "Apple MPS"
    return f"CPU ({torch.get_num_threads()} threads)"
